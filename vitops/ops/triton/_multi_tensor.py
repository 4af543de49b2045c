"""Multi-tensor apply for the Triton optimizer kernels (lamb.py, adamp.py), as csrc/cuda/multi_tensor_kernels.cuh:
a step costs the same few launches whether it updates three tensors or three thousand, because launch overhead, not
bandwidth, is what a per-tensor loop pays for on the many small tensors (biases, norms) of a model.

The tensors of a step are cut into chunks (a plan that depends only on their shapes, so it is built once and cached
on the device). A program works through one chunk; the tensors' data pointers reach it through a small int64 table
built on every call, since grads may be re-allocated between steps. The pointer type is a compile-time constant,
so the chunks are grouped by param dtype and each kernel runs once per group.

A chunk is either whole rows of a tensor or a piece of one row (LAMB: a tensor is one row; AdamP: size(0) channel
rows, one row for a param never projected). Rows, their partial-sum slots and tensors are numbered in the order of
the op's arguments, whatever the grouping, so that what the ops return is in that order. A kernel writes a chunk's
sums to its own slots, one per row in it; a segment-sum kernel then adds each row's slots, and each tensor's rows,
in a fixed order. No atomics, so a step is bit-reproducible. Short rows are packed many to a program and walked in
2-D tiles, one row per tile row, so that a per-row sum is a plain tile reduction and a bias-sized row does not take
a whole program.
"""

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024  # elements per vector step of a program
CHUNK = 1 << 14  # elements a program works through, as csrc/cpu/chunk_plan.h's kChunk (packed rows: more)
# Rows up to BLOCK long are walked in [TILE_ROWS, TILE_COLS] tiles: narrow, so that even a 3x3 conv's 9-element rows
# fill half of each tile row.
TILE_COLS = 16
TILE_ROWS = BLOCK // TILE_COLS
_SUM_BLOCK = 256  # values a segment-sum program adds per step
# The step kernels' launch options: IEEE arithmetic in the order of csrc/lamb.h and adamp.h (no FMA contraction),
# and 8 warps (4 elements a thread a step), with which no variant spills on sm_80 or sm_90 (with 4, LAMB's spilled
# on sm_80; see `python -m benchmarks.static`).
STEP_OPTIONS = {"num_warps": 8, "enable_fp_fusion": False}
_PLANS_CACHED = 64  # a plan per param group and shape set; bounded, as each holds device tables

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# A chunk's entry in the chunk table: its tensor (the op argument's index), its elements [begin, end) of that
# tensor, its first partial-sum slot (-1: the tensor needs no sums), its first row, and how many whole rows it holds
# (0: it is a piece of one row, with one slot).
_CHUNK_FIELDS = tl.constexpr(6)


@triton.jit
def load_chunk(chunks, chunk):
    entry = chunks + chunk * _CHUNK_FIELDS
    return (
        tl.load(entry), tl.load(entry + 1), tl.load(entry + 2), tl.load(entry + 3), tl.load(entry + 4),
        tl.load(entry + 5),
    )  # fmt: skip


@triton.jit
def end_unless_skipped(found_inf_ptr, begin, end):
    """A chunk's end, or its begin when the step is skipped (found_inf nonzero, skip_nonfinite): a skipped step
    walks no element, so it writes nothing and its sums are 0."""
    return tl.where(tl.load(found_inf_ptr) != 0, begin, end)


@triton.jit
def load_pointer(pointers, tensor, WIDTH: tl.constexpr, COLUMN: tl.constexpr, DTYPE: tl.constexpr):
    """Column COLUMN of the tensor's row of a pointer table of WIDTH columns, as a pointer to DTYPE."""
    return tl.load(pointers + tensor * WIDTH + COLUMN).to(tl.pointer_type(DTYPE))


@triton.jit
def step_pointers(pointers, tensor, PARAM_DTYPE: tl.constexpr):
    """The tensor's param, grad, exp_avg and exp_avg_sq pointers, from a table of those four columns."""
    return (
        load_pointer(pointers, tensor, 4, 0, PARAM_DTYPE), load_pointer(pointers, tensor, 4, 1, PARAM_DTYPE),
        load_pointer(pointers, tensor, 4, 2, tl.float32), load_pointer(pointers, tensor, 4, 3, tl.float32),
    )  # fmt: skip


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


class Group(NamedTuple):
    """The chunks of one param dtype, contiguous in the chunk table; those of tensors with sums come first."""

    dtype: tl.dtype
    first_chunk: int
    num_chunks: int
    num_summed_chunks: int


class Plan(NamedTuple):
    groups: tuple  # of Group
    chunks: Tensor  # [chunks, _CHUNK_FIELDS] int64
    num_slots: int
    num_rows: int
    row_slots: Tensor  # [rows + 1] int64: row r's partial sums are in slots row_slots[r] .. row_slots[r + 1]
    tensor_rows: Tensor  # [tensors + 1] int64: tensor t's rows are tensor_rows[t] .. tensor_rows[t + 1]
    row_tensor: Tensor  # [rows] int64: the tensor of each row
    row_lens: tuple  # per tensor
    numels: tuple  # per tensor


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host table on the device without waiting for the copy: staged through pinned memory on CUDA."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def _build_plan(device: torch.device, shapes: tuple, rows_of: Callable[[tuple], int], summed: Callable[[tuple], bool]):
    """The chunks of tensors of `shapes` ((shape, dtype) per op argument). A tensor has rows_of(shape) rows (at
    least one); summed(shape): whether a kernel writes its rows' sums. csrc/cpu/chunk_plan.h's plan, except that rows
    up to BLOCK long are packed TILE_ROWS at a time at least, so that the tiles that walk them are full."""
    chunks_by_dtype: dict = {}
    row_slots, tensor_rows, row_tensor, row_lens, numels = [0], [0], [], [], []
    for tensor, (shape, dtype) in enumerate(shapes):
        numel, rows = math.prod(shape), rows_of(shape)
        row_len = numel // rows
        row_lens.append(row_len)
        numels.append(numel)
        first_row = len(row_tensor)
        row_tensor += [tensor] * rows
        tensor_rows.append(len(row_tensor))
        if numel == 0:
            row_slots += [row_slots[-1]] * rows
            continue
        with_sums, without = chunks_by_dtype.setdefault(dtype, ([], []))
        if not summed(shape):
            without += [(tensor, b, min(b + CHUNK, numel), -1, first_row, 0) for b in range(0, numel, CHUNK)]
            row_slots += [row_slots[-1]] * rows
        elif row_len <= BLOCK:
            per_chunk = TILE_ROWS * max(1, CHUNK // (row_len * TILE_ROWS))
            for r in range(0, rows, per_chunk):
                n = min(per_chunk, rows - r)
                with_sums.append((tensor, r * row_len, (r + n) * row_len, row_slots[-1], first_row + r, n))
                row_slots += range(row_slots[-1] + 1, row_slots[-1] + n + 1)
        else:
            for r in range(rows):
                for b in range(0, row_len, CHUNK):
                    start, end = r * row_len + b, r * row_len + min(b + CHUNK, row_len)
                    with_sums.append((tensor, start, end, row_slots[-1] + b // CHUNK, first_row + r, 0))
                row_slots.append(row_slots[-1] + -(-row_len // CHUNK))
    groups, chunks = [], []
    for dtype, (with_sums, without) in chunks_by_dtype.items():
        groups.append(Group(TL_DTYPES[dtype], len(chunks), len(with_sums) + len(without), len(with_sums)))
        chunks += with_sums + without
    return Plan(
        tuple(groups), to_device(chunks, torch.int64, device).view(-1, _CHUNK_FIELDS.value), row_slots[-1],
        len(row_tensor), to_device(row_slots, torch.int64, device), to_device(tensor_rows, torch.int64, device),
        to_device(row_tensor, torch.int64, device), tuple(row_lens), tuple(numels),
    )  # fmt: skip


def shapes_of(tensors: list[Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


@functools.lru_cache(maxsize=_PLANS_CACHED)
def tensor_plan(device: torch.device, shapes: tuple) -> Plan:
    """One row per tensor, every tensor summed (LAMB's norms are over whole tensors)."""
    return _build_plan(device, shapes, lambda shape: 1, lambda shape: True)


@functools.lru_cache(maxsize=_PLANS_CACHED)
def channel_plan(device: torch.device, shapes: tuple) -> Plan:
    """size(0) rows per tensor of 2 or more dims, summed (AdamP's channel-wise view); one row, not summed, for
    any other (as csrc/optim.h's adamp_rows)."""

    def rows_of(shape):
        return shape[0] if len(shape) > 1 and math.prod(shape) > 0 else 1

    return _build_plan(device, shapes, rows_of, lambda shape: len(shape) > 1)


def pointer_table(*lists: list[Tensor]) -> Tensor:
    """[tensors, len(lists)] int64: each tensor's data pointer in each list."""
    device = lists[0][0].device
    return to_device([[tensors[i].data_ptr() for tensors in lists] for i in range(len(lists[0]))], torch.int64, device)


def segment_sums(values: Tensor, offsets: Tensor, long_segments: bool) -> Tensor:
    """[len(offsets) - 1, values.shape[1]]: the sums of the rows of `values` between consecutive offsets. Long
    segments (a tensor's chunks or rows, up to thousands) are added a program each, many values at a time; short
    ones (a row's chunks, mostly one) many to a program."""
    out = values.new_empty(offsets.numel() - 1, values.shape[1])
    if out.shape[0] == 0:
        return out
    segments, slots = (1, _SUM_BLOCK) if long_segments else (_SUM_BLOCK, 1)
    _segment_sum_kernel[(triton.cdiv(out.shape[0], segments),)](
        values, offsets, out, out.shape[0], WIDTH=values.shape[1], SEGMENTS=segments, SLOTS=slots
    )
    return out
