"""Conv-BatchNorm fusion: fold an inference-mode BatchNorm into the convolution (or linear layer) before it.

`fuse_conv_bn` computes the folded weight and bias in one pass over the weights. It is differentiable in every
tensor argument, so a re-parameterized block (RepVGG, ACNet) can build its equivalent kernel from BN-folded
branches while training. The gradients are composed from torch ops in the registered autograd formula.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from vitops.ops import reference
from vitops.ops._define import check_device_and_dtype, define_op

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CHANNEL_ARGS = ("bias", "running_mean", "running_var", "bn_weight", "bn_bias")


# --- the op's Python argument check (the compiled kernels' is in csrc/fuse_conv_bn.h) ---------------------------


def _check(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps) -> None:
    if weight.dtype not in KERNEL_DTYPES:
        raise TypeError(f"vitops.fuse_conv_bn: weight must be float32, float16, bfloat16 or float64, got {weight.dtype}")
    if weight.ndim < 2:
        raise ValueError(
            "vitops.fuse_conv_bn: weight must have shape (out_channels, in_channels / groups, *kernel), got "
            f"{tuple(weight.shape)}"
        )
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"vitops.fuse_conv_bn: eps must be a finite number > 0, got {eps}")
    acc = reference.accumulate_dtype(weight.dtype)
    for name, t in zip(CHANNEL_ARGS, (bias, running_mean, running_var, bn_weight, bn_bias)):
        if t is None:
            continue
        check_device_and_dtype("fuse_conv_bn", name, t, "weight", weight, acc, f" for a {weight.dtype} weight")
        if t.ndim != 1 or t.shape[0] != weight.shape[0]:
            raise ValueError(
                f"vitops.fuse_conv_bn: {name} must have shape ({weight.shape[0]},), one value per output channel of "
                f"weight {tuple(weight.shape)}, got {tuple(t.shape)}"
            )


# --- what every backend promises: output metadata (fake kernels) and gradients (autograd) --------------------


def _fake(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps):
    _check(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps)
    return weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output):
    weight, bias, running_mean, running_var, bn_weight, bn_bias, eps = inputs
    ctx.save_for_backward(weight, bias, running_mean, running_var, bn_weight)
    ctx.eps = eps
    ctx.has_bn_bias = bn_bias is not None


def _backward(ctx, grad_weight, grad_bias):
    """d/d(inputs) of  fw = w * g * r  and  fb = (b - m) * r * g + beta,  with r = (var + eps)^-1/2."""
    weight, bias, running_mean, running_var, bn_weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    acc = running_var.dtype
    shape = (-1,) + (1,) * (weight.ndim - 1)
    gw = torch.zeros_like(weight, dtype=acc) if grad_weight is None else grad_weight.to(acc)
    gb = torch.zeros_like(running_var) if grad_bias is None else grad_bias.to(acc)
    inv_std = torch.rsqrt(running_var + ctx.eps)
    gamma = bn_weight if bn_weight is not None else torch.ones_like(inv_std)
    scale = gamma * inv_std
    grads = [None] * 7
    if needs[0]:
        grads[0] = (gw * scale.view(shape)).to(weight.dtype)
    if needs[1] and bias is not None:
        grads[1] = gb * scale
    if needs[2]:
        grads[2] = -gb * scale
    if needs[3] or needs[4]:
        centred = -running_mean if bias is None else bias - running_mean
        # d/d(g * r) of both outputs: from the weight, sum over each output channel's weights.
        d_scale = (gw * weight.to(acc)).flatten(1).sum(1) + gb * centred
        if needs[3]:
            grads[3] = d_scale * gamma * (-0.5) * inv_std**3
        if needs[4] and bn_weight is not None:
            grads[4] = d_scale * inv_std
    if needs[5] and ctx.has_bn_bias:
        grads[5] = gb
    return tuple(grads)


define_op(
    "fuse_conv_bn",
    fake=_fake,
    reference=reference.fuse_conv_bn,
    check=_check,
    triton="fuse_conv_bn:fuse_conv_bn",
    backward=_backward,
    setup_context=_setup_context,
)


# --- public API -----------------------------------------------------------------------------------------------


def _check_tensor(name: str, t, optional: bool) -> None:
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        kind = "a Tensor or None" if optional else "a Tensor"
        raise TypeError(f"vitops.fuse_conv_bn: {name} must be {kind}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"vitops.fuse_conv_bn: {name} must be a floating-point tensor, got {t.dtype}")


def fuse_conv_bn(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Folds an inference-mode BatchNorm into the convolution before it; a drop-in for
    torch.nn.utils.fusion.fuse_conv_bn_weights.

    Args:
        weight: the conv weight, (out_channels, in_channels / groups, *kernel) for any conv rank and groups
            (a linear layer's (out, in) weight works too). Not transposed convs: their dim 0 is the input.
        bias: the conv bias (out_channels,), or None for none.
        running_mean, running_var: the BatchNorm's running statistics (out_channels,).
        bn_weight, bn_bias: the BatchNorm's affine parameters, or None when it has none (gamma=1, beta=0).
        eps: the BatchNorm's eps, > 0.

    Returns:
        (fused_weight, fused_bias), both contiguous and in the weight's dtype, with
        `fused_weight = weight * bn_weight / sqrt(running_var + eps)` per output channel and
        `fused_bias = (bias - running_mean) * bn_weight / sqrt(running_var + eps) + bn_bias`, computed in float32
        (float64 for a float64 weight). Differentiable in every tensor argument.
    """
    _check_tensor("weight", weight, optional=False)
    values = (bias, running_mean, running_var, bn_weight, bn_bias)
    for name, t in zip(CHANNEL_ARGS, values):
        _check_tensor(name, t, optional=name not in ("running_mean", "running_var"))
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"vitops.fuse_conv_bn: eps must be a finite number > 0, got {eps!r}")
    # The kernels take the per-channel tensors in the compute dtype; casting here keeps them differentiable.
    acc = reference.accumulate_dtype(weight.dtype) if weight.dtype in KERNEL_DTYPES else weight.dtype
    bias, running_mean, running_var, bn_weight, bn_bias = (t.to(acc) if t is not None else None for t in values)
    return torch.ops.vitops.fuse_conv_bn(weight, bias, running_mean, running_var, bn_weight, bn_bias, float(eps))
