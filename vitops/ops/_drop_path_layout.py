"""The argument checks and memory-order layout of the drop_path_add ops, shared by the fake kernels, the
Triton launchers and the Python fallbacks. They mirror csrc/drop_path_add.h, so every backend accepts the same
arguments and returns outputs with the same strides."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vitops.ops.reference import accumulate_dtype

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _require(condition: bool, op: str, message: str) -> None:
    torch._check(condition, lambda: f"vitops.{op}: {message}")


def is_batch_outer_dense(t: Tensor) -> bool:
    return torch._prims_common.is_non_overlapping_and_dense_or_false(t) and (
        t.shape[0] <= 1 or t.stride(0) * t.shape[0] == t.numel()
    )


def empty_in_kernel_layout(like: Tensor, dtype: torch.dtype) -> Tensor:
    """Outputs keep `like`'s layout when the kernels can walk it in memory order, else they are contiguous."""
    if is_batch_outer_dense(like):
        return torch.empty_like(like, dtype=dtype)
    return torch.empty(like.shape, dtype=dtype, device=like.device)


def with_layout_of(x: Tensor, layout: Tensor) -> Tensor:
    """`x` with the strides of `layout`, copied only when they differ."""
    if x.stride() == layout.stride():
        return x
    return torch.empty_like(layout, dtype=x.dtype).copy_(x)


def supported_pair(out: torch.dtype, branch: torch.dtype) -> bool:
    """The kernels read a half/bfloat16 branch next to a float32 residual; any other pair must match."""
    return branch == out or (out == torch.float32 and branch in (torch.float16, torch.bfloat16))


def _check_gamma_and_scale(op: str, like: Tensor, gamma: Tensor | None, sample_scale: Tensor | None, acc) -> None:
    if gamma is not None:
        _require(gamma.device == like.device, op, f"gamma is on {gamma.device} but branch is on {like.device}")
        _require(gamma.dtype == acc, op, f"gamma must be {acc} for {like.dtype} inputs, got {gamma.dtype}")
        _require(
            1 <= gamma.ndim < like.ndim,
            op,
            f"gamma must have between 1 and {like.ndim - 1} dims to broadcast against a {like.ndim}-d branch, "
            f"got shape {tuple(gamma.shape)}",
        )
        channel_dim = like.ndim - gamma.ndim
        _require(
            gamma.shape[0] == like.shape[channel_dim] and all(s == 1 for s in gamma.shape[1:]),
            op,
            f"gamma must have shape (C,) or (C, 1, ..., 1) matching dim {channel_dim} of branch "
            f"{tuple(like.shape)}, got {tuple(gamma.shape)}",
        )
    if sample_scale is not None:
        _require(
            sample_scale.device == like.device,
            op,
            f"sample_scale is on {sample_scale.device} but branch is on {like.device}",
        )
        _require(sample_scale.dtype == acc, op, f"sample_scale must be {acc}, got {sample_scale.dtype}")
        _require(
            sample_scale.ndim == 1 and sample_scale.shape[0] == like.shape[0],
            op,
            f"sample_scale must have shape ({like.shape[0]},), one value per sample, got {tuple(sample_scale.shape)}",
        )


def check_forward(residual: Tensor | None, branch: Tensor, gamma: Tensor | None, sample_scale: Tensor | None):
    op = "drop_path_add"
    _require(
        branch.dtype in KERNEL_DTYPES, op, f"branch must be float32, float16, bfloat16 or float64, got {branch.dtype}"
    )
    _require(branch.ndim >= 1, op, "branch must have a batch dim, got a 0-d tensor")
    out_dtype = branch.dtype
    if residual is not None:
        _require(
            residual.device == branch.device, op, f"residual is on {residual.device} but branch is on {branch.device}"
        )
        _require(
            residual.shape == branch.shape,
            op,
            f"residual and branch must have the same shape, got {tuple(residual.shape)} and {tuple(branch.shape)}",
        )
        out_dtype = residual.dtype
        _require(
            out_dtype in KERNEL_DTYPES and supported_pair(out_dtype, branch.dtype),
            op,
            "residual must be float32, float16, bfloat16 or float64 and branch the same dtype (or "
            f"float16/bfloat16 with a float32 residual), got residual {out_dtype} and branch {branch.dtype}",
        )
    _check_gamma_and_scale(op, branch, gamma, sample_scale, accumulate_dtype(out_dtype))
    return out_dtype


def check_backward(grad_out, branch, gamma, sample_scale, branch_dtype) -> None:
    op = "drop_path_add_backward"
    _require(
        grad_out.dtype in KERNEL_DTYPES and supported_pair(grad_out.dtype, branch_dtype),
        op,
        f"unsupported grad_out {grad_out.dtype} for branch dtype {branch_dtype}",
    )
    _require(grad_out.ndim >= 1, op, "grad_out must have a batch dim, got a 0-d tensor")
    if branch is not None:
        _require(gamma is not None, op, "branch is only needed, and only accepted, for gamma's gradient")
        _require(
            branch.shape == grad_out.shape and branch.dtype == branch_dtype and branch.device == grad_out.device,
            op,
            "branch must match grad_out's shape and device and have dtype branch_dtype",
        )
    _check_gamma_and_scale(op, grad_out, gamma, sample_scale, accumulate_dtype(grad_out.dtype))


@dataclass(frozen=True)
class MemoryLayout:
    """A dense, batch-outer tensor seen in memory order as (rows, channels, inner): element p is in sample
    p // per_sample and channel (p // inner) % channels."""

    numel: int
    per_sample: int
    channels: int
    inner: int

    @property
    def rows(self) -> int:
        return self.numel // (self.channels * self.inner) if self.numel else 0

    @property
    def rows_per_sample(self) -> int:
        return self.per_sample // (self.channels * self.inner) if self.numel else 0


def memory_layout(t: Tensor, gamma: Tensor | None) -> MemoryLayout:
    numel = t.numel()
    per_sample = numel // t.shape[0] if t.shape[0] else 0
    channels = gamma.shape[0] if gamma is not None else 1
    inner = t.stride(t.ndim - gamma.ndim) if channels > 1 else per_sample
    return MemoryLayout(numel, per_sample, channels, inner)
