// The optimizer ops' segment kernels (optim_segments.h) on eight plain floats, for CPUs without AVX2 (the compiler
// vectorizes what the target allows). Same operations, in the same order, as the AVX2 build: the two give the
// same bits (tests/optim/test_optim_lanes.py).
#include "optim_segments.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace vitops {
namespace cpu {
namespace scalar {

// One float16 or bfloat16 element at a time: c10's conversions.
struct Convert {
  template <int DT>
  static float load(const void* base, int64_t i) {
    if constexpr (DT == kF16) {
      return static_cast<float>(static_cast<const c10::Half*>(base)[i]);
    } else {
      return static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]);
    }
  }

  template <int DT>
  static void store(void* base, int64_t i, float x) {
    if constexpr (DT == kF16) {
      static_cast<c10::Half*>(base)[i] = c10::Half(x);
    } else {
      static_cast<c10::BFloat16*>(base)[i] = c10::BFloat16(x);
    }
  }
};

using One = OneLane<Convert>;

// Eight floats, each operation lane by lane.
struct Float8 {
  float v[8];
  Float8() = default;
  Float8(float x) {  // implicit: `x * 0.5f` broadcasts
    for (int l = 0; l < 8; ++l) v[l] = x;
  }
};

#define VITOPS_FLOAT8_OP(op)                                  \
  inline Float8 operator op(const Float8& a, const Float8& b) { \
    Float8 r;                                                 \
    for (int l = 0; l < 8; ++l) r.v[l] = a.v[l] op b.v[l];    \
    return r;                                                 \
  }
VITOPS_FLOAT8_OP(+)
VITOPS_FLOAT8_OP(-)
VITOPS_FLOAT8_OP(*)
VITOPS_FLOAT8_OP(/)
#undef VITOPS_FLOAT8_OP

inline Float8 sqrt_rn(const Float8& a) {
  Float8 r;
  for (int l = 0; l < 8; ++l) r.v[l] = vitops::sqrt_rn(a.v[l]);
  return r;
}

struct Wide {
  using Value = Float8;
  static constexpr int kWidth = 8;

  template <int DT>
  static Value load(const void* base, int64_t i) {
    Value x;
    for (int l = 0; l < 8; ++l) x.v[l] = One::load<DT>(base, i + l);
    return x;
  }

  template <int DT>
  static void store(void* base, int64_t i, const Value& x) {
    for (int l = 0; l < 8; ++l) One::store<DT>(base, i + l, x.v[l]);
  }

  static Value zero() { return Value(0.f); }

  static float sum(const Value& x) {
    float s = 0.f;
    for (int l = 0; l < 8; ++l) s += x.v[l];
    return s;
  }
};

}  // namespace scalar

const SegmentKernels& scalar_kernels() {
  static const SegmentKernels kernels = Segments<scalar::Wide, scalar::One>::table();
  return kernels;
}

}  // namespace cpu
}  // namespace vitops
