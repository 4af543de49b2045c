"""The fused optimizer-step ops: vitops::lamb_step, vitops::adamp_step and LAMB's global clipping coefficient
vitops::lamb_clip_coef (schemas in csrc/vitops.cpp), their fake kernels, their Python fallbacks where vitops._C
brought no kernel, and the Triton variants vitops::lamb_step_triton / vitops::adamp_step_triton.

Both ops update params, exp_avgs and exp_avg_sqs in place and return nothing. The kernels take float32, float16
and bfloat16 params (grads of the param's dtype) with float32 moments, all contiguous; the optimizers send any
other param down the reference path."""
from __future__ import annotations

import torch

from vitops import _backend, _extension
from vitops.optim import reference

try:
    from vitops.ops.triton import optim as _triton

    _TRITON_ERROR = None
except ImportError as error:  # triton missing or broken: the other backends still work
    _triton = None
    _TRITON_ERROR = f"Triton kernels failed to import: {error}"

OPS = ("lamb_step", "adamp_step")
for _op in OPS:
    # On CUDA the Triton kernels run by default; the compiled multi-tensor CUDA kernels, built but not yet run on
    # a GPU, only when forced with use_backend("cuda").
    _backend.register_op(
        _op, has_triton=True, triton_blocker=_TRITON_ERROR, preference={"cuda": ("triton", "cuda", "torch")}
    )

_backend.register_op(
    "lamb_clip_coef",
    has_triton=False,
    cuda_blocker="none by design: the reference's torch._foreach_norm already is a multi-tensor CUDA kernel",
)

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _lamb_fake(params, grads, exp_avgs, exp_avg_sqs, clip_coef, lr, beta1, beta2, beta3, bias_correction1,
               bias_correction2, eps, weight_decay, decay_scale, decoupled_decay, adapt, trust_clip):  # fmt: skip
    return None


def _adamp_fake(params, grads, exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2, lr, beta1, beta2, eps,
                weight_decay, delta, wd_ratio, nesterov):  # fmt: skip
    return None


def _lamb_reference(*args):
    reference.lamb_step(*args)


def _adamp_reference(*args):
    reference.adamp_step(*args)


for _key in _extension.DISPATCH_KEYS:
    for _op, _ref in (("lamb_step", _lamb_reference), ("adamp_step", _adamp_reference)):
        if not _extension.has_compiled_kernel(_op, _key):
            use_triton = _key == "CUDA" and _triton is not None
            impl = getattr(_triton, f"{_op}_triton") if use_triton else _ref
            torch.library.impl(f"vitops::{_op}", _key)(impl)

def _check_clip_args(grads, max_grad_norm) -> None:
    if not grads:
        raise ValueError("vitops.lamb_clip_coef: grads is empty")
    if not max_grad_norm > 0:
        raise ValueError(f"vitops.lamb_clip_coef: max_grad_norm must be > 0, got {max_grad_norm}")


def _lamb_clip_coef_reference(grads, max_grad_norm):
    _check_clip_args(grads, max_grad_norm)
    return reference.lamb_clip_coef(grads, max_grad_norm)


def _lamb_clip_coef_fake(grads, max_grad_norm):
    _check_clip_args(grads, max_grad_norm)
    return grads[0].new_empty((), dtype=torch.float32)


for _key in _extension.DISPATCH_KEYS:
    if not _extension.has_compiled_kernel("lamb_clip_coef", _key):
        torch.library.impl("vitops::lamb_clip_coef", _key)(_lamb_clip_coef_reference)
torch.library.register_fake("vitops::lamb_clip_coef")(_lamb_clip_coef_fake)


torch.library.register_fake("vitops::lamb_step")(_lamb_fake)
torch.library.register_fake("vitops::adamp_step")(_adamp_fake)


def kernel_ok(p: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether the fused kernels take this param and grad (else the reference path runs)."""
    return (
        p.dtype in KERNEL_DTYPES
        and grad.dtype == p.dtype
        and p.is_contiguous()
        and grad.is_contiguous()
        and p.device.type in _backend.DEVICE_TYPES
    )


def lamb_step(backend: str, *args) -> None:
    if backend == "torch":
        reference.lamb_step(*args)
    elif backend == "triton":
        torch.ops.vitops.lamb_step_triton(*args)
    else:
        torch.ops.vitops.lamb_step(*args)


def lamb_clip_coef(backend: str, grads: list[torch.Tensor], max_grad_norm: float) -> torch.Tensor:
    if backend == "cpu":
        return torch.ops.vitops.lamb_clip_coef(grads, max_grad_norm)
    return reference.lamb_clip_coef(grads, max_grad_norm)


def adamp_step(backend: str, *args) -> None:
    if backend == "torch":
        reference.adamp_step(*args)
    elif backend == "triton":
        torch.ops.vitops.adamp_step_triton(*args)
    else:
        torch.ops.vitops.adamp_step(*args)
