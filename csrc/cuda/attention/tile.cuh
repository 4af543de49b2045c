#pragma once
// Device helpers the attention kernels share: operand pointers, cp.async tile loads and the two-stage streaming of
// blocks, the ldmatrix address of each operand role, the per-element pass over accumulators, the register shuffles
// of the online softmax, and the epilogue store. ATen-free: compiled by nvcc, and as C++ by the CPU emulation
// (tests/cpp/attention_emulation.cpp) with the warp instructions swapped.
#include <cmath>
#include <cstdint>

#include "../warp_mma.cuh"
#include "params.h"

namespace vitops {
namespace cuda {
namespace attention {

#ifdef VITOPS_EMULATE_CUDA
inline char* shared_memory() {
  return reinterpret_cast<char*>(dynamic_smem());
}
#else
__device__ __forceinline__ char* shared_memory() {
  extern __shared__ uint4 attention_shared_memory[];
  return reinterpret_cast<char*>(attention_shared_memory);
}
#endif

using Element = uint16_t;  // fp16 or bf16 bits; the kernels' Dtype says which

// The (N, D) matrix of head (b, h) of an operand.
__device__ __forceinline__ const Element* head_of(const void* data, const Strides& s, int64_t b, int64_t h) {
  return static_cast<const Element*>(data) + b * s.batch + h * s.head;
}
__device__ __forceinline__ Element* head_of(void* data, const Strides& s, int64_t b, int64_t h) {
  return static_cast<Element*>(data) + b * s.batch + h * s.head;
}

// Which (batch, head, block of rows) a CTA of a 1-D grid takes: the block index runs fastest.
struct CtaTask {
  int64_t b, h, bh;
  int block;
};
__device__ __forceinline__ CtaTask cta_task(int heads, int blocks_per_head) {
  CtaTask t;
  t.bh = blockIdx.x / blocks_per_head;
  t.block = static_cast<int>(blockIdx.x % blocks_per_head);
  t.b = t.bh / heads;
  t.h = t.bh % heads;
  return t;
}

// Copies rows [row0, row0 + kRows) of an (n, D) matrix into a tile of pitch kPitch<D>, 16 bytes per cp.async
// from all kThreads threads. Rows at or past n are zero-filled without reading (their source is clamped to row 0).
template <int kRows, int D>
__device__ __forceinline__ void load_tile_async(Element* tile, const Element* src, int64_t row_stride, int row0,
                                                int n) {
  constexpr int kChunks = D / 8;
  constexpr int kTotal = kRows * kChunks;
#pragma unroll
  for (int it = 0; it < (kTotal + kThreads - 1) / kThreads; ++it) {
    const int i = it * kThreads + static_cast<int>(threadIdx.x);
    if (kTotal % kThreads == 0 || i < kTotal) {
      const int r = i / kChunks, c = i % kChunks;
      const bool valid = row0 + r < n;
      const Element* from = src + (valid ? int64_t(row0 + r) * row_stride : 0) + c * 8;
      warp::cp_async<16>(tile + r * kPitch<D> + c * 8, from, valid ? 16 : 0);
    }
  }
}

// Copies floats [i0, i0 + kCount) of a vector of length n into shared memory, zero past n.
template <int kCount>
__device__ __forceinline__ void load_vector_async(float* dst, const float* src, int i0, int n) {
  static_assert(kCount <= kThreads, "one float per thread");
  const int i = static_cast<int>(threadIdx.x);
  if (i < kCount) {
    const bool valid = i0 + i < n;
    warp::cp_async<4>(dst + i, src + (valid ? i0 + i : 0), valid ? 4 : 0);
  }
}

// One step of a loop over blocks that stream through two cp.async stages: waits for block j, and for every warp to
// be done with block j - 1, then starts loading block j + 1 (load_block(j + 1)) into the stage block j - 1 held.
template <class LoadBlock>
__device__ __forceinline__ void await_block(int j, int blocks, const LoadBlock& load_block) {
  warp::cp_async_wait<0>();
  __syncthreads();
  if (j + 1 < blocks) {
    load_block(j + 1);
    warp::cp_async_commit();
  }
}

// The key/value blocks of one head that the forward and dQ kernels stream through two stages of shared memory,
// k0, k1, then v0, v1 from `stages`: block j sits in stage j & 1.
template <int D, int kBlockN>
struct KeyValueStages {
  Element* k_tiles;
  Element* v_tiles;
  const Element* k;
  const Element* v;
  const Problem& p;

  __device__ __forceinline__ KeyValueStages(Element* stages, const Problem& problem, const CtaTask& task)
      : k_tiles(stages),
        v_tiles(stages + 2 * kBlockN * kPitch<D>),
        k(head_of(problem.k, problem.k_strides, task.b, task.h)),
        v(head_of(problem.v, problem.v_strides, task.b, task.h)),
        p(problem) {}

  __device__ __forceinline__ int blocks() const { return static_cast<int>(ceil_div(p.nk, kBlockN)); }

  // Starts loading block j (cp.async, not committed).
  __device__ __forceinline__ void load(int j) const {
    const int stage = j & 1;
    load_tile_async<kBlockN, D>(k_tiles + stage * kBlockN * kPitch<D>, k, p.k_strides.row, j * kBlockN, p.nk);
    load_tile_async<kBlockN, D>(v_tiles + stage * kBlockN * kPitch<D>, v, p.v_strides.row, j * kBlockN, p.nk);
  }

  __device__ __forceinline__ const Element* k_tile(int j) const { return k_tiles + (j & 1) * kBlockN * kPitch<D>; }
  __device__ __forceinline__ const Element* v_tile(int j) const { return v_tiles + (j & 1) * kBlockN * kPitch<D>; }
};

// ldmatrix addresses. A tile is row-major (rows of D elements at kPitch<D>); each x4 load fills either one A
// operand or the B operands of two adjacent 8-wide n-tiles (registers 0, 1: n-tile 0; 2, 3: n-tile 1).

// A (16 x 16) at (row0, k0) of a tile holding A row-major: matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15), ordered
// as a0a1, a2a3, a4a5, a6a7.
template <int D>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const Element* tile, int row0, int k0, int lane) {
  warp::ldmatrix<4, false>(a, tile + (row0 + (lane & 15)) * kPitch<D> + k0 + ((lane >> 4) << 3));
}

// B of n-tiles n0..n0+15 x k0..k0+15 from a tile holding B^T row-major (row = n, k contiguous: K for Q K^T).
template <int D>
__device__ __forceinline__ void load_b_pair(uint32_t (&b)[4], const Element* tile, int n0, int k0, int lane) {
  warp::ldmatrix<4, false>(b, tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * kPitch<D> + k0 +
                                  (((lane >> 3) & 1) << 3));
}

// B of n-tiles n0..n0+15 x k0..k0+15 from a tile holding B row-major (row = k, n contiguous: V for P V), read
// transposed.
template <int D>
__device__ __forceinline__ void load_b_pair_trans(uint32_t (&b)[4], const Element* tile, int k0, int n0,
                                                  int lane) {
  warp::ldmatrix<4, true>(b, tile + (k0 + (lane & 7) + (((lane >> 3) & 1) << 3)) * kPitch<D> + n0 +
                                 ((lane >> 4) << 3));
}

// acc[nt] (16 x 8 per n-tile) += A (16 x D, a[D/16] in registers) times the B^T tile rows n0.. (B^T row-major).
template <int D, int kNTiles, class Dtype>
__device__ __forceinline__ void mma_a_regs_bt_tile(float (&acc)[kNTiles][4], const uint32_t (&a)[D / 16][4],
                                                   const Element* bt_tile, int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {
      uint32_t b[4];
      load_b_pair<D>(b, bt_tile, np * 16, kk * 16, lane);
      warp::mma_m16n8k16<Dtype>(acc[2 * np], a[kk], b[0], b[1]);
      warp::mma_m16n8k16<Dtype>(acc[2 * np + 1], a[kk], b[2], b[3]);
    }
  }
}

// The A operand of k-chunk kk (columns 16kk..16kk+15) of a 16 x N float matrix held as accumulators (n-tiles
// 2kk and 2kk+1), rounded to Dtype: the C layout of two n-tiles is the A layout of one k-chunk.
template <class Dtype, int kNTiles>
__device__ __forceinline__ void accumulators_to_a(uint32_t (&a)[4], const float (&c)[kNTiles][4], int kk) {
  a[0] = warp::pack2<Dtype>(c[2 * kk][0], c[2 * kk][1]);
  a[1] = warp::pack2<Dtype>(c[2 * kk][2], c[2 * kk][3]);
  a[2] = warp::pack2<Dtype>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = warp::pack2<Dtype>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// acc[dt] (16 x D) += C (16 x kRows, accumulators, rounded to Dtype) times the tile (kRows x D, row-major).
template <int D, int kNTiles, class Dtype>
__device__ __forceinline__ void mma_c_regs_b_tile(float (&acc)[D / 8][4], const float (&c)[kNTiles][4],
                                                  const Element* b_tile, int lane) {
#pragma unroll
  for (int kk = 0; kk < kNTiles / 2; ++kk) {
    uint32_t a[4];
    accumulators_to_a<Dtype>(a, c, kk);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b[4];
      load_b_pair_trans<D>(b, b_tile, kk * 16, dp * 16, lane);
      warp::mma_m16n8k16<Dtype>(acc[2 * dp], a, b[0], b[1]);
      warp::mma_m16n8k16<Dtype>(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// acc[nt][i] = f(acc[nt][i], nt, i, column) for each of this lane's elements of a 16 x (8 kNTiles) accumulator tile:
// element i of n-tile nt is at row lane / 4 + 8 (i / 2) and column `column` of the tile.
template <int kNTiles, class F>
__device__ __forceinline__ void transform_accumulators(float (&acc)[kNTiles][4], int lane, const F& f) {
  const int col = (lane & 3) * 2;
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = f(acc[nt][i], nt, i, nt * 8 + col + (i & 1));
  }
}

// Max and sum over the 4 lanes (threadID_in_group) that hold one row of an accumulator tile.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, warp::shfl_xor(x, 1));
  return fmaxf(x, warp::shfl_xor(x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += warp::shfl_xor(x, 1);
  return x + warp::shfl_xor(x, 2);
}

// Writes a warp's 16 x D accumulators (times `scale`, rounded to Dtype) to rows row0.. of an (n, D) matrix,
// through the warp's own 16 rows of a shared tile, so that each global store is 16 contiguous bytes. Rows at or
// past n are not written.
template <int D, class Dtype>
__device__ __forceinline__ void store_rows(const float (&acc)[D / 8][4], float scale, Element* staging,
                                           Element* dst, int64_t row_stride, int row0, int n, int lane) {
  const int group = lane >> 2, pair = (lane & 3) * 2;
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    uint32_t* top = reinterpret_cast<uint32_t*>(staging + group * kPitch<D> + dt * 8 + pair);
    uint32_t* bottom = reinterpret_cast<uint32_t*>(staging + (group + 8) * kPitch<D> + dt * 8 + pair);
    *top = warp::pack2<Dtype>(acc[dt][0] * scale, acc[dt][1] * scale);
    *bottom = warp::pack2<Dtype>(acc[dt][2] * scale, acc[dt][3] * scale);
  }
  __syncwarp();
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int it = 0; it < (kWarpRows * kChunks + 31) / 32; ++it) {
    const int i = it * 32 + lane;
    const int r = i / kChunks, c = i % kChunks;
    if (i < kWarpRows * kChunks && row0 + r < n) {
      *reinterpret_cast<uint4*>(dst + int64_t(row0 + r) * row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(staging + r * kPitch<D> + c * 8);
    }
  }
}

}  // namespace attention
}  // namespace cuda
}  // namespace vitops
