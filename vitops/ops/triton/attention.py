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
full IEEE float32 (slow on tensor cores but exact to float32); float64 inputs go through the reference in
vitops.ops.reference, computed in float64.
"""
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from vitops.ops import reference
from vitops.ops._attention_checks import check_packed, check_qkv

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
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
def _program(n, BLOCK: tl.constexpr):
    """(block index along the sequence, batch*head) of this program. The grid is 1-D (no 65535 limit on B*H) and
    a head's blocks are adjacent, so they share its K and V (or Q and dO) in the L2."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(n, BLOCK)
    return pid % blocks, (pid // blocks).to(tl.int64)


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    H, NQ, NK, D, qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    pid_m, bh = _program(NQ, BLOCK_M)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < NQ
    d_ok = offs_d < D
    q = tl.load(
        Q + b * sqb + h * sqh + rows[:, None].to(tl.int64) * sqn + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, NK, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < NK
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None].to(tl.int64) * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), IEEE) * qk_scale_log2
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = _dot(_cast(p, v.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(
        O + b * sob + h * soh + rows[:, None].to(tl.int64) * son + offs_d[None, :],
        _cast(acc, O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + bh * NQ + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdob, sdoh, sdon, sdqb, sdqh, sdqn,
    H, NQ, NK, D, scale, qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    pid_m, bh = _program(NQ, BLOCK_M)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < NQ
    d_ok = offs_d < D
    q_mask = row_ok[:, None] & d_ok[None, :]
    r64 = rows[:, None].to(tl.int64)
    q = tl.load(Q + b * sqb + h * sqh + r64 * sqn + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + r64 * sdon + offs_d[None, :], mask=q_mask, other=0.0)
    o = tl.load(O + b * sob + h * soh + r64 * son + offs_d[None, :], mask=q_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + bh * NQ + rows, delta, mask=row_ok)
    lse = tl.load(LSE + bh * NQ + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, NK, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < NK
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None].to(tl.int64) * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), IEEE) * qk_scale_log2
        p = tl.where(col_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), IEEE)
        ds = p * (dp - delta[:, None])
        dq = _dot(_cast(ds, k.dtype), k, dq, IEEE)
    dq = dq * scale
    tl.store(
        DQ + b * sdqb + h * sdqh + r64 * sdqn + offs_d[None, :], _cast(dq, DQ.dtype.element_ty), mask=q_mask
    )


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    H, NQ, NK, D, scale, qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    pid_n, bh = _program(NK, BLOCK_N)
    b = bh // H
    h = bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < NK
    d_ok = offs_d < D
    kv_mask = col_ok[:, None] & d_ok[None, :]
    c64 = cols[:, None].to(tl.int64)
    k = tl.load(K + b * skb + h * skh + c64 * skn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + c64 * svn + offs_d[None, :], mask=kv_mask, other=0.0)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start in range(0, NQ, BLOCK_M):
        rows = start + offs_m
        row_ok = rows < NQ
        q_mask = row_ok[:, None] & d_ok[None, :]
        r64 = rows[:, None].to(tl.int64)
        q = tl.load(q_base + r64 * sqn + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + r64 * sdon + offs_d[None, :], mask=q_mask, other=0.0)
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


# --- launchers: (B, H, N, D) views in, (B, H, N, D) views out --------------------------------------------------


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


def _bhn(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _warps(block_d: int) -> int:
    return 8 if block_d >= 128 else 4


def forward_into(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float) -> None:
    """Writes attention(q, k, v) into the (B, H, Nq, D) view `out` and lse into the contiguous (B, H, Nq)."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    if out.numel() == 0:
        return
    block_d = max(16, triton.next_power_of_2(d))
    block_m = _block(nq, 128 if block_d <= 64 else 64)
    block_n = _block(nk, 64)
    grid = (triton.cdiv(nq, block_m) * b * h,)
    _fwd_kernel[grid](
        q, k, v, out, lse, *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(out),
        h, nq, nk, d, scale * LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=q.dtype == torch.float32,
        num_warps=_warps(block_d),
    )  # fmt: skip


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
    block_d = max(16, triton.next_power_of_2(d))
    block_m = _block(nq, 64)
    block_n = _block(nk, 64)
    delta = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    ieee = q.dtype == torch.float32
    _bwd_dq_kernel[(triton.cdiv(nq, block_m) * b * h,)](
        q, k, v, out, grad_out, lse, delta, dq,
        *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(out), *_bhn(grad_out), *_bhn(dq),
        h, nq, nk, d, scale, scale * LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=ieee, num_warps=_warps(block_d),
    )  # fmt: skip
    _bwd_dkdv_kernel[(triton.cdiv(nk, block_n) * b * h,)](
        q, k, v, grad_out, lse, delta, dk, dv,
        *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(grad_out), *_bhn(dk), *_bhn(dv),
        h, nq, nk, d, scale, scale * LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=ieee, num_warps=_warps(block_d),
    )  # fmt: skip


def packed_views(packed: Tensor, num_heads: int, parts: int) -> list[Tensor]:
    """(B, H, N, D) views of the `parts` consecutive (H, D) groups of a (B, N, parts*H*D) tensor."""
    d = packed.shape[-1] // (parts * num_heads)
    grouped = packed.unflatten(-1, (parts, num_heads, d))
    return [grouped[:, :, i].transpose(1, 2) for i in range(parts)]


# --- custom ops -------------------------------------------------------------------------------------------------


@torch.library.custom_op("vitops::attention_triton", mutates_args=())
def attention_triton(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> tuple[Tensor, Tensor]:
    check_qkv(q, k, v, "attention_triton")
    if q.dtype == torch.float64:
        out, lse = reference.attention_forward(q, k, v, scale)
        return out.contiguous(), lse.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    forward_into(q, k, v, out, lse, reference.attention_scale(q.shape[-1], scale))
    return out, lse


@torch.library.custom_op("vitops::attention_backward_triton", mutates_args=())
def attention_backward_triton(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: Optional[float]
) -> tuple[Tensor, Tensor, Tensor]:
    if q.dtype == torch.float64:
        grads = reference.attention_backward(grad_out, q, k, v, out, lse, scale)
        return tuple(g.contiguous() for g in grads)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    backward_into(grad_out, q, k, v, out, lse, dq, dk, dv, reference.attention_scale(q.shape[-1], scale))
    return dq, dk, dv


@torch.library.custom_op("vitops::attention_packed_triton", mutates_args=())
def attention_packed_triton(qkv: Tensor, num_heads: int, scale: Optional[float]) -> tuple[Tensor, Tensor]:
    check_packed(qkv, num_heads, "attention_packed_triton")
    b, n, c3 = qkv.shape
    q, k, v = packed_views(qkv, num_heads, 3)
    if qkv.dtype == torch.float64:
        out, lse = reference.attention_forward(q, k, v, scale)
        return out.transpose(1, 2).reshape(b, n, c3 // 3), lse.contiguous()
    out = torch.empty((b, n, c3 // 3), dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty((b, num_heads, n), dtype=torch.float32, device=qkv.device)
    (out_view,) = packed_views(out, num_heads, 1)
    forward_into(q, k, v, out_view, lse, reference.attention_scale(q.shape[-1], scale))
    return out, lse


@torch.library.custom_op("vitops::attention_packed_backward_triton", mutates_args=())
def attention_packed_backward_triton(
    grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int, scale: Optional[float]
) -> Tensor:
    q, k, v = packed_views(qkv, num_heads, 3)
    (o,) = packed_views(out, num_heads, 1)
    (go,) = packed_views(grad_out, num_heads, 1)
    if qkv.dtype == torch.float64:
        grads = reference.attention_backward(go, q, k, v, o, lse, scale)
        return torch.cat([g.transpose(1, 2).flatten(2) for g in grads], dim=-1)
    grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    dq, dk, dv = packed_views(grad_qkv, num_heads, 3)
    backward_into(go, q, k, v, o, lse, dq, dk, dv, reference.attention_scale(q.shape[-1], scale))
    return grad_qkv
