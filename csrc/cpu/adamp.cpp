// CPU kernels of adamp_step. Pass 1 updates the moments, saves the Adam direction q to a scratch buffer, and
// sums, per channel row of each param, g.p, g.g, p.p and p.q; from those, per tensor, the channel-wise and then
// the layer-wise cosine tests of timm's projection are decided and the projection coefficient of each row is
// known. Pass 2 applies p = p * (1 - lr * wd * wd_ratio) - (lr / bc1) * (q - p * coef_row). Params of one dim
// or fewer are never projected: they are finished in pass 1. Both passes run per cache-sized group of tensors.
//
// Per element, in timm's order of operations: m = m * beta1 + (1 - beta1) * g; v = v * beta2 + (1 - beta2) * g * g;
// q = m / (sqrt(v) / sqrt(bc2) + eps) (nesterov: (beta1 * m + (1 - beta1) * g) / (...)); dividing by sqrt(bc2)
// is multiplying by its reciprocal.
#include "../optim.h"
#include "multi_tensor.h"
#include "optim_simd_dtype.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

namespace vitops {
namespace cpu {
namespace {

using AdamPConsts = simd::AdamPArgs;

template <bool NESTEROV>
inline __attribute__((always_inline)) float adamp_direction(const AdamPConsts& k, float m, float v, float g) {
  const float denom = std::sqrt(v) * k.inv_sqrt_bc2 + k.eps;
  if constexpr (NESTEROV) {
    return (k.beta1 * m + k.one_minus_beta1 * g) / denom;
  } else {
    return m / denom;
  }
}

// STAGE 0: moments and param (no projection). STAGE 1: moments, q saved to `qb`, and the row sums g.p, g.g,
// p.p, p.q. STAGE 2: param from the saved q and the row's projection coefficient.
template <typename T, bool NESTEROV, int STAGE>
inline __attribute__((always_inline)) void adamp_segment_body(
    const AdamPConsts& k, T* __restrict p, const T* __restrict grad, float* __restrict m, float* __restrict v,
    float* __restrict qb, int64_t n, float coef, double* sums) {
  float acc_gp[kLanes] = {0.f}, acc_gg[kLanes] = {0.f}, acc_pp[kLanes] = {0.f}, acc_pq[kLanes] = {0.f};
  auto element = [&](int64_t i, int lane) __attribute__((always_inline)) {
    const float pv = load_float(p[i]);
    if constexpr (STAGE == 2) {
      p[i] = store_as<T>(pv * k.factor + k.neg_step * (qb[i] - pv * coef));
    } else {
      const float g = load_float(grad[i]);
      const float mi = m[i] * k.beta1 + k.one_minus_beta1 * g;
      const float vi = v[i] * k.beta2 + k.one_minus_beta2 * g * g;
      m[i] = mi;
      v[i] = vi;
      const float q = adamp_direction<NESTEROV>(k, mi, vi, g);
      if constexpr (STAGE == 1) {
        acc_gp[lane] += g * pv;
        acc_gg[lane] += g * g;
        acc_pp[lane] += pv * pv;
        acc_pq[lane] += pv * q;
        qb[i] = q;
      } else {
        p[i] = store_as<T>(pv * k.factor + k.neg_step * q);
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
    double s[4] = {0, 0, 0, 0};
    for (int l = 0; l < kLanes; ++l) {
      s[0] += acc_gp[l];
      s[1] += acc_gg[l];
      s[2] += acc_pp[l];
      s[3] += acc_pq[l];
    }
    for (int q = 0; q < 4; ++q) {
      sums[q] = s[q];
    }
  }
}

// The AVX2 kernels where the CPU has them, else the scalar ones (same operations, same order).
template <typename T, bool NESTEROV, int STAGE>
void adamp_segment(
    const AdamPConsts& k, T* p, const T* g, float* m, float* v, float* q, int64_t n, float c, double* s) {
  static const bool avx2 = simd::has_avx2();
  if (avx2) {
    simd::adamp_segment_avx2(k, simd_dtype<T>(), NESTEROV, STAGE, p, g, m, v, q, n, c, s);
  } else {
    adamp_segment_body<T, NESTEROV, STAGE>(k, p, g, m, v, q, n, c, s);
  }
}

template <int STAGE>
void adamp_dispatch(
    const AdamPConsts& k, bool nesterov, const at::Tensor& param, const at::Tensor& grad, float* m, float* v,
    float* q, int64_t begin, int64_t n, float coef, double* sums) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "vitops::adamp_step", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      scalar_t* p = param.mutable_data_ptr<scalar_t>() + begin;
      const scalar_t* g = grad.const_data_ptr<scalar_t>() + begin;
      float* qb = q ? q + begin : nullptr;
      if (nesterov) {
        adamp_segment<scalar_t, true, STAGE>(k, p, g, m + begin, v + begin, qb, n, coef, sums);
      } else {
        adamp_segment<scalar_t, false, STAGE>(k, p, g, m + begin, v + begin, qb, n, coef, sums);
      }
    }
  });
}

struct AdamPHyper {
  double lr, beta1, beta2, eps, weight_decay, delta, wd_ratio;
  bool nesterov;
};

// Both passes over one group of tensors.
void adamp_group(
    const AdamPHyper& h, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::ArrayRef<double> bias_correction1, at::ArrayRef<double> bias_correction2) {
  const size_t n = params.size();
  const bool decay = h.weight_decay > 0.0;
  std::vector<AdamPConsts> consts(n);
  std::vector<int64_t> numel(n), rows(n), offsets(n + 1, 0);
  std::vector<char> projectable(n);
  for (size_t t = 0; t < n; ++t) {
    AdamPConsts& k = consts[t];
    k.beta1 = float(h.beta1);
    k.one_minus_beta1 = float(1.0 - h.beta1);
    k.beta2 = float(h.beta2);
    k.one_minus_beta2 = float(1.0 - h.beta2);
    k.eps = float(h.eps);
    k.inv_sqrt_bc2 = float(1.0 / std::sqrt(bias_correction2[t]));
    k.neg_step = float(-(h.lr / bias_correction1[t]));
    k.factor = decay ? float(1.0 - h.lr * h.weight_decay) : 1.f;
    numel[t] = params[t].numel();
    rows[t] = adamp_rows(params[t]);
    projectable[t] = params[t].dim() > 1;
    offsets[t + 1] = offsets[t] + numel[t];
  }
  const ChunkPlan plan = make_chunk_plan(numel, rows);
  float* scratch = scratch_buffer(offsets.back());
  std::vector<double> partials(plan.slot_row.size() * 4, 0.0);
  for_each_segment(plan, [&](const Chunk& c, int64_t begin, int64_t end, int64_t slot) {
    const int t = c.tensor;
    float* m = exp_avgs[t].mutable_data_ptr<float>();
    float* v = exp_avg_sqs[t].mutable_data_ptr<float>();
    if (projectable[t]) {
      adamp_dispatch<1>(consts[t], h.nesterov, params[t], grads[t], m, v, scratch + offsets[t], begin, end - begin,
                        0.f, partials.data() + 4 * slot);
    } else {
      adamp_dispatch<0>(consts[t], h.nesterov, params[t], grads[t], m, v, nullptr, begin, end - begin, 0.f, nullptr);
    }
  });
  const auto sums = reduce_slots(plan, partials, 4);

  // Per tensor: timm's projection test, first per channel (rows), then for the whole layer (one row).
  std::vector<float> coef(size_t(plan.total_rows), 0.f);
  bool any_projectable = false;
  for (size_t t = 0; t < n; ++t) {
    if (!projectable[t] || numel[t] == 0) {
      continue;
    }
    any_projectable = true;
    const int64_t R = rows[t];
    const int64_t base = plan.row_base[t];
    auto cosine = [&](double gp, double gg, double pp) {
      const double gn = std::max(std::sqrt(gg), h.eps);
      const double pn = std::max(std::sqrt(pp), h.eps);
      return float(std::abs(gp) / (gn * pn));
    };
    float max_cos = 0.f;
    double tot[4] = {0, 0, 0, 0};
    for (int64_t r = 0; r < R; ++r) {
      const double* s = sums.data() + 4 * (base + r);
      max_cos = std::max(max_cos, cosine(s[0], s[1], s[2]));
      for (int q = 0; q < 4; ++q) {
        tot[q] += s[q];
      }
    }
    bool projected = false;
    if (max_cos < float(h.delta / std::sqrt(double(plan.row_len[t])))) {
      for (int64_t r = 0; r < R; ++r) {
        const double* s = sums.data() + 4 * (base + r);
        const double norm = std::sqrt(s[2]) + h.eps;
        coef[base + r] = float(s[3] / norm / norm);
      }
      projected = true;
    } else if (cosine(tot[0], tot[1], tot[2]) < float(h.delta / std::sqrt(double(numel[t])))) {
      const double norm = std::sqrt(tot[2]) + h.eps;
      for (int64_t r = 0; r < R; ++r) {
        coef[base + r] = float(tot[3] / norm / norm);
      }
      projected = true;
    }
    if (projected && decay) {
      consts[t].factor = float(1.0 - h.lr * h.weight_decay * h.wd_ratio);
    }
  }
  if (!any_projectable) {
    return;
  }
  for_each_segment(plan, [&](const Chunk& c, int64_t begin, int64_t end, int64_t slot) {
    const int t = c.tensor;
    if (!projectable[t]) {
      return;
    }
    float* m = exp_avgs[t].mutable_data_ptr<float>();
    float* v = exp_avg_sqs[t].mutable_data_ptr<float>();
    adamp_dispatch<2>(consts[t], h.nesterov, params[t], grads[t], m, v, scratch + offsets[t], begin, end - begin,
                      coef[plan.slot_row[slot]], nullptr);
  });
}

void adamp_step_cpu(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs,
    at::ArrayRef<double> bias_correction1,
    at::ArrayRef<double> bias_correction2,
    double lr,
    double beta1,
    double beta2,
    double eps,
    double weight_decay,
    double delta,
    double wd_ratio,
    bool nesterov) {
  check_adamp_args(params, grads, exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2);
  const AdamPHyper h{lr, beta1, beta2, eps, weight_decay, delta, wd_ratio, nesterov};
  for_each_cache_group(params, [&](size_t first, size_t count) {
    adamp_group(h, params.slice(first, count), grads.slice(first, count), exp_avgs.slice(first, count),
                exp_avg_sqs.slice(first, count), bias_correction1.slice(first, count),
                bias_correction2.slice(first, count));
  });
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("adamp_step", &cpu::adamp_step_cpu);
}

}  // namespace vitops
