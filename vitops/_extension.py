"""Loads the compiled library vitops._C, and defines from Python whatever it did not provide.

The schemas live in csrc/vitops.cpp. When the library is missing (or was built before an op existed), the same
schemas are defined here so that torch.ops.vitops.<name> exists whatever was built; tests check that the two
copies agree whenever the library is loaded.
"""
import torch

# op name -> schema, exactly as in csrc/vitops.cpp.
SCHEMAS = {
    "drop_path_add": (
        "drop_path_add(Tensor? residual, Tensor branch, Tensor? gamma, Tensor? sample_scale) -> Tensor"
    ),
    "drop_path_add_backward": (
        "drop_path_add_backward(Tensor grad_out, Tensor? branch, Tensor? gamma, Tensor? sample_scale, "
        "ScalarType branch_dtype, bool need_branch_grad) -> (Tensor, Tensor)"
    ),
    "lamb_step": (
        "lamb_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor? clip_coef, float lr, float beta1, float beta2, float beta3, float bias_correction1, "
        "float bias_correction2, float eps, float weight_decay, float decay_scale, bool decoupled_decay, "
        "bool adapt, bool trust_clip) -> ()"
    ),
    "lamb_clip_coef": "lamb_clip_coef(Tensor[] grads, float max_grad_norm) -> Tensor",
    "adamp_step": (
        "adamp_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "float[] bias_correction1, float[] bias_correction2, float lr, float beta1, float beta2, float eps, "
        "float weight_decay, float delta, float wd_ratio, bool nesterov) -> ()"
    ),
    "attention": "attention(Tensor q, Tensor k, Tensor v, float? scale) -> (Tensor, Tensor)",
    "attention_backward": (
        "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float? scale) "
        "-> (Tensor, Tensor, Tensor)"
    ),
    "attention_packed": "attention_packed(Tensor qkv, int num_heads, float? scale) -> (Tensor, Tensor)",
    "attention_packed_backward": (
        "attention_packed_backward(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads, "
        "float? scale) -> Tensor"
    ),
    "fuse_conv_bn": (
        "fuse_conv_bn(Tensor weight, Tensor? bias, Tensor running_mean, Tensor running_var, Tensor? bn_weight, "
        "Tensor? bn_bias, float eps) -> (Tensor, Tensor)"
    ),
}

try:
    from vitops import _C  # noqa: F401  (loading it runs the static op registrations)

    LOAD_ERROR = None
except ImportError as error:
    _C = None
    if "No module named" in str(error):
        LOAD_ERROR = "not built (install with `pip install --no-build-isolation .`)"
    else:
        LOAD_ERROR = f"failed to load: {error}"

DISPATCH_KEYS = ("CPU", "CUDA")

# Read before any Python fallback registers itself for the same keys.
COMPILED_KERNELS = {
    op: frozenset(
        key
        for key in DISPATCH_KEYS
        if _C is not None
        and hasattr(torch.ops.vitops, op)
        and torch._C._dispatch_has_kernel_for_dispatch_key(f"vitops::{op}", key)
    )
    for op in SCHEMAS
}

_fallback_library = torch.library.Library("vitops", "FRAGMENT")
for _name, _schema in SCHEMAS.items():
    if not hasattr(torch.ops.vitops, _name):
        _fallback_library.define(_schema)


def has_compiled_kernel(op: str, dispatch_key: str) -> bool:
    """Whether vitops._C registered a kernel of `op` for `dispatch_key` ("CPU" or "CUDA")."""
    return dispatch_key in COMPILED_KERNELS.get(op, ())
