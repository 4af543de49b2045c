"""Attention without a mask, for ViT/DeiT's short sequences (N = 50, 197, 577 at head_dim 64).

Two entry points:

- `attention(q, k, v, *, scale=None)`: (B, H, N, D) tensors like SDPA. Strided views whose last dim is contiguous
  are read in place (e.g. q, k, v sliced out of a qkv Linear output).
- `attention_packed(qkv, num_heads, *, scale=None)`: the raw (B, N, 3*H*D) qkv Linear output in, (B, N, H*D) out,
  ready for the proj Linear; its backward writes one packed (B, N, 3*H*D) gradient. No permute/contiguous copy.

Both are custom ops (torch.ops.vitops.attention / attention_packed) returning (out, lse) with fake kernels and
autograd: the forward keeps the per-row log-sum-exp, and the backward is its own op
(attention_backward / attention_packed_backward) that recomputes the probabilities, FlashAttention style.

Backends:
- "cuda": csrc/cuda/attention.cu, a short-sequence design (one head's K and V in shared memory, single-pass
  softmax) for Nq, Nk <= 256, head_dim <= 128, float16/bfloat16. NEVER RUN ON A GPU YET: it was written and
  compiled without one, and its logic checked only by running the kernels' C++ on the CPU with one thread per
  CUDA thread (tests/test_attention_cuda_emulation.py). So it runs only when forced (`use_backend("cuda")`,
  VITOPS_BACKEND=cuda): see CUDA_KERNEL_BY_DEFAULT. Inputs outside its range are sent to the Triton kernels by
  `attention`/`attention_packed` (the compiled op itself runs an ATen math fallback for them).
- "triton": FlashAttention-2 style kernels for any N (CUDA tensors, or CPU under TRITON_INTERPRET=1).
- "torch": PyTorch's SDPA, differentiated by autograd (the ops' CPU key runs vitops.ops.reference, the spec).
Where vitops._C has no CUDA kernel the compiled ops' CUDA key runs the Triton kernels; their CPU key always runs
the reference. Precision: float16/bfloat16 accumulate in float32 (the Triton kernels round P and dS to the input
dtype for the tensor-core dots, as FlashAttention does; the CUDA kernel keeps them in float32); float32 runs the
Triton kernels with IEEE float32 dots (the compiled CUDA op: its ATen math fallback); float64 runs in float64
through the reference math (SDPA on the "torch" backend). Any N >= 1; head_dim up to 256 (Triton pads it to a
power of two >= 16 and masks); larger head_dim is an error.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vitops import _backend, _extension
from vitops.ops import reference
from vitops.ops._attention_checks import MAX_HEAD_DIM, check_packed, check_qkv  # noqa: F401

try:
    from vitops.ops.triton import attention as _triton

    _TRITON_ERROR = None
except ImportError as error:  # triton missing or broken: the reference still works
    _triton = None
    _TRITON_ERROR = f"Triton kernels failed to import: {error}"


_backend.register_op("attention", has_triton=True, triton_blocker=_TRITON_ERROR)
_backend.register_op("attention_packed", has_triton=True, triton_blocker=_TRITON_ERROR)


# --- fake kernels, autograd -----------------------------------------------------------------------------------


def _attention_fake(q, k, v, scale):
    check_qkv(q, k, v)
    lse = q.new_empty(q.shape[:-1], dtype=reference.accumulate_dtype(q.dtype))
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


def _attention_backward_fake(grad_out, q, k, v, out, lse, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _packed_fake(qkv, num_heads, scale):
    check_packed(qkv, num_heads)
    b, n, c3 = qkv.shape
    out = qkv.new_empty((b, n, c3 // 3))
    lse = qkv.new_empty((b, num_heads, n), dtype=reference.accumulate_dtype(qkv.dtype))
    return out, lse


def _packed_backward_fake(grad_out, qkv, out, lse, num_heads, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    *tensors, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(*tensors, out, lse)
    ctx.scale = scale


def _make_backward(backward_op):
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = backward_op(grad_out, q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None

    return backward


def _packed_setup_context(ctx, inputs, output):
    qkv, num_heads, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads, ctx.scale = num_heads, scale


def _make_packed_backward(backward_op):
    def backward(ctx, grad_out, _grad_lse):
        qkv, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        return backward_op(grad_out, qkv, out, lse, ctx.num_heads, ctx.scale), None, None

    return backward


def _register(suffix: str) -> None:
    ops = torch.ops.vitops
    torch.library.register_fake(f"vitops::attention{suffix}")(_attention_fake)
    torch.library.register_fake(f"vitops::attention_backward{suffix}")(_attention_backward_fake)
    torch.library.register_fake(f"vitops::attention_packed{suffix}")(_packed_fake)
    torch.library.register_fake(f"vitops::attention_packed_backward{suffix}")(_packed_backward_fake)
    torch.library.register_autograd(
        f"vitops::attention{suffix}",
        _make_backward(getattr(ops, f"attention_backward{suffix}")),
        setup_context=_setup_context,
    )
    torch.library.register_autograd(
        f"vitops::attention_packed{suffix}",
        _make_packed_backward(getattr(ops, f"attention_packed_backward{suffix}")),
        setup_context=_packed_setup_context,
    )


# --- reference implementations of the compiled ops (their CPU key, and CUDA without Triton) ---------------------


def _reference_attention(q, k, v, scale):
    check_qkv(q, k, v)
    out, lse = reference.attention_forward(q, k, v, scale)
    return out.contiguous(), lse.contiguous()


def _reference_attention_backward(grad_out, q, k, v, out, lse, scale):
    return tuple(g.contiguous() for g in reference.attention_backward(grad_out, q, k, v, out, lse, scale))


def _reference_packed(qkv, num_heads, scale):
    check_packed(qkv, num_heads)
    q, k, v = reference.split_packed_qkv(qkv, num_heads)
    out, lse = reference.attention_forward(q, k, v, scale)
    return out.transpose(1, 2).flatten(2).contiguous(), lse.contiguous()


def _reference_packed_backward(grad_out, qkv, out, lse, num_heads, scale):
    q, k, v = reference.split_packed_qkv(qkv, num_heads)
    go = grad_out.unflatten(-1, (num_heads, -1)).transpose(1, 2)
    o = out.unflatten(-1, (num_heads, -1)).transpose(1, 2)
    grads = reference.attention_backward(go, q, k, v, o, lse, scale)
    return torch.cat([g.transpose(1, 2).flatten(2) for g in grads], dim=-1).contiguous()


_IMPLS = {
    "attention": ("attention_triton", _reference_attention),
    "attention_backward": ("attention_backward_triton", _reference_attention_backward),
    "attention_packed": ("attention_packed_triton", _reference_packed),
    "attention_packed_backward": ("attention_packed_backward_triton", _reference_packed_backward),
}
# Where vitops._C brought no kernel (there is no compiled attention kernel yet), the compiled op runs the Triton
# kernels on CUDA and the reference on CPU, so torch.ops.vitops.attention* works whatever was built.
for _key in _extension.DISPATCH_KEYS:
    for _op, (_triton_name, _ref_impl) in _IMPLS.items():
        if not _extension.has_compiled_kernel(_op, _key):
            use_triton = _key == "CUDA" and _triton is not None
            torch.library.impl(f"vitops::{_op}", _key)(getattr(_triton, _triton_name) if use_triton else _ref_impl)

_register("")
if _triton is not None:
    _register("_triton")


# --- public API -----------------------------------------------------------------------------------------------

CUDA_KERNEL_MAX_N = 256
CUDA_KERNEL_MAX_HEAD_DIM = 128


def cuda_kernel_fits(nq: int, nk: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the compiled short-sequence CUDA kernel is meant for these inputs (see csrc/cuda/attention.cu)."""
    return (
        dtype in (torch.float16, torch.bfloat16)
        and nq <= CUDA_KERNEL_MAX_N
        and nk <= CUDA_KERNEL_MAX_N
        and head_dim <= CUDA_KERNEL_MAX_HEAD_DIM
    )


# The compiled CUDA kernel has never run on a GPU, and it computes on CUDA cores where the Triton kernels use
# tensor cores; so on CUDA tensors it runs only when asked for by name (`vitops.use_backend("cuda")` or
# VITOPS_BACKEND=cuda), and by default the Triton kernels run. Flip this once it has been validated and measured.
CUDA_KERNEL_BY_DEFAULT = False


def pick_backend(op: str, device_type: str) -> str:
    """The backend that runs `op` ("attention" or "attention_packed") now: `_backend.backend_for`, except that the
    CUDA kernel must be asked for by name while CUDA_KERNEL_BY_DEFAULT is False."""
    backend = _backend.backend_for(op, device_type)
    forced = bool(_backend._forced) or _backend._ENV_BACKEND is not None
    if (
        backend == "cuda"
        and not forced
        and not CUDA_KERNEL_BY_DEFAULT
        and _backend._AVAILABILITY[op]["cuda"]["triton"] is None
    ):
        return "triton"
    return backend


def _use_triton_instead(op: str, backend: str, nq: int, nk: int, head_dim: int, dtype: torch.dtype) -> bool:
    """The "cuda" backend hands inputs its kernel was not designed for to the Triton kernels, when they can run."""
    return (
        backend == "cuda"
        and not cuda_kernel_fits(nq, nk, head_dim, dtype)
        and _backend._AVAILABILITY[op]["cuda"]["triton"] is None
    )


def _torch_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    """The "torch" backend: PyTorch's own fused attention (SDPA, which also computes half precision in float32),
    differentiated by autograd. It is what a model runs where no vitops kernel can (e.g. on the CPU), so it is
    SDPA rather than the much slower math of vitops.ops.reference, which remains the specification."""
    scale = reference.attention_scale(q.shape[-1], scale)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
    """softmax(q @ k^T * scale) @ v, like `F.scaled_dot_product_attention(q, k, v, scale=scale)` without a mask
    or dropout.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D). Same dtype (float16, bfloat16, float32 or float64) and device.
            Any strides as long as the last dim is contiguous: views into a packed qkv are read in place.
            D <= 256; any N >= 1.
        scale: softmax scale, D ** -0.5 by default.

    Returns:
        Contiguous (B, H, Nq, D) in q's dtype. Differentiable in q, k and v.
    """
    check_qkv(q, k, v)
    backend = pick_backend("attention", q.device.type)
    if backend == "torch":
        return _torch_attention(q, k, v, scale)
    if backend == "triton" or _use_triton_instead("attention", backend, q.shape[2], k.shape[2], q.shape[3], q.dtype):
        return torch.ops.vitops.attention_triton(q, k, v, scale)[0]
    return torch.ops.vitops.attention(q, k, v, scale)[0]


def attention_packed(qkv: Tensor, num_heads: int, *, scale: float | None = None) -> Tensor:
    """Multi-head attention of a qkv Linear's raw output: what timm's Attention computes between `qkv` and `proj`.

    Args:
        qkv: (B, N, 3 * num_heads * D), laid out as qkv.reshape(B, N, 3, num_heads, D) (timm's order); the last
            dim must be contiguous. float16, bfloat16, float32 or float64. D <= 256; any N >= 1.
        num_heads: H.
        scale: softmax scale, D ** -0.5 by default.

    Returns:
        Contiguous (B, N, H * D) in qkv's dtype. Its backward writes one packed (B, N, 3 * H * D) gradient.
    """
    check_packed(qkv, num_heads)
    backend = pick_backend("attention_packed", qkv.device.type)
    if backend == "torch":
        q, k, v = reference.split_packed_qkv(qkv, num_heads)
        return _torch_attention(q, k, v, scale).transpose(1, 2).flatten(2)
    n, d = qkv.shape[1], qkv.shape[2] // (3 * num_heads)
    if backend == "triton" or _use_triton_instead("attention_packed", backend, n, n, d, qkv.dtype):
        return torch.ops.vitops.attention_packed_triton(qkv, num_heads, scale)[0]
    return torch.ops.vitops.attention_packed(qkv, num_heads, scale)[0]
