"""Triton kernels of AdamP's ops (adamp_moments, adamp_apply; schemas in vitops/ops/schemas.def), on the channel
plans of _multi_tensor.py, and their launchers, which take the ops' arguments.

The arithmetic is csrc/adamp.h's, operation for operation (Triton cannot include the C++ header): IEEE-rounded
(div_rn, sqrt_rn, no FMA contraction), 1 / sqrt(bc2) as a float multiplier. The per-row and per-tensor decisions
(timm's cosine tests, the projection coefficients) are a few torch ops over all rows and tensors at once, in float64
from the float32 sums as adamp.h computes them, on the device: nothing waits for the GPU. tests/optim/test_optim.py
checks it against the reference.
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from vitops.ops.triton import _multi_tensor as mt

TENSOR_SUMS = 5  # adamp.h's kTensorSums: g.p, g.g, p.p, p.q and the rows failing the channel-wise test


@triton.jit
def _tile(
    p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, coef, factor, neg_step, inv_sqrt_bc2,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, gp, gg, pp, pq,
    NESTEROV: tl.constexpr, STAGE: tl.constexpr,
):  # fmt: skip
    """The elements at `offs` (a tile of any shape). STAGE 0: moments and param, never projected. 1: moments;
    returns the per-element sums gp, gg, pp and pq (of `offs`' shape) plus g.p, g.g, p.p and p.q of these
    elements (0 where masked). 2: param, q projected with `coef`, the moments as they are."""
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
    denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
    if NESTEROV:
        q = tl.div_rn(beta1 * m + one_minus_beta1 * g, denom)
    else:
        q = tl.div_rn(m, denom)
    if STAGE != 1:
        p_new = pv * factor + neg_step * tl.where(coef == 0.0, q, q - pv * coef)
        tl.store(p_ptr + offs, p_new.to(p_ptr.dtype.element_ty), mask=mask)
    return (
        gp + tl.where(mask, g * pv, 0.0), gg + tl.where(mask, g * g, 0.0), pp + tl.where(mask, pv * pv, 0.0),
        pq + tl.where(mask, pv * q, 0.0),
    )  # fmt: skip


@triton.jit
def _row_piece(
    p_ptr, g_ptr, m_ptr, v_ptr, partials_ptr, coef_ptr, begin, end, slot, row, factor, neg_step, inv_sqrt_bc2,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    NESTEROV: tl.constexpr, STAGE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Elements [begin, end) of one row, or (STAGE 0) of a param never projected. Stage 1 writes their sums to
    `slot`."""
    coef = 0.0
    if STAGE == 2:
        coef = tl.load(coef_ptr + row)
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    gp, gg, pp, pq = zero, zero, zero, zero
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        gp, gg, pp, pq = _tile(
            p_ptr, g_ptr, m_ptr, v_ptr, offs, offs < end, coef, factor, neg_step, inv_sqrt_bc2,
            beta1, one_minus_beta1, beta2, one_minus_beta2, eps, gp, gg, pp, pq, NESTEROV, STAGE,
        )  # fmt: skip
    if STAGE == 1:
        entry = partials_ptr + slot * 4
        tl.store(entry, tl.sum(gp, axis=0))
        tl.store(entry + 1, tl.sum(gg, axis=0))
        tl.store(entry + 2, tl.sum(pp, axis=0))
        tl.store(entry + 3, tl.sum(pq, axis=0))


@triton.jit
def _short_rows(
    p_ptr, g_ptr, m_ptr, v_ptr, partials_ptr, coef_ptr, begin, end, slot, row, rows, factor, neg_step,
    inv_sqrt_bc2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    NESTEROV: tl.constexpr, STAGE: tl.constexpr, TILE_ROWS: tl.constexpr, TILE_COLS: tl.constexpr,
):  # fmt: skip
    """`rows` whole rows from element `begin`, rows `row`.., TILE_ROWS at a time, so that a row's sums are a tile
    row's; stage 1 writes them to slots `slot`.., one per row."""
    row_len = (end - begin) // rows
    for first in range(0, rows, TILE_ROWS):
        tile_rows = first + tl.arange(0, TILE_ROWS)
        row_mask = tile_rows < rows
        coef = tl.zeros([TILE_ROWS, 1], dtype=tl.float32)
        if STAGE == 2:
            coef = tl.load(coef_ptr + row + tile_rows, mask=row_mask, other=0.0)[:, None]
        zero = tl.zeros([TILE_ROWS, TILE_COLS], dtype=tl.float32)
        gp, gg, pp, pq = zero, zero, zero, zero
        for col in range(0, row_len, TILE_COLS):
            cols = col + tl.arange(0, TILE_COLS)
            offs = begin + tile_rows[:, None] * row_len + cols[None, :]
            mask = row_mask[:, None] & (cols < row_len)[None, :]
            gp, gg, pp, pq = _tile(
                p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, coef, factor, neg_step, inv_sqrt_bc2,
                beta1, one_minus_beta1, beta2, one_minus_beta2, eps, gp, gg, pp, pq, NESTEROV, STAGE,
            )  # fmt: skip
        if STAGE == 1:
            entry = partials_ptr + (slot + tile_rows) * 4
            tl.store(entry, tl.sum(gp, axis=1), mask=row_mask)
            tl.store(entry + 1, tl.sum(gg, axis=1), mask=row_mask)
            tl.store(entry + 2, tl.sum(pp, axis=1), mask=row_mask)
            tl.store(entry + 3, tl.sum(pq, axis=1), mask=row_mask)


@triton.jit
def _adamp_kernel(
    chunks, pointers, step_consts, partials_ptr, coef_ptr, factor_ptr, found_inf_ptr, first_unprojected,
    plain_factor, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    PARAM_DTYPE: tl.constexpr, NESTEROV: tl.constexpr, STAGE: tl.constexpr, SKIPPABLE: tl.constexpr,
    BLOCK: tl.constexpr, TILE_COLS: tl.constexpr,
):  # fmt: skip
    """STAGE 1 (adamp_moments): moments, and each row's sums g.p, g.g, p.p, p.q to its slots; chunks from
    `first_unprojected` on (params never projected) are finished here. STAGE 2 (adamp_apply): params, q recomputed
    from the moments and projected with its row's coefficient; only the chunks before `first_unprojected` run."""
    chunk = tl.program_id(0)
    tensor, begin, end, slot, row, rows = mt.load_chunk(chunks, chunk)
    if SKIPPABLE:
        end = mt.end_unless_skipped(found_inf_ptr, begin, end)
    p_ptr, g_ptr, m_ptr, v_ptr = mt.step_pointers(pointers, tensor, PARAM_DTYPE)
    inv_sqrt_bc2 = tl.load(step_consts + tensor * 2)  # adamp::StepConstants
    neg_step = tl.load(step_consts + tensor * 2 + 1)
    if STAGE == 2:
        factor = tl.load(factor_ptr + tensor)
    else:
        factor = plain_factor
    if chunk >= first_unprojected:
        if STAGE == 1:
            _row_piece(
                p_ptr, g_ptr, m_ptr, v_ptr, partials_ptr, coef_ptr, begin, end, slot, row, factor, neg_step,
                inv_sqrt_bc2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, NESTEROV, 0, BLOCK,
            )  # fmt: skip
    elif rows == 0:
        _row_piece(
            p_ptr, g_ptr, m_ptr, v_ptr, partials_ptr, coef_ptr, begin, end, slot, row, factor, neg_step,
            inv_sqrt_bc2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, NESTEROV, STAGE, BLOCK,
        )  # fmt: skip
    else:
        _short_rows(
            p_ptr, g_ptr, m_ptr, v_ptr, partials_ptr, coef_ptr, begin, end, slot, row, rows, factor, neg_step,
            inv_sqrt_bc2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, NESTEROV, STAGE, BLOCK // TILE_COLS,
            TILE_COLS,
        )  # fmt: skip


def _cosine(sums: Tensor, eps: float) -> Tensor:
    """adamp::cosine, in float64, of [..., >= 3] sums g.p, g.g, p.p."""
    s = sums.double()
    return s[..., 0].abs() / (s[..., 1].sqrt().clamp_min(eps) * s[..., 2].sqrt().clamp_min(eps))


def _projection_coef(sums: Tensor, eps: float) -> Tensor:
    """adamp::projection_coef, in float64, of [..., 4] sums g.p, g.g, p.p, p.q; float32."""
    s = sums.double()
    norm = s[..., 2].sqrt() + eps
    return (s[..., 3] / norm / norm).float()


def _thresholds(delta: float, lengths, device) -> Tensor:
    """float32 delta / sqrt(length) per entry, as adamp::passes compares."""
    return mt.to_device([delta / math.sqrt(max(n, 1)) for n in lengths], torch.float32, device)


def _launch(plan: mt.Plan, stage: int, pointers, step_consts, partials, coef, factor, found_inf, plain_factor, beta1,
            beta2, eps, nesterov) -> None:  # fmt: skip
    for group in plan.groups:
        grid = group.num_chunks if stage == 1 else group.num_summed_chunks
        if grid:
            _adamp_kernel[(grid,)](
                plan.chunks[group.first_chunk :], pointers, step_consts, partials, coef, factor,
                found_inf if found_inf is not None else step_consts, group.num_summed_chunks, plain_factor, beta1,
                1 - beta1, beta2, 1 - beta2, eps, PARAM_DTYPE=group.dtype, NESTEROV=nesterov, STAGE=stage,
                SKIPPABLE=found_inf is not None, BLOCK=mt.BLOCK, TILE_COLS=mt.TILE_COLS, **mt.STEP_OPTIONS,
            )  # fmt: skip


def _step_consts(bias_correction1, bias_correction2, lr, device) -> Tensor:
    """[tensors, 2] float32: adamp::step_constants per tensor."""
    consts = [[1.0 / math.sqrt(bc2), -(lr / bc1)] for bc1, bc2 in zip(bias_correction1, bias_correction2)]
    return mt.to_device(consts, torch.float32, device)


def _factors(weight_decay: float, lr: float, wd_ratio: float) -> tuple[float, float]:
    """adamp::Constants' plain and projected weight-decay factors."""
    if weight_decay > 0:
        return 1.0 - lr * weight_decay, 1.0 - lr * weight_decay * wd_ratio
    return 1.0, 1.0


def adamp_moments(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    bias_correction1: list[float], bias_correction2: list[float], lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, delta: float, wd_ratio: float, nesterov: bool,
    found_inf: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    device = params[0].device
    plan = mt.channel_plan(device, mt.shapes_of(params))
    pointers = mt.pointer_table(params, grads, exp_avgs, exp_avg_sqs)
    step_consts = _step_consts(bias_correction1, bias_correction2, lr, device)
    partials = torch.empty(max(plan.num_slots, 1), 4, device=device, dtype=torch.float32)
    plain_factor, _ = _factors(weight_decay, lr, wd_ratio)
    _launch(plan, 1, pointers, step_consts, partials, partials, partials, found_inf, plain_factor, beta1, beta2, eps,
            nesterov)  # fmt: skip
    row_sums = mt.segment_sums(partials, plan.row_slots, long_segments=False)
    projectable = mt.to_device([len(p.shape) > 1 for p in params], torch.bool, device)[plan.row_tensor]
    if found_inf is not None:  # a skipped step's rows are all 0: none fails its test
        projectable = projectable & (found_inf == 0)
    passes = _cosine(row_sums, eps).float() < _thresholds(delta, plan.row_lens, device)[plan.row_tensor]
    failing = (projectable & ~passes).float()
    row_coefs = torch.where(projectable, _projection_coef(row_sums, eps), 0.0)
    tensor_sums = torch.cat(
        [mt.segment_sums(row_sums, plan.tensor_rows, long_segments=True),
         mt.segment_sums(failing[:, None].contiguous(), plan.tensor_rows, long_segments=True)], dim=1,
    )  # fmt: skip
    return row_coefs, tensor_sums


def adamp_apply(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    row_coefs: Tensor, tensor_sums: Tensor, full_numels: list[int],
    bias_correction1: list[float], bias_correction2: list[float], lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, delta: float, wd_ratio: float, nesterov: bool,
    found_inf: Tensor | None = None,
) -> None:  # fmt: skip
    device = params[0].device
    plan = mt.channel_plan(device, mt.shapes_of(params))
    # adamp::projection per tensor: per channel if no row failed, else for the whole tensor if its cosine passes
    # with its numel over all ranks.
    channel = tensor_sums[:, 4] == 0
    layer = ~channel & (_cosine(tensor_sums, eps).float() < _thresholds(delta, full_numels, device))
    coef = torch.where(
        channel[plan.row_tensor],
        row_coefs,
        torch.where(layer[plan.row_tensor], _projection_coef(tensor_sums, eps)[plan.row_tensor], 0.0),
    )
    plain_factor, projected_factor = _factors(weight_decay, lr, wd_ratio)
    factor = torch.where(channel | layer, projected_factor, plain_factor).float()
    pointers = mt.pointer_table(params, grads, exp_avgs, exp_avg_sqs)
    step_consts = _step_consts(bias_correction1, bias_correction2, lr, device)
    _launch(plan, 2, pointers, step_consts, factor, coef.contiguous(), factor, found_inf, plain_factor, beta1, beta2,
            eps, nesterov)  # fmt: skip
