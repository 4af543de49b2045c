// AdamP's ops on CUDA tensors (schemas in vitops/ops/schemas.def; device code in adamp.cuh). adamp_moments is a
// multi-tensor pass (moments; row sums of projectable params, the others updated) and a finalize kernel (per
// tensor: rows' coefficients and channel-wise tests, the tensor's sums); adamp_apply is one multi-tensor pass,
// each block deciding its tensor's projection from the sums. All on the device: no host sync.
#include "adamp.cuh"
#include "multi_tensor_apply.cuh"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace vitops {
namespace cuda {
namespace {

DevicePlan adamp_plan(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::ArrayRef<double> bias_correction1,
                      at::ArrayRef<double> bias_correction2, double lr, at::IntArrayRef full_numels) {
  return upload_plan(params, adamp_rows(params), [&](size_t t, TensorMeta& m) {
    m.g = grads[t].const_data_ptr();
    m.m = exp_avgs[t].mutable_data_ptr<float>();
    m.v = exp_avg_sqs[t].mutable_data_ptr<float>();
    m.flag = params[t].dim() > 1;
    const adamp::StepConstants s = adamp::step_constants(lr, bias_correction1[t], bias_correction2[t]);
    m.f0 = s.inv_sqrt_bc2;
    m.f1 = s.neg_step;
    if (!full_numels.empty()) {
      m.full_numel = full_numels[t];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> adamp_moments_cuda(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
    at::ArrayRef<double> bias_correction1, at::ArrayRef<double> bias_correction2, double lr, double beta1,
    double beta2, double eps, double weight_decay, double delta, double wd_ratio, bool nesterov,
    const std::optional<at::Tensor>& found_inf) {
  check_adamp_moments(params, grads, exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2, found_inf);
  const c10::cuda::CUDAGuard guard(params[0].device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const DevicePlan plan =
      adamp_plan(params, grads, exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2, lr, {});
  const adamp::Constants k = adamp::make_constants(lr, beta1, beta2, eps, weight_decay, delta, wd_ratio, nesterov);
  const auto options = params[0].options().dtype(at::kFloat);
  auto partials = at::empty({std::max<int64_t>(1, 4 * plan.view.num_slots)}, options);
  auto row_coefs = at::empty({plan.view.total_rows}, options);
  auto tensor_sums = at::empty({plan.view.num_tensors, adamp::kTensorSums}, options);
  const float* skip = data_or_null(found_inf);
  if (plan.view.num_chunks > 0) {
    adamp_moments_kernel<<<static_cast<unsigned>(plan.view.num_chunks), kThreads, 0, stream>>>(
        plan.view, k, partials.mutable_data_ptr<float>(), skip);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  adamp_finalize_kernel<<<static_cast<unsigned>(plan.view.num_tensors), kThreads, 0, stream>>>(
      plan.view, k, partials.const_data_ptr<float>(), row_coefs.mutable_data_ptr<float>(),
      tensor_sums.mutable_data_ptr<float>(), skip);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {row_coefs, tensor_sums};
}

void adamp_apply_cuda(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
    const at::Tensor& row_coefs, const at::Tensor& tensor_sums, at::IntArrayRef full_numels,
    at::ArrayRef<double> bias_correction1, at::ArrayRef<double> bias_correction2, double lr, double beta1,
    double beta2, double eps, double weight_decay, double delta, double wd_ratio, bool nesterov,
    const std::optional<at::Tensor>& found_inf) {
  check_adamp_apply(params, grads, exp_avgs, exp_avg_sqs, row_coefs, tensor_sums, full_numels, bias_correction1,
                    bias_correction2, found_inf);
  const c10::cuda::CUDAGuard guard(params[0].device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const DevicePlan plan =
      adamp_plan(params, grads, exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2, lr, full_numels);
  if (plan.view.num_chunks == 0) {
    return;
  }
  const adamp::Constants k = adamp::make_constants(lr, beta1, beta2, eps, weight_decay, delta, wd_ratio, nesterov);
  adamp_apply_kernel<<<static_cast<unsigned>(plan.view.num_chunks), kThreads, 0, stream>>>(
      plan.view, k, row_coefs.const_data_ptr<float>(), tensor_sums.const_data_ptr<float>(), data_or_null(found_inf));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(vitops, CUDA, m) {
  m.impl("adamp_moments", &cuda::adamp_moments_cuda);
  m.impl("adamp_apply", &cuda::adamp_apply_cuda);
}

}  // namespace vitops
