// lamb_step for CUDA tensors: multi-tensor stage 1 (moments, and per segment p'.p' and u.u), a finalize kernel
// (per tensor: the norms, in a fixed order, and the trust ratio), and stage 2 (p = p' - lr * ratio * u, u
// recomputed from the new moments). Without layer adaptation, stage 1 finishes the step alone. The clip
// coefficient is read on the device. Same per-element operations as csrc/cpu/lamb.cpp.
#include "lamb_kernels.cuh"
#include "multi_tensor_apply.cuh"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace vitops {
namespace cuda {
namespace {

void lamb_step_cuda(
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
  const c10::cuda::CUDAGuard guard(params[0].device());
  auto stream = at::cuda::getCurrentCUDAStream();
  std::vector<int64_t> rows(params.size(), 1);
  DevicePlan plan = upload_plan(params, grads, exp_avgs, exp_avg_sqs, rows, [](size_t, TensorMeta&) {});
  if (plan.view.num_chunks == 0) {
    return;
  }
  const LambParams k = lamb_params(
      clip_coef.has_value() ? clip_coef->const_data_ptr<float>() : nullptr, lr, beta1, beta2, beta3,
      bias_correction1, bias_correction2, eps, weight_decay, decay_scale, decoupled_decay, trust_clip);
  const bool decay = weight_decay != 0.0;
  const auto grid = static_cast<unsigned>(plan.view.num_chunks);
  if (!(decay || adapt)) {
    lamb_stage_kernel<0><<<grid, kThreads, 0, stream>>>(plan.view, k, nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  auto options = params[0].options().dtype(at::kFloat);
  auto partials = at::empty({plan.view.num_slots * 2}, options);
  auto ratios = at::empty({plan.view.num_tensors}, options);
  lamb_stage_kernel<1><<<grid, kThreads, 0, stream>>>(plan.view, k, partials.mutable_data_ptr<float>(), nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto ratio_blocks = static_cast<unsigned>((plan.view.num_tensors + kThreads - 1) / kThreads);
  lamb_ratio_kernel<<<ratio_blocks, kThreads, 0, stream>>>(
      plan.view, partials.const_data_ptr<float>(), ratios.mutable_data_ptr<float>(), trust_clip);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  lamb_stage_kernel<2><<<grid, kThreads, 0, stream>>>(plan.view, k, nullptr, ratios.const_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(vitops, CUDA, m) {
  m.impl("lamb_step", &cuda::lamb_step_cuda);
}

}  // namespace vitops
