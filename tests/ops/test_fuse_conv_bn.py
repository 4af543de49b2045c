"""vitops.ops.fuse_conv_bn: every backend against the reference and torch's fuse_conv_bn_weights, gradients,
bad input, opcheck and torch.compile."""
import os

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

import vitops
from vitops import _backend, _extension
from vitops.ops import fuse_conv_bn, reference
from tests.triton_aot import assert_compiles_for_sm90

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
TRITON_CPU = _backend.TRITON_BLOCKER is None and os.environ.get("TRITON_INTERPRET") == "1"


def cpu_backends():
    backends = ["torch"]
    if _extension.has_compiled_kernel("fuse_conv_bn", "CPU"):
        backends.append("cpu")
    if TRITON_CPU:
        backends.append("triton")
    return backends


def channel_tensors(c, dtype=torch.float32, device="cpu", affine=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, lo=-1.0, hi=1.0):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype).to(device)

    return dict(
        bias=rand(c) if bias else None,
        running_mean=rand(c),
        running_var=rand(c, lo=0.05, hi=3.0),
        bn_weight=rand(c, lo=-2.0, hi=2.0) if affine else None,
        bn_bias=rand(c) if affine else None,
    )


def call(weight, t, eps=1e-5):
    return fuse_conv_bn(weight, t["bias"], t["running_mean"], t["running_var"], t["bn_weight"], t["bn_bias"], eps)


def torch_fused(weight, t, eps=1e-5):
    c = weight.shape[0]
    return fuse_conv_bn_weights(
        weight, t["bias"], t["running_mean"], t["running_var"], eps,
        t["bn_weight"] if t["bn_weight"] is not None else torch.ones(c, dtype=weight.dtype),
        t["bn_bias"] if t["bn_bias"] is not None else torch.zeros(c, dtype=weight.dtype),
    )  # fmt: skip


def randomize_bn(model, seed=0):
    """Non-trivial BatchNorm statistics and affine parameters, so folding mistakes show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=g) * 0.5 + 1)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.5)
    return model


def assert_same_output(a, b, *, rel=1e-5):
    """Equal to `rel` relative to the output's scale (max |a|)."""
    scale = a.abs().max().clamp_min(1e-12)
    err = (a - b).abs().max() / scale
    assert err <= rel, f"relative error {err.item():.3g} > {rel}"


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# --- the op ----------------------------------------------------------------------------------------------------

WEIGHT_SHAPES = [(8, 4), (6, 3, 5), (16, 4, 3, 3), (4, 1, 3, 3), (12, 2, 1, 1), (5, 3, 5, 5), (4, 2, 3, 3, 3)]


def test_schema_matches_compiled_library():
    if _extension.LOAD_ERROR is not None:
        pytest.skip(f"vitops._C is {_extension.LOAD_ERROR}")
    registered = str(torch.ops.vitops.fuse_conv_bn.default._schema)
    assert registered == "vitops::" + _extension.SCHEMAS["fuse_conv_bn"]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("bias,affine", [(True, True), (False, True), (True, False), (False, False)])
def test_matches_torch_fuse_conv_bn_weights(backend, shape, bias, affine):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    t = channel_tensors(shape[0], bias=bias, affine=affine)
    with vitops.use_backend(backend):
        w, b = call(weight, t, eps=1e-3)
    want_w, want_b = torch_fused(weight, t, eps=1e-3)
    assert w.shape == weight.shape and b.shape == (shape[0],)
    assert w.dtype == b.dtype == torch.float32
    torch.testing.assert_close(w, want_w, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(b, want_b, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_against_reference(backend, dtype):
    weight = torch.randn(16, 4, 3, 3, dtype=torch.float64).to(dtype)
    acc = reference.accumulate_dtype(dtype)
    t = channel_tensors(16, dtype=acc)
    with vitops.use_backend(backend):
        w, b = call(weight, t)
    want_w, want_b = reference.fuse_conv_bn(weight, *t.values(), 1e-5)
    assert w.dtype == b.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(w, want_w, rtol=tol, atol=tol)
    torch.testing.assert_close(b, want_b, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", cpu_backends())
def test_non_contiguous_weight_and_zero_channels(backend):
    weight = torch.randn(3, 3, 4, 8).permute(3, 2, 0, 1)  # (8, 4, 3, 3), not contiguous
    t = channel_tensors(8)
    with vitops.use_backend(backend):
        w, b = call(weight, t)
        w0, b0 = call(torch.empty(0, 4, 3, 3), channel_tensors(0))
    want_w, want_b = torch_fused(weight, t)
    torch.testing.assert_close(w, want_w, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(b, want_b, rtol=2e-6, atol=1e-6)
    assert w.is_contiguous()
    assert w0.shape == (0, 4, 3, 3) and b0.shape == (0,)


def test_per_channel_tensors_are_cast_to_the_compute_dtype():
    weight = torch.randn(8, 4, 3, 3)
    t = {k: v.double() for k, v in channel_tensors(8).items()}
    w, b = call(weight, t)
    want_w, want_b = torch_fused(weight.double(), t)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, want_w.float(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(b, want_b.float(), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(running_var=torch.rand(7)), ValueError, "running_var must have shape \\(8,\\)"),
        (dict(bn_weight=torch.rand(8, 1)), ValueError, "bn_weight must have shape"),
        (dict(bias=torch.rand(16)), ValueError, "bias must have shape"),
        (dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
        (dict(eps=-1e-5), ValueError, "eps must be"),
        (dict(eps=float("nan")), ValueError, "eps must be"),
        (dict(running_mean=torch.zeros(8, dtype=torch.int64)), TypeError, "running_mean must be a floating-point"),
        (dict(weight=torch.ones(8, 4, 3, 3, dtype=torch.int32)), TypeError, "weight must be a floating-point"),
        (dict(bn_bias=[0.0] * 8), TypeError, "bn_bias must be a Tensor or None"),
        (dict(weight=torch.randn(8)), ValueError, "weight must have shape \\(out_channels"),
    ],
)
def test_bad_arguments_name_the_argument(change, error, match):
    args = dict(weight=torch.randn(8, 4, 3, 3), eps=1e-5, **channel_tensors(8))
    args.update(change)
    with pytest.raises(error, match="vitops.fuse_conv_bn: " + match):
        fuse_conv_bn(**args)


def raw_ops():
    ops = []
    if _extension.has_compiled_kernel("fuse_conv_bn", "CPU"):
        ops.append(pytest.param(torch.ops.vitops.fuse_conv_bn, id="compiled"))
    if TRITON_CPU:
        ops.append(pytest.param(torch.ops.vitops.fuse_conv_bn_triton, id="triton"))
    return ops


@pytest.mark.parametrize("op", raw_ops())
@pytest.mark.parametrize(
    "name,value,match",
    [
        ("bn_weight", torch.rand(8, dtype=torch.float64), "bn_weight must be \\S+ for a \\S+ weight, got"),
        ("running_var", torch.rand(9), "running_var must have shape \\(8,\\)"),
        ("eps", 0.0, "eps must be a finite number > 0"),
    ],
)
def test_raw_op_checks_name_the_argument(op, name, value, match):
    args = dict(weight=torch.randn(8, 4, 3, 3), eps=1e-5, **channel_tensors(8))
    args[name] = value
    order = ("weight", "bias", "running_mean", "running_var", "bn_weight", "bn_bias", "eps")
    with pytest.raises(RuntimeError, match="vitops.fuse_conv_bn: " + match):
        op(*(args[k] for k in order))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("bias,affine", [(True, True), (False, False)])
def test_gradcheck_float64(backend, bias, affine):
    weight = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    t = channel_tensors(4, dtype=torch.float64, bias=bias, affine=affine)
    names = [k for k, v in t.items() if v is not None]
    for k in names:
        t[k].requires_grad_(True)

    def f(weight, *values):
        full = dict(t)
        full.update(zip(names, values))
        return call(weight, full)

    with vitops.use_backend(backend):
        assert torch.autograd.gradcheck(f, (weight, *(t[k] for k in names)))
        if backend == "cpu":  # the backward is composed of differentiable torch ops
            assert torch.autograd.gradgradcheck(f, (weight, *(t[k] for k in names)))


def test_opcheck():
    ops = [torch.ops.vitops.fuse_conv_bn]
    if TRITON_CPU:
        ops.append(torch.ops.vitops.fuse_conv_bn_triton)
    for op in ops:
        for shape, bias, affine, grad in [((8, 4, 3, 3), True, True, True), ((6, 3, 5), False, False, False)]:
            t = channel_tensors(shape[0], bias=bias, affine=affine)
            weight = torch.randn(shape, requires_grad=grad)
            if grad:
                for v in t.values():
                    v.requires_grad_(True)
            torch.library.opcheck(op, (weight, *t.values(), 1e-5))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def conv_bn(x, weight, bias, mean, var, gamma, beta):
        w, b = fuse_conv_bn(weight, bias, mean, var, gamma, beta, 1e-5)
        return torch.nn.functional.conv2d(x, w, b, padding=1)

    compiled = torch.compile(conv_bn, fullgraph=True, backend="inductor")
    x = torch.randn(2, 4, 8, 8)
    weight = torch.randn(8, 4, 3, 3, requires_grad=True)
    t = channel_tensors(8)
    out = compiled(x, weight, *t.values())
    torch.testing.assert_close(out, conv_bn(x, weight, *t.values()))
    out.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


@pytest.mark.skipif(_backend.TRITON_BLOCKER is not None, reason="needs triton")
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp64"])
def test_triton_kernel_compiles_for_sm90(dtype):
    """The Triton kernel compiles for an H100 without a GPU (tests/triton_aot.py), and float32 uses IEEE-rounded
    sqrt and division."""
    acc = "fp64" if dtype == "fp64" else "fp32"
    assert_compiles_for_sm90(
        f"""
    from vitops.ops.triton.fuse_conv_bn import _fuse_conv_bn_kernel

    signature = dict(
        weight_ptr="*{dtype}", bias_ptr="constexpr", mean_ptr="*{acc}", var_ptr="*{acc}", gamma_ptr="*{acc}",
        beta_ptr="*{acc}", fused_weight_ptr="*{dtype}", fused_bias_ptr="*{dtype}", channels="i32",
        per_channel="i32", eps="fp32",
    )
    constants = dict(
        bias_ptr=None, HAS_BIAS=False, HAS_GAMMA=True, HAS_BETA=True, BLOCK_C=4, BLOCK_K=1024,
        ACC=tl.{"float64" if acc == "fp64" else "float32"}, IS_FP64={acc == "fp64"},
    )
    ptx = compile(_fuse_conv_bn_kernel, signature, constants)
    if "{acc}" == "fp32":
        assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx
    else:
        assert "sqrt.rn.f64" in ptx
    """
    )


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_backends_against_reference(backend, dtype):
    acc = reference.accumulate_dtype(dtype)
    for shape in WEIGHT_SHAPES:
        weight = torch.randn(shape, device="cuda", dtype=dtype)
        t = channel_tensors(shape[0], dtype=acc, device="cuda")
        with vitops.use_backend(backend):
            w, b = call(weight, t)
        want_w, want_b = reference.fuse_conv_bn(weight, *t.values(), 1e-5)
        tol = 1e-3 if dtype == torch.float16 else 2e-6
        torch.testing.assert_close(w, want_w, rtol=tol, atol=tol)
        torch.testing.assert_close(b, want_b, rtol=tol, atol=tol)


@pytest.mark.cuda
@requires_cuda
def test_cuda_gradcheck_and_opcheck():
    weight = torch.randn(4, 2, 3, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    t = {k: v.requires_grad_(True) for k, v in channel_tensors(4, dtype=torch.float64, device="cuda").items()}
    with vitops.use_backend("cuda"):
        assert torch.autograd.gradcheck(lambda w, *v: fuse_conv_bn(w, *v, 1e-5), (weight, *t.values()))
    torch.library.opcheck(torch.ops.vitops.fuse_conv_bn, (weight.float(), *(v.float() for v in t.values()), 1e-5))


