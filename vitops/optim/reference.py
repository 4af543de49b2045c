"""Plain PyTorch statements of timm's LAMB and AdamP steps (timm 1.0.x, the single-tensor formulation), written
for vitops' state layout: moment buffers are float32 whatever the param dtype, and a float16/bfloat16 param is
updated in float32 and rounded once. This is the specification the compiled, Triton and CUDA kernels are tested
against, the "torch" backend, and the path for what the kernels do not take (caution, float64 or non-contiguous
params).

Each function takes one list entry per param, like the ops vitops::lamb_step and vitops::adamp_step, and updates
params and moments in place.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _work_copy(p: Tensor) -> Tensor:
    """The param in its compute dtype: itself when float32/float64, else a float32 copy."""
    return p if p.dtype in (torch.float32, torch.float64) else p.float()


def _caution_(update: Tensor, grad: Tensor) -> None:
    """Cautious optimizers (https://arxiv.org/abs/2411.16085) as timm applies them: zero the update where it
    disagrees in sign with the gradient, rescale by the kept fraction (at least 1e-3)."""
    mask = (update * grad > 0).to(grad.dtype)
    mask.div_(mask.mean().clamp_(min=1e-3))
    update.mul_(mask)


def lamb_trust_ratio(w_norm: Tensor, u_norm: Tensor, trust_clip: bool) -> Tensor:
    """||p|| / ||u||, 1 where either norm is 0, capped at 1 with trust_clip (LAMBC)."""
    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
    return ratio.clamp(max=1.0) if trust_clip else ratio


def lamb_clip_coef(grads: list[Tensor], max_grad_norm: float | None) -> Tensor | None:
    """max(1, ||all grads||_2 / max_grad_norm) as a float32 0-d tensor on the grads' device, or None when
    clipping is off or there are no grads. No host sync."""
    if max_grad_norm is None or not grads:
        return None
    norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in grads])
    global_norm = torch.linalg.vector_norm(torch.stack(norms))
    return (global_norm / max_grad_norm).clamp_(min=1.0)


@torch.no_grad()
def lamb_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    clip_coef: Tensor | None,
    lr: float,
    beta1: float,
    beta2: float,
    beta3: float,
    bias_correction1: float,
    bias_correction2: float,
    eps: float,
    weight_decay: float,
    decay_scale: float,
    decoupled_decay: bool,
    adapt: bool,
    trust_clip: bool,
    caution: bool = False,
) -> None:
    """One LAMB step of a param group (timm.optim.lamb._single_tensor_lamb). `adapt` is
    `weight_decay != 0 or always_adapt`; `decay_scale` is lr, or lr**2 / max_lr with corrected weight decay."""
    for p, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs):
        g = grad.to(exp_avg.dtype)
        if clip_coef is not None:
            g = g / clip_coef
        if beta3 == 1 - beta1:
            exp_avg.lerp_(g, beta3)
        else:
            exp_avg.mul_(beta1).add_(g, alpha=beta3)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
        update = (exp_avg / bias_correction1).div_(denom)
        if caution:
            _caution_(update, g)
        w = _work_copy(p)
        if weight_decay != 0:
            if decoupled_decay:
                w.add_(w, alpha=-decay_scale * weight_decay)
            else:
                update.add_(w, alpha=weight_decay)
        if adapt:
            update.mul_(lamb_trust_ratio(w.norm(2.0), update.norm(2.0), trust_clip))
        w.add_(update, alpha=-lr)
        if w is not p:
            p.copy_(w)


def _channel_view(x: Tensor) -> Tensor:
    return x.reshape(x.size(0), -1)


def _layer_view(x: Tensor) -> Tensor:
    return x.reshape(1, -1)


def adamp_projection(
    p: Tensor, grad: Tensor, perturb: Tensor, delta: float, wd_ratio: float, eps: float, caution: bool = False
) -> tuple[Tensor, float]:
    """timm's AdamP projection: per channel (rows of p.reshape(size(0), -1)) if every row's |cos(g, p)| is below
    delta / sqrt(row length), else for the whole layer under the same test; a projected update loses its radial
    component and its weight decay is scaled by wd_ratio. Returns (perturb, weight decay ratio)."""
    expand = (-1,) + (1,) * (p.ndim - 1)
    for view in (_channel_view, _layer_view):
        p_view = view(p)
        cos = F.cosine_similarity(view(grad), p_view, dim=1, eps=eps).abs_()
        if cos.max() < delta / math.sqrt(p_view.size(1)):
            p_n = p / p_view.norm(p=2, dim=1).add_(eps).reshape(expand)
            perturb -= p_n * view(p_n * perturb).sum(dim=1).reshape(expand)
            if caution:  # spherical caution
                grad_perp = grad - p_n * view(p_n * grad).sum(dim=1).reshape(expand)
                _caution_(perturb, grad_perp)
                perturb -= p_n * view(p_n * perturb).sum(dim=1).reshape(expand)
            return perturb, wd_ratio
    if caution:
        _caution_(perturb, grad)
    return perturb, 1.0


@torch.no_grad()
def adamp_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    bias_correction1: list[float],
    bias_correction2: list[float],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    delta: float,
    wd_ratio: float,
    nesterov: bool,
    caution: bool = False,
) -> None:
    """One AdamP step of a param group (timm.optim.adamp.AdamP.step), with per-param bias corrections."""
    for i, (p, grad, exp_avg, exp_avg_sq) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        g = grad.to(exp_avg.dtype)
        w = _work_copy(p)
        exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2[i])).add_(eps)
        step_size = lr / bias_correction1[i]
        if nesterov:
            perturb = (beta1 * exp_avg + (1 - beta1) * g) / denom
        else:
            perturb = exp_avg / denom
        ratio = 1.0
        if p.ndim > 1:
            perturb, ratio = adamp_projection(w, g, perturb, delta, wd_ratio, eps, caution)
        elif caution:
            _caution_(perturb, g)
        if weight_decay > 0:
            w.mul_(1.0 - lr * weight_decay * ratio)
        w.add_(perturb, alpha=-step_size)
        if w is not p:
            p.copy_(w)
