// CPU kernels of AdamP's ops (vitops/ops/schemas.def): adamp_moments and adamp_apply. Each is one parallel pass
// over the chunks of every tensor of the step (multi_tensor.h), a chunk being whole channel rows or a piece of one;
// per segment, the kernels of optim_segments.h run csrc/adamp.h's arithmetic eight lanes at a time (AVX2 where the
// CPU has it). Params of one dim or fewer are never projected: adamp_moments finishes them.
#include "../adamp.h"
#include "../optim.h"
#include "multi_tensor.h"
#include "optim_segments.h"

#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <numeric>

namespace vitops {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> adamp_moments_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
    at::ArrayRef<double> bias_correction1, at::ArrayRef<double> bias_correction2, double lr, double beta1,
    double beta2, double eps, double weight_decay, double delta, double wd_ratio, bool nesterov,
    const std::optional<at::Tensor>& found_inf) {
  check_adamp_moments(params, grads, exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2, found_inf);
  const auto options = at::TensorOptions().dtype(at::kFloat);
  const std::vector<int64_t> rows = adamp_rows(params);
  if (step_skipped_on_host(found_inf)) {
    return {at::zeros({std::accumulate(rows.begin(), rows.end(), int64_t(0))}, options),
            at::zeros({int64_t(params.size()), adamp::kTensorSums}, options)};
  }
  const adamp::Constants k = adamp::make_constants(lr, beta1, beta2, eps, weight_decay, delta, wd_ratio, nesterov);
  const ChunkPlan plan = plan_for(params, rows);
  std::vector<double> partials(plan.slot_row.size() * 4, 0.0);
  const SegmentKernels& kernels = segment_kernels();
  for_each_segment(plan, [&](const Chunk& c, int64_t begin, int64_t end, int64_t slot) {
    const int t = c.tensor;
    kernels.adamp_moments(k, adamp::step_constants(lr, bias_correction1[t], bias_correction2[t]),
                          params[t].dim() > 1, dtype_code(params[t].scalar_type()), element_ptr(params[t], begin),
                          const_element_ptr(grads[t], begin), exp_avgs[t].mutable_data_ptr<float>() + begin,
                          exp_avg_sqs[t].mutable_data_ptr<float>() + begin, end - begin, partials.data() + 4 * slot);
  });
  const auto row_sums = reduce_slots(plan, partials, 4);

  // Per row of a projectable param: its projection coefficient and whether it passes the channel-wise test; per
  // param, the sums over its rows and the count of rows that fail.
  auto row_coefs = at::zeros({plan.total_rows}, options);
  auto sums = at::zeros({int64_t(params.size()), adamp::kTensorSums}, options);
  float* coef = row_coefs.mutable_data_ptr<float>();
  float* out = sums.mutable_data_ptr<float>();
  for (size_t t = 0; t < params.size(); ++t) {
    if (params[t].dim() <= 1 || params[t].numel() == 0) {
      continue;
    }
    double total[adamp::kTensorSums] = {0, 0, 0, 0, 0};
    for (int64_t r = plan.row_base[t]; r < plan.row_base[t] + params[t].size(0); ++r) {
      const double* s = row_sums.data() + 4 * r;
      total[4] += !adamp::passes(adamp::cosine(s[0], s[1], s[2], eps), delta, plan.row_len[t]);
      for (int q = 0; q < 4; ++q) {
        total[q] += s[q];
      }
      coef[r] = adamp::projection_coef(s[3], s[2], eps);
    }
    for (int q = 0; q < adamp::kTensorSums; ++q) {
      out[adamp::kTensorSums * t + q] = float(total[q]);
    }
  }
  return {row_coefs, sums};
}

void adamp_apply_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
    const at::Tensor& row_coefs, const at::Tensor& tensor_sums, at::IntArrayRef full_numels,
    at::ArrayRef<double> bias_correction1, at::ArrayRef<double> bias_correction2, double lr, double beta1,
    double beta2, double eps, double weight_decay, double delta, double wd_ratio, bool nesterov,
    const std::optional<at::Tensor>& found_inf) {
  check_adamp_apply(params, grads, exp_avgs, exp_avg_sqs, row_coefs, tensor_sums, full_numels, bias_correction1,
                    bias_correction2, found_inf);
  if (step_skipped_on_host(found_inf)) {
    return;
  }
  const ChunkPlan plan = plan_for(params, adamp_rows(params));
  const adamp::Constants k = adamp::make_constants(lr, beta1, beta2, eps, weight_decay, delta, wd_ratio, nesterov);

  // Per param: its projection, from its sums over every rank, and the weight-decay factor that follows.
  const float* sums = tensor_sums.const_data_ptr<float>();
  std::vector<int> projection(params.size(), adamp::kNone);
  std::vector<float> layer_coef(params.size(), 0.f);
  for (size_t t = 0; t < params.size(); ++t) {
    if (params[t].dim() > 1 && params[t].numel() > 0) {
      const float* s = sums + adamp::kTensorSums * t;
      projection[t] = adamp::projection(s, k, full_numels[t]);
      layer_coef[t] = adamp::projection_coef(s[3], s[2], eps);
    }
  }
  const float* coefs = row_coefs.const_data_ptr<float>();
  const SegmentKernels& kernels = segment_kernels();
  for_each_segment(plan, [&](const Chunk& c, int64_t begin, int64_t end, int64_t slot) {
    const int t = c.tensor;
    if (params[t].dim() <= 1) {
      return;  // finished by adamp_moments
    }
    const int mode = projection[t];
    const float coef =
        mode == adamp::kChannel ? coefs[plan.slot_row[slot]] : mode == adamp::kLayer ? layer_coef[t] : 0.f;
    const float factor = mode == adamp::kNone ? k.plain_factor : k.projected_factor;
    kernels.adamp_apply(k, adamp::step_constants(lr, bias_correction1[t], bias_correction2[t]), factor, coef,
                        dtype_code(params[t].scalar_type()), element_ptr(params[t], begin),
                        const_element_ptr(grads[t], begin), exp_avgs[t].const_data_ptr<float>() + begin,
                        exp_avg_sqs[t].const_data_ptr<float>() + begin, end - begin);
  });
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("adamp_moments", &cpu::adamp_moments_cpu);
  m.impl("adamp_apply", &cpu::adamp_apply_cpu);
}

}  // namespace vitops
