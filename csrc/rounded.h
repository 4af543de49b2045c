#pragma once
// Float arithmetic that rounds every operation to nearest and never fuses a multiply and an add, the same on the
// host and on a CUDA device. The optimizers' per-element math (lamb.h, adamp.h) is written once, as templates
// over the value type, and instantiated with:
//   float          the CPU kernels' scalar code and the CUDA kernels' CPU emulation (host code is compiled with
//                  -ffp-contract=off);
//   RoundedFloat   the CUDA kernels, whose operators are the _rn intrinsics (nvcc contracts a * b + c into an FMA
//                  unless told otherwise);
//   Lanes8         eight AVX2 lanes (csrc/cpu/optim_avx2.cpp).
// So every compiled backend computes the same bits per element. No ATen: the emulation and the AVX2 file include
// this.
#include <c10/macros/Macros.h>

#include <cmath>

// Every function of the shared math is inlined where it is used: optim_avx2.cpp, compiled for AVX2, includes it,
// and an out-of-line copy of it could otherwise be the one the linker keeps for code running on older CPUs.
#if defined(__CUDACC__)
#define VITOPS_MATH C10_HOST_DEVICE __forceinline__
#else
#define VITOPS_MATH inline __attribute__((always_inline))
#endif

namespace vitops {

VITOPS_MATH float sqrt_rn(float x) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

// A float whose +, -, *, / and sqrt_rn are IEEE round-to-nearest on their own, on the host and on the device.
struct RoundedFloat {
  float value;
  VITOPS_MATH RoundedFloat(float x) : value(x) {}  // implicit, so that `x * 0.5f` reads as it computes
};

VITOPS_MATH RoundedFloat operator+(RoundedFloat a, RoundedFloat b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a.value, b.value);
#else
  return a.value + b.value;
#endif
}

VITOPS_MATH RoundedFloat operator-(RoundedFloat a, RoundedFloat b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a.value, b.value);
#else
  return a.value - b.value;
#endif
}

VITOPS_MATH RoundedFloat operator*(RoundedFloat a, RoundedFloat b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a.value, b.value);
#else
  return a.value * b.value;
#endif
}

VITOPS_MATH RoundedFloat operator/(RoundedFloat a, RoundedFloat b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a.value, b.value);
#else
  return a.value / b.value;
#endif
}

VITOPS_MATH RoundedFloat sqrt_rn(RoundedFloat x) {
  return sqrt_rn(x.value);
}

}  // namespace vitops
