// LAMB's ops on CUDA tensors (schemas in vitops/ops/schemas.def; device code in lamb.cuh). lamb_grad_sq_sums and
// lamb_moments are a multi-tensor pass writing partial sums per segment, then a kernel adding them up per tensor in
// a fixed order; lamb_apply is one multi-tensor pass, each block computing its tensor's trust ratio. The clipping
// coefficient and the trust ratios are computed on the device: no host sync.
#include "lamb.cuh"
#include "multi_tensor_apply.cuh"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace vitops {
namespace cuda {
namespace {

// [tensors, WIDTH] float32: the per-tensor sums of a plan with one row per tensor, from its partial sums.
template <int WIDTH>
at::Tensor tensor_sums(const DevicePlan& plan, const at::Tensor& partials, cudaStream_t stream) {
  auto out = at::zeros({plan.view.num_tensors, WIDTH}, partials.options());
  if (plan.view.num_tensors > 0) {
    const auto blocks = static_cast<unsigned>((plan.view.total_rows + kThreads - 1) / kThreads);
    row_sums_kernel<WIDTH><<<blocks, kThreads, 0, stream>>>(plan.view, partials.const_data_ptr<float>(),
                                                            out.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

at::Tensor lamb_grad_sq_sums_cuda(at::TensorList grads) {
  check_lamb_grad_sq_sums(grads);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const DevicePlan plan = upload_plan(grads, std::vector<int64_t>(grads.size(), 1), [](size_t, TensorMeta&) {});
  auto partials = at::empty({std::max<int64_t>(1, plan.view.num_slots)}, grads[0].options().dtype(at::kFloat));
  if (plan.view.num_chunks > 0) {
    lamb_sq_sum_kernel<<<static_cast<unsigned>(plan.view.num_chunks), kThreads, 0, stream>>>(
        plan.view, partials.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return tensor_sums<1>(plan, partials, stream).view({int64_t(grads.size())});
}

at::Tensor lamb_moments_cuda(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
    const std::optional<at::Tensor>& grad_sq_sum, double max_grad_norm, double lr, double beta1, double beta2,
    double beta3, double bias_correction1, double bias_correction2, double eps, double weight_decay,
    double decay_scale, bool decoupled_decay, bool adapt, const std::optional<at::Tensor>& found_inf) {
  check_lamb_moments(params, grads, exp_avgs, exp_avg_sqs, grad_sq_sum, max_grad_norm, found_inf);
  const c10::cuda::CUDAGuard guard(params[0].device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const DevicePlan plan = upload_plan(params, std::vector<int64_t>(params.size(), 1), [&](size_t t, TensorMeta& m) {
    m.g = grads[t].const_data_ptr();
    m.m = exp_avgs[t].mutable_data_ptr<float>();
    m.v = exp_avg_sqs[t].mutable_data_ptr<float>();
  });
  const lamb::Constants k = lamb::make_constants(lr, beta1, beta2, beta3, bias_correction1, bias_correction2, eps,
                                                 weight_decay, decay_scale, decoupled_decay);
  auto partials = at::empty({std::max<int64_t>(1, 2 * plan.view.num_slots)}, params[0].options().dtype(at::kFloat));
  if (plan.view.num_chunks > 0) {
    const float* clip = data_or_null(grad_sq_sum);
    const float* skip = data_or_null(found_inf);
    const auto grid = static_cast<unsigned>(plan.view.num_chunks);
    float* out = partials.mutable_data_ptr<float>();
    if (adapt) {
      lamb_moments_kernel<false><<<grid, kThreads, 0, stream>>>(plan.view, k, clip, float(max_grad_norm), out, skip);
    } else {
      lamb_moments_kernel<true><<<grid, kThreads, 0, stream>>>(plan.view, k, clip, float(max_grad_norm), out, skip);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return tensor_sums<2>(plan, partials, stream);
}

void lamb_apply_cuda(
    at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs, const at::Tensor& sums, double lr,
    double beta1, double beta2, double beta3, double bias_correction1, double bias_correction2, double eps,
    double weight_decay, double decay_scale, bool decoupled_decay, bool trust_clip,
    const std::optional<at::Tensor>& found_inf) {
  check_lamb_apply(params, exp_avgs, exp_avg_sqs, sums, found_inf);
  const c10::cuda::CUDAGuard guard(params[0].device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const DevicePlan plan = upload_plan(params, std::vector<int64_t>(params.size(), 1), [&](size_t t, TensorMeta& m) {
    m.m = exp_avgs[t].mutable_data_ptr<float>();
    m.v = exp_avg_sqs[t].mutable_data_ptr<float>();
  });
  if (plan.view.num_chunks == 0) {
    return;
  }
  const lamb::Constants k = lamb::make_constants(lr, beta1, beta2, beta3, bias_correction1, bias_correction2, eps,
                                                 weight_decay, decay_scale, decoupled_decay);
  lamb_apply_kernel<<<static_cast<unsigned>(plan.view.num_chunks), kThreads, 0, stream>>>(
      plan.view, k, sums.const_data_ptr<float>(), trust_clip, data_or_null(found_inf));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(vitops, CUDA, m) {
  m.impl("lamb_grad_sq_sums", &cuda::lamb_grad_sq_sums_cuda);
  m.impl("lamb_moments", &cuda::lamb_moments_cuda);
  m.impl("lamb_apply", &cuda::lamb_apply_cuda);
}

}  // namespace vitops
