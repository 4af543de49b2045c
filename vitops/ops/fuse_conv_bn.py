"""Conv-BatchNorm fusion: fold an inference-mode BatchNorm into the convolution (or linear layer) before it.

`fuse_conv_bn` computes the folded weight and bias in one pass over the weights. It is differentiable in every
tensor argument, so a re-parameterized block (RepVGG, ACNet) can build its equivalent kernel from BN-folded
branches while training. The gradients are composed from torch ops in the registered autograd formula.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from vitops import _backend, _extension
from vitops.ops import _fuse_conv_bn_checks as checks
from vitops.ops import reference

try:
    from vitops.ops.triton import fuse_conv_bn as _triton

    _TRITON_ERROR = None
except ImportError as error:  # triton missing or broken: the other backends still work
    _triton = None
    _TRITON_ERROR = f"Triton kernels failed to import: {error}"

_backend.register_op("fuse_conv_bn", has_triton=True, triton_blocker=_TRITON_ERROR)


# --- what every backend promises: output metadata (fake kernels) and gradients (autograd) --------------------


def _fake(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps):
    checks.check_fuse_conv_bn(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps)
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


def _register(op: str) -> None:
    torch.library.register_fake(op)(_fake)
    torch.library.register_autograd(op, _backward, setup_context=_setup_context)


def _reference_impl(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps):
    checks.check_fuse_conv_bn(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps)
    fused_weight, fused_bias = reference.fuse_conv_bn(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps)
    return fused_weight, fused_bias


# Where vitops._C brought no kernel, the compiled op falls back to Triton on CUDA and to the reference on CPU.
for _key in _extension.DISPATCH_KEYS:
    if not _extension.has_compiled_kernel("fuse_conv_bn", _key):
        _impl = _triton.fuse_conv_bn_triton if (_key == "CUDA" and _triton is not None) else _reference_impl
        torch.library.impl("vitops::fuse_conv_bn", _key)(_impl)

_register("vitops::fuse_conv_bn")
if _triton is not None:
    _register("vitops::fuse_conv_bn_triton")


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
    for name, t in zip(checks.CHANNEL_ARGS, values):
        _check_tensor(name, t, optional=name not in ("running_mean", "running_var"))
    if weight.ndim < 2:
        raise ValueError(
            "vitops.fuse_conv_bn: weight must have shape (out_channels, in_channels / groups, *kernel), got "
            f"{tuple(weight.shape)}"
        )
    if weight.dtype not in checks.KERNEL_DTYPES:
        raise TypeError(
            f"vitops.fuse_conv_bn: weight must be float32, float16, bfloat16 or float64, got {weight.dtype}"
        )
    for name, t in zip(checks.CHANNEL_ARGS, values):
        if t is None:
            continue
        if t.shape != (weight.shape[0],):
            raise ValueError(
                f"vitops.fuse_conv_bn: {name} must have shape ({weight.shape[0]},) to match weight's "
                f"{weight.shape[0]} output channels, got {tuple(t.shape)}"
            )
        if t.device != weight.device:
            raise ValueError(f"vitops.fuse_conv_bn: {name} is on {t.device} but weight is on {weight.device}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"vitops.fuse_conv_bn: eps must be a finite number > 0, got {eps!r}")
    eps = float(eps)
    backend = _backend.backend_for("fuse_conv_bn", weight.device.type)
    if backend == "torch":
        return reference.fuse_conv_bn(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps)
    acc = reference.accumulate_dtype(weight.dtype)
    bias, running_mean, running_var, bn_weight, bn_bias = (t.to(acc) if t is not None else None for t in values)
    op = torch.ops.vitops.fuse_conv_bn_triton if backend == "triton" else torch.ops.vitops.fuse_conv_bn
    return op(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps)
