#pragma once
// The CPU kernels of the optimizer ops for one segment of one tensor (a chunk of the multi-tensor plan,
// multi_tensor.h), written once over a "lane set" and compiled twice: with eight AVX2 lanes
// (csrc/cpu/optim_avx2.cpp, for CPUs that have AVX2 and F16C) and with eight plain floats
// (csrc/cpu/optim_scalar.cpp, for the others). The arithmetic is csrc/lamb.h's and csrc/adamp.h's; sums use one
// accumulator per lane, added in lane order, then the tail's. So both builds give the same bits, which
// tests/optim/test_optim_lanes.py checks. No ATen or c10 (beyond its macros): the AVX2 file must not emit
// their inline functions compiled for AVX2.
//
// A lane set L provides: L::Value, what the math runs on; L::kWidth elements per Value; L::load<DT>(base, i) and
// L::store<DT>(base, i, x) for kWidth elements from element i of a param or grad of dtype DT (Dtype below, as
// floats); L::zero(); L::sum(x), the lanes added in order. Segments run kWidth elements at a time, then their
// tail one element at a time with the lane set's one-lane twin, a OneLane.
#include "../adamp.h"
#include "../lamb.h"
#include "chunk_plan.h"

#include <cstdint>

namespace vitops {
namespace cpu {

// The kernels of one instruction set. Every pointer is already offset to the segment's first element; sums get
// the segment's partial sums (LAMB: p'.p' and u.u; AdamP: g.p, g.g, p.p and p.q).
struct SegmentKernels {
  // Sum of squares, for LAMB's global grad norm.
  double (*sq_sum)(int dtype, const void* x, int64_t n);
  // LAMB's moments, and p' and u's sums; with `finish` (no layer adaptation), the param too.
  void (*lamb_moments)(const lamb::Constants& k, float inv_clip, bool finish, int dtype, void* p, const void* g,
                       float* m, float* v, int64_t n, double* sums);
  // LAMB's param update, u recomputed from the new moments.
  void (*lamb_apply)(const lamb::Constants& k, float ratio, int dtype, void* p, const float* m, const float* v,
                     int64_t n);
  // AdamP's moments; a projectable param gets its row sums, any other is updated here.
  void (*adamp_moments)(const adamp::Constants& k, const adamp::StepConstants& s, bool projectable, int dtype,
                        void* p, const void* g, float* m, float* v, int64_t n, double* sums);
  // AdamP's param update, q recomputed from the new moments (and g, for nesterov).
  void (*adamp_apply)(const adamp::Constants& k, const adamp::StepConstants& s, float factor, float coef, int dtype,
                      void* p, const void* g, const float* m, const float* v, int64_t n);
};

// Defined in optim_avx2.cpp (only call it where avx2_supported()) and optim_scalar.cpp.
bool avx2_supported();
const SegmentKernels& avx2_kernels();
const SegmentKernels& scalar_kernels();

inline const SegmentKernels& segment_kernels() {
  static const SegmentKernels& kernels = avx2_supported() ? avx2_kernels() : scalar_kernels();
  return kernels;
}

// The one-lane set whose float16 and bfloat16 conversions are Convert's: Convert::load<DT>(base, i) -> float and
// Convert::store<DT>(base, i, float) for DT kF16 and kBF16. Each build passes its own Convert: its instantiation,
// compiled for AVX2 in the AVX2 build, is then never the copy the linker keeps for the scalar build.
template <typename Convert>
struct OneLane {
  using Value = float;
  static constexpr int kWidth = 1;

  template <int DT>
  static float load(const void* base, int64_t i) {
    if constexpr (DT == kF32) {
      return static_cast<const float*>(base)[i];
    } else {
      return Convert::template load<DT>(base, i);
    }
  }

  template <int DT>
  static void store(void* base, int64_t i, float x) {
    if constexpr (DT == kF32) {
      static_cast<float*>(base)[i] = x;
    } else {
      Convert::template store<DT>(base, i, x);
    }
  }

  static float zero() { return 0.f; }
  static float sum(float x) { return x; }
};

// The kernels for a wide lane set W and its one-lane twin O (see the top of the file).
template <typename W, typename O>
struct Segments {
  template <typename L, int DT>
  static VITOPS_MATH void sq_sum_at(const void* x, int64_t i, typename L::Value& acc) {
    const auto v = L::template load<DT>(x, i);
    acc = acc + v * v;
  }

  template <int DT>
  static double sq_sum_of(const void* x, int64_t n) {
    auto acc = W::zero();
    float tail = 0.f;
    int64_t i = 0;
    for (; i + W::kWidth <= n; i += W::kWidth) {
      sq_sum_at<W, DT>(x, i, acc);
    }
    for (; i < n; ++i) {
      sq_sum_at<O, DT>(x, i, tail);
    }
    return double(W::sum(acc)) + double(tail);
  }

  template <typename L, int DT, bool FINISH>
  static VITOPS_MATH void lamb_moments_at(
      const lamb::Constants& k, float inv_clip, void* p, const void* g, float* m, float* v, int64_t i,
      typename L::Value& acc_p, typename L::Value& acc_u) {
    const auto grad = L::template load<DT>(g, i) * inv_clip;
    const auto m1 = lamb::first_moment(k, L::template load<kF32>(m, i), grad);
    const auto v1 = lamb::second_moment(k, L::template load<kF32>(v, i), grad);
    L::template store<kF32>(m, i, m1);
    L::template store<kF32>(v, i, v1);
    const auto pd = lamb::decayed(k, L::template load<DT>(p, i));
    const auto u = lamb::update(k, m1, v1, pd);
    acc_p = acc_p + pd * pd;
    acc_u = acc_u + u * u;
    if (FINISH) {
      L::template store<DT>(p, i, lamb::apply(k, pd, u, 1.f));
    }
  }

  template <int DT, bool FINISH>
  static void lamb_moments_of(
      const lamb::Constants& k, float inv_clip, void* p, const void* g, float* m, float* v, int64_t n,
      double* sums) {
    auto acc_p = W::zero(), acc_u = W::zero();
    float tail_p = 0.f, tail_u = 0.f;
    int64_t i = 0;
    for (; i + W::kWidth <= n; i += W::kWidth) {
      lamb_moments_at<W, DT, FINISH>(k, inv_clip, p, g, m, v, i, acc_p, acc_u);
    }
    for (; i < n; ++i) {
      lamb_moments_at<O, DT, FINISH>(k, inv_clip, p, g, m, v, i, tail_p, tail_u);
    }
    sums[0] = double(W::sum(acc_p)) + double(tail_p);
    sums[1] = double(W::sum(acc_u)) + double(tail_u);
  }

  template <typename L, int DT>
  static VITOPS_MATH void lamb_apply_at(
      const lamb::Constants& k, float ratio, void* p, const float* m, const float* v, int64_t i) {
    const auto pd = lamb::decayed(k, L::template load<DT>(p, i));
    const auto u = lamb::update(k, L::template load<kF32>(m, i), L::template load<kF32>(v, i), pd);
    L::template store<DT>(p, i, lamb::apply(k, pd, u, ratio));
  }

  template <int DT>
  static void lamb_apply_of(
      const lamb::Constants& k, float ratio, void* p, const float* m, const float* v, int64_t n) {
    int64_t i = 0;
    for (; i + W::kWidth <= n; i += W::kWidth) {
      lamb_apply_at<W, DT>(k, ratio, p, m, v, i);
    }
    for (; i < n; ++i) {
      lamb_apply_at<O, DT>(k, ratio, p, m, v, i);
    }
  }

  template <typename L, int DT, bool PROJECTABLE>
  static VITOPS_MATH void adamp_moments_at(
      const adamp::Constants& k, const adamp::StepConstants& s, void* p, const void* g, float* m, float* v,
      int64_t i, typename L::Value (&acc)[4]) {
    const auto grad = L::template load<DT>(g, i);
    const auto pv = L::template load<DT>(p, i);
    const auto m1 = adamp::first_moment(k, L::template load<kF32>(m, i), grad);
    const auto v1 = adamp::second_moment(k, L::template load<kF32>(v, i), grad);
    L::template store<kF32>(m, i, m1);
    L::template store<kF32>(v, i, v1);
    const auto q = adamp::direction(k, s, m1, v1, grad);
    if (PROJECTABLE) {
      acc[0] = acc[0] + grad * pv;
      acc[1] = acc[1] + grad * grad;
      acc[2] = acc[2] + pv * pv;
      acc[3] = acc[3] + pv * q;
    } else {
      L::template store<DT>(p, i, adamp::apply(s, pv, q, k.plain_factor, 0.f));
    }
  }

  template <int DT, bool PROJECTABLE>
  static void adamp_moments_of(
      const adamp::Constants& k, const adamp::StepConstants& s, void* p, const void* g, float* m, float* v,
      int64_t n, double* sums) {
    typename W::Value acc[4] = {W::zero(), W::zero(), W::zero(), W::zero()};
    float tail[4] = {0.f, 0.f, 0.f, 0.f};
    int64_t i = 0;
    for (; i + W::kWidth <= n; i += W::kWidth) {
      adamp_moments_at<W, DT, PROJECTABLE>(k, s, p, g, m, v, i, acc);
    }
    for (; i < n; ++i) {
      adamp_moments_at<O, DT, PROJECTABLE>(k, s, p, g, m, v, i, tail);
    }
    if (PROJECTABLE) {
      for (int q = 0; q < 4; ++q) {
        sums[q] = double(W::sum(acc[q])) + double(tail[q]);
      }
    }
  }

  template <typename L, int DT>
  static VITOPS_MATH void adamp_apply_at(
      const adamp::Constants& k, const adamp::StepConstants& s, float factor, float coef, void* p, const void* g,
      const float* m, const float* v, int64_t i) {
    const auto grad = k.nesterov ? L::template load<DT>(g, i) : L::zero();
    const auto q = adamp::direction(k, s, L::template load<kF32>(m, i), L::template load<kF32>(v, i), grad);
    L::template store<DT>(p, i, adamp::apply(s, L::template load<DT>(p, i), q, factor, coef));
  }

  template <int DT>
  static void adamp_apply_of(
      const adamp::Constants& k, const adamp::StepConstants& s, float factor, float coef, void* p, const void* g,
      const float* m, const float* v, int64_t n) {
    int64_t i = 0;
    for (; i + W::kWidth <= n; i += W::kWidth) {
      adamp_apply_at<W, DT>(k, s, factor, coef, p, g, m, v, i);
    }
    for (; i < n; ++i) {
      adamp_apply_at<O, DT>(k, s, factor, coef, p, g, m, v, i);
    }
  }

  // The entry points: the dtype (and the flags that choose a loop) become template arguments here.
  static double sq_sum(int dtype, const void* x, int64_t n) {
    switch (dtype) {
      case kF32: return sq_sum_of<kF32>(x, n);
      case kF16: return sq_sum_of<kF16>(x, n);
      default: return sq_sum_of<kBF16>(x, n);
    }
  }

  template <bool FINISH>
  static void lamb_moments_finish(
      const lamb::Constants& k, float inv_clip, int dtype, void* p, const void* g, float* m, float* v, int64_t n,
      double* sums) {
    switch (dtype) {
      case kF32: return lamb_moments_of<kF32, FINISH>(k, inv_clip, p, g, m, v, n, sums);
      case kF16: return lamb_moments_of<kF16, FINISH>(k, inv_clip, p, g, m, v, n, sums);
      default: return lamb_moments_of<kBF16, FINISH>(k, inv_clip, p, g, m, v, n, sums);
    }
  }

  static void lamb_moments(
      const lamb::Constants& k, float inv_clip, bool finish, int dtype, void* p, const void* g, float* m, float* v,
      int64_t n, double* sums) {
    if (finish) {
      lamb_moments_finish<true>(k, inv_clip, dtype, p, g, m, v, n, sums);
    } else {
      lamb_moments_finish<false>(k, inv_clip, dtype, p, g, m, v, n, sums);
    }
  }

  static void lamb_apply(
      const lamb::Constants& k, float ratio, int dtype, void* p, const float* m, const float* v, int64_t n) {
    switch (dtype) {
      case kF32: return lamb_apply_of<kF32>(k, ratio, p, m, v, n);
      case kF16: return lamb_apply_of<kF16>(k, ratio, p, m, v, n);
      default: return lamb_apply_of<kBF16>(k, ratio, p, m, v, n);
    }
  }

  template <bool PROJECTABLE>
  static void adamp_moments_projectable(
      const adamp::Constants& k, const adamp::StepConstants& s, int dtype, void* p, const void* g, float* m,
      float* v, int64_t n, double* sums) {
    switch (dtype) {
      case kF32: return adamp_moments_of<kF32, PROJECTABLE>(k, s, p, g, m, v, n, sums);
      case kF16: return adamp_moments_of<kF16, PROJECTABLE>(k, s, p, g, m, v, n, sums);
      default: return adamp_moments_of<kBF16, PROJECTABLE>(k, s, p, g, m, v, n, sums);
    }
  }

  static void adamp_moments(
      const adamp::Constants& k, const adamp::StepConstants& s, bool projectable, int dtype, void* p,
      const void* g, float* m, float* v, int64_t n, double* sums) {
    if (projectable) {
      adamp_moments_projectable<true>(k, s, dtype, p, g, m, v, n, sums);
    } else {
      adamp_moments_projectable<false>(k, s, dtype, p, g, m, v, n, sums);
    }
  }

  static void adamp_apply(
      const adamp::Constants& k, const adamp::StepConstants& s, float factor, float coef, int dtype, void* p,
      const void* g, const float* m, const float* v, int64_t n) {
    switch (dtype) {
      case kF32: return adamp_apply_of<kF32>(k, s, factor, coef, p, g, m, v, n);
      case kF16: return adamp_apply_of<kF16>(k, s, factor, coef, p, g, m, v, n);
      default: return adamp_apply_of<kBF16>(k, s, factor, coef, p, g, m, v, n);
    }
  }

  static SegmentKernels table() {
    return SegmentKernels{&sq_sum, &lamb_moments, &lamb_apply, &adamp_moments, &adamp_apply};
  }
};

}  // namespace cpu
}  // namespace vitops
