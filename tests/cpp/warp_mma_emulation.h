#pragma once
// The warp-level instructions of csrc/cuda/warp_mma.cuh, emulated on the CPU (cuda_emulation.h): the same
// functions, so a kernel compiled with VITOPS_EMULATE_CUDA runs with exactly these swapped. Included before the
// kernels' headers. 16-bit values are c10::Half / c10::BFloat16 (torch's include dir), so what the kernels round
// to the input dtype (P, dS, the outputs) is rounded here as on the GPU, to nearest even.
//
// mma and ldmatrix are written from NVIDIA's PTX ISA, sections "Matrix Fragments for mma.m16n8k16 with floating
// point type" (which lane holds which element of A, B and C/D) and "Warp-level matrix load instruction:
// ldmatrix" (which lanes give the row addresses, which elements each lane receives, what .trans changes). The
// lanes of a warp exchange their fragments (or row addresses) through the emulator's per-warp buffer, behind a
// warp barrier, as the hardware's warp-wide .sync instructions do. cp.async is a plain copy, but deferred to the
// cp.async.wait_group that covers it, so a kernel that reads a tile before waiting for it reads garbage.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cfloat>

#include "cuda_emulation.h"

namespace vitops {
namespace cuda {
namespace warp {

namespace fragments {

struct Position {
  int row, col;
};

// Element i of each operand held by `lane`, as the PTX ISA tabulates it for mma.m16n8k16 with .f16/.bf16.
constexpr Position a_position(int lane, int i) {  // A: 16 x 16, a0..a7
  const int group = lane >> 2, thread_in_group = lane % 4;
  return {(i < 2 || (i >= 4 && i < 6)) ? group : group + 8, thread_in_group * 2 + (i & 1) + (i >= 4 ? 8 : 0)};
}
constexpr Position b_position(int lane, int i) {  // B: 16 x 8, b0..b3
  const int group = lane >> 2, thread_in_group = lane % 4;
  return {thread_in_group * 2 + (i & 1) + (i >= 2 ? 8 : 0), group};
}
constexpr Position c_position(int lane, int i) {  // C and D: 16 x 8, c0..c3
  const int group = lane >> 2, thread_in_group = lane % 4;
  return {i < 2 ? group : group + 8, thread_in_group * 2 + (i & 1)};
}

// Which (lane, element) holds A[row][col] and B[row][col]: the tables above inverted.
struct Holder {
  int lane, index;
};
struct Holders {
  Holder a[16][16], b[16][8];
};
constexpr Holders invert() {
  Holders h{};
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 8; ++i) h.a[a_position(lane, i).row][a_position(lane, i).col] = {lane, i};
    for (int i = 0; i < 4; ++i) h.b[b_position(lane, i).row][b_position(lane, i).col] = {lane, i};
  }
  return h;
}
inline constexpr Holders kHolders = invert();

}  // namespace fragments

template <class Dtype>
inline uint16_t round_to(float x) {
  if constexpr (Dtype::kIsBf16) {
    return c10::BFloat16(x).x;
  } else {
    return c10::Half(x).x;
  }
}

template <class Dtype>
inline float widen(uint16_t bits) {
  if constexpr (Dtype::kIsBf16) {
    return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
  } else {
    return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
  }
}

template <class Dtype>
inline uint32_t pack2(float lo, float hi) {
  return uint32_t(round_to<Dtype>(lo)) | (uint32_t(round_to<Dtype>(hi)) << 16);
}

template <class Dtype>
inline void unpack2(uint32_t pair, float& lo, float& hi) {
  lo = widen<Dtype>(static_cast<uint16_t>(pair & 0xffffu));
  hi = widen<Dtype>(static_cast<uint16_t>(pair >> 16));
}

inline float exp2_approx(float x) {
  const float y = std::exp2(x);
  return y < FLT_MIN ? 0.f : y;  // .ftz
}

inline float shfl_xor(float x, int mask) {
  return __shfl_xor_sync(0xffffffffu, x, mask);
}

// Aborts unless [p, p + bytes) lies in the block's shared memory and p is `align`-byte aligned.
inline void check_shared(const void* p, size_t bytes, size_t align, const char* what) {
  const auto* begin = reinterpret_cast<const char*>(dynamic_smem());
  const auto* end = begin + emulation::g_block->smem.size() * sizeof(float);
  const auto* c = static_cast<const char*>(p);
  if (c < begin || c + bytes > end || reinterpret_cast<uintptr_t>(p) % align != 0) {
    std::fprintf(stderr, "warp_mma_emulation: %s address %p is not an aligned shared-memory address (thread %u)\n",
                 what, p, threadIdx.x);
    std::abort();
  }
}

// d += a * b. Products of two fp16 or bf16 values are exact in float32; they are summed in k order, then added
// to d (the hardware's order of float32 additions is unspecified).
template <class Dtype>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  struct Operands {
    float a[8], b[4];
  } mine;
  // register r holds elements 2r (low half) and 2r + 1
  for (int r = 0; r < 4; ++r) unpack2<Dtype>(a[r], mine.a[2 * r], mine.a[2 * r + 1]);
  unpack2<Dtype>(b0, mine.b[0], mine.b[1]);
  unpack2<Dtype>(b1, mine.b[2], mine.b[3]);
  const auto lanes = emulation::warp_exchange(mine);
  const int lane = threadIdx.x % 32;
  for (int i = 0; i < 4; ++i) {
    const fragments::Position c = fragments::c_position(lane, i);
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) {
      const fragments::Holder ha = fragments::kHolders.a[c.row][k], hb = fragments::kHolders.b[k][c.col];
      sum += lanes[ha.lane].a[ha.index] * lanes[hb.lane].b[hb.index];
    }
    d[i] += sum;
  }
}

// ldmatrix.sync.aligned.m8n8.x{kMatrices}{.trans}.shared.b16: lanes 8m..8m+7 give the row addresses of matrix m;
// lane L receives elements (L / 4, 2 (L % 4) + {0, 1}) of matrix m, or with .trans those of its transpose.
template <int kMatrices, bool kTrans>
inline void ldmatrix(uint32_t (&r)[kMatrices], const void* row) {
  static_assert(kMatrices == 1 || kMatrices == 2 || kMatrices == 4, "ldmatrix loads 1, 2 or 4 matrices");
  const int lane = threadIdx.x % 32;
  if (lane < 8 * kMatrices) check_shared(row, 16, 16, "ldmatrix row");
  const auto rows = emulation::warp_exchange(row);
  for (int m = 0; m < kMatrices; ++m) {
    uint16_t e[2];
    for (int j = 0; j < 2; ++j) {
      const int matrix_row = kTrans ? 2 * (lane % 4) + j : lane / 4;
      const int matrix_col = kTrans ? lane / 4 : 2 * (lane % 4) + j;
      std::memcpy(&e[j], static_cast<const char*>(rows[8 * m + matrix_row]) + 2 * matrix_col, 2);
    }
    r[m] = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
  }
}

template <int kBytes>
inline void cp_async(void* dst, const void* src, int src_bytes) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async copies 4, 8 or 16 bytes");
  check_shared(dst, kBytes, kBytes, "cp.async destination");
  if (reinterpret_cast<uintptr_t>(src) % kBytes != 0 || src_bytes < 0 || src_bytes > kBytes) {
    std::fprintf(stderr, "warp_mma_emulation: cp.async source %p (%d of %d bytes) misaligned or oversized\n", src,
                 src_bytes, kBytes);
    std::abort();
  }
  emulation::current_thread().async_groups.back().push_back({dst, src, kBytes, src_bytes});
}

inline void cp_async_commit() {
  emulation::current_thread().async_groups.emplace_back();
}

// Completes all but the newest kPending committed groups of this thread (the open group is not waited for).
template <int kPending>
inline void cp_async_wait() {
  auto& groups = emulation::current_thread().async_groups;
  const int committed = static_cast<int>(groups.size()) - 1;
  const int complete = std::max(0, committed - kPending);
  for (int g = 0; g < complete; ++g) {
    for (const emulation::AsyncCopy& c : groups[g]) {
      std::memcpy(c.dst, c.src, c.src_bytes);
      std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
    }
  }
  groups.erase(groups.begin(), groups.begin() + complete);
}

}  // namespace warp
}  // namespace cuda
}  // namespace vitops
