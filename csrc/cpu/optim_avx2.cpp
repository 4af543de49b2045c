// The optimizer ops' segment kernels (optim_segments.h) on eight AVX2 lanes, for CPUs with AVX2 and F16C. AVX2
// without FMA: each operation rounds on its own, as in the scalar build (optim_scalar.cpp) and the CUDA kernels.
//
// What optim_segments.h includes is included first, for the default target: a function the target pragma covers
// is compiled for AVX2, and an out-of-line copy of a shared inline function could then be the one the linker keeps
// for every caller. Only optim_segments.h's own templates, instantiated here, and this file's code follow it.
#include "../adamp.h"
#include "../lamb.h"
#include "chunk_plan.h"

// csrc/lamb.h's and adamp.h's functions take eight-lane values by value; they are always inlined, so the note that
// GCC 4.6 changed how such arguments are passed does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <cstdint>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx2,f16c")
#include <immintrin.h>

#include "optim_segments.h"

namespace vitops {
namespace cpu {
namespace avx2 {

// Eight floats in a ymm register.
struct Lanes8 {
  __m256 v;
  Lanes8(__m256 x) : v(x) {}
  Lanes8(float x) : v(_mm256_set1_ps(x)) {}  // implicit: `x * 0.5f` broadcasts
};

inline Lanes8 operator+(Lanes8 a, Lanes8 b) { return _mm256_add_ps(a.v, b.v); }
inline Lanes8 operator-(Lanes8 a, Lanes8 b) { return _mm256_sub_ps(a.v, b.v); }
inline Lanes8 operator*(Lanes8 a, Lanes8 b) { return _mm256_mul_ps(a.v, b.v); }
inline Lanes8 operator/(Lanes8 a, Lanes8 b) { return _mm256_div_ps(a.v, b.v); }
inline Lanes8 sqrt_rn(Lanes8 a) { return _mm256_sqrt_ps(a.v); }

inline uint16_t bfloat16_bits(float x) {  // round to nearest even, NaN to 0x7fc0, as c10::BFloat16
  uint32_t u;
  __builtin_memcpy(&u, &x, 4);
  return x != x ? uint16_t(0x7fc0) : uint16_t((u + ((u >> 16) & 1) + 0x7fff) >> 16);
}

struct Wide {
  using Value = Lanes8;
  static constexpr int kWidth = 8;

  template <int DT>
  static Value load(const void* base, int64_t i) {
    if constexpr (DT == kF32) {
      return _mm256_loadu_ps(static_cast<const float*>(base) + i);
    } else {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
      if constexpr (DT == kF16) {
        return _mm256_cvtph_ps(h);
      } else {
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      }
    }
  }

  template <int DT>
  static void store(void* base, int64_t i, Value x) {
    if constexpr (DT == kF32) {
      _mm256_storeu_ps(static_cast<float*>(base) + i, x.v);
    } else if constexpr (DT == kF16) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i),
                       _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {  // bfloat16_bits on eight lanes
      const __m256i u = _mm256_castps_si256(x.v);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q));
      r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i), _mm256_castsi256_si128(packed));
    }
  }

  static Value zero() { return _mm256_setzero_ps(); }

  static float sum(Value x) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, x.v);
    float s = 0.f;
    for (int l = 0; l < 8; ++l) {
      s += lanes[l];
    }
    return s;
  }
};

// One float16 or bfloat16 element at a time, for the segments' tails: F16C's scalar conversions, bfloat16_bits.
struct Convert {
  template <int DT>
  static float load(const void* base, int64_t i) {
    const uint16_t bits = static_cast<const uint16_t*>(base)[i];
    if constexpr (DT == kF16) {
      return _cvtsh_ss(bits);
    } else {
      const uint32_t wide = uint32_t(bits) << 16;
      float f;
      __builtin_memcpy(&f, &wide, 4);
      return f;
    }
  }

  template <int DT>
  static void store(void* base, int64_t i, float x) {
    static_cast<uint16_t*>(base)[i] =
        DT == kF16 ? _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC) : bfloat16_bits(x);
  }
};

}  // namespace avx2

bool avx2_supported() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return supported;
}

const SegmentKernels& avx2_kernels() {
  static const SegmentKernels kernels = Segments<avx2::Wide, OneLane<avx2::Convert>>::table();
  return kernels;
}

}  // namespace cpu
}  // namespace vitops

#else  // not x86 with GCC or clang: the scalar build runs

#include "optim_segments.h"

namespace vitops {
namespace cpu {

bool avx2_supported() { return false; }

const SegmentKernels& avx2_kernels() { return scalar_kernels(); }

}  // namespace cpu
}  // namespace vitops

#endif
