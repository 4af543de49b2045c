"""Plain PyTorch statements of timm's LAMB and AdamP (timm 1.0.x), as the stages the optimizer ops split a step
into (vitops/ops/schemas.def), written for vitops' state layout: moment buffers are float32 whatever the param
dtype, and a float16/bfloat16 param is updated in float32 and rounded once. This is the specification the
compiled, Triton and CUDA kernels are tested against, and it runs what the kernels don't take (float64 or
non-contiguous params, caution).

A stage gets one list entry per param, like the ops, and updates params and moments in place. Whatever a step
needs over a whole tensor (LAMB's norms, AdamP's cosines) comes out of one stage as sums and goes into the next:
with sharded params (FSDP2) the optimizer adds up the ranks' sums in between, so each rank's stages see only its
shards. lamb_step and adamp_step compose the stages for unsharded params, as the optimizers call the ops
(tests/fuzz/test_compile_dynamic.py keeps the two in step). A stage given a nonzero `found_inf` (skip_nonfinite)
leaves every tensor as it was and returns zero sums, decided on the device.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor


def _work_copy(p: Tensor) -> Tensor:
    """The param in its compute dtype: itself when float32/float64, else a float32 copy."""
    return p if p.dtype in (torch.float32, torch.float64) else p.float()


def _write_back(p: Tensor, w: Tensor) -> None:
    if w is not p:
        p.copy_(w)


@contextlib.contextmanager
def _kept_if(found_inf: Tensor | None, tensors: list[Tensor]):
    """What the block writes to `tensors` is undone, bit for bit, if found_inf is nonzero: a choice made on the
    device (torch.where), so that nothing waits for it."""
    if found_inf is None:
        yield
        return
    before = [t.clone() for t in tensors]
    yield
    skip = found_inf != 0
    for t, old in zip(tensors, before):
        t.copy_(torch.where(skip, old, t))


def _zero_if(found_inf: Tensor | None, sums: Tensor) -> Tensor:
    if found_inf is None or sums.numel() == 0:
        return sums
    return torch.where(found_inf != 0, 0.0, sums)


def _caution_(update: Tensor, grad: Tensor) -> None:
    """Cautious optimizers (https://arxiv.org/abs/2411.16085) as timm applies them: zero the update where it
    disagrees in sign with the gradient, rescale by the kept fraction (at least 1e-3)."""
    mask = (update * grad > 0).to(grad.dtype)
    mask.div_(mask.mean().clamp_(min=1e-3))
    update.mul_(mask)


# --- LAMB ------------------------------------------------------------------------------------------------------


def lamb_grad_sq_sums(grads: list[Tensor]) -> Tensor:
    """float32 [len(grads)]: each grad's sum of squares (computed in float32, float64 for float64 grads)."""
    return torch.stack([g.to(torch.promote_types(g.dtype, torch.float32)).square().sum().float() for g in grads])


def lamb_clip_coef(grad_sq_sum: Tensor | None, max_grad_norm: float) -> Tensor | None:
    """timm's global clipping coefficient max(1, ||all grads|| / max_grad_norm), from the grads' total sum of
    squares; None without one."""
    if grad_sq_sum is None:
        return None
    return (grad_sq_sum.sqrt() / max_grad_norm).clamp_(min=1.0)


def lamb_trust_ratio(w_norm: Tensor, u_norm: Tensor, trust_clip: bool) -> Tensor:
    """||p|| / ||u||, 1 where either norm is 0, capped at 1 with trust_clip (LAMBC)."""
    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
    return ratio.clamp(max=1.0) if trust_clip else ratio


def _lamb_update(
    p: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, bias_correction1: float, bias_correction2: float, eps: float,
    weight_decay: float, decay_scale: float, decoupled_decay: bool, caution_grad: Tensor | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(p', u): the param after decoupled weight decay (a new tensor; p itself without it) and timm's update
    before the trust ratio, from the new moments."""
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    update = (exp_avg / bias_correction1).div_(denom)
    if caution_grad is not None:
        _caution_(update, caution_grad)
    w = _work_copy(p)
    if weight_decay != 0:
        if decoupled_decay:
            w = w.add(w, alpha=-decay_scale * weight_decay)
        else:
            update.add_(w, alpha=weight_decay)
    return w, update


@torch.no_grad()
def lamb_moments(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    grad_sq_sum: Tensor | None, max_grad_norm: float,
    lr: float, beta1: float, beta2: float, beta3: float, bias_correction1: float, bias_correction2: float, eps: float,
    weight_decay: float, decay_scale: float, decoupled_decay: bool,
    adapt: bool, found_inf: Tensor | None = None, caution: bool = False,
) -> Tensor:  # fmt: skip
    """timm.optim.lamb._single_tensor_lamb up to the trust ratio: the grads divided by the global clipping
    coefficient (from grad_sq_sum, the sum of squares of every grad of the step), the moments, and per param the
    sums of squares of p' and u (float32 [len(params), 2]). Without layer adaptation (`adapt` is
    `weight_decay != 0 or always_adapt`) the params are updated too. `decay_scale` is lr, or lr**2 / max_lr with
    corrected weight decay."""
    clip = lamb_clip_coef(grad_sq_sum, max_grad_norm)
    sums = []
    with _kept_if(found_inf, [*params, *exp_avgs, *exp_avg_sqs]):
        for p, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs):
            g = grad.to(exp_avg.dtype)
            if clip is not None:
                g = g / clip
            if beta3 == 1 - beta1:
                exp_avg.lerp_(g, beta3)
            else:
                exp_avg.mul_(beta1).add_(g, alpha=beta3)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            w, update = _lamb_update(p, exp_avg, exp_avg_sq, bias_correction1, bias_correction2, eps, weight_decay,
                                     decay_scale, decoupled_decay, g if caution else None)  # fmt: skip
            sums.append(torch.stack([w.square().sum(), update.square().sum()]).float())
            if not adapt:
                _write_back(p, w.add_(update, alpha=-lr))
    return _zero_if(found_inf, torch.stack(sums)) if sums else torch.zeros(0, 2)


@torch.no_grad()
def lamb_apply(
    params: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], sums: Tensor,
    lr: float, beta1: float, beta2: float, beta3: float, bias_correction1: float, bias_correction2: float, eps: float,
    weight_decay: float, decay_scale: float, decoupled_decay: bool,
    trust_clip: bool, found_inf: Tensor | None = None, caution_grads: list[Tensor] | None = None,
) -> None:  # fmt: skip
    """The rest of the step with layer adaptation: p = p' - lr * trust_ratio * u, the trust ratio from
    lamb_moments' sums (of whole tensors). With caution, `caution_grads` are the clipped grads lamb_moments used."""
    norms = sums.sqrt()
    with _kept_if(found_inf, params):
        for i, (p, exp_avg, exp_avg_sq) in enumerate(zip(params, exp_avgs, exp_avg_sqs)):
            caution_grad = caution_grads[i] if caution_grads is not None else None
            w, update = _lamb_update(p, exp_avg, exp_avg_sq, bias_correction1, bias_correction2, eps, weight_decay,
                                     decay_scale, decoupled_decay, caution_grad)  # fmt: skip
            update.mul_(lamb_trust_ratio(norms[i, 0], norms[i, 1], trust_clip).to(update.dtype))
            _write_back(p, w.add_(update, alpha=-lr))


def lamb_step(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    max_grad_norm: float | None, *hyper, adapt: bool, trust_clip: bool,
) -> None:  # fmt: skip
    """One LAMB step over unsharded params whose grads are all the step's grads: the three stages in turn. `hyper`
    are the stages' hyperparameters lr .. decoupled_decay."""
    grad_sq_sum = lamb_grad_sq_sums(grads).sum() if max_grad_norm is not None and grads else None
    sums = lamb_moments(params, grads, exp_avgs, exp_avg_sqs, grad_sq_sum, max_grad_norm or 1.0, *hyper, adapt)
    if adapt:
        lamb_apply(params, exp_avgs, exp_avg_sqs, sums, *hyper, trust_clip)


# --- AdamP -----------------------------------------------------------------------------------------------------

ADAMP_TENSOR_SUMS = 5  # g.p, g.g, p.p, p.q and the number of rows failing the channel-wise test


def adamp_rows(p: Tensor) -> int:
    """The rows of AdamP's channel-wise view: size(0) for a param of 2 or more dims (one row if it is empty),
    else one."""
    return p.shape[0] if p.ndim > 1 and p.numel() > 0 else 1


def _adamp_direction(
    exp_avg: Tensor, exp_avg_sq: Tensor, g: Tensor, beta1: float, bias_correction2: float, eps: float, nesterov: bool
) -> Tensor:
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    if nesterov:
        return (beta1 * exp_avg + (1 - beta1) * g) / denom
    return exp_avg / denom


def _adamp_finish(p: Tensor, w: Tensor, perturb: Tensor, lr: float, weight_decay: float,
                  bias_correction1: float) -> None:  # fmt: skip
    """An unprojected param's update."""
    if weight_decay > 0:
        w.mul_(1.0 - lr * weight_decay)
    _write_back(p, w.add_(perturb, alpha=-lr / bias_correction1))


def _cosine(gp: Tensor, gg: Tensor, pp: Tensor, eps: float) -> Tensor:
    """|cos(g, p)| from the sums g.p, g.g and p.p, with each norm clamped at eps (F.cosine_similarity)."""
    return gp.abs() / (gg.sqrt().clamp_min(eps) * pp.sqrt().clamp_min(eps))


def _channel_view(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


@torch.no_grad()
def adamp_moments(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    bias_correction1: list[float], bias_correction2: list[float], lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, delta: float, wd_ratio: float, nesterov: bool,
    found_inf: Tensor | None = None, caution: bool = False,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """timm.optim.AdamP.step up to the projection: the moments; params of one dim or fewer, never projected, are
    updated. For the others, timm's projection test per channel row (p.reshape(size(0), -1)):
    |cos(g, p)| < delta / sqrt(row length). Returns (row_coefs, tensor_sums): float32 [rows], per row the
    projection coefficient p.q / (||p_row|| + eps)^2 (q the Adam direction); float32 [len(params), 5], per param
    g.p, g.g, p.p, p.q summed over the param and the number of rows failing the test. Rows and sums of params
    never projected are 0."""
    row_coefs, tensor_sums = [], []
    with _kept_if(found_inf, [*params, *exp_avgs, *exp_avg_sqs]):
        for i, (p, grad, exp_avg, exp_avg_sq) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
            g = grad.to(exp_avg.dtype)
            w = _work_copy(p)
            exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            q = _adamp_direction(exp_avg, exp_avg_sq, g, beta1, bias_correction2[i], eps, nesterov)
            if p.ndim <= 1 or p.numel() == 0:
                if p.ndim <= 1:
                    if caution:
                        _caution_(q, g)
                    _adamp_finish(p, w, q, lr, weight_decay, bias_correction1[i])
                row_coefs.append(torch.zeros(1, device=p.device))
                tensor_sums.append(torch.zeros(ADAMP_TENSOR_SUMS, device=p.device))
                continue
            gv, wv, qv = _channel_view(g), _channel_view(w), _channel_view(q)
            gp, gg, pp, pq = ((a * b).sum(1).float() for a, b in ((gv, wv), (gv, gv), (wv, wv), (wv, qv)))
            failing = ~(_cosine(gp, gg, pp, eps) < delta / math.sqrt(wv.shape[1]))
            row_coefs.append(pq / (pp.sqrt() + eps) / (pp.sqrt() + eps))  # eps^2 would underflow
            tensor_sums.append(torch.stack([gp.sum(), gg.sum(), pp.sum(), pq.sum(), failing.sum().float()]))
    if not params:
        return torch.zeros(0), torch.zeros(0, ADAMP_TENSOR_SUMS)
    return _zero_if(found_inf, torch.cat(row_coefs)), _zero_if(found_inf, torch.stack(tensor_sums))


@torch.no_grad()
def adamp_apply(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    row_coefs: Tensor, tensor_sums: Tensor, full_numels: list[int],
    bias_correction1: list[float], bias_correction2: list[float], lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, delta: float, wd_ratio: float, nesterov: bool,
    found_inf: Tensor | None = None, caution: bool = False,
) -> None:  # fmt: skip
    """The rest of the step for params of 2 or more dims, from adamp_moments' outputs (tensor_sums summed over
    whole tensors): timm projects per channel if no row failed its test, else the whole param if its cosine is
    below delta / sqrt(full_numels[i]) (its numel over all ranks), else not at all. A projected direction loses its
    component along p: q - p * coef, and its weight decay is scaled by wd_ratio."""
    first_row = 0
    with _kept_if(found_inf, params):
        for i, (p, grad, exp_avg, exp_avg_sq) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
            rows = adamp_rows(p)
            coefs, first_row = row_coefs[first_row : first_row + rows], first_row + rows
            if p.ndim <= 1 or p.numel() == 0:
                continue
            g = grad.to(exp_avg.dtype)
            w = _work_copy(p)
            q = _adamp_direction(exp_avg, exp_avg_sq, g, beta1, bias_correction2[i], eps, nesterov)
            gp, gg, pp, pq, failing = tensor_sums[i]
            channel = failing == 0
            layer = ~channel & (_cosine(gp, gg, pp, eps) < delta / math.sqrt(full_numels[i]))
            coef = torch.where(channel, coefs, torch.where(layer, pq / (pp.sqrt() + eps) / (pp.sqrt() + eps), 0.0))
            expand = (-1,) + (1,) * (p.ndim - 1)
            coef = coef.to(w.dtype).reshape(expand)
            q = torch.where(coef == 0, q, q - w * coef)  # unprojected rows as timm's: no p * 0 (NaN for an inf p)
            projected = channel | layer
            if caution:  # timm's spherical caution for projected params, plain caution for the others
                if projected:
                    view = _channel_view if channel else (lambda x: x.reshape(1, -1))
                    p_n = w / view(w).norm(dim=1).add_(eps).reshape(expand)
                    _caution_(q, g - p_n * view(p_n * g).sum(1).reshape(expand))
                    q -= p_n * view(p_n * q).sum(1).reshape(expand)
                else:
                    _caution_(q, g)
            if weight_decay > 0:  # decided on the device: no host sync
                w.mul_(torch.where(projected, w.new_tensor(1.0 - lr * weight_decay * wd_ratio),
                                   w.new_tensor(1.0 - lr * weight_decay)))  # fmt: skip
            _write_back(p, w.add_(q, alpha=-lr / bias_correction1[i]))


def adamp_step(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *hyper,
    caution: bool = False,
) -> None:  # fmt: skip
    """One AdamP step over unsharded params: the two stages in turn. `hyper` are the stages' hyperparameters
    bias_correction1 .. nesterov."""
    lists = (params, grads, exp_avgs, exp_avg_sqs)
    row_coefs, tensor_sums = adamp_moments(*lists, *hyper, caution=caution)
    adamp_apply(*lists, row_coefs, tensor_sums, [p.numel() for p in params], *hyper, caution=caution)
