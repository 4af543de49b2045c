#pragma once
// Float arithmetic that rounds every operation to nearest and never fuses a multiply and an add, the same on the
// host and on a CUDA device. The per-element math of the ops (lamb.h, adamp.h, drop_path_add.h, fuse_conv_bn.h) is
// written once, as templates over the value type; the optimizers' is instantiated with:
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

// The operations rounded to nearest, by overload on the value type (float or double): on a CUDA device the _rn
// intrinsics, on the host the plain operations.
namespace rn {
#ifdef __CUDA_ARCH__
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt(float x) { return __fsqrt_rn(x); }
__device__ __forceinline__ double sqrt(double x) { return __dsqrt_rn(x); }
#else
template <typename T>
VITOPS_MATH T add(T a, T b) { return a + b; }
template <typename T>
VITOPS_MATH T sub(T a, T b) { return a - b; }
template <typename T>
VITOPS_MATH T mul(T a, T b) { return a * b; }
template <typename T>
VITOPS_MATH T div(T a, T b) { return a / b; }
template <typename T>
VITOPS_MATH T sqrt(T x) { return std::sqrt(x); }
#endif
}  // namespace rn

VITOPS_MATH float sqrt_rn(float x) { return rn::sqrt(x); }
VITOPS_MATH double sqrt_rn(double x) { return rn::sqrt(x); }

// A T (float or double) whose +, -, *, / and sqrt_rn are IEEE round-to-nearest on their own, on the host and on
// the device. The operators are friends defined in the class, so that the other operand converts to Rounded:
// `x * 0.5f` reads as it computes.
template <typename T>
struct Rounded {
  T value;
  VITOPS_MATH Rounded(T x) : value(x) {}

  friend VITOPS_MATH Rounded operator+(Rounded a, Rounded b) { return rn::add(a.value, b.value); }
  friend VITOPS_MATH Rounded operator-(Rounded a, Rounded b) { return rn::sub(a.value, b.value); }
  friend VITOPS_MATH Rounded operator*(Rounded a, Rounded b) { return rn::mul(a.value, b.value); }
  friend VITOPS_MATH Rounded operator/(Rounded a, Rounded b) { return rn::div(a.value, b.value); }
  friend VITOPS_MATH Rounded sqrt_rn(Rounded x) { return rn::sqrt(x.value); }
};

using RoundedFloat = Rounded<float>;
using RoundedDouble = Rounded<double>;

}  // namespace vitops
