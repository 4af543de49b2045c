// CPU kernels of LAMB's ops (vitops/ops/schemas.def): lamb_grad_sq_sums, lamb_moments and lamb_apply. Each is one
// parallel pass over the chunks of every tensor of the step (multi_tensor.h); per segment, the kernels of
// optim_segments.h run csrc/lamb.h's arithmetic eight lanes at a time (AVX2 where the CPU has it). Sums are float
// per lane within a segment, then double, added up per tensor in a fixed order.
#include "../lamb.h"
#include "../optim.h"
#include "multi_tensor.h"
#include "optim_segments.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace vitops {
namespace cpu {
namespace {

// [tensors, width] float32: the per-tensor sums of a plan with one row per tensor.
at::Tensor tensor_sums(const ChunkPlan& plan, const std::vector<double>& partials, int width) {
  const auto sums = reduce_slots(plan, partials, width);
  auto out = at::empty({plan.total_rows, width}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  for (size_t i = 0; i < sums.size(); ++i) {
    o[i] = float(sums[i]);
  }
  return out;
}

at::Tensor lamb_grad_sq_sums_cpu(at::TensorList grads) {
  check_lamb_grad_sq_sums(grads);
  const ChunkPlan plan = plan_for(grads, std::vector<int64_t>(grads.size(), 1));
  std::vector<double> partials(plan.slot_row.size(), 0.0);
  const SegmentKernels& kernels = segment_kernels();
  for_each_segment(plan, [&](const Chunk& c, int64_t begin, int64_t end, int64_t slot) {
    const at::Tensor& g = grads[c.tensor];
    partials[slot] = kernels.sq_sum(dtype_code(g.scalar_type()), const_element_ptr(g, begin), end - begin);
  });
  return tensor_sums(plan, partials, 1).view({int64_t(grads.size())});
}

at::Tensor lamb_moments_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
    const std::optional<at::Tensor>& grad_sq_sum, double max_grad_norm, double lr, double beta1, double beta2,
    double beta3, double bias_correction1, double bias_correction2, double eps, double weight_decay,
    double decay_scale, bool decoupled_decay, bool adapt, const std::optional<at::Tensor>& found_inf) {
  check_lamb_moments(params, grads, exp_avgs, exp_avg_sqs, grad_sq_sum, max_grad_norm, found_inf);
  if (step_skipped_on_host(found_inf)) {
    return at::zeros({int64_t(params.size()), 2}, at::TensorOptions().dtype(at::kFloat));
  }
  const float inv_clip =
      grad_sq_sum.has_value() ? lamb::inverse_clip(grad_sq_sum->item<float>(), float(max_grad_norm)) : 1.f;
  const lamb::Constants k = lamb::make_constants(lr, beta1, beta2, beta3, bias_correction1, bias_correction2, eps,
                                                 weight_decay, decay_scale, decoupled_decay);
  const ChunkPlan plan = plan_for(params, std::vector<int64_t>(params.size(), 1));
  std::vector<double> partials(plan.slot_row.size() * 2, 0.0);
  const SegmentKernels& kernels = segment_kernels();
  for_each_segment(plan, [&](const Chunk& c, int64_t begin, int64_t end, int64_t slot) {
    const int t = c.tensor;
    kernels.lamb_moments(k, inv_clip, !adapt, dtype_code(params[t].scalar_type()), element_ptr(params[t], begin),
                         const_element_ptr(grads[t], begin), exp_avgs[t].mutable_data_ptr<float>() + begin,
                         exp_avg_sqs[t].mutable_data_ptr<float>() + begin, end - begin, partials.data() + 2 * slot);
  });
  return tensor_sums(plan, partials, 2);
}

void lamb_apply_cpu(
    at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs, const at::Tensor& sums, double lr,
    double beta1, double beta2, double beta3, double bias_correction1, double bias_correction2, double eps,
    double weight_decay, double decay_scale, bool decoupled_decay, bool trust_clip,
    const std::optional<at::Tensor>& found_inf) {
  check_lamb_apply(params, exp_avgs, exp_avg_sqs, sums, found_inf);
  if (step_skipped_on_host(found_inf)) {
    return;
  }
  const lamb::Constants k = lamb::make_constants(lr, beta1, beta2, beta3, bias_correction1, bias_correction2, eps,
                                                 weight_decay, decay_scale, decoupled_decay);
  const float* s = sums.const_data_ptr<float>();
  std::vector<float> ratios(params.size());
  for (size_t t = 0; t < params.size(); ++t) {
    ratios[t] = lamb::trust_ratio(s[2 * t], s[2 * t + 1], trust_clip);
  }
  const ChunkPlan plan = plan_for(params, std::vector<int64_t>(params.size(), 1));
  const SegmentKernels& kernels = segment_kernels();
  for_each_segment(plan, [&](const Chunk& c, int64_t begin, int64_t end, int64_t) {
    const int t = c.tensor;
    kernels.lamb_apply(k, ratios[t], dtype_code(params[t].scalar_type()), element_ptr(params[t], begin),
                       exp_avgs[t].const_data_ptr<float>() + begin, exp_avg_sqs[t].const_data_ptr<float>() + begin,
                       end - begin);
  });
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("lamb_grad_sq_sums", &cpu::lamb_grad_sq_sums_cpu);
  m.impl("lamb_moments", &cpu::lamb_moments_cpu);
  m.impl("lamb_apply", &cpu::lamb_apply_cpu);
}

}  // namespace vitops
