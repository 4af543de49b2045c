#pragma once
// The forward kernel: out = softmax(scale * q k^T) v and the natural-log lse of each query, FlashAttention-2
// style (see csrc/cuda/attention.cu for the design).
#include "tile.cuh"

namespace vitops {
namespace cuda {
namespace attention {

// A CTA per (batch, head, 64 queries), 4 warps of 16 query rows. Q is loaded once (its fragments then stay in
// registers); key/value blocks stream through two cp.async stages, block j + 1 loading while block j computes.
// Per block: S = Q K^T (16 x kBlockN per warp, float32 accumulators), scaled into base 2, the running row max m
// and sum l updated (online softmax; the O accumulators rescaled by 2^(m_old - m_new)), then O += P V with P
// rounded to Dtype. Rows past nq are zero-filled and not stored; keys past nk get probability 0.
template <int D, class Dtype>
__global__ void __launch_bounds__(kThreads, ForwardTile<D>::kMinCtasPerSm)
    attention_forward_kernel(const ForwardParams p) {
  constexpr int kBlockM = ForwardTile<D>::kBlockM, kBlockN = ForwardTile<D>::kBlockN, kNTiles = kBlockN / 8;
  Element* q_tile = reinterpret_cast<Element*>(shared_memory());
  const CtaTask task = cta_task(p.heads, static_cast<int>(ceil_div(p.nq, kBlockM)));
  const Element* q = head_of(p.q, p.q_strides, task.b, task.h);
  const KeyValueStages<D, kBlockN> kv(q_tile + kBlockM * kPitch<D>, p, task);
  const int m0 = task.block * kBlockM;
  const int warp_id = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;

  load_tile_async<kBlockM, D>(q_tile, q, p.q_strides.row, m0, p.nq);
  kv.load(0);
  warp::cp_async_commit();

  uint32_t q_frag[D / 16][4];
  float o[D / 8][4] = {};
  // Per thread, rows lane/4 and lane/4 + 8 of the warp's 16: running max (of scale_log2 * s) and partial sum
  // (this lane's columns only; the quad's lanes are summed at the end).
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const int n_blocks = kv.blocks();
  for (int j = 0; j < n_blocks; ++j) {
    await_block(j, n_blocks, [&](int next) { kv.load(next); });
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) load_a<D>(q_frag[kk], q_tile, warp_id * kWarpRows, kk * 16, lane);
    }

    float s[kNTiles][4] = {};
    mma_a_regs_bt_tile<D, kNTiles, Dtype>(s, q_frag, kv.k_tile(j), lane);

    // scores in base 2; keys past nk (only in the last block) get -inf
    const int key0 = j * kBlockN;
    transform_accumulators(s, lane, [&](float score, int, int, int column) {
      return key0 + column < p.nk ? score * p.scale_log2 : -INFINITY;
    });
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float block_max = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) block_max = fmaxf(block_max, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      // finite: every block holds a key, and rows past nq have zero scores
      const float new_max = fmaxf(row_max[r], quad_max(block_max));
      const float rescale = warp::exp2_approx(row_max[r] - new_max);  // 0 on the first block
      row_max[r] = new_max;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        s[nt][2 * r] = warp::exp2_approx(s[nt][2 * r] - new_max);
        s[nt][2 * r + 1] = warp::exp2_approx(s[nt][2 * r + 1] - new_max);
        sum += s[nt][2 * r] + s[nt][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * rescale + sum;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[dt][2 * r] *= rescale;
        o[dt][2 * r + 1] *= rescale;
      }
    }
    mma_c_regs_b_tile<D, kNTiles, Dtype>(o, s, kv.v_tile(j), lane);
  }

  const int row0 = m0 + warp_id * kWarpRows;
  float inv_sum[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(row_sum[r]);
    inv_sum[r] = 1.f / sum;
    const int row = row0 + (lane >> 2) + 8 * r;
    if ((lane & 3) == 0 && row < p.nq) {
      // lse = ln(sum_j e^(scale s_j)) = ln 2 * (max + log2(sum))
      p.lse[task.bh * p.nq + row] = 0.6931471805599453f * (row_max[r] + log2f(sum));
    }
  }
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    o[dt][0] *= inv_sum[0];
    o[dt][1] *= inv_sum[0];
    o[dt][2] *= inv_sum[1];
    o[dt][3] *= inv_sum[1];
  }
  // The warp's own Q rows are free: their fragments were read into registers before any score was computed.
  store_rows<D, Dtype>(o, 1.f, q_tile + warp_id * kWarpRows * kPitch<D>,
                       head_of(p.out, p.out_strides, task.b, task.h), p.out_strides.row,
                       row0, p.nq, lane);
}

}  // namespace attention
}  // namespace cuda
}  // namespace vitops
