"""Triton kernels of LAMB's ops (lamb_grad_sq_sums, lamb_moments, lamb_apply; schemas in vitops/ops/schemas.def), on
the multi-tensor plans of _multi_tensor.py, and their launchers, which take the ops' arguments.

The arithmetic is csrc/lamb.h's, operation for operation (Triton cannot include the C++ header): IEEE-rounded
(div_rn, sqrt_rn, no FMA contraction), per-step divisors as multiplications by their float reciprocals, terms with
a zero coefficient left out, the trust ratio computed by each program from its tensor's sums. tests/optim/test_optim.py checks it against the reference.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from vitops.ops.triton import _multi_tensor as mt


@triton.jit
def _lamb_sq_sum_kernel(chunks, pointers, partials_ptr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """Each chunk's sum of squares to its slot."""
    tensor, begin, end, slot, _, _ = mt.load_chunk(chunks, tl.program_id(0))
    x_ptr = mt.load_pointer(pointers, tensor, 1, 0, DTYPE)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < end, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(partials_ptr + slot, tl.sum(acc, axis=0))


@triton.jit
def _decayed_update(pv, m, v, inv_bc1, inv_sqrt_bc2, eps, neg_decay, coupled_wd):
    """lamb::decayed and lamb::update: (p', u) from the param and the new moments."""
    pd = tl.where(neg_decay == 0.0, pv, pv + pv * neg_decay)
    u = tl.div_rn(m * inv_bc1, tl.sqrt_rn(v) * inv_sqrt_bc2 + eps)
    return pd, tl.where(coupled_wd == 0.0, u, u + coupled_wd * pd)


@triton.jit
def _lamb_moments_kernel(
    chunks, pointers, grad_sq_sum_ptr, partials_ptr, found_inf_ptr, max_grad_norm,
    beta1, beta2, beta3, one_minus_beta2, inv_bc1, inv_sqrt_bc2, eps, neg_decay, coupled_wd, neg_lr,
    PARAM_DTYPE: tl.constexpr, MODE: tl.constexpr, FINISH: tl.constexpr, HAS_CLIP: tl.constexpr,
    SKIPPABLE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The moments, and the chunk's sums of p'^2 and u^2 to its slot; FINISH (no layer adaptation): the params."""
    tensor, begin, end, slot, _, _ = mt.load_chunk(chunks, tl.program_id(0))
    if SKIPPABLE:
        end = mt.end_unless_skipped(found_inf_ptr, begin, end)
    p_ptr, g_ptr, m_ptr, v_ptr = mt.step_pointers(pointers, tensor, PARAM_DTYPE)
    if HAS_CLIP:  # lamb::inverse_clip
        coef = tl.div_rn(tl.sqrt_rn(tl.load(grad_sq_sum_ptr)), max_grad_norm)
        inv_clip = tl.div_rn(1.0, tl.where(coef < 1.0, 1.0, coef))
    one_minus_beta3 = 1.0 - beta3  # in float32, as torch.lerp
    p_acc = tl.zeros([BLOCK], dtype=tl.float32)
    u_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < end
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_CLIP:
            g = g * inv_clip
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        if MODE == 0:
            m = m + beta3 * (g - m)
        elif MODE == 1:
            m = g - (g - m) * one_minus_beta3
        else:
            m = m * beta1 + beta3 * g
        v = tl.load(v_ptr + offs, mask=mask, other=0.0) * beta2 + one_minus_beta2 * g * g
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        pv = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        pd, u = _decayed_update(pv, m, v, inv_bc1, inv_sqrt_bc2, eps, neg_decay, coupled_wd)
        p_acc += tl.where(mask, pd * pd, 0.0)
        u_acc += tl.where(mask, u * u, 0.0)
        if FINISH:
            tl.store(p_ptr + offs, (pd + neg_lr * u).to(PARAM_DTYPE), mask=mask)
    tl.store(partials_ptr + slot * 2, tl.sum(p_acc, axis=0))
    tl.store(partials_ptr + slot * 2 + 1, tl.sum(u_acc, axis=0))


@triton.jit
def _lamb_apply_kernel(
    chunks, pointers, sums_ptr, found_inf_ptr, inv_bc1, inv_sqrt_bc2, eps, neg_decay, coupled_wd, neg_lr,
    PARAM_DTYPE: tl.constexpr, TRUST_CLIP: tl.constexpr, SKIPPABLE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The params, u recomputed from the moments and scaled by the trust ratio of the tensor's sums."""
    tensor, begin, end, _, _, _ = mt.load_chunk(chunks, tl.program_id(0))
    if SKIPPABLE:
        end = mt.end_unless_skipped(found_inf_ptr, begin, end)
    p_ptr = mt.load_pointer(pointers, tensor, 3, 0, PARAM_DTYPE)
    m_ptr = mt.load_pointer(pointers, tensor, 3, 1, tl.float32)
    v_ptr = mt.load_pointer(pointers, tensor, 3, 2, tl.float32)
    w_norm = tl.sqrt_rn(tl.load(sums_ptr + tensor * 2))  # lamb::trust_ratio
    u_norm = tl.sqrt_rn(tl.load(sums_ptr + tensor * 2 + 1))
    both = (w_norm > 0.0) & (u_norm > 0.0)
    ratio = tl.where(both, tl.div_rn(w_norm, tl.where(both, u_norm, 1.0)), 1.0)
    if TRUST_CLIP:
        ratio = tl.where(ratio > 1.0, 1.0, ratio)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < end
        pv = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=1.0)
        pd, u = _decayed_update(pv, m, v, inv_bc1, inv_sqrt_bc2, eps, neg_decay, coupled_wd)
        tl.store(p_ptr + offs, (pd + neg_lr * (u * ratio)).to(PARAM_DTYPE), mask=mask)


def _constants(lr, beta1, beta2, beta3, bias_correction1, bias_correction2, eps, weight_decay, decay_scale,
               decoupled_decay) -> dict:  # fmt: skip
    """lamb::make_constants (the kernels round each to float32)."""
    decay = weight_decay != 0
    return {
        "inv_bc1": 1.0 / bias_correction1, "inv_sqrt_bc2": 1.0 / bias_correction2**0.5, "eps": eps,
        "neg_decay": -decay_scale * weight_decay if decay and decoupled_decay else 0.0,
        "coupled_wd": weight_decay if decay and not decoupled_decay else 0.0, "neg_lr": -lr,
    }  # fmt: skip


def _tensor_sums(plan: mt.Plan, partials: Tensor) -> Tensor:
    return mt.segment_sums(partials, plan.row_slots, long_segments=True)


def lamb_grad_sq_sums(grads: list[Tensor]) -> Tensor:
    plan = mt.tensor_plan(grads[0].device, mt.shapes_of(grads))
    partials = torch.empty(max(plan.num_slots, 1), 1, device=grads[0].device, dtype=torch.float32)
    pointers = mt.pointer_table(grads)
    for group in plan.groups:
        _lamb_sq_sum_kernel[(group.num_chunks,)](
            plan.chunks[group.first_chunk :], pointers, partials, DTYPE=group.dtype, BLOCK=mt.BLOCK, **mt.STEP_OPTIONS
        )
    return _tensor_sums(plan, partials).view(-1)


def lamb_moments(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    grad_sq_sum: Tensor | None, max_grad_norm: float,
    lr: float, beta1: float, beta2: float, beta3: float, bias_correction1: float, bias_correction2: float, eps: float,
    weight_decay: float, decay_scale: float, decoupled_decay: bool,
    adapt: bool, found_inf: Tensor | None = None,
) -> Tensor:  # fmt: skip
    device = params[0].device
    plan = mt.tensor_plan(device, mt.shapes_of(params))
    mode = 2
    if beta3 == 1 - beta1:
        mode = 0 if beta3 < 0.5 else 1
    consts = _constants(lr, beta1, beta2, beta3, bias_correction1, bias_correction2, eps, weight_decay, decay_scale,
                        decoupled_decay)  # fmt: skip
    pointers = mt.pointer_table(params, grads, exp_avgs, exp_avg_sqs)
    partials = torch.empty(max(plan.num_slots, 1), 2, device=device, dtype=torch.float32)
    clip = grad_sq_sum if grad_sq_sum is not None else partials  # unused pointers without them
    skip = found_inf if found_inf is not None else partials
    for group in plan.groups:
        _lamb_moments_kernel[(group.num_chunks,)](
            plan.chunks[group.first_chunk :], pointers, clip, partials, skip, max_grad_norm, beta1, beta2, beta3,
            1 - beta2, **consts, PARAM_DTYPE=group.dtype, MODE=mode, FINISH=not adapt,
            HAS_CLIP=grad_sq_sum is not None, SKIPPABLE=found_inf is not None, BLOCK=mt.BLOCK, **mt.STEP_OPTIONS,
        )  # fmt: skip
    return _tensor_sums(plan, partials)


def lamb_apply(
    params: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], sums: Tensor,
    lr: float, beta1: float, beta2: float, beta3: float, bias_correction1: float, bias_correction2: float, eps: float,
    weight_decay: float, decay_scale: float, decoupled_decay: bool,
    trust_clip: bool, found_inf: Tensor | None = None,
) -> None:  # fmt: skip
    plan = mt.tensor_plan(params[0].device, mt.shapes_of(params))
    consts = _constants(lr, beta1, beta2, beta3, bias_correction1, bias_correction2, eps, weight_decay, decay_scale,
                        decoupled_decay)  # fmt: skip
    pointers = mt.pointer_table(params, exp_avgs, exp_avg_sqs)
    for group in plan.groups:
        _lamb_apply_kernel[(group.num_chunks,)](
            plan.chunks[group.first_chunk :], pointers, sums, found_inf if found_inf is not None else sums, **consts,
            PARAM_DTYPE=group.dtype, TRUST_CLIP=trust_clip, SKIPPABLE=found_inf is not None, BLOCK=mt.BLOCK,
            **mt.STEP_OPTIONS,
        )  # fmt: skip
