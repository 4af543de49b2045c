"""The tensor-core CUDA attention kernels (csrc/cuda/attention/), compiled as plain C++ and run on the CPU
(tests/cpp/attention_emulation.cpp: one fiber per CUDA thread, the warp-level mma/ldmatrix/cp.async emulated from
the PTX ISA's fragment layouts, fp16/bf16 rounded as on the GPU), against the reference: forward out and lse,
and dq, dk, dv, on packed, contiguous and strided operands. Without a GPU this is what checks the kernels'
fragment bookkeeping, masking, online softmax, pipelining and addressing; it says nothing about their speed.

Tolerance, FlashAttention's rule: each output's max error against a float64 reference is at most twice that of
the same reference computed in the input dtype (PyTorch on the CPU), plus a floor of 1e-5 * max(1, max |ref|):
float32's rounding over a row's ~100-term sums, far below one fp16/bf16 ulp, which matters only where the
dtype reference happens to be exact (N = 1, where P = 1 and dS = 0)."""
import ctypes

import pytest
import torch

from tests.cpp import emulation
from vitops.ops import reference

DTYPES = {"fp16": (0, torch.float16), "bf16": (1, torch.bfloat16)}


@pytest.fixture(scope="module")
def emulator():
    lib = emulation.build("attention_emulation")
    sizes = [ctypes.c_int64, *[ctypes.c_int] * 4]  # batch, heads, nq, nk, head_dim
    pointers = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p]
    lib.attention.argtypes = [ctypes.c_int, *sizes, ctypes.c_double, *pointers]
    return lib


def _operands(layout, b, h, nq, nk, d, dtype, g):
    """(q, k, v, grad_out) as the ops give them to the kernels, and (out, grad_q, grad_k, grad_v) as the ops
    allocate them (NaN until written), all (B, H, N, D) views."""

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    def unwritten(*shape):
        return torch.full(shape, float("nan"), dtype=dtype)

    if layout == "packed":  # qkv (B, N, 3*H*D) in, out (B, N, H*D), one grad_qkv (B, N, 3*H*D)
        q, k, v = rand(b, nq, 3 * h * d).view(b, nq, 3, h, d).permute(2, 0, 3, 1, 4)
        grad_out = rand(b, nq, h * d).view(b, nq, h, d).transpose(1, 2)
        out = unwritten(b, nq, h * d).view(b, nq, h, d).transpose(1, 2)
        grad_q, grad_k, grad_v = unwritten(b, nq, 3 * h * d).view(b, nq, 3, h, d).permute(2, 0, 3, 1, 4)
        return (q, k, v, grad_out), (out, grad_q, grad_k, grad_v)
    if layout == "contiguous":
        q, k, v, grad_out = rand(b, h, nq, d), rand(b, h, nk, d), rand(b, h, nk, d), rand(b, h, nq, d)
    else:  # strided: (B, N, H, D) memory seen as (B, H, N, D), and rows padded by 8 or 16 elements
        q = rand(b, nq, h, d).transpose(1, 2)
        k = rand(b, h, nk, d + 16)[..., :d]
        v = rand(b, nk, h, d + 8)[..., :d].transpose(1, 2)
        grad_out = rand(b, nq, h, d).transpose(1, 2)
    return (q, k, v, grad_out), (unwritten(b, h, nq, d), unwritten(b, h, nq, d), unwritten(b, h, nk, d),
                                 unwritten(b, h, nk, d))  # fmt: skip


def _run(emulator, dtype_name, layout, b, h, nq, nk, d, scale=None, seed=0, saturated=False):
    code, dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(seed)
    inputs, outputs = _operands(layout, b, h, nq, nk, d, dtype, g)
    if saturated:  # every score near -2 |u|^2 ~ -2 D: 2^(-lse / ln 2) overflows float32
        q, k = inputs[:2]
        u = torch.randn(b, h, 1, d, generator=g)
        q.copy_(-2 * u + 0.05 * torch.randn(q.shape, generator=g))
        k.copy_(u + 0.05 * torch.randn(k.shape, generator=g))
    lse = torch.full((b, h, nq), float("nan"))
    views = inputs + outputs
    pointers = (ctypes.c_void_p * 8)(*(t.data_ptr() for t in views))
    strides = (ctypes.c_int64 * 24)(*(s for t in views for s in t.stride()[:3]))
    status = emulator.attention(code, b, h, nq, nk, d, reference.attention_scale(d, scale), pointers, strides,
                                lse.data_ptr())  # fmt: skip
    assert status == 0
    out, grad_q, grad_k, grad_v = outputs
    return inputs, (out, lse, grad_q, grad_k, grad_v)


def _references(q, k, v, grad_out, dtype, scale):
    """(out, lse, dq, dk, dv) in float64, and the same computed in `dtype` by PyTorch."""
    results = []
    for compute in (torch.float64, dtype):
        qc, kc, vc = (t.detach().to(compute).requires_grad_() for t in (q, k, v))
        out = reference.attention(qc, kc, vc, scale)
        lse = torch.logsumexp((qc @ kc.transpose(-2, -1)) * reference.attention_scale(q.shape[-1], scale), dim=-1)
        grads = torch.autograd.grad(out, (qc, kc, vc), grad_out.to(compute))
        results.append([t.detach() for t in (out, lse, *grads)])
    return results


NS = (1, 17, 64, 197, 257)
HEAD_DIMS = (32, 64, 80, 96, 128)
LAYOUTS = ("packed", "contiguous", "strided")


def _grid():
    """Every (N, head_dim) pair once, with the dtype, layout, batch (1-2), heads (1-3) and, unpacked, a key count
    Nk != Nq rotating along the grid so that each value meets several of the others; two cases use another
    scale, one of them negative."""
    cases = []
    for i, n in enumerate(NS):
        for j, d in enumerate(HEAD_DIMS):
            layout = LAYOUTS[(i + 2 * j) % 3]
            nk = n if layout == "packed" else NS[(i + 2 * j + 1) % len(NS)]
            dtype = ("fp16", "bf16")[(i + j) % 2]
            b, h = 1 + (i * j) % 2, 1 + (2 * i + j) % 3
            cases.append((dtype, layout, b, h, n, nk, d, None))
    cases += [("bf16", "strided", 1, 2, 197, 64, 64, 0.3), ("fp16", "packed", 2, 1, 17, 17, 80, -0.2)]
    return cases


def _assert_matches_reference(inputs, got, dtype_name, scale):
    """FlashAttention's rule (module docstring) for each of out, lse, dq, dk, dv."""
    want64, want_dtype = _references(*inputs, DTYPES[dtype_name][1], scale)
    for name, kernel, exact, rounded in zip(("out", "lse", "dq", "dk", "dv"), got, want64, want_dtype):
        assert kernel.shape == exact.shape, name
        assert torch.isfinite(kernel).all(), f"{name}: non-finite values (unwritten or wrong)"
        error = (kernel.double() - exact).abs().max().item()
        bound = 2 * (rounded.double() - exact).abs().max().item() + 1e-5 * max(1.0, exact.abs().max().item())
        assert error <= bound, f"{name}: max error {error:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("dtype_name,layout,b,h,nq,nk,d,scale", _grid())
def test_attention_kernels_in_emulation(emulator, dtype_name, layout, b, h, nq, nk, d, scale):
    inputs, got = _run(emulator, dtype_name, layout, b, h, nq, nk, d, scale)
    _assert_matches_reference(inputs, got, dtype_name, scale)


@pytest.mark.parametrize(
    "dtype_name,layout,nq,nk,d", [("fp16", "packed", 17, 17, 64), ("bf16", "strided", 17, 197, 128)]
)
def test_attention_kernels_in_emulation_with_saturated_scores(emulator, dtype_name, layout, nq, nk, d):
    """Scores around -2 D with scale 1: the probabilities are fine but e^-lse overflows float32, so a key past Nk
    left unmasked in the dQ kernel would add inf * 0 = NaN (its zero-filled K row times an infinite dS)."""
    inputs, got = _run(emulator, dtype_name, layout, 1, 2, nq, nk, d, 1.0, saturated=True)
    assert got[1].max() < -100  # lse
    _assert_matches_reference(inputs, got, dtype_name, 1.0)
