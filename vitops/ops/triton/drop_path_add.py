"""Triton kernels of drop_path_add.

A tensor is walked in memory order as a (rows, channels, inner) grid (see _MemoryLayout), tiled
in 3-D so that a tile's sample and channel indices are vectors along its own axes: no per-element division, and
gamma's gradient is a reduction over two tile axes. A dropped sample's branch is masked out of every load.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from vitops.ops import reference

_TILE_ELEMENTS = 4096


@triton.jit
def _tile(pid, rows, channels, inner, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    tiles_i = tl.cdiv(inner, BLOCK_I)
    tiles_c = tl.cdiv(channels, BLOCK_C)
    pid_i = pid % tiles_i
    pid_c = (pid // tiles_i) % tiles_c
    pid_r = pid // (tiles_i * tiles_c)
    r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    i = pid_i.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    offsets = (r[:, None, None] * channels + c[None, :, None]) * inner + i[None, None, :]
    in_bounds = (r < rows)[:, None, None] & (c < channels)[None, :, None] & (i < inner)[None, None, :]
    return r, c, offsets, in_bounds


@triton.jit
def _row_scale(scale_ptr, r, rows, rows_per_sample, HAS_SCALE: tl.constexpr, ACC: tl.constexpr):
    if HAS_SCALE:
        return tl.load(scale_ptr + r // rows_per_sample, mask=r < rows, other=1.0).to(ACC)
    return tl.full(r.shape, 1.0, ACC)


@triton.jit
def _channel_gamma(gamma_ptr, c, channels, HAS_GAMMA: tl.constexpr, ACC: tl.constexpr):
    if HAS_GAMMA:
        return tl.load(gamma_ptr + c, mask=c < channels, other=0.0).to(ACC)
    return tl.full(c.shape, 1.0, ACC)


@triton.jit
def _forward_kernel(
    residual_ptr, branch_ptr, gamma_ptr, scale_ptr, out_ptr,
    rows, channels, inner, rows_per_sample,
    HAS_RESIDUAL: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    r, c, offsets, in_bounds = _tile(tl.program_id(0), rows, channels, inner, BLOCK_R, BLOCK_C, BLOCK_I)
    s = _row_scale(scale_ptr, r, rows, rows_per_sample, HAS_SCALE, ACC)
    g = _channel_gamma(gamma_ptr, c, channels, HAS_GAMMA, ACC)
    kept = in_bounds & (s != 0.0)[:, None, None]
    b = tl.load(branch_ptr + offsets, mask=kept, other=0.0).to(ACC)
    # A dropped sample's branch term is exactly 0, whatever gamma holds (0 * inf would be NaN).
    out = tl.where(kept, (b * g[None, :, None]) * s[:, None, None], 0.0)
    if HAS_RESIDUAL:
        out = tl.load(residual_ptr + offsets, mask=in_bounds, other=0.0).to(ACC) + out
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _backward_kernel(
    grad_out_ptr, branch_ptr, gamma_ptr, scale_ptr, grad_branch_ptr, partials_ptr,
    rows, channels, inner, rows_per_sample,
    HAS_GAMMA: tl.constexpr, HAS_SCALE: tl.constexpr, NEED_BRANCH_GRAD: tl.constexpr, NEED_GAMMA_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    r, c, offsets, in_bounds = _tile(pid, rows, channels, inner, BLOCK_R, BLOCK_C, BLOCK_I)
    s = _row_scale(scale_ptr, r, rows, rows_per_sample, HAS_SCALE, ACC)
    kept = in_bounds & (s != 0.0)[:, None, None]
    grad = tl.load(grad_out_ptr + offsets, mask=kept, other=0.0).to(ACC) * s[:, None, None]
    if NEED_BRANCH_GRAD:
        g = _channel_gamma(gamma_ptr, c, channels, HAS_GAMMA, ACC)
        grad_branch = tl.where(kept, grad * g[None, :, None], 0.0)
        tl.store(grad_branch_ptr + offsets, grad_branch.to(grad_branch_ptr.dtype.element_ty), mask=in_bounds)
    if NEED_GAMMA_GRAD:
        b = tl.load(branch_ptr + offsets, mask=kept, other=0.0).to(ACC)
        partial = tl.sum(tl.sum(grad * b, axis=2), axis=0)
        # One row of partial sums per tile: the channel tile's columns of row (pid without its channel part).
        tiles_i = tl.cdiv(inner, BLOCK_I)
        tiles_c = tl.cdiv(channels, BLOCK_C)
        row = (pid // (tiles_i * tiles_c)) * tiles_i + pid % tiles_i
        tl.store(partials_ptr + row.to(tl.int64) * channels + c, partial, mask=c < channels)


@dataclass(frozen=True)
class _MemoryLayout:
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


def _memory_layout(t: Tensor, gamma: Optional[Tensor]) -> _MemoryLayout:
    numel = t.numel()
    per_sample = numel // t.shape[0] if t.shape[0] else 0
    channels = gamma.shape[0] if gamma is not None else 1
    inner = t.stride(t.ndim - gamma.ndim) if channels > 1 else per_sample
    return _MemoryLayout(numel, per_sample, channels, inner)


def _with_layout_of(x: Tensor, layout: Tensor) -> Tensor:
    """`x` with the strides of `layout`, copied only when they differ."""
    if x.stride() == layout.stride():
        return x
    return torch.empty_like(layout, dtype=x.dtype).copy_(x)


def _contiguous(x: Optional[Tensor]) -> Optional[Tensor]:
    """gamma and sample_scale are indexed as dense vectors by the kernels (they are small: copies are cheap)."""
    return x.contiguous() if x is not None else None


def _tiles(layout: _MemoryLayout) -> tuple[int, int, int]:
    """Tile sizes (rows, channels, inner) of _TILE_ELEMENTS elements, shaped after the layout. Rows past the
    tensor are masked, so a tile's shape depends on the channels and inner sizes alone: 21 shapes in all."""
    if layout.inner == 1:
        block_c = min(triton.next_power_of_2(layout.channels), 256)
        block_i = 1
    else:
        block_c = 1
        block_i = min(triton.next_power_of_2(layout.inner), _TILE_ELEMENTS)
    return max(1, _TILE_ELEMENTS // (block_c * block_i)), block_c, block_i


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _tile_meta(layout: _MemoryLayout, dtype: torch.dtype) -> dict:
    """8 warps, 16 elements a thread: with 4, the float32 backward spills on sm_90 (`python -m benchmarks.static`)."""
    block_r, block_c, block_i = _tiles(layout)
    acc = _tl_dtype(reference.accumulate_dtype(dtype))
    return dict(BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_I=block_i, ACC=acc, num_warps=8)


def forward_meta(
    layout: _MemoryLayout, out_dtype: torch.dtype, has_residual: bool, has_gamma: bool, has_scale: bool
) -> dict:
    """The keyword arguments (constexprs and launch options) of a _forward_kernel launch."""
    return dict(
        HAS_RESIDUAL=has_residual, HAS_GAMMA=has_gamma, HAS_SCALE=has_scale, **_tile_meta(layout, out_dtype),
        enable_fp_fusion=False,  # no FMA: float32 results equal timm's op-by-op ones
    )  # fmt: skip


def backward_meta(
    layout: _MemoryLayout, grad_dtype: torch.dtype, has_gamma: bool, has_scale: bool,
    need_branch_grad: bool, need_gamma_grad: bool,
) -> dict:  # fmt: skip
    """The keyword arguments (constexprs and launch options) of a _backward_kernel launch."""
    return dict(
        HAS_GAMMA=has_gamma, HAS_SCALE=has_scale, NEED_BRANCH_GRAD=need_branch_grad,
        NEED_GAMMA_GRAD=need_gamma_grad, **_tile_meta(layout, grad_dtype),
    )  # fmt: skip


def _grid(layout: _MemoryLayout, blocks: tuple[int, int, int]) -> int:
    block_r, block_c, block_i = blocks
    return triton.cdiv(layout.rows, block_r) * triton.cdiv(layout.channels, block_c) * triton.cdiv(layout.inner, block_i)


def forward(
    residual: Optional[Tensor], branch: Tensor, gamma: Optional[Tensor], sample_scale: Optional[Tensor]
) -> Tensor:
    gamma, sample_scale = _contiguous(gamma), _contiguous(sample_scale)
    primary = residual if residual is not None else branch
    out = reference.drop_path_add_empty_output(primary, primary.dtype)
    if out.numel() == 0:
        return out
    branch = _with_layout_of(branch, out)
    if residual is not None:
        residual = _with_layout_of(residual, out)
    layout = _memory_layout(out, gamma)
    _forward_kernel[(_grid(layout, _tiles(layout)),)](
        residual, branch, gamma, sample_scale, out,
        layout.rows, layout.channels, layout.inner, layout.rows_per_sample,
        **forward_meta(layout, out.dtype, residual is not None, gamma is not None, sample_scale is not None),
    )  # fmt: skip
    return out


def backward(
    grad_out: Tensor,
    branch: Optional[Tensor],
    gamma: Optional[Tensor],
    sample_scale: Optional[Tensor],
    branch_dtype: torch.dtype,
    need_branch_grad: bool,
) -> tuple[Tensor, Tensor]:
    gamma, sample_scale = _contiguous(gamma), _contiguous(sample_scale)
    acc = reference.accumulate_dtype(grad_out.dtype)
    layout_ref = reference.drop_path_add_empty_output(grad_out, branch_dtype)
    grad_branch = layout_ref if need_branch_grad else grad_out.new_empty(0, dtype=branch_dtype)
    need_gamma_grad = branch is not None
    if not need_gamma_grad:
        grad_gamma = grad_out.new_empty(0, dtype=acc)
    elif grad_out.numel() == 0:
        grad_gamma = torch.zeros(gamma.shape, dtype=acc, device=grad_out.device)
    if grad_out.numel() == 0 or not (need_branch_grad or need_gamma_grad):
        return grad_branch, grad_gamma
    grad_out = _with_layout_of(grad_out, layout_ref)
    layout = _memory_layout(layout_ref, gamma)
    blocks = _tiles(layout)
    partials = None
    if need_gamma_grad:
        branch = _with_layout_of(branch, layout_ref)
        partial_rows = triton.cdiv(layout.rows, blocks[0]) * triton.cdiv(layout.inner, blocks[2])
        partials = torch.empty(partial_rows, layout.channels, dtype=acc, device=grad_out.device)
    _backward_kernel[(_grid(layout, blocks),)](
        grad_out, branch, gamma, sample_scale, grad_branch, partials,
        layout.rows, layout.channels, layout.inner, layout.rows_per_sample,
        **backward_meta(layout, grad_out.dtype, gamma is not None, sample_scale is not None, need_branch_grad,
                        need_gamma_grad),
    )  # fmt: skip
    if need_gamma_grad:
        grad_gamma = partials.sum(0).view(gamma.shape)
    return grad_branch, grad_gamma
