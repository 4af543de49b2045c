"""Stochastic depth (drop path) and the fused residual `residual + drop_path(branch * gamma)`.

drop_path_add is the end of every ViT and ResNet block. Fused, it reads residual and branch once and writes the
output once: 3 passes over memory where timm's eager version makes 5 (7 with LayerScale). Its backward produces
the branch's and gamma's gradients in one more pass. The per-sample keep mask is drawn here with torch's RNG, exactly
as timm draws it, so a seed gives the same mask on every backend.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vitops import _backend, _extension
from vitops.ops import _drop_path_layout as layout_lib
from vitops.ops import reference

try:
    from vitops.ops.triton import drop_path_add as _triton

    _TRITON_ERROR = None
except ImportError as error:  # triton missing or broken: the other backends still work
    _triton = None
    _TRITON_ERROR = f"Triton kernels failed to import: {error}"

_backend.register_op("drop_path_add", has_triton=True, triton_blocker=_TRITON_ERROR)


# --- what every backend promises: output metadata (fake kernels) and gradients (autograd) --------------------


def _forward_fake(residual, branch, gamma, sample_scale):
    out_dtype = layout_lib.check_forward(residual, branch, gamma, sample_scale)
    return layout_lib.empty_in_kernel_layout(residual if residual is not None else branch, out_dtype)


def _backward_fake(grad_out, branch, gamma, sample_scale, branch_dtype, need_branch_grad):
    layout_lib.check_backward(grad_out, branch, gamma, sample_scale, branch_dtype)
    acc = reference.accumulate_dtype(grad_out.dtype)
    if need_branch_grad:
        grad_branch = layout_lib.empty_in_kernel_layout(grad_out, branch_dtype)
    else:
        grad_branch = grad_out.new_empty(0, dtype=branch_dtype)
    grad_gamma = grad_out.new_empty(gamma.shape if branch is not None else (0,), dtype=acc)
    return grad_branch, grad_gamma


def _setup_context(ctx, inputs, output):
    residual, branch, gamma, sample_scale = inputs
    need_gamma_grad = gamma is not None and ctx.needs_input_grad[2]
    # The branch is kept alive only for gamma's gradient; without LayerScale the backward needs only the mask.
    ctx.save_for_backward(branch if need_gamma_grad else None, gamma, sample_scale)
    ctx.branch_dtype = branch.dtype


def _make_backward(backward_op):
    def backward(ctx, grad_out):
        branch, gamma, sample_scale = ctx.saved_tensors
        grad_branch, grad_gamma = backward_op(
            grad_out, branch, gamma, sample_scale, ctx.branch_dtype, ctx.needs_input_grad[1]
        )
        return (
            grad_out if ctx.needs_input_grad[0] else None,
            grad_branch if ctx.needs_input_grad[1] else None,
            grad_gamma if branch is not None else None,
            None,
        )

    return backward


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


def _register(forward_op: str, backward_op: str) -> None:
    torch.library.register_fake(forward_op)(_forward_fake)
    torch.library.register_fake(backward_op)(_backward_fake)
    torch.library.register_autograd(
        forward_op, _make_backward(getattr(torch.ops.vitops, backward_op.split("::")[1])), setup_context=_setup_context
    )
    torch.library.register_autograd(backward_op, _double_backward, setup_context=_setup_backward_context)


def _reference_forward(residual, branch, gamma, sample_scale):
    out = _forward_fake(residual, branch, gamma, sample_scale)
    return out.copy_(reference.drop_path_add(residual, branch, gamma, sample_scale))


def _reference_backward(grad_out, branch, gamma, sample_scale, branch_dtype, need_branch_grad):
    grad_branch, grad_gamma = _backward_fake(grad_out, branch, gamma, sample_scale, branch_dtype, need_branch_grad)
    ref_branch, ref_gamma = reference.drop_path_add_backward(
        grad_out, branch, gamma, sample_scale, branch_dtype, need_branch_grad
    )
    return grad_branch.copy_(ref_branch), grad_gamma.copy_(ref_gamma)


# Where vitops._C brought no kernel, the compiled op falls back to Triton on CUDA and to the reference on CPU, so
# torch.ops.vitops.drop_path_add works whatever was built.
for _key in _extension.DISPATCH_KEYS:
    if not _extension.has_compiled_kernel("drop_path_add", _key):
        use_triton = _key == "CUDA" and _triton is not None
        forward_impl = _triton.drop_path_add_triton if use_triton else _reference_forward
        backward_impl = _triton.drop_path_add_backward_triton if use_triton else _reference_backward
        torch.library.impl("vitops::drop_path_add", _key)(forward_impl)
        torch.library.impl("vitops::drop_path_add_backward", _key)(backward_impl)

_register("vitops::drop_path_add", "vitops::drop_path_add_backward")
if _triton is not None:
    _register("vitops::drop_path_add_triton", "vitops::drop_path_add_backward_triton")


# --- public API -----------------------------------------------------------------------------------------------


def _check_drop_prob(op: str, drop_prob: float) -> None:
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"vitops.{op}: drop_prob must be in [0, 1], got {drop_prob}")


def _check_floating(op: str, name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"vitops.{op}: {name} must be a Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"vitops.{op}: {name} must be a floating-point tensor, got {t.dtype}")


def _check_gamma(gamma: Tensor, branch: Tensor) -> None:
    channel_dim = branch.ndim - gamma.ndim
    if not (
        1 <= gamma.ndim < branch.ndim
        and gamma.shape[0] == branch.shape[channel_dim]
        and all(s == 1 for s in gamma.shape[1:])
    ):
        raise ValueError(
            f"vitops.drop_path_add: gamma of shape {tuple(gamma.shape)} can't scale branch of shape "
            f"{tuple(branch.shape)}: give (C,) for the last dim, or (C, 1, ..., 1) for an earlier one, "
            "e.g. (C, 1, 1) for dim 1 of NCHW"
        )


def _run(residual: Tensor | None, branch: Tensor, gamma: Tensor | None, sample_scale: Tensor | None) -> Tensor:
    """Casts to what the kernels take and calls the chosen backend."""
    backend = _backend.backend_for("drop_path_add", branch.device.type)
    out_dtype = branch.dtype if gamma is None else torch.promote_types(branch.dtype, gamma.dtype)
    if residual is not None:
        out_dtype = torch.promote_types(residual.dtype, out_dtype)
        residual = residual.to(out_dtype)
    if not layout_lib.supported_pair(out_dtype, branch.dtype):
        branch = branch.to(out_dtype)
    acc = reference.accumulate_dtype(out_dtype)
    gamma = gamma.to(acc) if gamma is not None else None
    sample_scale = sample_scale.to(acc) if sample_scale is not None else None
    if backend == "torch":
        return reference.drop_path_add(residual, branch, gamma, sample_scale)
    if backend == "triton":
        return torch.ops.vitops.drop_path_add_triton(residual, branch, gamma, sample_scale)
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
    _check_drop_prob("drop_path_add", drop_prob)
    if residual.shape != branch.shape:
        raise ValueError(
            f"vitops.drop_path_add: residual and branch must have the same shape, got {tuple(residual.shape)} "
            f"and {tuple(branch.shape)}"
        )
    if residual.device != branch.device:
        raise ValueError(
            f"vitops.drop_path_add: residual is on {residual.device} but branch is on {branch.device}"
        )
    if gamma is not None:
        _check_floating("drop_path_add", "gamma", gamma)
        if gamma.device != branch.device:
            raise ValueError(f"vitops.drop_path_add: gamma is on {gamma.device} but branch is on {branch.device}")
        _check_gamma(gamma, branch)
    sample_scale = None
    if training and drop_prob > 0.0 and branch.ndim > 0:
        scale_dtype = branch.dtype if gamma is None else torch.promote_types(branch.dtype, gamma.dtype)
        sample_scale = reference.sample_scale(
            branch.shape[0], drop_prob, scale_by_keep, dtype=scale_dtype, device=branch.device
        )
    elif gamma is None:
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
