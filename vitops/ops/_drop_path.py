"""Stochastic depth (drop path) and the fused residual `residual + drop_path(branch * gamma)`.

drop_path_add is the end of every ViT and ResNet block. Fused, it reads residual and branch once and writes the
output once: 3 passes over memory where timm's eager version makes 5 (7 with LayerScale). Its backward produces
the branch's and gamma's gradients in one more pass. The per-sample keep mask is drawn here with torch's RNG,
exactly as timm draws it, so a seed gives the same mask on every backend.

Kernels: csrc/cpu/drop_path_add.cpp, csrc/cuda/drop_path_add.cu (shared math and checks in
csrc/drop_path_add.h), vitops/ops/triton/drop_path_add.py; the spec is vitops.ops.reference.drop_path_add.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vitops.ops import reference
from vitops.ops._define import check_device_and_dtype, define_op

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_NAMES = "float32, float16, bfloat16 or float64"


# --- the ops' Python argument checks (the compiled kernels' are in csrc/drop_path_add.h) -----------------------


def _supported_pair(out: torch.dtype, branch: torch.dtype) -> bool:
    """The kernels read a half/bfloat16 branch next to a float32 residual; any other pair must match."""
    return branch == out or (out == torch.float32 and branch in (torch.float16, torch.bfloat16))


def _check_gamma_and_scale(op: str, like: Tensor, gamma: Tensor | None, sample_scale: Tensor | None, acc) -> None:
    if gamma is not None:
        check_device_and_dtype(op, "gamma", gamma, "branch", like, acc, f" for {like.dtype} inputs")
        channel_dim = like.ndim - gamma.ndim
        if not (
            1 <= gamma.ndim < like.ndim
            and gamma.shape[0] == like.shape[channel_dim]
            and all(s == 1 for s in gamma.shape[1:])
        ):
            raise ValueError(
                f"vitops.{op}: gamma of shape {tuple(gamma.shape)} can't scale branch of shape {tuple(like.shape)}: "
                "give (C,) for the last dim, or (C, 1, ..., 1) for an earlier one, e.g. (C, 1, 1) for dim 1 of NCHW"
            )
    if sample_scale is not None:
        check_device_and_dtype(op, "sample_scale", sample_scale, "branch", like, acc)
        if sample_scale.ndim != 1 or sample_scale.shape[0] != like.shape[0]:
            raise ValueError(
                f"vitops.{op}: sample_scale must have shape ({like.shape[0]},), one value per sample, got "
                f"{tuple(sample_scale.shape)}"
            )


def _check_forward(residual, branch, gamma, sample_scale) -> torch.dtype:
    """Checks drop_path_add's arguments; returns the output dtype."""
    op = "drop_path_add"
    if branch.dtype not in KERNEL_DTYPES:
        raise TypeError(f"vitops.{op}: branch must be {_DTYPE_NAMES}, got {branch.dtype}")
    if branch.ndim < 1:
        raise ValueError(f"vitops.{op}: branch must have a batch dim, got a 0-d tensor")
    out_dtype = branch.dtype
    if residual is not None:
        if residual.device != branch.device:
            raise ValueError(f"vitops.{op}: residual is on {residual.device} but branch is on {branch.device}")
        if residual.shape != branch.shape:
            raise ValueError(
                f"vitops.{op}: residual and branch must have the same shape, got {tuple(residual.shape)} and "
                f"{tuple(branch.shape)}"
            )
        out_dtype = residual.dtype
        if out_dtype not in KERNEL_DTYPES or not _supported_pair(out_dtype, branch.dtype):
            raise TypeError(
                f"vitops.{op}: residual must be {_DTYPE_NAMES} and branch the same dtype (or float16/bfloat16 with "
                f"a float32 residual), got residual {out_dtype} and branch {branch.dtype}"
            )
    _check_gamma_and_scale(op, branch, gamma, sample_scale, reference.accumulate_dtype(out_dtype))
    return out_dtype


def _check_backward(grad_out, branch, gamma, sample_scale, branch_dtype, need_branch_grad) -> None:
    op = "drop_path_add_backward"
    if grad_out.dtype not in KERNEL_DTYPES or not _supported_pair(grad_out.dtype, branch_dtype):
        raise TypeError(f"vitops.{op}: unsupported grad_out {grad_out.dtype} for branch dtype {branch_dtype}")
    if grad_out.ndim < 1:
        raise ValueError(f"vitops.{op}: grad_out must have a batch dim, got a 0-d tensor")
    if branch is not None:
        if gamma is None:
            raise ValueError(f"vitops.{op}: branch is only needed, and only accepted, for gamma's gradient")
        if branch.shape != grad_out.shape or branch.dtype != branch_dtype or branch.device != grad_out.device:
            raise ValueError(
                f"vitops.{op}: branch must match grad_out's shape and device and have dtype branch_dtype"
            )
    _check_gamma_and_scale(op, grad_out, gamma, sample_scale, reference.accumulate_dtype(grad_out.dtype))


# --- fake kernels and the reference in the ops' output layout ----------------------------------------------------


def _forward_fake(residual, branch, gamma, sample_scale):
    out_dtype = _check_forward(residual, branch, gamma, sample_scale)
    return reference.drop_path_add_empty_output(residual if residual is not None else branch, out_dtype)


def _backward_fake(grad_out, branch, gamma, sample_scale, branch_dtype, need_branch_grad):
    _check_backward(grad_out, branch, gamma, sample_scale, branch_dtype, need_branch_grad)
    acc = reference.accumulate_dtype(grad_out.dtype)
    if need_branch_grad:
        grad_branch = reference.drop_path_add_empty_output(grad_out, branch_dtype)
    else:
        grad_branch = grad_out.new_empty(0, dtype=branch_dtype)
    grad_gamma = grad_out.new_empty(gamma.shape if branch is not None else (0,), dtype=acc)
    return grad_branch, grad_gamma


def _reference_forward(residual, branch, gamma, sample_scale):
    out = _forward_fake(residual, branch, gamma, sample_scale)
    return out.copy_(reference.drop_path_add(residual, branch, gamma, sample_scale))


def _reference_backward(grad_out, branch, gamma, sample_scale, branch_dtype, need_branch_grad):
    grad_branch, grad_gamma = _backward_fake(grad_out, branch, gamma, sample_scale, branch_dtype, need_branch_grad)
    ref_branch, ref_gamma = reference.drop_path_add_backward(
        grad_out, branch, gamma, sample_scale, branch_dtype, need_branch_grad
    )
    return grad_branch.copy_(ref_branch), grad_gamma.copy_(ref_gamma)


# --- autograd -----------------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    residual, branch, gamma, sample_scale = inputs
    need_gamma_grad = gamma is not None and ctx.needs_input_grad[2]
    # The branch is kept alive only for gamma's gradient; without LayerScale the backward needs only the mask.
    ctx.save_for_backward(branch if need_gamma_grad else None, gamma, sample_scale)
    ctx.branch_dtype = branch.dtype


def _backward(ctx, grad_out):
    branch, gamma, sample_scale = ctx.saved_tensors
    grad_branch, grad_gamma = torch.ops.vitops.drop_path_add_backward(
        grad_out, branch, gamma, sample_scale, ctx.branch_dtype, ctx.needs_input_grad[1]
    )
    return (
        grad_out if ctx.needs_input_grad[0] else None,
        grad_branch if ctx.needs_input_grad[1] else None,
        grad_gamma if branch is not None else None,
        None,
    )


def _setup_backward_context(ctx, inputs, output):
    grad_out, branch, gamma, sample_scale, branch_dtype, need_branch_grad = inputs
    ctx.save_for_backward(grad_out, branch, gamma, sample_scale)
    ctx.branch_dtype, ctx.need_branch_grad = branch_dtype, need_branch_grad


def _double_backward(ctx, grad_grad_branch, grad_grad_gamma):
    """Double backward (gradient penalties, create_graph=True): the backward is linear in grad_out, branch and
    gamma, so its own gradients come from differentiating the reference's formula; only the rare second-order
    pass runs in plain torch ops."""
    grad_out, branch, gamma, sample_scale = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() if t is not None else None for t in (grad_out, branch, gamma)]
        grad_branch, grad_gamma = reference.drop_path_add_backward(
            leaves[0], leaves[1], leaves[2], sample_scale, ctx.branch_dtype, ctx.need_branch_grad
        )
        outputs, weights = [], []
        if ctx.need_branch_grad and grad_grad_branch is not None:
            outputs.append(grad_branch), weights.append(grad_grad_branch)
        if branch is not None and grad_grad_gamma is not None:
            outputs.append(grad_gamma), weights.append(grad_grad_gamma)
        wanted = [t for t in leaves if t is not None]
        grads = iter(
            torch.autograd.grad(outputs, wanted, weights, allow_unused=True, create_graph=torch.is_grad_enabled())
            if outputs
            else [None] * len(wanted)
        )
    grad_out_grad, branch_grad, gamma_grad = (next(grads) if t is not None else None for t in leaves)
    return grad_out_grad, branch_grad, gamma_grad, None, None, None


for _name, _launcher, _fake, _spec, _check, _autograd in (
    ("drop_path_add_backward", "backward", _backward_fake, _reference_backward, _check_backward,
     (_double_backward, _setup_backward_context)),
    ("drop_path_add", "forward", _forward_fake, _reference_forward, _check_forward, (_backward, _setup_context)),
):  # fmt: skip
    define_op(
        _name,
        fake=_fake,
        reference=_spec,
        check=_check,
        triton=f"drop_path_add:{_launcher}",
        backward=_autograd[0],
        setup_context=_autograd[1],
    )


# --- public API -----------------------------------------------------------------------------------------------


def _check_floating(op: str, name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"vitops.{op}: {name} must be a Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"vitops.{op}: {name} must be a floating-point tensor, got {t.dtype}")


def _check_drop_prob(op: str, drop_prob: float) -> None:
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"vitops.{op}: drop_prob must be in [0, 1], got {drop_prob}")


def _run(residual: Tensor | None, branch: Tensor, gamma: Tensor | None, sample_scale: Tensor | None) -> Tensor:
    """Casts to what the kernels take (promoted output dtype, float32/float64 gamma and scale) and runs the op."""
    out_dtype = branch.dtype if gamma is None else torch.promote_types(branch.dtype, gamma.dtype)
    if residual is not None:
        out_dtype = torch.promote_types(residual.dtype, out_dtype)
        residual = residual.to(out_dtype)
    if not _supported_pair(out_dtype, branch.dtype):
        branch = branch.to(out_dtype)
    acc = reference.accumulate_dtype(out_dtype)
    gamma = gamma.to(acc) if gamma is not None else None
    sample_scale = sample_scale.to(acc) if sample_scale is not None else None
    return torch.ops.vitops.drop_path_add(residual, branch, gamma, sample_scale)


def drop_path_add(
    residual: Tensor,
    branch: Tensor,
    drop_prob: float = 0.0,
    training: bool = False,
    gamma: Tensor | None = None,
    scale_by_keep: bool = True,
) -> Tensor:
    """`residual + drop_path(branch * gamma)` in one pass over memory.

    Args:
        residual: (B, ...) the skip path.
        branch: (B, ...) the block's output, same shape as residual.
        drop_prob: probability of dropping each sample's branch, in [0, 1].
        training: drop path is the identity unless True.
        gamma: optional LayerScale, broadcast against the trailing dims of branch: (C,) scales the last dim of
            (B, N, C) tokens, (C, 1, 1) dim 1 of NCHW maps. Gets a gradient.
        scale_by_keep: scale kept samples by 1 / (1 - drop_prob).

    Returns:
        A tensor of the promoted dtype of residual, branch and gamma, in residual's memory layout (contiguous or
        channels_last). A dropped sample's output equals its residual exactly, and its branch is not read.
    """
    _check_floating("drop_path_add", "residual", residual)
    _check_floating("drop_path_add", "branch", branch)
    if gamma is not None:
        _check_floating("drop_path_add", "gamma", gamma)
    _check_drop_prob("drop_path_add", drop_prob)
    sample_scale: Optional[Tensor] = None  # annotated for TorchScript, which compiles this function as it is
    if training and drop_prob > 0.0 and branch.ndim > 0:
        scale_dtype = branch.dtype if gamma is None else torch.promote_types(branch.dtype, gamma.dtype)
        sample_scale = reference.sample_scale(
            branch.shape[0], drop_prob, scale_by_keep, dtype=scale_dtype, device=branch.device
        )
    elif gamma is None and residual.shape == branch.shape and residual.device == branch.device:
        return residual + branch
    return _run(residual, branch, gamma, sample_scale)


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True) -> Tensor:
    """Stochastic depth per sample, a drop-in for timm.layers.drop_path: each sample (dim 0) is zeroed with
    probability drop_prob, and kept samples are scaled by 1 / (1 - drop_prob) if `scale_by_keep`. Returns x
    itself when drop_prob == 0 or not training. For the same seed the result is bit-identical to timm's, except
    that a dropped sample is exactly zero even where x holds inf or nan."""
    _check_floating("drop_path", "x", x)
    _check_drop_prob("drop_path", drop_prob)
    if drop_prob == 0.0 or not training:
        return x
    if x.ndim == 0:
        raise ValueError("vitops.drop_path: x must have a batch dim, got a 0-d tensor")
    sample_scale = reference.sample_scale(x.shape[0], drop_prob, scale_by_keep, dtype=x.dtype, device=x.device)
    return _run(None, x, None, sample_scale)
