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
  using Tile = ForwardTile<D>;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kNTiles = kBlockN / 8;
  Element* q_tile = reinterpret_cast<Element*>(shared_memory());
  Element* k_tiles = q_tile + kBlockM * kPitch<D>;
  Element* v_tiles = k_tiles + 2 * kBlockN * kPitch<D>;

  const CtaTask task = cta_task(p.heads, static_cast<int>(ceil_div(p.nq, kBlockM)));
  const Element* q = head_of(static_cast<const Element*>(p.q), p.q_strides, task.b, task.h);
  const Element* k = head_of(static_cast<const Element*>(p.k), p.k_strides, task.b, task.h);
  const Element* v = head_of(static_cast<const Element*>(p.v), p.v_strides, task.b, task.h);
  const int m0 = task.block * kBlockM;
  const int warp_id = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;

  load_tile_async<kBlockM, D>(q_tile, q, p.q_strides.row, m0, p.nq);
  load_tile_async<kBlockN, D>(k_tiles, k, p.k_strides.row, 0, p.nk);
  load_tile_async<kBlockN, D>(v_tiles, v, p.v_strides.row, 0, p.nk);
  warp::cp_async_commit();

  uint32_t q_frag[D / 16][4];
  float o[D / 8][4] = {};
  // Per thread, rows lane/4 and lane/4 + 8 of the warp's 16: running max (of scale_log2 * s) and partial sum
  // (this lane's columns only; the quad's lanes are summed at the end).
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const int n_blocks = static_cast<int>(ceil_div(p.nk, kBlockN));
  for (int j = 0; j < n_blocks; ++j) {
    warp::cp_async_wait<0>();
    __syncthreads();  // block j visible to all; all done with block j - 1, whose stage is refilled next
    if (j + 1 < n_blocks) {
      const int stage = (j + 1) & 1;
      load_tile_async<kBlockN, D>(k_tiles + stage * kBlockN * kPitch<D>, k, p.k_strides.row, (j + 1) * kBlockN,
                                  p.nk);
      load_tile_async<kBlockN, D>(v_tiles + stage * kBlockN * kPitch<D>, v, p.v_strides.row, (j + 1) * kBlockN,
                                  p.nk);
      warp::cp_async_commit();
    }
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) load_a<D>(q_frag[kk], q_tile, warp_id * kWarpRows, kk * 16, lane);
    }
    const Element* k_tile = k_tiles + (j & 1) * kBlockN * kPitch<D>;
    const Element* v_tile = v_tiles + (j & 1) * kBlockN * kPitch<D>;

    float s[kNTiles][4] = {};
    mma_a_regs_bt_tile<D, kNTiles, Dtype>(s, q_frag, k_tile, lane);

    // scores in base 2; keys past nk (only in the last block) get -inf
    const int key0 = j * kBlockN + (lane & 3) * 2;
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[nt][i] = key0 + nt * 8 + (i & 1) < p.nk ? s[nt][i] * p.scale_log2 : -INFINITY;
      }
    }
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
    mma_c_regs_b_tile<D, kNTiles, Dtype>(o, s, v_tile, lane);
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
                       head_of(static_cast<Element*>(p.out), p.out_strides, task.b, task.h), p.out_strides.row,
                       row0, p.nq, lane);
}

}  // namespace attention
}  // namespace cuda
}  // namespace vitops
