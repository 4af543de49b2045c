#pragma once
// The backward kernels, FlashAttention-2 style (see csrc/cuda/attention.cu for the design), launched in this
// order: delta = rowsum(dO * O); dQ (a CTA per query block, looping over key blocks); dK and dV (a CTA per key
// block, looping over query blocks). Each gradient element is written once by one CTA: deterministic, no atomics.
// Both gradient kernels recompute P = 2^(scale_log2 * s - log2(e) * lse) and dS = P * (dP - delta), dP = dO V^T.
#include "tile.cuh"

namespace vitops {
namespace cuda {
namespace attention {

constexpr float kLog2e = 1.4426950408889634f;

// delta[b, h, i] = sum_d grad_out[b, h, i, d] * out[b, h, i, d] in float32: 8 lanes per row, 16 bytes each.
template <int D, class Dtype>
__global__ void __launch_bounds__(kThreads) attention_delta_kernel(const BackwardParams p) {
  const int64_t row = int64_t(blockIdx.x) * kDeltaRowsPerCta + threadIdx.x / kDeltaLanesPerRow;
  const int sub = static_cast<int>(threadIdx.x % kDeltaLanesPerRow);
  const int64_t rows = p.batch * p.heads * p.nq;
  float acc = 0.f;
  if (row < rows) {
    const int64_t bh = row / p.nq, b = bh / p.heads, h = bh % p.heads;
    const int i = static_cast<int>(row % p.nq);
    const Element* out = head_of(p.out, p.out_strides, b, h) + i * p.out_strides.row;
    const Element* grad_out = head_of(p.grad_out, p.grad_out_strides, b, h) + i * p.grad_out_strides.row;
#pragma unroll
    for (int c = sub; c < D / 8; c += kDeltaLanesPerRow) {
      const uint4 o = *reinterpret_cast<const uint4*>(out + c * 8);
      const uint4 g = *reinterpret_cast<const uint4*>(grad_out + c * 8);
      const uint32_t os[4] = {o.x, o.y, o.z, o.w}, gs[4] = {g.x, g.y, g.z, g.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float o_lo, o_hi, g_lo, g_hi;
        warp::unpack2<Dtype>(os[e], o_lo, o_hi);
        warp::unpack2<Dtype>(gs[e], g_lo, g_hi);
        acc += o_lo * g_lo + o_hi * g_hi;
      }
    }
  }
#pragma unroll
  for (int mask = kDeltaLanesPerRow / 2; mask > 0; mask /= 2) acc += warp::shfl_xor(acc, mask);
  if (sub == 0 && row < rows) p.delta[row] = acc;
}

// dQ = scale * dS K. A CTA per (batch, head, 64 queries), 4 warps of 16 rows; Q and dO are loaded once (their
// fragments then stay in registers) and key/value blocks stream through two cp.async stages. Per block:
// S = Q K^T, P from lse, dP = dO V^T, dS = P (dP - delta), dQ += dS K with dS rounded to Dtype (K read
// transposed). Keys past nk get P = 0; rows past nq are zero-filled and not stored.
template <int D, class Dtype>
__global__ void __launch_bounds__(kThreads, GradQTile<D>::kMinCtasPerSm)
    attention_grad_q_kernel(const BackwardParams p) {
  constexpr int kBlockM = GradQTile<D>::kBlockM, kBlockN = GradQTile<D>::kBlockN, kNTiles = kBlockN / 8;
  const CtaTask task = cta_task(p.heads, static_cast<int>(ceil_div(p.nq, kBlockM)));
  Element* q_tile = reinterpret_cast<Element*>(shared_memory());
  Element* grad_out_tile = q_tile + kBlockM * kPitch<D>;
  const Element* q = head_of(p.q, p.q_strides, task.b, task.h);
  const KeyValueStages<D, kBlockN> kv(grad_out_tile + kBlockM * kPitch<D>, p, task);
  const Element* grad_out = head_of(p.grad_out, p.grad_out_strides, task.b, task.h);
  const int m0 = task.block * kBlockM;
  const int warp_id = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int row0 = m0 + warp_id * kWarpRows;

  load_tile_async<kBlockM, D>(q_tile, q, p.q_strides.row, m0, p.nq);
  load_tile_async<kBlockM, D>(grad_out_tile, grad_out, p.grad_out_strides.row, m0, p.nq);
  kv.load(0);
  warp::cp_async_commit();

  // rows lane/4 and lane/4 + 8 of the warp's 16 (0 past nq: finite, and never stored)
  float lse_log2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + (lane >> 2) + 8 * r;
    lse_log2[r] = row < p.nq ? p.lse[task.bh * p.nq + row] * kLog2e : 0.f;
    delta[r] = row < p.nq ? p.delta[task.bh * p.nq + row] : 0.f;
  }

  uint32_t q_frag[D / 16][4], grad_out_frag[D / 16][4];
  float dq[D / 8][4] = {};
  const int n_blocks = kv.blocks();
  for (int j = 0; j < n_blocks; ++j) {
    await_block(j, n_blocks, [&](int next) { kv.load(next); });
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        load_a<D>(q_frag[kk], q_tile, warp_id * kWarpRows, kk * 16, lane);
        load_a<D>(grad_out_frag[kk], grad_out_tile, warp_id * kWarpRows, kk * 16, lane);
      }
    }

    float s[kNTiles][4] = {};
    mma_a_regs_bt_tile<D, kNTiles, Dtype>(s, q_frag, kv.k_tile(j), lane);
    float dp[kNTiles][4] = {};
    mma_a_regs_bt_tile<D, kNTiles, Dtype>(dp, grad_out_frag, kv.v_tile(j), lane);

    // Keys past nk need P = 0 even though their K rows are zero: with 2^(-lse log2 e) overflowing (very negative
    // scores), dS * K would be inf * 0.
    const int key0 = j * kBlockN;
    transform_accumulators(s, lane, [&](float score, int nt, int i, int column) {
      const int r = i / 2;
      const float prob =
          key0 + column < p.nk ? warp::exp2_approx(fmaf(score, p.scale_log2, -lse_log2[r])) : 0.f;
      return prob * (dp[nt][i] - delta[r]);  // dS
    });
    mma_c_regs_b_tile<D, kNTiles, Dtype>(dq, s, kv.k_tile(j), lane);
  }
  // The warp's own Q rows are free: their fragments were read into registers before any score was computed.
  store_rows<D, Dtype>(dq, p.scale, q_tile + warp_id * kWarpRows * kPitch<D>,
                       head_of(p.grad_q, p.grad_q_strides, task.b, task.h),
                       p.grad_q_strides.row, row0, p.nq, lane);
}

// dK = scale * dS^T Q and dV = P^T dO. A CTA per (batch, head, 64 keys), 4 warps of 16 key rows; K and V stay in
// shared memory and query blocks (Q, dO, lse, delta) stream through two cp.async stages. Per block the warp
// computes the transposed tiles directly, keys as rows, so that P^T and dS^T are already A operands:
// S^T = K Q^T, P^T from lse, dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q (dO and Q read
// transposed). Queries past nq are zero-filled, lse and delta too, so they add exactly 0; key rows past nk are
// not stored.
template <int D, class Dtype>
__global__ void __launch_bounds__(kThreads, GradKVTile<D>::kMinCtasPerSm)
    attention_grad_kv_kernel(const BackwardParams p) {
  constexpr int kBlockN = GradKVTile<D>::kBlockN, kBlockM = GradKVTile<D>::kBlockM, kMTiles = kBlockM / 8;
  Element* k_tile = reinterpret_cast<Element*>(shared_memory());
  Element* v_tile = k_tile + kBlockN * kPitch<D>;
  Element* q_tiles = v_tile + kBlockN * kPitch<D>;
  Element* grad_out_tiles = q_tiles + 2 * kBlockM * kPitch<D>;
  float* lse_stages = reinterpret_cast<float*>(grad_out_tiles + 2 * kBlockM * kPitch<D>);
  float* delta_stages = lse_stages + 2 * kBlockM;

  const CtaTask task = cta_task(p.heads, static_cast<int>(ceil_div(p.nk, kBlockN)));
  const Element* q = head_of(p.q, p.q_strides, task.b, task.h);
  const Element* k = head_of(p.k, p.k_strides, task.b, task.h);
  const Element* v = head_of(p.v, p.v_strides, task.b, task.h);
  const Element* grad_out = head_of(p.grad_out, p.grad_out_strides, task.b, task.h);
  const float* lse = p.lse + task.bh * p.nq;
  const float* delta = p.delta + task.bh * p.nq;
  const int n0 = task.block * kBlockN;
  const int warp_id = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;

  auto load_query_block = [&](int i) {
    const int stage = i & 1;
    load_tile_async<kBlockM, D>(q_tiles + stage * kBlockM * kPitch<D>, q, p.q_strides.row, i * kBlockM, p.nq);
    load_tile_async<kBlockM, D>(grad_out_tiles + stage * kBlockM * kPitch<D>, grad_out, p.grad_out_strides.row,
                                i * kBlockM, p.nq);
    load_vector_async<kBlockM>(lse_stages + stage * kBlockM, lse, i * kBlockM, p.nq);
    load_vector_async<kBlockM>(delta_stages + stage * kBlockM, delta, i * kBlockM, p.nq);
  };
  load_tile_async<kBlockN, D>(k_tile, k, p.k_strides.row, n0, p.nk);
  load_tile_async<kBlockN, D>(v_tile, v, p.v_strides.row, n0, p.nk);
  load_query_block(0);
  warp::cp_async_commit();

  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  const int m_blocks = static_cast<int>(ceil_div(p.nq, kBlockM));
  for (int i = 0; i < m_blocks; ++i) {
    await_block(i, m_blocks, load_query_block);
    const Element* q_tile = q_tiles + (i & 1) * kBlockM * kPitch<D>;
    const Element* grad_out_tile = grad_out_tiles + (i & 1) * kBlockM * kPitch<D>;
    const float* lse_block = lse_stages + (i & 1) * kBlockM;
    const float* delta_block = delta_stages + (i & 1) * kBlockM;

    // K and V fragments are re-read from shared memory each block rather than held: at D = 128 the dK and dV
    // accumulators alone take 128 registers per thread.
    uint32_t kv_frag[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) load_a<D>(kv_frag[kk], k_tile, warp_id * kWarpRows, kk * 16, lane);
    float pt[kMTiles][4] = {};
    mma_a_regs_bt_tile<D, kMTiles, Dtype>(pt, kv_frag, q_tile, lane);
    transform_accumulators(pt, lane, [&](float score, int, int, int query) {
      return warp::exp2_approx(fmaf(score, p.scale_log2, -lse_block[query] * kLog2e));
    });
    mma_c_regs_b_tile<D, kMTiles, Dtype>(dv, pt, grad_out_tile, lane);

#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) load_a<D>(kv_frag[kk], v_tile, warp_id * kWarpRows, kk * 16, lane);
    float dpt[kMTiles][4] = {};
    mma_a_regs_bt_tile<D, kMTiles, Dtype>(dpt, kv_frag, grad_out_tile, lane);
    transform_accumulators(pt, lane, [&](float prob, int nt, int i, int query) {
      return prob * (dpt[nt][i] - delta_block[query]);  // dS^T
    });
    mma_c_regs_b_tile<D, kMTiles, Dtype>(dk, pt, q_tile, lane);
  }
  // The warp's own K and V rows are free: only this warp read them, into fragments.
  const int row0 = n0 + warp_id * kWarpRows;
  store_rows<D, Dtype>(dk, p.scale, k_tile + warp_id * kWarpRows * kPitch<D>,
                       head_of(p.grad_k, p.grad_k_strides, task.b, task.h),
                       p.grad_k_strides.row, row0, p.nk, lane);
  store_rows<D, Dtype>(dv, 1.f, v_tile + warp_id * kWarpRows * kPitch<D>,
                       head_of(p.grad_v, p.grad_v_strides, task.b, task.h),
                       p.grad_v_strides.row, row0, p.nk, lane);
}

}  // namespace attention
}  // namespace cuda
}  // namespace vitops
