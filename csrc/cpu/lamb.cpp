// CPU kernels of lamb_step. Pass 1 updates the moments, saves the update u to a scratch buffer and sums
// ||p'||^2 and ||u||^2 per tensor; pass 2 applies p = p' - lr * trust_ratio * u. Both passes run per cache-sized
// group of tensors (multi_tensor.h), so pass 2 reads p and u back from the cache. Without layer adaptation
// (weight_decay == 0 and not always_adapt) the whole step is one pass.
//
// Per element, in timm's order of operations (each op rounded to float, never contracted; dividing by clip, bc1
// and sqrt(bc2) is multiplying by their reciprocals):
//   g = grad / clip;  m = lerp(m, g, beta3) (or m * beta1 + beta3 * g);  v = v * beta2 + (1 - beta2) * g * g
//   u = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps);  p' = p + p * (-decay_scale * wd) [decoupled]
//   u = u + wd * p' [coupled];  p = p' + (-lr) * (u * ratio)
#include "../optim.h"
#include "multi_tensor.h"
#include "optim_simd_dtype.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

namespace vitops {
namespace cpu {
namespace {

using simd::kLerpHigh;
using simd::kLerpLow;
using simd::kMulAdd;
using LambConsts = simd::LambArgs;

template <int MODE>
inline __attribute__((always_inline)) float moment1(const LambConsts& k, float m, float g) {
  if constexpr (MODE == kLerpLow) {
    return m + k.beta3 * (g - m);
  } else if constexpr (MODE == kLerpHigh) {
    return g - (g - m) * k.one_minus_beta3;
  } else {
    return m * k.beta1 + k.beta3 * g;
  }
}

inline __attribute__((always_inline)) float lamb_update(const LambConsts& k, float m, float v, float pd) {
  const float denom = std::sqrt(v) * k.inv_sqrt_bc2 + k.eps;
  const float u = (m * k.inv_bc1) / denom;
  return u + k.coupled_wd * pd;
}

// STAGE 0: single pass (no adaptation): moments and param. STAGE 1: moments, u saved to `ub`, and the two sums
// of squares. STAGE 2: param from the saved u and the tensor's trust ratio.
template <typename T, int MODE, int STAGE>
inline __attribute__((always_inline)) void lamb_segment_body(
    const LambConsts& k, T* __restrict p, const T* __restrict grad, float* __restrict m, float* __restrict v,
    float* __restrict ub, int64_t n, float ratio, double* sums) {
  float acc_pp[kLanes] = {0.f};
  float acc_uu[kLanes] = {0.f};
  const float scaled_lr = k.neg_lr;
  auto element = [&](int64_t i, int lane) __attribute__((always_inline)) {
    const float pv = load_float(p[i]);
    const float pd = pv + pv * k.neg_decay;
    if constexpr (STAGE == 2) {
      p[i] = store_as<T>(pd + scaled_lr * (ub[i] * ratio));
    } else {
      const float g = load_float(grad[i]) * k.inv_clip;
      const float mi = moment1<MODE>(k, m[i], g);
      const float vi = v[i] * k.beta2 + k.one_minus_beta2 * g * g;
      m[i] = mi;
      v[i] = vi;
      const float u = lamb_update(k, mi, vi, pd);
      if constexpr (STAGE == 1) {
        acc_pp[lane] += pd * pd;
        acc_uu[lane] += u * u;
        ub[i] = u;
      } else {
        p[i] = store_as<T>(pd + scaled_lr * u);
      }
    }
  };
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      element(j + l, l);
    }
  }
  for (; j < n; ++j) {
    element(j, 0);
  }
  if constexpr (STAGE == 1) {
    double pp = 0, uu = 0;
    for (int l = 0; l < kLanes; ++l) {
      pp += acc_pp[l];
      uu += acc_uu[l];
    }
    sums[0] = pp;
    sums[1] = uu;
  }
}

// The AVX2 kernels where the CPU has them, else the scalar ones (same operations, same order).
template <typename T, int MODE, int STAGE>
void lamb_segment(
    const LambConsts& k, T* p, const T* g, float* m, float* v, float* u, int64_t n, float r, double* s) {
  static const bool avx2 = simd::has_avx2();
  if (avx2) {
    simd::lamb_segment_avx2(k, simd_dtype<T>(), MODE, STAGE, p, g, m, v, u, n, r, s);
  } else {
    lamb_segment_body<T, MODE, STAGE>(k, p, g, m, v, u, n, r, s);
  }
}

template <int STAGE>
void run_stage(
    const ChunkPlan& plan, const LambConsts& k, int mode, at::TensorList params, at::TensorList grads,
    at::TensorList exp_avgs, at::TensorList exp_avg_sqs, const std::vector<float>& ratios,
    std::vector<double>* partials, float* scratch, const std::vector<int64_t>& offsets) {
  for_each_segment(plan, [&](const Chunk& c, int64_t begin, int64_t end, int64_t slot) {
    const int t = c.tensor;
    const auto& param = params[t];
    float* m = exp_avgs[t].mutable_data_ptr<float>() + begin;
    float* v = exp_avg_sqs[t].mutable_data_ptr<float>() + begin;
    const float r = STAGE == 2 ? ratios[t] : 1.f;
    double* s = partials ? partials->data() + 2 * slot : nullptr;
    float* u = scratch ? scratch + offsets[t] + begin : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "vitops::lamb_step", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        scalar_t* p = param.mutable_data_ptr<scalar_t>() + begin;
        const scalar_t* g = grads[t].const_data_ptr<scalar_t>() + begin;
        switch (mode) {
          case kLerpLow:
            lamb_segment<scalar_t, kLerpLow, STAGE>(k, p, g, m, v, u, end - begin, r, s);
            break;
          case kLerpHigh:
            lamb_segment<scalar_t, kLerpHigh, STAGE>(k, p, g, m, v, u, end - begin, r, s);
            break;
          default:
            lamb_segment<scalar_t, kMulAdd, STAGE>(k, p, g, m, v, u, end - begin, r, s);
        }
      }
    });
  });
}

void lamb_pass(
    const LambConsts& k, int mode, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, bool adapt, bool trust_clip) {
  std::vector<int64_t> numel, rows;
  for (const auto& p : params) {
    numel.push_back(p.numel());
    rows.push_back(1);
  }
  const ChunkPlan plan = make_chunk_plan(numel, rows);
  std::vector<float> ratios(params.size(), 1.f);
  std::vector<int64_t> offsets(params.size() + 1, 0);
  for (size_t t = 0; t < params.size(); ++t) {
    offsets[t + 1] = offsets[t] + numel[t];
  }
  if (!adapt) {
    run_stage<0>(plan, k, mode, params, grads, exp_avgs, exp_avg_sqs, ratios, nullptr, nullptr, offsets);
    return;
  }
  // u of the whole group, from pass 1 to pass 2: it stays in cache (see for_each_cache_group).
  float* scratch = scratch_buffer(offsets.back());
  std::vector<double> partials(plan.slot_row.size() * 2, 0.0);
  run_stage<1>(plan, k, mode, params, grads, exp_avgs, exp_avg_sqs, ratios, &partials, scratch, offsets);
  const auto sums = reduce_slots(plan, partials, 2);
  for (size_t t = 0; t < params.size(); ++t) {
    const float w_norm = float(std::sqrt(sums[2 * t]));
    const float u_norm = float(std::sqrt(sums[2 * t + 1]));
    float r = (w_norm > 0.f && u_norm > 0.f) ? w_norm / u_norm : 1.f;
    if (trust_clip) {
      r = std::min(r, 1.f);
    }
    ratios[t] = r;
  }
  run_stage<2>(plan, k, mode, params, grads, exp_avgs, exp_avg_sqs, ratios, nullptr, scratch, offsets);
}

void lamb_step_cpu(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs,
    const std::optional<at::Tensor>& clip_coef,
    double lr,
    double beta1,
    double beta2,
    double beta3,
    double bias_correction1,
    double bias_correction2,
    double eps,
    double weight_decay,
    double decay_scale,
    bool decoupled_decay,
    bool adapt,
    bool trust_clip) {
  check_lamb_args(params, grads, exp_avgs, exp_avg_sqs, clip_coef);
  if (params.empty()) {
    return;
  }
  LambConsts k{};
  k.inv_clip = clip_coef.has_value() ? float(1.0 / double(clip_coef->item<float>())) : 1.f;
  k.beta1 = float(beta1);
  k.beta2 = float(beta2);
  k.beta3 = float(beta3);
  k.one_minus_beta3 = float(1.0 - beta3);
  k.one_minus_beta2 = float(1.0 - beta2);
  k.inv_bc1 = float(1.0 / bias_correction1);
  k.inv_sqrt_bc2 = float(1.0 / std::sqrt(bias_correction2));
  k.eps = float(eps);
  const bool decay = weight_decay != 0.0;
  k.neg_decay = decay && decoupled_decay ? float(-decay_scale * weight_decay) : 0.f;
  k.coupled_wd = decay && !decoupled_decay ? float(weight_decay) : 0.f;
  k.neg_lr = float(-lr);
  int mode = kMulAdd;
  if (beta3 == 1.0 - beta1) {
    mode = beta3 < 0.5 ? kLerpLow : kLerpHigh;
  }

  if (!(decay || adapt)) {  // one pass over everything
    lamb_pass(k, mode, params, grads, exp_avgs, exp_avg_sqs, false, trust_clip);
    return;
  }
  // Both passes per group of tensors small enough that the second pass finds them in cache.
  for_each_cache_group(params, [&](size_t first, size_t count) {
    lamb_pass(k, mode, params.slice(first, count), grads.slice(first, count), exp_avgs.slice(first, count),
              exp_avg_sqs.slice(first, count), true, trust_clip);
  });
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("lamb_step", &cpu::lamb_step_cpu);
}

}  // namespace vitops
