"""vitops.ops.fuse_conv_bn: every backend against the reference and torch's fuse_conv_bn_weights, gradients,
bad input, opcheck and torch.compile."""
import ctypes
import os

import pytest
import torch
from torch.nn.utils.fusion import fuse_conv_bn_weights

import vitops
from tests.cpp import emulation
from vitops import _backend, _extension
from vitops.ops import fuse_conv_bn, reference

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


# --- the op ----------------------------------------------------------------------------------------------------

WEIGHT_SHAPES = [(8, 4), (6, 3, 5), (16, 4, 3, 3), (4, 1, 3, 3), (12, 2, 1, 1), (5, 3, 5, 5), (4, 2, 3, 3, 3)]


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


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize(
    "name,value,error,match",
    [
        ("bn_weight", torch.rand(8, dtype=torch.float64), TypeError, "bn_weight must be \\S+ for a \\S+ weight, got"),
        ("running_var", torch.rand(9), ValueError, "running_var must have shape \\(8,\\)"),
        ("eps", 0.0, ValueError, "eps must be a finite number > 0"),
    ],
)
def test_raw_op_checks_name_the_argument(backend, name, value, error, match):
    """Direct torch.ops calls skip the Python wrapper; every backend checks the op's own arguments alike."""
    args = dict(weight=torch.randn(8, 4, 3, 3), eps=1e-5, **channel_tensors(8))
    args[name] = value
    order = ("weight", "bias", "running_mean", "running_var", "bn_weight", "bn_bias", "eps")
    with vitops.use_backend(backend), pytest.raises(error, match="vitops.fuse_conv_bn: " + match):
        torch.ops.vitops.fuse_conv_bn(*(args[k] for k in order))


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


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend):
    for shape, bias, affine, grad in [((8, 4, 3, 3), True, True, True), ((6, 3, 5), False, False, False)]:
        t = channel_tensors(shape[0], bias=bias, affine=affine)
        weight = torch.randn(shape, requires_grad=grad)
        if grad:
            for v in t.values():
                v.requires_grad_(True)
        with vitops.use_backend(backend):
            torch.library.opcheck(torch.ops.vitops.fuse_conv_bn, (weight, *t.values(), 1e-5))


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


# --- the CUDA kernel, run on the CPU ----------------------------------------------------------------------------
# csrc/cuda/fuse_conv_bn.cuh compiled as plain C++ (tests/cpp/elementwise_emulation.cpp, one fiber per CUDA
# thread), launched as csrc/cuda/fuse_conv_bn.cu launches it. Without a GPU this is what checks its indexing and
# its math; it says nothing about its speed.

EMULATION_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
CHANNEL_ARGS = ("bias", "running_mean", "running_var", "bn_weight", "bn_bias")


@pytest.fixture(scope="module")
def cuda_emulation():
    lib = emulation.build("elementwise_emulation")
    pointers = [ctypes.c_void_p] * 8
    lib.fuse_conv_bn.argtypes = [ctypes.c_int, *pointers, ctypes.c_int64, ctypes.c_int64, ctypes.c_double]
    lib.fuse_conv_bn_one_channel.argtypes = [*pointers, ctypes.c_int64, ctypes.c_int64, ctypes.c_double]
    return lib


def address(t):
    return t.data_ptr() if t is not None else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias,affine", [(True, True), (False, False)])
@pytest.mark.parametrize(
    "shape,threads", [((67, 5, 3, 3), 64), ((5, 64, 3, 3), 256), ((8, 1, 3, 3), 32), ((3, 16, 1, 1), 32)]
)  # fmt: skip
def test_cuda_kernel_in_emulation(cuda_emulation, shape, threads, dtype, bias, affine):
    """Odd channel counts, a channel spread over several strides of a 256-thread block, depthwise and 1x1."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    t = channel_tensors(shape[0], dtype=reference.accumulate_dtype(dtype), bias=bias, affine=affine)
    args = [t[name] for name in CHANNEL_ARGS]
    fused_weight, fused_bias = torch.empty_like(weight), torch.empty(shape[0], dtype=dtype)
    used = cuda_emulation.fuse_conv_bn(EMULATION_DTYPES[dtype], address(weight), *map(address, args),
                                       address(fused_weight), address(fused_bias), shape[0], weight[0].numel(),
                                       1e-5)  # fmt: skip
    assert used == threads
    if "cpu" in cpu_backends():  # the CPU kernel runs the same per-channel functions: the same bits
        with vitops.use_backend("cpu"):
            want = torch.ops.vitops.fuse_conv_bn(weight, *args, 1e-5)
        assert torch.equal(fused_weight, want[0]) and torch.equal(fused_bias, want[1])
    exact = reference.fuse_conv_bn(weight.double(), *(a.double() if a is not None else None for a in args), 1e-5)
    tol = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(fused_weight.double(), exact[0], rtol=tol, atol=tol)
    torch.testing.assert_close(fused_bias.double(), exact[1], rtol=tol, atol=tol)


def test_cuda_kernel_indexes_in_64_bits(cuda_emulation):
    """The block of the last output channel a grid can hold, alone, with 200 weights per channel: the weight
    offset channel * 200 is past 2^38, so it must be 64-bit. Only that channel's elements exist."""
    channel, per_channel = 2**31 - 2, 200
    weight = torch.randn(1, per_channel, generator=torch.Generator().manual_seed(3))
    t = channel_tensors(1)
    args = [t[name] for name in CHANNEL_ARGS]
    fused_weight, fused_bias = torch.empty(1, per_channel), torch.empty(1)
    cuda_emulation.fuse_conv_bn_one_channel(address(weight), *map(address, args), address(fused_weight),
                                            address(fused_bias), channel, per_channel, 1e-5)  # fmt: skip
    want = reference.fuse_conv_bn(weight, *args, 1e-5)
    torch.testing.assert_close(fused_weight, want[0], rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(fused_bias, want[1], rtol=2e-6, atol=1e-6)
