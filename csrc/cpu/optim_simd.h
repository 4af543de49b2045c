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

// Divisions by per-step constants (the clip coefficient, the bias corrections) are multiplications by their
// float reciprocals: within an ulp of timm's divisions, and half the divides, which bound these kernels on CPU.
struct LambArgs {
  float inv_clip;
  float beta1, beta2, beta3, one_minus_beta3, one_minus_beta2;
  float inv_bc1, inv_sqrt_bc2, eps;
  float neg_decay;   // -decay_scale * wd when decoupled, else 0
  float coupled_wd;  // wd when not decoupled, else 0
  float neg_lr;
};

struct AdamPArgs {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
  float inv_sqrt_bc2;  // per tensor
  float neg_step;  // -lr / bc1, per tensor
  float factor;    // 1 - lr * wd * wd_ratio (or 1), per tensor
};

bool has_avx2();

// STAGE 0: single pass; 1: moments, the update direction saved to `u` (LAMB's u, AdamP's q) and the sums (LAMB:
// p'.p', u.u; AdamP: g.p, g.g, p.p, p.q); 2: the param from the saved direction.
void lamb_segment_avx2(
    const LambArgs& k, int dtype, int mode, int stage, void* p, const void* g, float* m, float* v, float* u,
    int64_t n, float ratio, double* sums);
void adamp_segment_avx2(
    const AdamPArgs& k, int dtype, bool nesterov, int stage, void* p, const void* g, float* m, float* v, float* u,
    int64_t n, float coef, double* sums);

}  // namespace simd
}  // namespace cpu
}  // namespace vitops
