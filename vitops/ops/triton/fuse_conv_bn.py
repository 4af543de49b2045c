"""Triton kernel of fuse_conv_bn: one program per block of output channels, looping over the channels'
weights in (channels, weights) tiles. Per-channel scale and bias are computed once per program."""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

_TILE_ELEMENTS = 4096


@triton.jit
def _fuse_conv_bn_kernel(
    weight_ptr, bias_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr, fused_weight_ptr, fused_bias_ptr,
    channels, per_channel, eps,
    HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, IS_FP64: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = c < channels
    var_eps = tl.load(var_ptr + c, mask=in_c, other=1.0).to(ACC) + eps
    if IS_FP64:  # float64 sqrt and division are IEEE-rounded already
        inv_std = 1.0 / tl.sqrt(var_eps)
    else:  # tl.sqrt and / are approximate for float32 on GPUs
        inv_std = tl.div_rn(tl.full((BLOCK_C,), 1.0, ACC), tl.sqrt_rn(var_eps))
    if HAS_GAMMA:
        gamma = tl.load(gamma_ptr + c, mask=in_c, other=1.0).to(ACC)
    else:
        gamma = tl.full((BLOCK_C,), 1.0, ACC)
    scale = gamma * inv_std
    centred = -tl.load(mean_ptr + c, mask=in_c, other=0.0).to(ACC)
    if HAS_BIAS:
        centred = tl.load(bias_ptr + c, mask=in_c, other=0.0).to(ACC) + centred
    fused_bias = (centred * inv_std) * gamma
    if HAS_BETA:
        fused_bias = fused_bias + tl.load(beta_ptr + c, mask=in_c, other=0.0).to(ACC)
    tl.store(fused_bias_ptr + c, fused_bias.to(fused_bias_ptr.dtype.element_ty), mask=in_c)

    rows = c.to(tl.int64) * per_channel
    for k0 in range(0, per_channel, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = in_c[:, None] & (k < per_channel)[None, :]
        offsets = rows[:, None] + k[None, :]
        w = tl.load(weight_ptr + offsets, mask=mask, other=0.0).to(ACC)
        tl.store(fused_weight_ptr + offsets, (w * scale[:, None]).to(fused_weight_ptr.dtype.element_ty), mask=mask)


def launch_meta(
    weight_dtype: torch.dtype, per_channel: int, has_bias: bool, has_gamma: bool, has_beta: bool
) -> dict:
    """The keyword arguments (constexprs) of a _fuse_conv_bn_kernel launch: tiles of _TILE_ELEMENTS weights,
    BLOCK_K of a channel's `per_channel` weights by BLOCK_C channels (channels past the weight are masked), so
    there are 13 tile shapes in all."""
    block_k = min(triton.next_power_of_2(max(per_channel, 1)), _TILE_ELEMENTS)
    is_fp64 = weight_dtype == torch.float64
    return dict(
        HAS_BIAS=has_bias, HAS_GAMMA=has_gamma, HAS_BETA=has_beta, BLOCK_C=_TILE_ELEMENTS // block_k,
        BLOCK_K=block_k, ACC=tl.float64 if is_fp64 else tl.float32, IS_FP64=is_fp64,
    )  # fmt: skip


def fuse_conv_bn(
    weight: Tensor,
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    eps: float,
) -> tuple[Tensor, Tensor]:
    channels = weight.shape[0]
    fused_weight = weight.new_empty(weight.shape)
    fused_bias = weight.new_empty(channels)
    if channels == 0:
        return fused_weight, fused_bias
    per_channel = weight.numel() // channels
    weight = weight.contiguous()
    channel_tensors = (bias, running_mean, running_var, bn_weight, bn_bias)
    bias, running_mean, running_var, bn_weight, bn_bias = (t.contiguous() if t is not None else None
                                                           for t in channel_tensors)  # fmt: skip
    meta = launch_meta(weight.dtype, per_channel, bias is not None, bn_weight is not None, bn_bias is not None)
    _fuse_conv_bn_kernel[(triton.cdiv(channels, meta["BLOCK_C"]),)](
        weight, bias, running_mean, running_var, bn_weight, bn_bias, fused_weight, fused_bias,
        channels, per_channel, eps, **meta,
    )  # fmt: skip
    return fused_weight, fused_bias
