#pragma once
// AdamP's arithmetic (timm.optim.AdamP), written once for every compiled backend: the CPU kernels
// (csrc/cpu/adamp.cpp, scalar and AVX2), the CUDA kernels (csrc/cuda/adamp.cuh) and their CPU emulation. No ATen.
// vitops/ops/triton/adamp.py writes the same operations, in the same order, in Triton; vitops/optim/reference.py
// is the specification all of them are tested against.
//
// Per element of a param p with grad g and moments m, v:
//   m = m * beta1 + (1 - beta1) * g;   v = v * beta2 + (1 - beta2) * g * g
//   q = m / (sqrt(v) * inv_sqrt_bc2 + eps)   (nesterov: (beta1 * m + (1 - beta1) * g) / (...))
//   p = p * factor + (-lr / bc1) * (q - p * coef)
// factor is 1 - lr * wd (1 - lr * wd * wd_ratio for a projected param, 1 without weight decay) and coef the
// projection coefficient of the element's row, 0 without projection: then the term is left out, as timm leaves it
// out (p * 0 would make an inf param NaN). Every operation rounds to float
// (rounded.h); dividing by sqrt(bc2) is multiplying by its float reciprocal (see lamb.h for why).
//
// The projection (params of 2 or more dims): rows are the param's size(0) channels. Per row, from the sums
// g.p, g.g, p.p and p.q over the row, timm's cosine test |cos(g, p)| < delta / sqrt(row length). If every row
// passes, each row is projected with its own coef = p.q / (||p_row|| + eps)^2; else if the whole tensor passes
// the same test (delta / sqrt(numel)), every row takes the tensor's coef; else none is projected. The cosines are
// computed in double from the float sums.
#include "rounded.h"

#include <cstdint>

namespace vitops {
namespace adamp {

enum Projection : int { kNone = 0, kChannel = 1, kLayer = 2 };

// Per-tensor sums of the moments stage (adamp_moments' second output): g.p, g.g, p.p, p.q over the tensor, and
// the number of its rows that fail the channel-wise test.
constexpr int kTensorSums = 5;

// The per-step constants, from the hyperparameters every AdamP op takes (vitops/ops/schemas.def).
struct Constants {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
  float plain_factor;      // 1 - lr * wd (1 without weight decay)
  float projected_factor;  // 1 - lr * wd * wd_ratio (1 without weight decay)
  double delta;
  double eps_double;       // the cosines are computed in double
  bool nesterov;
};

VITOPS_MATH Constants make_constants(
    double lr, double beta1, double beta2, double eps, double weight_decay, double delta, double wd_ratio,
    bool nesterov) {
  Constants k;
  k.beta1 = float(beta1);
  k.one_minus_beta1 = float(1.0 - beta1);
  k.beta2 = float(beta2);
  k.one_minus_beta2 = float(1.0 - beta2);
  k.eps = float(eps);
  const bool decay = weight_decay > 0.0;
  k.plain_factor = decay ? float(1.0 - lr * weight_decay) : 1.f;
  k.projected_factor = decay ? float(1.0 - lr * weight_decay * wd_ratio) : 1.f;
  k.delta = delta;
  k.eps_double = eps;
  k.nesterov = nesterov;
  return k;
}

// What differs per tensor: AdamP counts steps per param.
struct StepConstants {
  float inv_sqrt_bc2;
  float neg_step;  // -lr / bc1
};

VITOPS_MATH StepConstants step_constants(double lr, double bias_correction1, double bias_correction2) {
  return StepConstants{float(1.0 / std::sqrt(bias_correction2)), float(-(lr / bias_correction1))};
}

template <typename X>
VITOPS_MATH X first_moment(const Constants& k, X m, X g) {
  return m * k.beta1 + k.one_minus_beta1 * g;
}

template <typename X>
VITOPS_MATH X second_moment(const Constants& k, X v, X g) {
  return v * k.beta2 + k.one_minus_beta2 * g * g;
}

// q, the Adam direction, from the new moments (and the grad, for nesterov).
template <typename X>
VITOPS_MATH X direction(const Constants& k, const StepConstants& s, X m, X v, X g) {
  const X denom = sqrt_rn(v) * s.inv_sqrt_bc2 + k.eps;
  return k.nesterov ? (k.beta1 * m + k.one_minus_beta1 * g) / denom : m / denom;
}

// The new param (coef 0: not projected).
template <typename X>
VITOPS_MATH X apply(const StepConstants& s, X p, X q, float factor, float coef) {
  return p * factor + s.neg_step * (coef == 0.f ? q : q - p * coef);
}

VITOPS_MATH double cosine(double gp, double gg, double pp, double eps) {
  const double g_norm = std::sqrt(gg), p_norm = std::sqrt(pp);
  return std::fabs(gp) / ((g_norm > eps ? g_norm : eps) * (p_norm > eps ? p_norm : eps));
}

// timm's test of one view of `view_len` elements per row: |cos| < delta / sqrt(view_len), compared in float as
// the reference compares a float tensor with a Python float. NaN fails.
VITOPS_MATH bool passes(double cos, double delta, int64_t view_len) {
  return float(cos) < float(delta / std::sqrt(double(view_len)));
}

// p.q / (||p|| + eps)^2: projecting q off p_n = p / (||p|| + eps) is q - p * coef. Divided twice: (||p|| + eps)^2
// underflows for a zero row and a tiny eps.
VITOPS_MATH float projection_coef(double pq, double pp, double eps) {
  const double norm = std::sqrt(pp) + eps;
  return float(pq / norm / norm);
}

// The projection a tensor of `numel` elements (over all ranks) takes, from its sums (kTensorSums values, summed
// over all ranks).
VITOPS_MATH int projection(const float* sums, const Constants& k, int64_t numel) {
  if (sums[4] == 0.f) {
    return kChannel;
  }
  return passes(cosine(sums[0], sums[1], sums[2], k.eps_double), k.delta, numel) ? kLayer : kNone;
}

}  // namespace adamp
}  // namespace vitops
