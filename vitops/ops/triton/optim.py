"""Triton kernels of the fused optimizer steps (vitops::lamb_step_triton, vitops::adamp_step_triton).

The same stages as the C++ and CUDA kernels, launched per tensor: a first pass updates the moments and
accumulates (atomically, per tensor or per channel row) the sums the step needs; the trust ratios (LAMB) or
projection coefficients (AdamP) are then worked out on the device with torch ops, never read back to the host;
a second pass applies the update, recomputing the Adam direction from the new moments. Arithmetic is IEEE
rounded (div_rn, sqrt_rn, no FMA contraction) in timm's order of operations.
"""
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 1024


@triton.jit
def _lamb_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, clip_ptr, sums_ptr, ratio_ptr, n,
    beta1, beta2, beta3, one_minus_beta3, one_minus_beta2, bc1, sqrt_bc2, eps, neg_decay, coupled_wd, neg_lr,
    MODE: tl.constexpr, STAGE: tl.constexpr, HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    pv = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pd = pv + pv * neg_decay
    if STAGE == 2:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_CLIP:
            g = tl.div_rn(g, tl.load(clip_ptr))
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        if MODE == 0:
            m = m + beta3 * (g - m)
        elif MODE == 1:
            m = g - (g - m) * one_minus_beta3
        else:
            m = m * beta1 + beta3 * g
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        v = v * beta2 + one_minus_beta2 * g * g
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
    denom = tl.div_rn(tl.sqrt_rn(v), sqrt_bc2) + eps
    u = tl.div_rn(tl.div_rn(m, bc1), denom)
    u = u + coupled_wd * pd
    if STAGE == 1:
        tl.atomic_add(sums_ptr, tl.sum(tl.where(mask, pd * pd, 0.0), axis=0))
        tl.atomic_add(sums_ptr + 1, tl.sum(tl.where(mask, u * u, 0.0), axis=0))
    else:
        if STAGE == 2:
            u = u * tl.load(ratio_ptr)
        tl.store(p_ptr + offs, (pd + neg_lr * u).to(p_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("vitops::lamb_step_triton", mutates_args=("params", "exp_avgs", "exp_avg_sqs"))
def lamb_step_triton(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    clip_coef: Optional[Tensor],
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
) -> None:
    if not params:
        return
    device = params[0].device
    mode = 2
    if beta3 == 1 - beta1:
        mode = 0 if beta3 < 0.5 else 1
    decay = weight_decay != 0
    consts = dict(
        beta1=beta1, beta2=beta2, beta3=beta3, one_minus_beta3=1 - beta3, one_minus_beta2=1 - beta2,
        bc1=bias_correction1, sqrt_bc2=bias_correction2 ** 0.5, eps=eps,
        neg_decay=-decay_scale * weight_decay if decay and decoupled_decay else 0.0,
        coupled_wd=weight_decay if decay and not decoupled_decay else 0.0, neg_lr=-lr,
    )  # fmt: skip
    clip = clip_coef if clip_coef is not None else params[0]  # an unused pointer without clipping
    two_pass = decay or adapt
    sums = torch.zeros(len(params), 2, device=device, dtype=torch.float32) if two_pass else None
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        if p.numel() == 0:
            continue
        grid = (triton.cdiv(p.numel(), _BLOCK),)
        _lamb_kernel[grid](
            p, g, m, v, clip, sums[i] if two_pass else p, p, p.numel(), **consts,
            MODE=mode, STAGE=1 if two_pass else 0, HAS_CLIP=clip_coef is not None, BLOCK=_BLOCK, enable_fp_fusion=False,
        )  # fmt: skip
    if not two_pass:
        return
    w_norm, u_norm = sums.sqrt().unbind(1)
    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
    if trust_clip:
        ratio = ratio.clamp(max=1.0)
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        if p.numel() == 0:
            continue
        grid = (triton.cdiv(p.numel(), _BLOCK),)
        _lamb_kernel[grid](
            p, g, m, v, clip, p, ratio[i], p.numel(), **consts,
            MODE=mode, STAGE=2, HAS_CLIP=clip_coef is not None, BLOCK=_BLOCK, enable_fp_fusion=False,
        )  # fmt: skip


@lamb_step_triton.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, clip_coef, lr, beta1, beta2, beta3, bias_correction1,
      bias_correction2, eps, weight_decay, decay_scale, decoupled_decay, adapt, trust_clip):  # fmt: skip
    return None


@triton.jit
def _adamp_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, sums_ptr, coef_ptr, factor_ptr, row_len,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, sqrt_bc2, neg_step,
    NESTEROV: tl.constexpr, STAGE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < row_len
    offs = row.to(tl.int64) * row_len + cols
    pv = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.zeros_like(pv)
    if STAGE == 2:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        if NESTEROV:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0) * beta1 + one_minus_beta1 * g
        v = tl.load(v_ptr + offs, mask=mask, other=0.0) * beta2 + one_minus_beta2 * g * g
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
    denom = tl.div_rn(tl.sqrt_rn(v), sqrt_bc2) + eps
    if NESTEROV:
        q = tl.div_rn(beta1 * m + one_minus_beta1 * g, denom)
    else:
        q = tl.div_rn(m, denom)
    if STAGE == 1:
        base = sums_ptr + row * 4
        tl.atomic_add(base, tl.sum(tl.where(mask, g * pv, 0.0), axis=0))
        tl.atomic_add(base + 1, tl.sum(tl.where(mask, g * g, 0.0), axis=0))
        tl.atomic_add(base + 2, tl.sum(tl.where(mask, pv * pv, 0.0), axis=0))
        tl.atomic_add(base + 3, tl.sum(tl.where(mask, pv * q, 0.0), axis=0))
    else:
        if STAGE == 2:
            q = q - pv * tl.load(coef_ptr + row)
        tl.store(p_ptr + offs, (pv * tl.load(factor_ptr) + neg_step * q).to(p_ptr.dtype.element_ty), mask=mask)


def adamp_coefficients(sums: Tensor, numel: int, eps: float, delta: float) -> tuple[Tensor, Tensor]:
    """From a tensor's per-row sums [rows, 4] = (g.p, g.g, p.p, p.q): the per-row projection coefficients (all
    zero when the projection does not apply) and a bool 0-d tensor, whether it applies. On the device."""
    rows = sums.shape[0]

    def cosine(s):
        return s[..., 0].abs() / (s[..., 1].sqrt().clamp_min(eps) * s[..., 2].sqrt().clamp_min(eps))

    channel = cosine(sums).max() < delta / (numel // rows) ** 0.5
    total = sums.sum(0)
    layer = cosine(total) < delta / numel**0.5
    channel_coef = sums[:, 3] / (sums[:, 2].sqrt() + eps) ** 2
    layer_coef = (total[3] / (total[2].sqrt() + eps) ** 2).expand(rows)
    zero = torch.zeros_like(channel_coef)
    coef = torch.where(channel, channel_coef, torch.where(layer, layer_coef, zero))
    return coef, channel | layer


@torch.library.custom_op("vitops::adamp_step_triton", mutates_args=("params", "exp_avgs", "exp_avg_sqs"))
def adamp_step_triton(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    bias_correction1: List[float],
    bias_correction2: List[float],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    delta: float,
    wd_ratio: float,
    nesterov: bool,
) -> None:
    if not params:
        return
    device = params[0].device
    decay = weight_decay > 0
    plain_factor = torch.tensor(1.0 - lr * weight_decay if decay else 1.0, dtype=torch.float32, device=device)
    projected_factor = torch.tensor(
        1.0 - lr * weight_decay * wd_ratio if decay else 1.0, dtype=torch.float32, device=device
    )
    consts = dict(
        beta1=beta1, one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2, eps=eps,
    )  # fmt: skip
    pending = []
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        if p.numel() == 0:
            continue
        rows = p.shape[0] if p.ndim > 1 else 1
        row_len = p.numel() // rows
        per_tensor = dict(sqrt_bc2=bias_correction2[i] ** 0.5, neg_step=-(lr / bias_correction1[i]))
        grid = (rows, triton.cdiv(row_len, _BLOCK))
        if p.ndim > 1:
            sums = torch.zeros(rows, 4, dtype=torch.float32, device=device)
            _adamp_kernel[grid](
                p, g, m, v, sums, sums, plain_factor, row_len, **consts, **per_tensor,
                NESTEROV=nesterov, STAGE=1, BLOCK=_BLOCK, enable_fp_fusion=False,
            )  # fmt: skip
            pending.append((i, sums, grid, row_len, per_tensor))
        else:
            _adamp_kernel[grid](
                p, g, m, v, p, p, plain_factor, row_len, **consts, **per_tensor,
                NESTEROV=nesterov, STAGE=0, BLOCK=_BLOCK, enable_fp_fusion=False,
            )  # fmt: skip
    for i, sums, grid, row_len, per_tensor in pending:
        p, g, m, v = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]
        coef, projected = adamp_coefficients(sums, p.numel(), eps, delta)
        factor = torch.where(projected, projected_factor, plain_factor)
        _adamp_kernel[grid](
            p, g, m, v, sums, coef, factor, row_len, **consts, **per_tensor,
            NESTEROV=nesterov, STAGE=2, BLOCK=_BLOCK, enable_fp_fusion=False,
        )  # fmt: skip


@adamp_step_triton.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2, lr, beta1, beta2, eps,
      weight_decay, delta, wd_ratio, nesterov):  # fmt: skip
    return None
