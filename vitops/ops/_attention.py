"""Attention without a mask, for ViT/DeiT's short sequences (N = 50, 197, 577 at head_dim 64).

Two entry points:

- `attention(q, k, v, *, scale=None)`: (B, H, N, D) tensors like SDPA. Strided views whose last dim is contiguous
  are read in place (e.g. q, k, v sliced out of a qkv Linear output).
- `attention_packed(qkv, num_heads, *, scale=None)`: the raw (B, N, 3*H*D) qkv Linear output in, (B, N, H*D) out,
  ready for the proj Linear; its backward writes one packed (B, N, 3*H*D) gradient. No permute/contiguous copy.

Both are custom ops (torch.ops.vitops.attention / attention_packed) returning (out, lse): the forward keeps the
per-row log-sum-exp, and the backward is its own op (attention_backward / attention_packed_backward) that
recomputes the probabilities, FlashAttention style.

Backends:
- "cuda": csrc/cuda/attention.cu, FlashAttention-2 style on tensor cores (mma.sync m16n8k16, ldmatrix, cp.async
  double buffering, online softmax; a deterministic backward without atomics), for float16/bfloat16 on sm_80+
  with head_dim 32, 64, 80, 96 or 128 and any N. NEVER RUN ON A GPU YET: written and compiled without one, and
  checked by running its device code, warp-level matrix instructions included, on the CPU
  (tests/ops/test_attention_cuda_emulation.py). So it runs only when forced (`use_backend("cuda")`,
  VITOPS_BACKEND=cuda) until a GPU run has measured it; inputs it does not take (`_cuda_kernel_takes`) run on
  the next backend.
- "triton": FlashAttention-2 style kernels for any N (CUDA tensors, or CPU under TRITON_INTERPRET=1); float16,
  bfloat16 (float32 accumulation) and float32 (IEEE float32 dots).
- "torch": on CPU, PyTorch's fused flash-attention CPU kernels (what SDPA runs, with its log-sum-exp), which
  is the CPU default; on CUDA, vitops.ops.reference (the spec, computed in float32 or float64).
Any N >= 1; head_dim up to 256; float64 runs on the torch backend.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from vitops.ops import reference
from vitops.ops._define import define_op

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --- argument checks, shared by the public functions, the fake kernels and the Python backends -----------------


def _check_tensor(op: str, name: str, t: Tensor, ndim: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"vitops.{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"vitops.{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.ndim != ndim:
        raise ValueError(f"vitops.{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"vitops.{op}: {name}'s last dim must be contiguous (stride 1), got strides {tuple(t.stride())}; "
            "call .contiguous() first"
        )


def _check_head_dim(op: str, d: int) -> None:
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"vitops.{op}: head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")


def _check_scale(op: str, scale: float | None) -> None:
    # An inf or NaN scale makes every score NaN; aten's flash CPU kernel would answer 0 for it.
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"vitops.{op}: scale must be finite (or None for head_dim ** -0.5), got {scale}")


def check_qkv(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, op: str = "attention") -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(op, name, t, 4)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"vitops.{op}: q is {q.dtype} but {name} is {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"vitops.{op}: q is on {q.device} but {name} is on {t.device}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"vitops.{op}: expected q (B, H, Nq, D) and k, v (B, H, Nk, D), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[2] == 0 and q.shape[2] > 0:
        raise ValueError(f"vitops.{op}: k and v have no tokens (Nk = 0) for q's {q.shape[2]}: each query needs a key")
    _check_head_dim(op, q.shape[-1])
    _check_scale(op, scale)


def check_packed(qkv: Tensor, num_heads: int, scale: float | None = None, op: str = "attention_packed") -> int:
    """Checks a packed qkv and returns its head_dim."""
    _check_tensor(op, "qkv", qkv, 3)
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"vitops.{op}: num_heads must be a positive int, got {num_heads!r}")
    c3 = qkv.shape[-1]
    if c3 == 0 or c3 % (3 * num_heads) != 0:
        raise ValueError(
            f"vitops.{op}: qkv's last dim {c3} is not 3 * num_heads * head_dim for num_heads={num_heads}"
        )
    d = c3 // (3 * num_heads)
    _check_head_dim(op, d)
    _check_scale(op, scale)
    return d


# --- fake kernels ---------------------------------------------------------------------------------------------


def _attention_fake(q, k, v, scale):
    check_qkv(q, k, v, scale)
    lse = q.new_empty(q.shape[:-1], dtype=reference.accumulate_dtype(q.dtype))
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


def _attention_backward_fake(grad_out, q, k, v, out, lse, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _packed_fake(qkv, num_heads, scale):
    check_packed(qkv, num_heads, scale)
    b, n, c3 = qkv.shape
    out = qkv.new_empty((b, n, c3 // 3))
    lse = qkv.new_empty((b, num_heads, n), dtype=reference.accumulate_dtype(qkv.dtype))
    return out, lse


def _packed_backward_fake(grad_out, qkv, out, lse, num_heads, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


# --- the torch backend: PyTorch's flash-attention CPU kernels, the reference elsewhere ---------------------------


def _runs_aten_flash(q: Tensor, k: Tensor) -> bool:
    """Whether aten's flash-attention CPU kernels compute what the reference does. They divide by zero (SIGFPE)
    on an empty batch, head or sequence dim, and return out = 0, lse = 0 for a query whose scores are all NaN
    (a NaN in q, say: they take the row for a masked one) where the answer is NaN. Inputs like those run on the
    reference. A finite sum of q and k rules out NaN and inf in either (a huge but finite input whose sum
    overflows takes the reference too): one streaming reduction each, 100x cheaper than isfinite().all() on these
    strided views, O(N * D) next to the kernels' O(N^2 * D), and on CPU no device sync."""
    if q.device.type != "cpu" or q.numel() == 0 or k.numel() == 0:
        return False
    acc = reference.accumulate_dtype(q.dtype)
    return bool((q.sum(dtype=acc) + k.sum(dtype=acc)).isfinite())


def _torch_forward(q, k, v, scale):
    if _runs_aten_flash(q, k):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return reference.attention_forward(q, k, v, scale)


def _torch_backward(grad_out, q, k, v, out, lse, scale):
    if _runs_aten_flash(q, k):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, False, scale=scale
        )
    return reference.attention_backward(grad_out, q, k, v, out, lse, scale)


# --- the ops from a (B, H, N, D) forward and backward, in the ops' output layouts --------------------------------


def _heads_to_tokens(x: Tensor) -> Tensor:
    """(B, H, N, D) -> (B, N, H*D), without a copy when x is a transposed (B, N, H, D) tensor."""
    return x.transpose(1, 2).flatten(2)


def _contiguous_outputs(fn):
    return lambda *args: tuple(t.contiguous() for t in fn(*args))


def _packed_forward(forward):
    def run(qkv, num_heads, scale):
        out, lse = forward(*reference.split_packed_qkv(qkv, num_heads), scale)
        return _heads_to_tokens(out).contiguous(), lse.contiguous()

    return run


def _packed_backward(backward):
    def run(grad_out, qkv, out, lse, num_heads, scale):
        q, k, v = reference.split_packed_qkv(qkv, num_heads)
        go, o = (t.unflatten(-1, (num_heads, -1)).transpose(1, 2) for t in (grad_out, out))
        return torch.cat([_heads_to_tokens(g) for g in backward(go, q, k, v, o, lse, scale)], dim=-1)

    return run


# --- autograd -----------------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    *tensors, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(*tensors, out, lse)
    ctx.scale = scale


def _autograd_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.vitops.attention_backward(grad_out, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


def _packed_setup_context(ctx, inputs, output):
    qkv, num_heads, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads, ctx.scale = num_heads, scale


def _packed_autograd_backward(ctx, grad_out, _grad_lse):
    qkv, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    return torch.ops.vitops.attention_packed_backward(grad_out, qkv, out, lse, ctx.num_heads, ctx.scale), None, None


# --- which inputs each kernel takes -----------------------------------------------------------------------------

# The compiled CUDA kernel has never run on a GPU, so on CUDA tensors it runs only when forced; by default the
# Triton kernels run. Drop this order once a GPU run has validated and measured it.
_ORDER = {"cuda": ("triton", "cuda", "torch")}
CUDA_KERNEL_HEAD_DIMS = (32, 64, 80, 96, 128)


def _cuda_kernel_takes(tensors: tuple[Tensor, ...], head_dim: int) -> bool:
    """The compiled kernel's contract (csrc/cuda/attention.cu): float16 or bfloat16 on an sm_80 or newer GPU, a
    head_dim it was built for, and rows it can copy 16 bytes at a time: the last dim contiguous, every other
    stride a multiple of 8 elements, the data 16-byte aligned."""
    first = tensors[0]
    if first.dtype not in (torch.float16, torch.bfloat16) or head_dim not in CUDA_KERNEL_HEAD_DIMS:
        return False
    if torch.cuda.get_device_capability(first.device) < (8, 0):
        return False
    return all(
        t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and all(stride % 8 == 0 for stride, size in zip(t.stride()[:-1], t.shape[:-1]) if size > 1)
        for t in tensors
    )


def _supports(tensors_and_head_dim) -> dict:
    """Per backend, whether its kernel takes the op's arguments; `tensors_and_head_dim(*args)` reads off the
    tensors the kernel reads in place (the first one's dtype is everyone's) and the head_dim."""
    return {
        "cuda": lambda *args: _cuda_kernel_takes(*tensors_and_head_dim(*args)),
        "triton": lambda *args: tensors_and_head_dim(*args)[0][0].dtype != torch.float64,  # float64 runs on torch
    }


def _packed_head_dim(qkv: Tensor, num_heads: int) -> int:
    return qkv.shape[-1] // (3 * num_heads)


_SUPPORTS = {
    "attention": _supports(lambda q, k, v, scale: ((q, k, v), q.shape[-1])),
    "attention_backward": _supports(
        lambda grad_out, q, k, v, out, lse, scale: ((q, k, v, grad_out, out), q.shape[-1])
    ),
    "attention_packed": _supports(lambda qkv, num_heads, scale: ((qkv,), _packed_head_dim(qkv, num_heads))),
    "attention_packed_backward": _supports(
        lambda grad_out, qkv, out, lse, num_heads, scale: ((qkv, grad_out, out), _packed_head_dim(qkv, num_heads))
    ),
}
_NO_CPU_KERNEL = {"cpu": "none is written: the torch backend runs PyTorch's fused flash-attention CPU kernels"}


for _name, _fake, _in_layout, _spec, _torch, _check, _autograd in (
    ("attention_backward", _attention_backward_fake, _contiguous_outputs, reference.attention_backward,
     _torch_backward, None, (None, None)),
    ("attention", _attention_fake, _contiguous_outputs, reference.attention_forward, _torch_forward, check_qkv,
     (_autograd_backward, _setup_context)),
    ("attention_packed_backward", _packed_backward_fake, _packed_backward, reference.attention_backward,
     _torch_backward, None, (None, None)),
    ("attention_packed", _packed_fake, _packed_forward, reference.attention_forward, _torch_forward, check_packed,
     (_packed_autograd_backward, _packed_setup_context)),
):  # fmt: skip
    define_op(
        _name,
        fake=_fake,
        reference=_in_layout(_spec),
        check=_check,
        torch_impl=_in_layout(_torch),
        triton=f"attention:{_name}",
        supports=_SUPPORTS[_name],
        no_kernel=_NO_CPU_KERNEL,
        order=_ORDER,
        backward=_autograd[0],
        setup_context=_autograd[1],
    )


# --- public API -----------------------------------------------------------------------------------------------


def _in_autocast_dtype(*tensors):
    """As scaled_dot_product_attention under autocast (CPU and CUDA list it among the ops run in lower precision):
    float32 inputs are cast to the autocast dtype. The ops themselves compute in the dtypes they are given."""
    device = next((t.device.type for t in tensors if isinstance(t, Tensor)), None)
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype == torch.float32 else t for t in tensors)


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
    """softmax(q @ k^T * scale) @ v, like `F.scaled_dot_product_attention(q, k, v, scale=scale)` without a mask
    or dropout.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D). Same dtype (float16, bfloat16, float32 or float64) and device.
            Any strides as long as the last dim is contiguous: views into a packed qkv are read in place.
            D <= 256; any N >= 1.
        scale: softmax scale, D ** -0.5 by default.

    Returns:
        Contiguous (B, H, Nq, D) in q's dtype (under autocast, float32 inputs run in the autocast dtype, as SDPA's
        do). Differentiable in q, k and v.
    """
    q, k, v = _in_autocast_dtype(q, k, v)
    check_qkv(q, k, v, scale)
    return torch.ops.vitops.attention(q, k, v, scale)[0]


def attention_packed(qkv: Tensor, num_heads: int, *, scale: float | None = None) -> Tensor:
    """Multi-head attention of a qkv Linear's raw output: what timm's Attention computes between `qkv` and `proj`.

    Args:
        qkv: (B, N, 3 * num_heads * D), laid out as qkv.reshape(B, N, 3, num_heads, D) (timm's order); the last
            dim must be contiguous. float16, bfloat16, float32 or float64. D <= 256; any N >= 1.
        num_heads: H.
        scale: softmax scale, D ** -0.5 by default.

    Returns:
        Contiguous (B, N, H * D) in qkv's dtype (under autocast, a float32 qkv runs in the autocast dtype, as
        SDPA's inputs do). Its backward writes one packed (B, N, 3 * H * D) gradient.
    """
    (qkv,) = _in_autocast_dtype(qkv)
    check_packed(qkv, num_heads, scale)
    return torch.ops.vitops.attention_packed(qkv, num_heads, scale)[0]
