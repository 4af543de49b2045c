#pragma once
// The AVX2 kernels of the fused optimizer steps (csrc/cpu/optim_avx2.cpp). That file is compiled for AVX2 and
// F16C as a whole, so it includes no ATen or c10 header (their inline functions must not be emitted with AVX2
// instructions): everything crosses this boundary as raw pointers and plain structs. Callers check has_avx2().
#include <cstdint>

namespace vitops {
namespace cpu {
namespace simd {

enum Dtype : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum MomentMode : int { kLerpLow = 0, kLerpHigh = 1, kMulAdd = 2 };

struct LambArgs {
  float clip;
  float beta1, beta2, beta3, one_minus_beta3, one_minus_beta2;
  float bc1, sqrt_bc2, eps;
  float neg_decay;   // -decay_scale * wd when decoupled, else 0
  float coupled_wd;  // wd when not decoupled, else 0
  float neg_lr;
};

struct AdamPArgs {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
  float sqrt_bc2;  // per tensor
  float neg_step;  // -lr / bc1, per tensor
  float factor;    // 1 - lr * wd * wd_ratio (or 1), per tensor
};

bool has_avx2();

// STAGE 0: single pass; 1: moments and sums (LAMB: p'.p', u.u; AdamP: g.p, g.g, p.p, p.q); 2: apply.
void lamb_segment_avx2(
    const LambArgs& k, int dtype, int mode, int stage, void* p, const void* g, float* m, float* v, int64_t n,
    float ratio, double* sums);
void adamp_segment_avx2(
    const AdamPArgs& k, int dtype, bool nesterov, int stage, void* p, const void* g, float* m, float* v,
    int64_t n, float coef, double* sums);

}  // namespace simd
}  // namespace cpu
}  // namespace vitops
