#pragma once
// The warp-level instructions of the tensor-core kernels (csrc/cuda/attention/), as inline-PTX wrappers: mma.sync
// m16n8k16 with float32 accumulation, ldmatrix, cp.async with its groups, the quad shuffles, and the conversions
// between float32 and packed 16-bit pairs. Nothing else of the kernels touches PTX, so the CPU emulation swaps
// exactly these: with VITOPS_EMULATE_CUDA defined, tests/cpp/warp_mma_emulation.h (included first) defines the
// same functions, and only the dtype tags below are shared.
//
// Fragment layouts (who holds which element), from NVIDIA's PTX ISA: "Matrix Fragments for mma.m16n8k16 with
// floating point type" and "Warp-level matrix load instruction: ldmatrix". With groupID = lane / 4 and
// threadID_in_group = lane % 4:
//  - A (16x16, row-major, 4 x b32 = a0..a7): a_i sits at row groupID (+8 for i in {2,3,6,7}), column
//    2 * threadID_in_group + (i & 1) (+8 for i >= 4).
//  - B (16x8, "col": k down, n across, 2 x b32 = b0..b3): b_i sits at row (k) 2 * threadID_in_group + (i & 1)
//    (+8 for i >= 2), column (n) groupID.
//  - C/D (16x8 float32, c0..c3): row groupID (+8 for i >= 2), column 2 * threadID_in_group + (i & 1).
//  - ldmatrix .m8n8 .b16: lanes 8m..8m+7 give the row addresses of matrix m (16 bytes each, 16-byte aligned); lane
//    L receives in register m the elements (row L / 4, columns 2 * (L % 4) and +1) of matrix m, the lower column
//    in the low half; with .trans, those of the transposed matrix (rows 2 * (L % 4) and +1, column L / 4).
#include <cstdint>

namespace vitops {
namespace cuda {
namespace warp {

// The 16-bit element types of the matrix operands. Elements travel as raw bits, two to a 32-bit register (the
// lower-indexed element in the low half), as the fragments above hold them.
struct Fp16 {
  static constexpr bool kIsBf16 = false;
};
struct Bf16 {
  static constexpr bool kIsBf16 = true;
};

#ifndef VITOPS_EMULATE_CUDA

// d += a * b for one 16x8x16 tile: a row-major 16x16, b a 16x8 "col" operand given as its two registers.
template <class Dtype>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (Dtype::kIsBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16: `row` is this lane's row address (see above).
template <int kMatrices, bool kTrans>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[kMatrices], const void* row) {
  static_assert(kMatrices == 1 || kMatrices == 2 || kMatrices == 4, "ldmatrix loads 1, 2 or 4 matrices");
  const uint32_t addr = shared_address(row);
  if constexpr (kMatrices == 1 && !kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr));
  } else if constexpr (kMatrices == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr));
  } else if constexpr (kMatrices == 2 && !kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
  } else if constexpr (kMatrices == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
  } else if constexpr (!kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
}

// cp.async of kBytes (4, 8 or 16) from global to shared memory, reading only the first src_bytes of them and
// zero-filling the rest (src_bytes = 0 reads nothing: the masked rows of a tile). 16-byte copies bypass L1 (.cg).
template <int kBytes>
__device__ __forceinline__ void cp_async(void* dst, const void* src, int src_bytes) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async copies 4, 8 or 16 bytes");
  if constexpr (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
                 "r"(src_bytes)
                 : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(shared_address(dst)), "l"(src),
                 "n"(kBytes), "r"(src_bytes)
                 : "memory");
  }
}

// Closes the group of this thread's cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most kPending of this thread's committed groups are still in flight. Other threads see the
// copies only after a __syncthreads() that follows.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// x of the lane whose id is this lane's xor `mask` (all 32 lanes take part).
__device__ __forceinline__ float shfl_xor(float x, int mask) {
  return __shfl_xor_sync(0xffffffffu, x, mask);
}

// Two floats rounded to nearest even into a 16-bit pair, `lo` in the low half.
template <class Dtype>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (Dtype::kIsBf16) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  }
  return r;
}

// The two elements of a 16-bit pair as floats (exact).
template <class Dtype>
__device__ __forceinline__ void unpack2(uint32_t pair, float& lo, float& hi) {
  if constexpr (Dtype::kIsBf16) {
    lo = __uint_as_float(pair << 16);
    hi = __uint_as_float(pair & 0xffff0000u);
  } else {
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(lo) : "h"(static_cast<uint16_t>(pair & 0xffffu)));
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(hi) : "h"(static_cast<uint16_t>(pair >> 16)));
  }
}

// 2^x by the SFU (ex2.approx, ~2 ulp, subnormal results flushed to zero; 2^-inf = 0).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

#endif  // VITOPS_EMULATE_CUDA

}  // namespace warp
}  // namespace cuda
}  // namespace vitops
