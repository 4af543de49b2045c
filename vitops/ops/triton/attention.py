"""Triton kernels of attention (no mask), FlashAttention-2 style, for ViT's short sequences.

Every tensor is addressed through its (batch, head, token) strides with a contiguous last dim, so strided q/k/v
views and the packed (B, N, 3*H*D) qkv Linear output are read in place, and the packed output (B, N, H*D) and
gradient (B, N, 3*H*D) are written in place: no permute or contiguous copy on either side.

- forward: one program per (query block, batch*head), on a 1-D grid; online softmax over key blocks in float32,
  writes out and the natural-log log-sum-exp (lse) of each query row.
- backward: two kernels. `_bwd_dq_kernel` (one program per query block) computes delta = rowsum(dO * O), stores
  it, and accumulates dQ over the key blocks; `_bwd_dkdv_kernel` (one program per key block) accumulates dK and
  dV over the query blocks, recomputing P = exp(S - lse). No atomics: the gradients are deterministic.

Any N >= 1 (rows and columns past N are masked), any head_dim up to 256 (padded to a power of two >= 16 and
masked). float16 and bfloat16 run the tensor-core dots with float32 accumulation; float32 inputs run the dots in
full IEEE float32 (slow on tensor cores but exact to float32). float64 is not taken here (see `supports`): the
op runs it on its torch backend.
"""
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from vitops.ops import reference

LOG2E = 1.4426950408889634
INTERPRET_BF16_FIX = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b. IEEE: float32 inputs, full-precision dot. The Triton interpreter keeps bfloat16 as raw uint16
    bits and would multiply those as integers, so there (only) bfloat16 operands are widened to float32 first,
    which gives the same products (a bfloat16 product is exact in float32)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    if INTERPRET_BF16_FIX and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """x.to(dtype), rounding to nearest even. The interpreter truncates float32 -> bfloat16, so there (only) the
    rounding is done by hand on the bits first, to give the GPU's results."""
    if INTERPRET_BF16_FIX and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _program(N, H, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's batch b, head h, their flat index bh, its block along a sequence of N (see `_block`), and the
    head_dim offsets with their mask d < D. The grid is 1-D (no 65535 limit on B*H) and a head's blocks are
    adjacent, so they share its K and V (or Q and dO) in the L2."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(N, BLOCK)
    start = pid % blocks * BLOCK
    bh = (pid // blocks).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    idx, ok, idx64, mask = _block(start, N, BLOCK, d_ok)
    return b, h, bh, offs_d, d_ok, idx, ok, idx64, mask


@triton.jit
def _block(start, N, BLOCK: tl.constexpr, d_ok):
    """The BLOCK sequence indices from start, those < N, the indices as an int64 column (for addressing), and the
    mask of the in-bounds elements of their (BLOCK, BLOCK_D) rows."""
    idx = start + tl.arange(0, BLOCK)
    ok = idx < N
    mask = ok[:, None] & d_ok[None, :]
    return idx, ok, idx[:, None].to(tl.int64), mask


@triton.jit
def _load_rows(head, idx64, stride, offs_d, mask):
    """The rows idx64 of one head's (N, D) matrix at `head`, whose rows are `stride` apart; 0 where masked out."""
    return tl.load(head + idx64 * stride + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    H, NQ, NK, D, qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    b, h, bh, offs_d, d_ok, rows, row_ok, r64, q_mask = _program(NQ, H, D, BLOCK_M, BLOCK_D)
    q = _load_rows(Q + b * sqb + h * sqh, r64, sqn, offs_d, q_mask)
    k_head = K + b * skb + h * skh
    v_head = V + b * svb + h * svh
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, NK, BLOCK_N):
        _, col_ok, c64, kv_mask = _block(start, NK, BLOCK_N, d_ok)
        k = _load_rows(k_head, c64, skn, offs_d, kv_mask)
        s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), IEEE) * qk_scale_log2
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_head, c64, svn, offs_d, kv_mask)
        acc = _dot(_cast(p, v.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + r64 * son + offs_d[None, :], _cast(acc, O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh * NQ + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdob, sdoh, sdon, sdqb, sdqh, sdqn,
    H, NQ, NK, D, scale, qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    b, h, bh, offs_d, d_ok, rows, row_ok, r64, q_mask = _program(NQ, H, D, BLOCK_M, BLOCK_D)
    q = _load_rows(Q + b * sqb + h * sqh, r64, sqn, offs_d, q_mask)
    do = _load_rows(DO + b * sdob + h * sdoh, r64, sdon, offs_d, q_mask)
    o = _load_rows(O + b * sob + h * soh, r64, son, offs_d, q_mask)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + bh * NQ + rows, delta, mask=row_ok)
    lse = tl.load(LSE + bh * NQ + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    k_head = K + b * skb + h * skh
    v_head = V + b * svb + h * svh
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, NK, BLOCK_N):
        _, col_ok, c64, kv_mask = _block(start, NK, BLOCK_N, d_ok)
        k = _load_rows(k_head, c64, skn, offs_d, kv_mask)
        v = _load_rows(v_head, c64, svn, offs_d, kv_mask)
        s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), IEEE) * qk_scale_log2
        p = tl.where(col_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), IEEE)
        ds = p * (dp - delta[:, None])
        dq = _dot(_cast(ds, k.dtype), k, dq, IEEE)
    dq = dq * scale
    tl.store(DQ + b * sdqb + h * sdqh + r64 * sdqn + offs_d[None, :], _cast(dq, DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    H, NQ, NK, D, scale, qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    b, h, bh, offs_d, d_ok, _, col_ok, c64, kv_mask = _program(NK, H, D, BLOCK_N, BLOCK_D)
    k = _load_rows(K + b * skb + h * skh, c64, skn, offs_d, kv_mask)
    v = _load_rows(V + b * svb + h * svh, c64, svn, offs_d, kv_mask)
    q_head = Q + b * sqb + h * sqh
    do_head = DO + b * sdob + h * sdoh
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start in range(0, NQ, BLOCK_M):
        rows, row_ok, r64, q_mask = _block(start, NQ, BLOCK_M, d_ok)
        q = _load_rows(q_head, r64, sqn, offs_d, q_mask)
        do = _load_rows(do_head, r64, sdon, offs_d, q_mask)
        lse = tl.load(LSE + bh * NQ + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + bh * NQ + rows, mask=row_ok, other=0.0)
        s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), IEEE) * qk_scale_log2
        p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dv = _dot(tl.trans(_cast(p, do.dtype)), do, dv, IEEE)
        dp = _dot(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), IEEE)
        ds = p * (dp - delta[:, None])
        dk = _dot(tl.trans(_cast(ds, q.dtype)), q, dk, IEEE)
    dk = dk * scale
    tl.store(DK + b * sdkb + h * sdkh + c64 * sdkn + offs_d[None, :], _cast(dk, DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdvb + h * sdvh + c64 * sdvn + offs_d[None, :], _cast(dv, DV.dtype.element_ty), mask=kv_mask)


# --- launch configurations -------------------------------------------------------------------------------------


class KernelConfig(NamedTuple):
    """How one attention kernel is launched: its tile of BLOCK_M query rows by BLOCK_N key rows, its warps, and
    the software-pipelining stages of its loop's loads."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (forward, dQ, dK/dV) per (float32, BLOCK_D): the largest tiles that compile without register spills for sm_80
# and sm_90a, as `python -m benchmarks.static` reports them with their occupancy
# (benchmarks/results/static-sm90.json). Not timed on a GPU yet. float32 runs its dots on CUDA cores (IEEE), whose
# operands take many more registers.
_CONFIGS = {
    (False, 16): (KernelConfig(128, 64, 8, 3), KernelConfig(128, 64, 8, 3), KernelConfig(64, 64, 4, 3)),
    (False, 32): (KernelConfig(128, 64, 8, 3), KernelConfig(128, 64, 8, 3), KernelConfig(64, 64, 8, 3)),
    (False, 64): (KernelConfig(128, 64, 8, 3), KernelConfig(128, 64, 8, 3), KernelConfig(64, 32, 4, 3)),
    (False, 128): (KernelConfig(128, 64, 8, 2), KernelConfig(64, 32, 4, 2), KernelConfig(32, 64, 8, 2)),
    (False, 256): (KernelConfig(32, 16, 4, 2), KernelConfig(16, 16, 4, 2), KernelConfig(16, 32, 8, 2)),
    (True, 16): (KernelConfig(32, 32, 4, 3), KernelConfig(32, 32, 8, 3), KernelConfig(32, 32, 8, 3)),
    (True, 32): (KernelConfig(32, 32, 4, 3), KernelConfig(32, 32, 4, 3), KernelConfig(32, 32, 8, 3)),
    (True, 64): (KernelConfig(32, 32, 4, 3), KernelConfig(32, 32, 4, 3), KernelConfig(32, 32, 8, 3)),
    (True, 128): (KernelConfig(16, 16, 4, 2), KernelConfig(16, 16, 4, 2), KernelConfig(16, 16, 8, 2)),
    (True, 256): (KernelConfig(16, 16, 4, 2), KernelConfig(16, 16, 4, 2), KernelConfig(16, 16, 8, 1)),
}
# Where they differ, the tiles for a head_dim that is not a multiple of 16: the strides of a packed qkv then are not
# either, so the compiler cannot vectorize the loads, and the kernels need more registers.
_UNALIGNED_CONFIGS = {
    (False, 128): (KernelConfig(64, 32, 8, 2), KernelConfig(32, 16, 4, 2), KernelConfig(32, 64, 8, 2)),
    (True, 32): (KernelConfig(32, 32, 4, 3), KernelConfig(32, 32, 4, 3), KernelConfig(16, 32, 8, 3)),
    (True, 64): (KernelConfig(32, 32, 8, 3), KernelConfig(32, 32, 4, 3), KernelConfig(16, 16, 8, 3)),
    (True, 128): (KernelConfig(16, 16, 4, 2), KernelConfig(16, 16, 4, 2), KernelConfig(16, 16, 8, 1)),
}


def launch_meta(head_dim: int, dtype: torch.dtype) -> dict[str, dict]:
    """The keyword arguments (constexprs and launch options) of each kernel's launch, by kernel name, for this
    head_dim (1..256) and dtype (float16, bfloat16, float32). They do not depend on the sequence lengths: rows
    and columns past N are masked."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    ieee = dtype == torch.float32
    configs = _CONFIGS[(ieee, block_d)]
    if head_dim % 16:
        configs = _UNALIGNED_CONFIGS.get((ieee, block_d), configs)
    return {
        kernel: dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=block_d, IEEE=ieee, num_warps=c.num_warps,
                     num_stages=c.num_stages)
        for kernel, c in zip(("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"), configs)
    }  # fmt: skip


# --- launchers: (B, H, N, D) views in, (B, H, N, D) views out --------------------------------------------------


def _bhn(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def forward_into(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float) -> None:
    """Writes attention(q, k, v) into the (B, H, Nq, D) view `out` and lse into the contiguous (B, H, Nq)."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    if out.numel() == 0:
        return
    meta = launch_meta(d, q.dtype)["_fwd_kernel"]
    _fwd_kernel[(triton.cdiv(nq, meta["BLOCK_M"]) * b * h,)](
        q, k, v, out, lse, *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(out), h, nq, nk, d, scale * LOG2E, **meta
    )


def backward_into(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    dq: Tensor, dk: Tensor, dv: Tensor, scale: float,
) -> None:  # fmt: skip
    """Writes the gradients of attention into the (B, H, N, D) views dq, dk, dv."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    if nq == 0 or nk == 0 or b * h == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return
    grad_out = _last_dim_contiguous(grad_out)
    meta = launch_meta(d, q.dtype)
    dq_meta, dkdv_meta = meta["_bwd_dq_kernel"], meta["_bwd_dkdv_kernel"]
    delta = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    _bwd_dq_kernel[(triton.cdiv(nq, dq_meta["BLOCK_M"]) * b * h,)](
        q, k, v, out, grad_out, lse, delta, dq,
        *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(out), *_bhn(grad_out), *_bhn(dq),
        h, nq, nk, d, scale, scale * LOG2E, **dq_meta,
    )  # fmt: skip
    _bwd_dkdv_kernel[(triton.cdiv(nk, dkdv_meta["BLOCK_N"]) * b * h,)](
        q, k, v, grad_out, lse, delta, dk, dv,
        *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(grad_out), *_bhn(dk), *_bhn(dv),
        h, nq, nk, d, scale, scale * LOG2E, **dkdv_meta,
    )  # fmt: skip


def packed_views(packed: Tensor, num_heads: int, parts: int) -> list[Tensor]:
    """(B, H, N, D) views of the `parts` consecutive (H, D) groups of a (B, N, parts*H*D) tensor."""
    d = packed.shape[-1] // (parts * num_heads)
    grouped = packed.unflatten(-1, (parts, num_heads, d))
    return [grouped[:, :, i].transpose(1, 2) for i in range(parts)]


# --- launchers: the op's signatures (vitops/ops/attention.py registers them as the "triton" backend) ---------


def supports(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16, torch.float32)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> tuple[Tensor, Tensor]:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    forward_into(q, k, v, out, lse, reference.attention_scale(q.shape[-1], scale))
    return out, lse


def attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: Optional[float]
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    backward_into(grad_out, q, k, v, out, lse, dq, dk, dv, reference.attention_scale(q.shape[-1], scale))
    return dq, dk, dv


def attention_packed(qkv: Tensor, num_heads: int, scale: Optional[float]) -> tuple[Tensor, Tensor]:
    b, n, c3 = qkv.shape
    q, k, v = packed_views(qkv, num_heads, 3)
    out = torch.empty((b, n, c3 // 3), dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty((b, num_heads, n), dtype=torch.float32, device=qkv.device)
    (out_view,) = packed_views(out, num_heads, 1)
    forward_into(q, k, v, out_view, lse, reference.attention_scale(q.shape[-1], scale))
    return out, lse


def attention_packed_backward(
    grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int, scale: Optional[float]
) -> Tensor:
    q, k, v = packed_views(qkv, num_heads, 3)
    (o,) = packed_views(out, num_heads, 1)
    (go,) = packed_views(grad_out, num_heads, 1)
    grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    dq, dk, dv = packed_views(grad_qkv, num_heads, 3)
    backward_into(go, q, k, v, o, lse, dq, dk, dv, reference.attention_scale(q.shape[-1], scale))
    return grad_qkv
