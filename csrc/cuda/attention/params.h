#pragma once
// What the host side (csrc/cuda/attention.cu), the launchers (launch.cuh) and the CPU emulation driver
// (tests/cpp/attention_emulation.cpp) share about the tensor-core attention kernels: the kernels' arguments, the
// tile shapes, and from them each kernel's grid and shared memory. No ATen and no CUDA headers.
#include <cstddef>
#include <cstdint>

namespace vitops {
namespace cuda {
namespace attention {

// Element (b, h, n, d) of a (B, H, N, D) operand is at data[b * batch + h * head + n * row + d]: strides in
// elements, the last dim contiguous. Packed (B, N, 3*H*D) and (B, N, H*D) tensors are read and written through
// such views in place.
struct Strides {
  int64_t batch, head, row;
};

struct Problem {
  const void* q;
  const void* k;
  const void* v;
  Strides q_strides, k_strides, v_strides;
  int heads, nq, nk;  // batch * heads * max(nq, nk) may exceed 2^31: offsets are 64-bit
  int64_t batch;
  float scale;       // of the scores q.k
  float scale_log2;  // scale * log2(e): the kernels' softmax runs in base 2
};

struct ForwardParams : Problem {
  void* out;
  Strides out_strides;
  float* lse;  // (B, H, Nq) contiguous, natural log
};

struct BackwardParams : Problem {
  const void* out;
  const void* grad_out;
  Strides out_strides, grad_out_strides;
  const float* lse;  // (B, H, Nq) contiguous, from the forward
  float* delta;      // (B, H, Nq) contiguous scratch: rowsum(grad_out * out), written by the first kernel
  void* grad_q;
  void* grad_k;
  void* grad_v;
  Strides grad_q_strides, grad_k_strides, grad_v_strides;
};

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kWarpRows = 16;  // rows of the m16n8k16 A operand: each warp owns 16 rows of its CTA's block
constexpr int kBlockRows = kWarps * kWarpRows;

// Shared-memory tiles hold rows of D 16-bit elements padded by 16 bytes: the row pitch is then an odd number of
// 16-byte units, so the 8 row addresses of an ldmatrix, and the 8 lanes of a 16-byte cp.async or store phase,
// fall in 8 different bank groups (conflict-free for every head_dim here, without an XOR swizzle).
template <int D>
constexpr int kPitch = D + 8;

template <int D>
constexpr size_t tile_bytes(int rows) {
  return size_t(rows) * kPitch<D> * 2;
}

// Rows of the streamed blocks (keys in the forward and dQ kernels, queries in the dK/dV kernel): two stages of
// them sit in shared memory. 32 rows from D = 64 up keep the score tiles' registers small beside D's
// accumulators (and pad N = 197 to 224 rather than 256); at D = 32 there is room for 64.
template <int D>
constexpr int kStreamRows = D <= 32 ? 64 : 32;

// Each kernel's CTAs per SM, promised to ptxas by __launch_bounds__: the most that compile without spills at
// sm_80 and sm_90 (and that shared memory allows: 164 KB per SM on A100, 228 KB on H100).

// Forward: a CTA per (batch, head, 64 queries); key/value blocks stream through two stages.
template <int D>
struct ForwardTile {
  static constexpr int kBlockM = kBlockRows, kBlockN = kStreamRows<D>;
  static constexpr int kMinCtasPerSm = D == 128 ? 3 : 4;
  // q, then stages {k0, k1}, then {v0, v1}
  static constexpr size_t kSmemBytes = tile_bytes<D>(kBlockM) + 4 * tile_bytes<D>(kBlockN);
};

// dQ: a CTA per (batch, head, 64 queries); key/value blocks stream through two stages.
template <int D>
struct GradQTile {
  static constexpr int kBlockM = kBlockRows, kBlockN = kStreamRows<D>;
  static constexpr int kMinCtasPerSm = D <= 80 ? 3 : 2;
  // q, grad_out, then stages {k0, k1}, {v0, v1}
  static constexpr size_t kSmemBytes = 2 * tile_bytes<D>(kBlockM) + 4 * tile_bytes<D>(kBlockN);
};

// dK, dV: a CTA per (batch, head, 64 keys); query blocks (q, grad_out, lse, delta) stream through two stages.
template <int D>
struct GradKVTile {
  static constexpr int kBlockN = kBlockRows, kBlockM = kStreamRows<D>;
  static constexpr int kMinCtasPerSm = D == 32 ? 4 : D <= 80 ? 3 : 2;
  // k, v, then stages {q0, q1}, {grad_out0, grad_out1}, {lse0, lse1}, {delta0, delta1}
  static constexpr size_t kSmemBytes =
      2 * tile_bytes<D>(kBlockN) + 4 * tile_bytes<D>(kBlockM) + 4 * sizeof(float) * kBlockM;
};

// delta = rowsum(grad_out * out): 8 lanes per row (16 bytes each per step), 16 rows per CTA.
constexpr int kDeltaLanesPerRow = 8;
constexpr int kDeltaRowsPerCta = kThreads / kDeltaLanesPerRow;

constexpr int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The grids are 1-D: the block index runs fastest, so CTAs of one head run together and share its K/V in L2.
template <int D>
constexpr int64_t forward_ctas(const Problem& p) {
  return p.batch * p.heads * ceil_div(p.nq, ForwardTile<D>::kBlockM);
}
template <int D>
constexpr int64_t grad_q_ctas(const Problem& p) {
  return p.batch * p.heads * ceil_div(p.nq, GradQTile<D>::kBlockM);
}
template <int D>
constexpr int64_t grad_kv_ctas(const Problem& p) {
  return p.batch * p.heads * ceil_div(p.nk, GradKVTile<D>::kBlockN);
}
constexpr int64_t delta_ctas(const Problem& p) {
  return ceil_div(p.batch * p.heads * p.nq, kDeltaRowsPerCta);
}

}  // namespace attention
}  // namespace cuda
}  // namespace vitops
