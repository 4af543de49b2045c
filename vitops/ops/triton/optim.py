"""Triton kernels of the fused optimizer steps (vitops::lamb_step_triton, vitops::adamp_step_triton).

Multi-tensor apply, as csrc/cuda/multi_tensor_kernels.cuh: a step costs the same few launches whether it updates
three tensors or three thousand, because launch overhead, not bandwidth, is what a per-tensor loop pays for on
the many small tensors (biases, norms) of a model.

The tensors of a step are cut into chunks (a plan that depends only on their shapes, so it is built once and
cached on the device). A program works through one chunk; the tensors' data pointers reach it through a small
int64 table built on every call, since grads may be re-allocated between steps. The pointer type is a
compile-time constant, so the tensors are grouped by param dtype and each stage runs once per group.

A chunk is either whole rows of a tensor or a piece of one row (LAMB: a tensor is one row; AdamP: size(0)
channel rows, 1-D params none). The first stage updates the moments and writes the sums the step needs to its
chunk's own slots, one per row in it; a segment-sum kernel then adds each row's slots, and each tensor's rows, in
a fixed order. No atomics, so a step is bit-reproducible. Short rows are packed many to a program and walked in
2-D tiles, one row per tile row, so that a per-row sum is a plain tile reduction and a bias-sized row does not
take a whole program. The trust ratios (LAMB) and projection decisions (AdamP) follow as a few torch ops over
all tensors at once, on the device: nothing in a step waits for the GPU. The second stage applies the update,
recomputing the Adam direction from the new moments rather than storing it. What needs no sums is finished in
the first stage: all of LAMB without layer adaptation, AdamP's 1-D params.

Arithmetic is IEEE rounded (div_rn, sqrt_rn, no FMA contraction) in timm's order of operations.
"""
import functools
import math
from typing import Callable, List, NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 1024  # elements per vector step of a program
_CHUNK = 1 << 14  # elements a program works through, as csrc/cpu/chunk_plan.h's kChunk (packed rows: more)
# AdamP's rows up to _BLOCK long are walked in [_TILE_ROWS, _TILE_COLS] tiles: narrow, so that even a 3x3 conv's
# 9-element rows fill half of each tile row.
_TILE_COLS = 16
_TILE_ROWS = _BLOCK // _TILE_COLS
_SUM_BLOCK = 256  # values a segment-sum program adds per step
_PLANS_CACHED = 64  # a plan per param group and shape set; bounded, as each holds device tables

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# A chunk's entry in the chunk table: its tensor (index in the plan), its elements [begin, end) of that tensor,
# its first partial-sum slot (-1: the tensor needs no sums), its first row (numbered over the plan), and how many
# whole rows it holds (0: it is a piece of one row, with one slot).
_CHUNK_FIELDS = tl.constexpr(6)


@triton.jit
def _load_chunk(chunks, chunk):
    entry = chunks + chunk * _CHUNK_FIELDS
    return (
        tl.load(entry), tl.load(entry + 1), tl.load(entry + 2), tl.load(entry + 3), tl.load(entry + 4),
        tl.load(entry + 5),
    )  # fmt: skip


@triton.jit
def _load_pointers(pointers, tensor, PARAM_DTYPE: tl.constexpr):
    entry = pointers + tensor * 4
    p_ptr = tl.load(entry).to(tl.pointer_type(PARAM_DTYPE))
    g_ptr = tl.load(entry + 1).to(tl.pointer_type(PARAM_DTYPE))
    m_ptr = tl.load(entry + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(entry + 3).to(tl.pointer_type(tl.float32))
    return p_ptr, g_ptr, m_ptr, v_ptr


@triton.jit
def _segment_sum_kernel(
    values_ptr, offsets_ptr, out_ptr, num_segments, WIDTH: tl.constexpr, SEGMENTS: tl.constexpr, SLOTS: tl.constexpr
):  # fmt: skip
    """out[s] = values[offsets[s]:offsets[s + 1]].sum(0), values of WIDTH columns: SEGMENTS segments a program,
    SLOTS values of each at a time, in a fixed order."""
    segments = tl.program_id(0) * SEGMENTS + tl.arange(0, SEGMENTS)
    segment_mask = segments < num_segments
    begin = tl.load(offsets_ptr + segments, mask=segment_mask, other=0)
    end = tl.load(offsets_ptr + segments + 1, mask=segment_mask, other=0)
    slots = tl.arange(0, SLOTS)
    cols = tl.arange(0, WIDTH)
    acc = tl.zeros([SEGMENTS, SLOTS, WIDTH], dtype=tl.float32)
    for step in range(0, tl.max(end - begin, axis=0), SLOTS):
        rows = begin[:, None] + step + slots[None, :]
        mask = (rows < end[:, None])[:, :, None]
        acc += tl.load(values_ptr + rows[:, :, None] * WIDTH + cols[None, None, :], mask=mask, other=0.0)
    out = out_ptr + segments[:, None] * WIDTH + cols[None, :]
    tl.store(out, tl.sum(acc, axis=1), mask=segment_mask[:, None])


@triton.jit
def _lamb_kernel(
    chunks, pointers, clip_ptr, partials_ptr, ratio_ptr,
    beta1, beta2, beta3, one_minus_beta3, one_minus_beta2, bc1, sqrt_bc2, eps, neg_decay, coupled_wd, neg_lr,
    PARAM_DTYPE: tl.constexpr, MODE: tl.constexpr, STAGE: tl.constexpr, HAS_CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """STAGE 0: moments and param, no adaptation. 1: moments, and the chunk's sums of p'^2 and u^2 to its slot.
    2: param, with u recomputed from the new moments and scaled by the tensor's trust ratio."""
    tensor, begin, end, slot, _, _ = _load_chunk(chunks, tl.program_id(0))
    p_ptr, g_ptr, m_ptr, v_ptr = _load_pointers(pointers, tensor, PARAM_DTYPE)
    if HAS_CLIP:
        clip = tl.load(clip_ptr)
    if STAGE == 2:
        ratio = tl.load(ratio_ptr + tensor)
    w_acc = tl.zeros([BLOCK], dtype=tl.float32)
    u_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < end
        pv = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        pd = pv + pv * neg_decay
        if STAGE == 2:
            m = tl.load(m_ptr + offs, mask=mask, other=0.0)
            v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        else:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_CLIP:
                g = tl.div_rn(g, clip)
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
            w_acc += tl.where(mask, pd * pd, 0.0)
            u_acc += tl.where(mask, u * u, 0.0)
        else:
            if STAGE == 2:
                u = u * ratio
            tl.store(p_ptr + offs, (pd + neg_lr * u).to(p_ptr.dtype.element_ty), mask=mask)
    if STAGE == 1:
        tl.store(partials_ptr + slot * 2, tl.sum(w_acc, axis=0))
        tl.store(partials_ptr + slot * 2 + 1, tl.sum(u_acc, axis=0))


@triton.jit
def _adamp_tile(
    p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, coef, factor, neg_step, sqrt_bc2,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    NESTEROV: tl.constexpr, STAGE: tl.constexpr,
):  # fmt: skip
    """The elements at `offs` (a tile of any shape). STAGE 0: moments and param, no projection. 1: moments; returns
    g.p, g.g, p.p and p.q per element (0 where masked) for the row sums. 2: param, q projected with `coef`."""
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
    if STAGE != 1:
        if STAGE == 2:
            q = q - pv * coef
        tl.store(p_ptr + offs, (pv * factor + neg_step * q).to(p_ptr.dtype.element_ty), mask=mask)
    return (
        tl.where(mask, g * pv, 0.0), tl.where(mask, g * g, 0.0), tl.where(mask, pv * pv, 0.0),
        tl.where(mask, pv * q, 0.0),
    )  # fmt: skip


@triton.jit
def _adamp_row_piece(
    p_ptr, g_ptr, m_ptr, v_ptr, partials_ptr, coef_ptr, begin, end, slot, row, factor, neg_step, sqrt_bc2,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    NESTEROV: tl.constexpr, STAGE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Elements [begin, end) of one row, or (STAGE 0) of a param never projected. Stage 1 writes their sums to
    `slot`."""
    coef = 0.0
    if STAGE == 2:
        coef = tl.load(coef_ptr + row)
    gp = tl.zeros([BLOCK], dtype=tl.float32)
    gg = tl.zeros([BLOCK], dtype=tl.float32)
    pp = tl.zeros([BLOCK], dtype=tl.float32)
    pq = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        gp_i, gg_i, pp_i, pq_i = _adamp_tile(
            p_ptr, g_ptr, m_ptr, v_ptr, offs, offs < end, coef, factor, neg_step, sqrt_bc2,
            beta1, one_minus_beta1, beta2, one_minus_beta2, eps, NESTEROV, STAGE,
        )  # fmt: skip
        gp += gp_i
        gg += gg_i
        pp += pp_i
        pq += pq_i
    if STAGE == 1:
        entry = partials_ptr + slot * 4
        tl.store(entry, tl.sum(gp, axis=0))
        tl.store(entry + 1, tl.sum(gg, axis=0))
        tl.store(entry + 2, tl.sum(pp, axis=0))
        tl.store(entry + 3, tl.sum(pq, axis=0))


@triton.jit
def _adamp_short_rows(
    p_ptr, g_ptr, m_ptr, v_ptr, partials_ptr, coef_ptr, begin, end, slot, row, rows, factor, neg_step, sqrt_bc2,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    NESTEROV: tl.constexpr, STAGE: tl.constexpr, TILE_ROWS: tl.constexpr, TILE_COLS: tl.constexpr,
):  # fmt: skip
    """`rows` whole rows from element `begin`, global rows `row`.., TILE_ROWS at a time, so that a row's sums
    are a tile row's; stage 1 writes them to slots `slot`.., one per row."""
    row_len = (end - begin) // rows
    for first in range(0, rows, TILE_ROWS):
        tile_rows = first + tl.arange(0, TILE_ROWS)
        row_mask = tile_rows < rows
        coef = tl.zeros([TILE_ROWS, 1], dtype=tl.float32)
        if STAGE == 2:
            coef = tl.load(coef_ptr + row + tile_rows, mask=row_mask, other=0.0)[:, None]
        gp = tl.zeros([TILE_ROWS, TILE_COLS], dtype=tl.float32)
        gg = tl.zeros([TILE_ROWS, TILE_COLS], dtype=tl.float32)
        pp = tl.zeros([TILE_ROWS, TILE_COLS], dtype=tl.float32)
        pq = tl.zeros([TILE_ROWS, TILE_COLS], dtype=tl.float32)
        for col in range(0, row_len, TILE_COLS):
            cols = col + tl.arange(0, TILE_COLS)
            offs = begin + tile_rows[:, None] * row_len + cols[None, :]
            mask = row_mask[:, None] & (cols < row_len)[None, :]
            gp_i, gg_i, pp_i, pq_i = _adamp_tile(
                p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, coef, factor, neg_step, sqrt_bc2,
                beta1, one_minus_beta1, beta2, one_minus_beta2, eps, NESTEROV, STAGE,
            )  # fmt: skip
            gp += gp_i
            gg += gg_i
            pp += pp_i
            pq += pq_i
        if STAGE == 1:
            entry = partials_ptr + (slot + tile_rows) * 4
            tl.store(entry, tl.sum(gp, axis=1), mask=row_mask)
            tl.store(entry + 1, tl.sum(gg, axis=1), mask=row_mask)
            tl.store(entry + 2, tl.sum(pp, axis=1), mask=row_mask)
            tl.store(entry + 3, tl.sum(pq, axis=1), mask=row_mask)


@triton.jit
def _adamp_kernel(
    chunks, pointers, step_consts, partials_ptr, coef_ptr, factor_ptr, first_unprojected, plain_factor,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    PARAM_DTYPE: tl.constexpr, NESTEROV: tl.constexpr, STAGE: tl.constexpr, BLOCK: tl.constexpr,
    TILE_COLS: tl.constexpr,
):  # fmt: skip
    """STAGE 1: moments, and each row's sums g.p, g.g, p.p, p.q to its slots; chunks from `first_unprojected` on
    (1-D params, never projected) are finished here. STAGE 2: param, with q recomputed from the new moments and
    projected with its row's coefficient; only the chunks before `first_unprojected` are launched."""
    chunk = tl.program_id(0)
    tensor, begin, end, slot, row, rows = _load_chunk(chunks, chunk)
    p_ptr, g_ptr, m_ptr, v_ptr = _load_pointers(pointers, tensor, PARAM_DTYPE)
    sqrt_bc2 = tl.load(step_consts + tensor * 4)
    neg_step = tl.load(step_consts + tensor * 4 + 1)
    if STAGE == 2:
        factor = tl.load(factor_ptr + tensor)
    else:
        factor = plain_factor
    if chunk >= first_unprojected:
        if STAGE == 1:
            _adamp_row_piece(
                p_ptr, g_ptr, m_ptr, v_ptr, partials_ptr, coef_ptr, begin, end, slot, row, factor, neg_step, sqrt_bc2,
                beta1, one_minus_beta1, beta2, one_minus_beta2, eps, NESTEROV, 0, BLOCK,
            )  # fmt: skip
    elif rows == 0:
        _adamp_row_piece(
            p_ptr, g_ptr, m_ptr, v_ptr, partials_ptr, coef_ptr, begin, end, slot, row, factor, neg_step, sqrt_bc2,
            beta1, one_minus_beta1, beta2, one_minus_beta2, eps, NESTEROV, STAGE, BLOCK,
        )  # fmt: skip
    else:
        _adamp_short_rows(
            p_ptr, g_ptr, m_ptr, v_ptr, partials_ptr, coef_ptr, begin, end, slot, row, rows, factor, neg_step,
            sqrt_bc2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, NESTEROV, STAGE, BLOCK // TILE_COLS,
            TILE_COLS,
        )  # fmt: skip


# --- plans ----------------------------------------------------------------------------------------------------


class _Group(NamedTuple):
    """The chunks of one param dtype, contiguous in the chunk table; those of tensors with sums come first."""

    dtype: tl.dtype
    first_chunk: int
    num_chunks: int
    num_summed_chunks: int


class _Plan(NamedTuple):
    order: tuple  # the op argument index of each planned tensor (non-empty ones, grouped by dtype)
    groups: tuple  # of _Group
    chunks: Tensor  # [chunks, _CHUNK_FIELDS] int64
    num_slots: int
    num_rows: int
    row_slots: Tensor  # [rows + 1] int64: row r's partial sums are in slots row_slots[r] .. row_slots[r + 1]
    tensor_rows: Tensor  # [tensors + 1] int64: tensor t's rows are tensor_rows[t] .. tensor_rows[t + 1]
    row_tensor: Tensor  # [rows] int64: the tensor of each row
    row_lens: tuple  # per planned tensor
    numels: tuple  # per planned tensor


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host table on the device without waiting for the copy: staged through pinned memory on CUDA."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def _plan(device: torch.device, shapes: tuple, rows_of: Callable[[torch.Size], int]) -> _Plan:
    """The chunks of tensors of `shapes` ((shape, dtype) per op argument). rows_of(shape): the rows a tensor's sums
    are taken over, 0 for none. csrc/cpu/chunk_plan.h's plan, except that rows up to _BLOCK long are packed
    _TILE_ROWS at a time at least, so that the tiles that walk them are full."""
    by_dtype: dict = {}
    for index, (shape, dtype) in enumerate(shapes):
        if math.prod(shape) > 0:
            by_dtype.setdefault(dtype, []).append(index)
    order, groups, chunks, row_lens, numels = [], [], [], [], []
    row_slots, tensor_rows, row_tensor = [0], [0], []
    for dtype, indices in by_dtype.items():
        # Tensors with sums first, so that the second stage, which only they need, launches a prefix of the group.
        indices.sort(key=lambda i: rows_of(shapes[i][0]) == 0)
        first_chunk = len(chunks)
        for index in indices:
            tensor, shape = len(order), shapes[index][0]
            order.append(index)
            numel, rows = math.prod(shape), rows_of(shape)
            row_len = numel // max(rows, 1)
            row_lens.append(row_len)
            numels.append(numel)
            if rows == 0:
                chunks += [(tensor, b, min(b + _CHUNK, numel), -1, -1, 0) for b in range(0, numel, _CHUNK)]
            elif row_len <= _BLOCK:
                per_chunk = _TILE_ROWS * max(1, _CHUNK // (row_len * _TILE_ROWS))
                for r in range(0, rows, per_chunk):
                    n = min(per_chunk, rows - r)
                    chunks.append((tensor, r * row_len, (r + n) * row_len, row_slots[-1], len(row_tensor) + r, n))
                    row_slots += range(row_slots[-1] + 1, row_slots[-1] + n + 1)
            else:
                for r in range(rows):
                    for b in range(0, row_len, _CHUNK):
                        start = r * row_len + b
                        end = r * row_len + min(b + _CHUNK, row_len)
                        chunks.append((tensor, start, end, row_slots[-1] + b // _CHUNK, len(row_tensor) + r, 0))
                    row_slots.append(row_slots[-1] + -(-row_len // _CHUNK))
            row_tensor += [tensor] * rows
            tensor_rows.append(len(row_tensor))
        summed = sum(1 for c in chunks[first_chunk:] if c[3] >= 0)
        groups.append(_Group(_TL_DTYPES[dtype], first_chunk, len(chunks) - first_chunk, summed))
    return _Plan(
        tuple(order), tuple(groups), _to_device(chunks, torch.int64, device).view(-1, _CHUNK_FIELDS),
        row_slots[-1], len(row_tensor), _to_device(row_slots, torch.int64, device),
        _to_device(tensor_rows, torch.int64, device), _to_device(row_tensor, torch.int64, device),
        tuple(row_lens), tuple(numels),
    )  # fmt: skip


def _shapes(params: List[Tensor]) -> tuple:
    return tuple((p.shape, p.dtype) for p in params)


@functools.lru_cache(maxsize=_PLANS_CACHED)
def _lamb_plan(device: torch.device, shapes: tuple) -> _Plan:
    return _plan(device, shapes, lambda shape: 1)  # the trust ratio's norms are over whole tensors


@functools.lru_cache(maxsize=_PLANS_CACHED)
def _adamp_plan(device: torch.device, shapes: tuple) -> _Plan:
    return _plan(device, shapes, lambda shape: shape[0] if len(shape) > 1 else 0)  # timm projects 2-D and up


def _pointer_table(plan: _Plan, *lists: List[Tensor]) -> Tensor:
    device = lists[0][0].device
    return _to_device([[tensors[i].data_ptr() for tensors in lists] for i in plan.order], torch.int64, device)


def _segment_sums(values: Tensor, offsets: Tensor, long_segments: bool) -> Tensor:
    """[len(offsets) - 1, values.shape[1]]: the sums of the rows of `values` between consecutive offsets. Long
    segments (a tensor's chunks or rows, up to thousands) are added a program each, many values at a time;
    short ones (a row's chunks, mostly one) many to a program."""
    out = values.new_empty(offsets.numel() - 1, values.shape[1])
    segments, slots = (1, _SUM_BLOCK) if long_segments else (_SUM_BLOCK, 1)
    _segment_sum_kernel[(triton.cdiv(out.shape[0], segments),)](
        values, offsets, out, out.shape[0], WIDTH=values.shape[1], SEGMENTS=segments, SLOTS=slots
    )
    return out


# --- the ops --------------------------------------------------------------------------------------------------


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
    plan = _lamb_plan(device, _shapes(params))
    if not plan.order:
        return
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
    two_pass = decay or adapt
    pointers = _pointer_table(plan, params, grads, exp_avgs, exp_avg_sqs)
    partials = torch.empty(plan.num_slots, 2, device=device, dtype=torch.float32)
    clip = clip_coef if clip_coef is not None else partials  # an unused pointer without clipping

    def launch(stage, ratios):
        for group in plan.groups:
            chunks = plan.chunks[group.first_chunk :]
            _lamb_kernel[(group.num_chunks,)](
                chunks, pointers, clip, partials, ratios, **consts, PARAM_DTYPE=group.dtype, MODE=mode,
                STAGE=stage, HAS_CLIP=clip_coef is not None, BLOCK=_BLOCK, enable_fp_fusion=False,
            )  # fmt: skip

    launch(1 if two_pass else 0, partials)
    if not two_pass:
        return
    w_norm, u_norm = _segment_sums(partials, plan.row_slots, long_segments=True).sqrt().unbind(1)
    ratios = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
    if trust_clip:
        ratios = ratios.clamp(max=1.0)
    launch(2, ratios)


@lamb_step_triton.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, clip_coef, lr, beta1, beta2, beta3, bias_correction1,
      bias_correction2, eps, weight_decay, decay_scale, decoupled_decay, adapt, trust_clip):  # fmt: skip
    return None


def _adamp_projection(
    plan: _Plan, row_sums: Tensor, thresholds: Tensor, eps: float, plain_factor: float, projected_factor: float
) -> tuple[Tensor, Tensor]:
    """timm's projection test for every tensor at once, from the per-row sums (g.p, g.g, p.p, p.q): per channel if
    every row's cosine is below thresholds[:, 0], else for the whole tensor if its cosine is below
    thresholds[:, 1]. Returns each row's projection coefficient (0 where the tensor is not projected) and each
    tensor's weight-decay factor."""
    tensor_sums = _segment_sums(row_sums, plan.tensor_rows, long_segments=True)

    def cosine(s):
        return s[:, 0].abs() / (s[:, 1].sqrt().clamp_min(eps) * s[:, 2].sqrt().clamp_min(eps))

    def coefficient(s):
        return s[:, 3] / (s[:, 2].sqrt() + eps) ** 2

    max_cosine = row_sums.new_zeros(len(plan.order)).scatter_reduce_(0, plan.row_tensor, cosine(row_sums), "amax")
    channel = max_cosine < thresholds[:, 0]
    layer = cosine(tensor_sums) < thresholds[:, 1]
    row_channel, row_layer = channel[plan.row_tensor], layer[plan.row_tensor]
    layer_coef = coefficient(tensor_sums)[plan.row_tensor]
    coef = torch.where(row_channel, coefficient(row_sums), torch.where(row_layer, layer_coef, 0.0))
    factor = torch.where(channel | layer, projected_factor, plain_factor)
    return coef, factor


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
    plan = _adamp_plan(device, _shapes(params))
    if not plan.order:
        return
    decay = weight_decay > 0
    plain_factor = 1.0 - lr * weight_decay if decay else 1.0
    projected_factor = 1.0 - lr * weight_decay * wd_ratio if decay else 1.0
    pointers = _pointer_table(plan, params, grads, exp_avgs, exp_avg_sqs)
    # Per tensor: sqrt(bc2) and -lr / bc1 for the kernels, the channel- and layer-wise cosine thresholds.
    step_consts = _to_device(
        [
            [bias_correction2[i] ** 0.5, -(lr / bias_correction1[i]), delta / row_len**0.5, delta / numel**0.5]
            for i, row_len, numel in zip(plan.order, plan.row_lens, plan.numels)
        ],
        torch.float32,
        device,
    )
    partials = torch.empty(plan.num_slots, 4, device=device, dtype=torch.float32)
    consts = dict(beta1=beta1, one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2, eps=eps)

    def launch(stage, coef, factor):
        for group in plan.groups:
            grid = group.num_chunks if stage == 1 else group.num_summed_chunks
            if grid:
                _adamp_kernel[(grid,)](
                    plan.chunks[group.first_chunk :], pointers, step_consts, partials, coef, factor,
                    group.num_summed_chunks, plain_factor, **consts, PARAM_DTYPE=group.dtype, NESTEROV=nesterov,
                    STAGE=stage, BLOCK=_BLOCK, TILE_COLS=_TILE_COLS, enable_fp_fusion=False,
                )  # fmt: skip

    launch(1, partials, partials)
    if not plan.num_rows:
        return
    row_sums = _segment_sums(partials, plan.row_slots, long_segments=False)
    coef, factor = _adamp_projection(plan, row_sums, step_consts[:, 2:], eps, plain_factor, projected_factor)
    launch(2, coef, factor)


@adamp_step_triton.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2, lr, beta1, beta2, eps,
      weight_decay, delta, wd_ratio, nesterov):  # fmt: skip
    return None
