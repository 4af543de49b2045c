"""Argument checks of the attention ops, shared by the public functions, the fake kernels and every backend."""
from __future__ import annotations

import torch
from torch import Tensor

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    if d < 1 or d > MAX_HEAD_DIM:
        raise ValueError(f"vitops.{op}: head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")


def _check_same(op: str, tensors: dict[str, Tensor]) -> None:
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.dtype != first.dtype:
            raise TypeError(f"vitops.{op}: {first_name} is {first.dtype} but {name} is {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"vitops.{op}: {first_name} is on {first.device} but {name} is on {t.device}")


def check_qkv(q: Tensor, k: Tensor, v: Tensor, op: str = "attention") -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(op, name, t, 4)
    _check_same(op, {"q": q, "k": k, "v": v})
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"vitops.{op}: expected q (B, H, Nq, D) and k, v (B, H, Nk, D), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    _check_head_dim(op, q.shape[-1])


def check_packed(qkv: Tensor, num_heads: int, op: str = "attention_packed") -> int:
    """Checks a packed qkv and returns its head_dim."""
    _check_tensor(op, "qkv", qkv, 3)
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"vitops.{op}: num_heads must be a positive int, got {num_heads!r}")
    c3 = qkv.shape[-1]
    if c3 % (3 * num_heads) != 0 or c3 == 0:
        raise ValueError(
            f"vitops.{op}: qkv's last dim {c3} is not 3 * num_heads * head_dim for num_heads={num_heads}"
        )
    d = c3 // (3 * num_heads)
    _check_head_dim(op, d)
    return d
