#pragma once
// LAMB's arithmetic (timm.optim.Lamb, the NVLAMB form), written once for every compiled backend: the CPU kernels
// (csrc/cpu/lamb.cpp, scalar and AVX2), the CUDA kernels (csrc/cuda/lamb.cuh) and their CPU emulation. No ATen.
// vitops/ops/triton/lamb.py writes the same operations, in the same order, in Triton; vitops/optim/reference.py is
// the specification all of them are tested against.
//
// Per element of a param p with grad g and moments m, v (the ops are described in vitops/ops/schemas.def):
//   g = g * inv_clip                                   inv_clip = 1 / max(1, ||all grads|| / max_grad_norm)
//   m = lerp(m, g, beta3)  (m * beta1 + beta3 * g without grad averaging)
//   v = v * beta2 + (1 - beta2) * g * g
//   p' = p + p * (-decay_scale * wd)                   decoupled weight decay; p' = p otherwise
//   u = (m * inv_bc1) / (sqrt(v) * inv_sqrt_bc2 + eps) + wd * p'      the wd term only for coupled decay
// A term whose coefficient is 0 is left out, as timm leaves it out: p * 0 would make an inf param NaN.
//   p = p' + (-lr) * (u * ratio)                       ratio: the trust ratio ||p'|| / ||u||, or 1
// Every operation rounds to float (rounded.h). Division by a per-step constant (the clip coefficient, bc1,
// sqrt(bc2)) is multiplication by its float reciprocal, as torch's CUDA kernels divide by a scalar: each differs
// from the reference's division by at most one ulp, and a CPU kernel bound by its divides does three fewer per
// element. The one division per element, by the denominator, is a true division.
#include "rounded.h"

namespace vitops {
namespace lamb {

// How m moves towards g, following the reference's torch op: lerp, whose formula depends on the weight beta3, or
// m * beta1 + beta3 * g without grad averaging.
enum MomentMode : int { kLerpLow = 0, kLerpHigh = 1, kMulAdd = 2 };

// The per-step constants, from the hyperparameters every LAMB op takes (vitops/ops/schemas.def).
struct Constants {
  float beta1, beta2, beta3, one_minus_beta3, one_minus_beta2;
  float inv_bc1, inv_sqrt_bc2, eps;
  float neg_decay;   // -decay_scale * weight_decay with decoupled decay, else 0
  float coupled_wd;  // weight_decay without decoupled decay, else 0
  float neg_lr;
  int mode;  // MomentMode
};

VITOPS_MATH Constants make_constants(
    double lr, double beta1, double beta2, double beta3, double bias_correction1, double bias_correction2,
    double eps, double weight_decay, double decay_scale, bool decoupled_decay) {
  Constants k;
  k.beta1 = float(beta1);
  k.beta2 = float(beta2);
  k.beta3 = float(beta3);
  k.one_minus_beta3 = 1.f - float(beta3);  // as torch.lerp computes it
  k.one_minus_beta2 = float(1.0 - beta2);
  k.inv_bc1 = float(1.0 / bias_correction1);
  k.inv_sqrt_bc2 = float(1.0 / std::sqrt(bias_correction2));
  k.eps = float(eps);
  const bool decay = weight_decay != 0.0;
  k.neg_decay = decay && decoupled_decay ? float(-decay_scale * weight_decay) : 0.f;
  k.coupled_wd = decay && !decoupled_decay ? float(weight_decay) : 0.f;
  k.neg_lr = float(-lr);
  k.mode = beta3 == 1.0 - beta1 ? (beta3 < 0.5 ? kLerpLow : kLerpHigh) : kMulAdd;
  return k;
}

// 1 / max(1, sqrt(grad_sq_sum) / max_grad_norm), from the sum of squares of every grad of the step.
VITOPS_MATH float inverse_clip(float grad_sq_sum, float max_grad_norm) {
  const RoundedFloat coef = sqrt_rn(RoundedFloat(grad_sq_sum)) / max_grad_norm;
  return (1.f / RoundedFloat(coef.value < 1.f ? 1.f : coef.value)).value;  // NaN stays NaN, as clamp_(min=1)
}

template <typename X>
VITOPS_MATH X first_moment(const Constants& k, X m, X g) {
  if (k.mode == kLerpLow) {
    return m + k.beta3 * (g - m);
  }
  if (k.mode == kLerpHigh) {
    return g - (g - m) * k.one_minus_beta3;
  }
  return m * k.beta1 + k.beta3 * g;
}

template <typename X>
VITOPS_MATH X second_moment(const Constants& k, X v, X g) {
  return v * k.beta2 + k.one_minus_beta2 * g * g;
}

// p', the param after decoupled weight decay.
template <typename X>
VITOPS_MATH X decayed(const Constants& k, X p) {
  return k.neg_decay == 0.f ? p : p + p * k.neg_decay;
}

// u, the update direction before the trust ratio, from the new moments and p'.
template <typename X>
VITOPS_MATH X update(const Constants& k, X m, X v, X p_decayed) {
  const X u = (m * k.inv_bc1) / (sqrt_rn(v) * k.inv_sqrt_bc2 + k.eps);
  return k.coupled_wd == 0.f ? u : u + k.coupled_wd * p_decayed;
}

// The new param. ratio is 1 without layer adaptation (u * 1 is u).
template <typename X>
VITOPS_MATH X apply(const Constants& k, X p_decayed, X u, float ratio) {
  return p_decayed + k.neg_lr * (u * ratio);
}

// ||p'|| / ||u|| from the two sums of squares over the whole tensor; 1 where either norm is 0; at most 1 with
// trust_clip (LAMBC).
VITOPS_MATH float trust_ratio(float p_sq_sum, float u_sq_sum, bool trust_clip) {
  const RoundedFloat w_norm = sqrt_rn(RoundedFloat(p_sq_sum));
  const RoundedFloat u_norm = sqrt_rn(RoundedFloat(u_sq_sum));
  const float ratio = w_norm.value > 0.f && u_norm.value > 0.f ? (w_norm / u_norm).value : 1.f;
  return trust_clip && ratio > 1.f ? 1.f : ratio;  // NaN stays NaN, as clamp(max=1)
}

}  // namespace lamb
}  // namespace vitops
