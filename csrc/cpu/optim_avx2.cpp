// AVX2 + F16C kernels of lamb_step and adamp_step for one row segment (see lamb.cpp / adamp.cpp for the math).
// Pass 1 saves the update direction to a scratch buffer that pass 2 reads back from cache: one sqrt and one
// divide per element per step, which is what bounds these kernels on a CPU.
// Eight lanes per step, each operation rounded separately (no FMA), so every element gets exactly the
// operations, in the order, of the scalar kernels; sums use eight float accumulators per segment.
#include "optim_simd.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx2,f16c")
#include <immintrin.h>

// Lanes<__m256> below: the vector type's alignment attribute does not matter for a tag parameter.
#pragma GCC diagnostic ignored "-Wignored-attributes"

namespace vitops {
namespace cpu {
namespace simd {
namespace {

using V = __m256;

inline V set1(float x) { return _mm256_set1_ps(x); }
inline V add(V a, V b) { return _mm256_add_ps(a, b); }
inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V div(V a, V b) { return _mm256_div_ps(a, b); }
inline V vsqrt(V a) { return _mm256_sqrt_ps(a); }

template <int DT>
inline V load(const void* base, int64_t i) {
  if constexpr (DT == kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  } else if constexpr (DT == kF16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i)));
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

template <int DT>
inline void store(void* base, int64_t i, V x) {
  if constexpr (DT == kF32) {
    _mm256_storeu_ps(static_cast<float*>(base) + i, x);
  } else if constexpr (DT == kF16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i),
                     _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    // Round to nearest even, NaN to 0x7fc0, as c10::BFloat16.
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i), _mm256_castsi256_si128(packed));
  }
}

// Scalar versions of the same, for the tail of a segment.
template <int DT>
inline float load1(const void* base, int64_t i) {
  if constexpr (DT == kF32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (DT == kF16) {
    return _cvtsh_ss(static_cast<const uint16_t*>(base)[i]);
  } else {
    const uint32_t bits = uint32_t(static_cast<const uint16_t*>(base)[i]) << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
  }
}

template <int DT>
inline void store1(void* base, int64_t i, float x) {
  if constexpr (DT == kF32) {
    static_cast<float*>(base)[i] = x;
  } else if constexpr (DT == kF16) {
    static_cast<uint16_t*>(base)[i] = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    uint32_t u;
    __builtin_memcpy(&u, &x, 4);
    uint16_t r = x != x ? uint16_t(0x7fc0) : uint16_t((u + ((u >> 16) & 1) + 0x7fff) >> 16);
    static_cast<uint16_t*>(base)[i] = r;
  }
}

inline float hsum(V x) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, x);
  float s = 0.f;
  for (int l = 0; l < 8; ++l) {
    s += lanes[l];
  }
  return s;
}

// The per-element math, written once for V (8 lanes) and float (1 lane).
inline float set1s(float x) { return x; }
inline float add(float a, float b) { return a + b; }
inline float sub(float a, float b) { return a - b; }
inline float mul(float a, float b) { return a * b; }
inline float div(float a, float b) { return a / b; }
inline float vsqrt(float a) { return __builtin_sqrtf(a); }

template <typename T>
struct Lanes;
template <>
struct Lanes<V> {
  static V splat(float x) { return set1(x); }
  template <int DT>
  static V ld(const void* b, int64_t i) { return load<DT>(b, i); }
  template <int DT>
  static void st(void* b, int64_t i, V x) { store<DT>(b, i, x); }
  static constexpr int width = 8;
};
template <>
struct Lanes<float> {
  static float splat(float x) { return x; }
  template <int DT>
  static float ld(const void* b, int64_t i) { return load1<DT>(b, i); }
  template <int DT>
  static void st(void* b, int64_t i, float x) { store1<DT>(b, i, x); }
  static constexpr int width = 1;
};

template <typename X, int DT, int MODE, int STAGE>
inline void lamb_lanes(const LambArgs& k, void* p, const void* g, float* m, float* v, float* ub, int64_t i,
                       X ratio, X& acc_pp, X& acc_uu) {
  using L = Lanes<X>;
  const X pv = L::template ld<DT>(p, i);
  const X pd = add(pv, mul(pv, L::splat(k.neg_decay)));
  if constexpr (STAGE == 2) {
    L::template st<DT>(p, i, add(pd, mul(L::splat(k.neg_lr), mul(L::template ld<kF32>(ub, i), ratio))));
  } else {
    const X gi = mul(L::template ld<DT>(g, i), L::splat(k.inv_clip));
    const X m0 = L::template ld<kF32>(m, i);
    X mi;
    if constexpr (MODE == kLerpLow) {
      mi = add(m0, mul(L::splat(k.beta3), sub(gi, m0)));
    } else if constexpr (MODE == kLerpHigh) {
      mi = sub(gi, mul(sub(gi, m0), L::splat(k.one_minus_beta3)));
    } else {
      mi = add(mul(m0, L::splat(k.beta1)), mul(L::splat(k.beta3), gi));
    }
    const X vi =
        add(mul(L::template ld<kF32>(v, i), L::splat(k.beta2)), mul(mul(L::splat(k.one_minus_beta2), gi), gi));
    L::template st<kF32>(m, i, mi);
    L::template st<kF32>(v, i, vi);
    const X denom = add(mul(vsqrt(vi), L::splat(k.inv_sqrt_bc2)), L::splat(k.eps));
    X u = div(mul(mi, L::splat(k.inv_bc1)), denom);
    u = add(u, mul(L::splat(k.coupled_wd), pd));
    if constexpr (STAGE == 1) {
      acc_pp = add(acc_pp, mul(pd, pd));
      acc_uu = add(acc_uu, mul(u, u));
      L::template st<kF32>(ub, i, u);
    } else {
      L::template st<DT>(p, i, add(pd, mul(L::splat(k.neg_lr), u)));
    }
  }
}

template <int DT, int MODE, int STAGE>
void lamb_segment(const LambArgs& k, void* p, const void* g, float* m, float* v, float* ub, int64_t n,
                  float ratio, double* sums) {
  V acc_pp = set1(0.f), acc_uu = set1(0.f);
  const V r = set1(ratio);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    lamb_lanes<V, DT, MODE, STAGE>(k, p, g, m, v, ub, i, r, acc_pp, acc_uu);
  }
  float tail_pp = 0.f, tail_uu = 0.f;
  for (; i < n; ++i) {
    lamb_lanes<float, DT, MODE, STAGE>(k, p, g, m, v, ub, i, ratio, tail_pp, tail_uu);
  }
  if constexpr (STAGE == 1) {
    sums[0] = double(hsum(acc_pp)) + double(tail_pp);
    sums[1] = double(hsum(acc_uu)) + double(tail_uu);
  }
}

template <typename X, int DT, bool NESTEROV, int STAGE>
inline void adamp_lanes(const AdamPArgs& k, void* p, const void* g, float* m, float* v, float* qb, int64_t i,
                        X coef, X* acc) {
  using L = Lanes<X>;
  const X pv = L::template ld<DT>(p, i);
  if constexpr (STAGE == 2) {
    const X q = L::template ld<kF32>(qb, i);
    L::template st<DT>(p, i, add(mul(pv, L::splat(k.factor)), mul(L::splat(k.neg_step), sub(q, mul(pv, coef)))));
    return;
  } else {
    const X gi = L::template ld<DT>(g, i);
    const X mi = add(mul(L::template ld<kF32>(m, i), L::splat(k.beta1)), mul(L::splat(k.one_minus_beta1), gi));
    const X vi =
        add(mul(L::template ld<kF32>(v, i), L::splat(k.beta2)), mul(mul(L::splat(k.one_minus_beta2), gi), gi));
    L::template st<kF32>(m, i, mi);
    L::template st<kF32>(v, i, vi);
    const X denom = add(mul(vsqrt(vi), L::splat(k.inv_sqrt_bc2)), L::splat(k.eps));
    X q;
    if constexpr (NESTEROV) {
      q = div(add(mul(L::splat(k.beta1), mi), mul(L::splat(k.one_minus_beta1), gi)), denom);
    } else {
      q = div(mi, denom);
    }
    if constexpr (STAGE == 1) {
      acc[0] = add(acc[0], mul(gi, pv));
      acc[1] = add(acc[1], mul(gi, gi));
      acc[2] = add(acc[2], mul(pv, pv));
      acc[3] = add(acc[3], mul(pv, q));
      L::template st<kF32>(qb, i, q);
    } else {
      L::template st<DT>(p, i, add(mul(pv, L::splat(k.factor)), mul(L::splat(k.neg_step), q)));
    }
  }
}

template <int DT, bool NESTEROV, int STAGE>
void adamp_segment(const AdamPArgs& k, void* p, const void* g, float* m, float* v, float* qb, int64_t n,
                   float coef, double* sums) {
  V acc[4] = {set1(0.f), set1(0.f), set1(0.f), set1(0.f)};
  float tail[4] = {0.f, 0.f, 0.f, 0.f};
  const V c = set1(coef);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    adamp_lanes<V, DT, NESTEROV, STAGE>(k, p, g, m, v, qb, i, c, acc);
  }
  for (; i < n; ++i) {
    adamp_lanes<float, DT, NESTEROV, STAGE>(k, p, g, m, v, qb, i, coef, tail);
  }
  if constexpr (STAGE == 1) {
    for (int q = 0; q < 4; ++q) {
      sums[q] = double(hsum(acc[q])) + double(tail[q]);
    }
  }
}

template <int DT, int MODE>
void lamb_stage(const LambArgs& k, int stage, void* p, const void* g, float* m, float* v, float* u, int64_t n,
                float r, double* s) {
  switch (stage) {
    case 0: return lamb_segment<DT, MODE, 0>(k, p, g, m, v, u, n, r, s);
    case 1: return lamb_segment<DT, MODE, 1>(k, p, g, m, v, u, n, r, s);
    default: return lamb_segment<DT, MODE, 2>(k, p, g, m, v, u, n, r, s);
  }
}

template <int DT>
void lamb_mode(const LambArgs& k, int mode, int stage, void* p, const void* g, float* m, float* v, float* u,
               int64_t n, float r, double* s) {
  switch (mode) {
    case kLerpLow: return lamb_stage<DT, kLerpLow>(k, stage, p, g, m, v, u, n, r, s);
    case kLerpHigh: return lamb_stage<DT, kLerpHigh>(k, stage, p, g, m, v, u, n, r, s);
    default: return lamb_stage<DT, kMulAdd>(k, stage, p, g, m, v, u, n, r, s);
  }
}

template <int DT, bool NESTEROV>
void adamp_stage(const AdamPArgs& k, int stage, void* p, const void* g, float* m, float* v, float* u, int64_t n,
                 float c, double* s) {
  switch (stage) {
    case 0: return adamp_segment<DT, NESTEROV, 0>(k, p, g, m, v, u, n, c, s);
    case 1: return adamp_segment<DT, NESTEROV, 1>(k, p, g, m, v, u, n, c, s);
    default: return adamp_segment<DT, NESTEROV, 2>(k, p, g, m, v, u, n, c, s);
  }
}

template <int DT>
void adamp_nesterov(const AdamPArgs& k, bool nesterov, int stage, void* p, const void* g, float* m, float* v,
                    float* u, int64_t n, float c, double* s) {
  if (nesterov) {
    adamp_stage<DT, true>(k, stage, p, g, m, v, u, n, c, s);
  } else {
    adamp_stage<DT, false>(k, stage, p, g, m, v, u, n, c, s);
  }
}

}  // namespace

bool has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return has;
}

void lamb_segment_avx2(const LambArgs& k, int dtype, int mode, int stage, void* p, const void* g, float* m,
                       float* v, float* u, int64_t n, float ratio, double* sums) {
  switch (dtype) {
    case kF32: return lamb_mode<kF32>(k, mode, stage, p, g, m, v, u, n, ratio, sums);
    case kF16: return lamb_mode<kF16>(k, mode, stage, p, g, m, v, u, n, ratio, sums);
    default: return lamb_mode<kBF16>(k, mode, stage, p, g, m, v, u, n, ratio, sums);
  }
}

void adamp_segment_avx2(const AdamPArgs& k, int dtype, bool nesterov, int stage, void* p, const void* g, float* m,
                        float* v, float* u, int64_t n, float coef, double* sums) {
  switch (dtype) {
    case kF32: return adamp_nesterov<kF32>(k, nesterov, stage, p, g, m, v, u, n, coef, sums);
    case kF16: return adamp_nesterov<kF16>(k, nesterov, stage, p, g, m, v, u, n, coef, sums);
    default: return adamp_nesterov<kBF16>(k, nesterov, stage, p, g, m, v, u, n, coef, sums);
  }
}

}  // namespace simd
}  // namespace cpu
}  // namespace vitops

#else  // not x86 with GCC/clang: the scalar kernels run

namespace vitops {
namespace cpu {
namespace simd {
bool has_avx2() { return false; }
void lamb_segment_avx2(const LambArgs&, int, int, int, void*, const void*, float*, float*, float*, int64_t, float,
                       double*) {}
void adamp_segment_avx2(const AdamPArgs&, int, bool, int, void*, const void*, float*, float*, float*, int64_t, float,
                        double*) {}
}  // namespace simd
}  // namespace cpu
}  // namespace vitops

#endif
