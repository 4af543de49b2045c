"""The argument checks of the fuse_conv_bn ops, shared by the fake kernel, the Triton launcher and the Python
fallbacks. They mirror csrc/fuse_conv_bn.h, so every backend accepts the same arguments."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from vitops.ops.reference import accumulate_dtype

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CHANNEL_ARGS = ("bias", "running_mean", "running_var", "bn_weight", "bn_bias")


def _require(condition: bool, message: str) -> None:
    torch._check(condition, lambda: f"vitops.fuse_conv_bn: {message}")


def check_fuse_conv_bn(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    eps: float,
) -> None:
    _require(weight.dtype in KERNEL_DTYPES, f"weight must be float32, float16, bfloat16 or float64, got {weight.dtype}")
    _require(
        weight.ndim >= 2,
        f"weight must have shape (out_channels, in_channels / groups, *kernel), got {tuple(weight.shape)}",
    )
    _require(math.isfinite(eps) and eps > 0, f"eps must be a finite number > 0, got {eps}")
    acc = accumulate_dtype(weight.dtype)
    values = (bias, running_mean, running_var, bn_weight, bn_bias)
    for name, t in zip(CHANNEL_ARGS, values):
        if t is None:
            continue
        _require(t.device == weight.device, f"{name} is on {t.device} but weight is on {weight.device}")
        _require(t.dtype == acc, f"{name} must be {acc} for a {weight.dtype} weight, got {t.dtype}")
        _require(
            t.ndim == 1 and t.shape[0] == weight.shape[0],
            f"{name} must have shape ({weight.shape[0]},), one value per output channel of weight "
            f"{tuple(weight.shape)}, got {tuple(t.shape)}",
        )
