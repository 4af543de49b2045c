// adamp_step for CUDA tensors: multi-tensor stage 1 (moments, and per row segment g.p, g.g, p.p, p.q; params of
// one dim or fewer are finished here), a finalize kernel (one block per tensor: row sums in a fixed order, timm's
// channel-wise then layer-wise cosine tests, the rows' projection coefficients and the weight-decay factor),
// and stage 2 (p = p * factor - (lr / bc1) * (q - p * coef_row), q recomputed from the new moments). All on the
// device. Same per-element operations as csrc/cpu/adamp.cpp.
#include "adamp_kernels.cuh"
#include "multi_tensor_apply.cuh"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace vitops {
namespace cuda {
namespace {

void adamp_step_cuda(
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
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  auto stream = at::cuda::getCurrentCUDAStream();
  std::vector<int64_t> rows;
  for (const auto& p : params) {
    rows.push_back(adamp_rows(p));
  }
  DevicePlan plan = upload_plan(params, grads, exp_avgs, exp_avg_sqs, rows, [&](size_t t, TensorMeta& meta) {
    adamp_tensor_fields(meta, params[t].dim(), lr, bias_correction1[t], bias_correction2[t]);
  });
  if (plan.view.num_chunks == 0) {
    return;
  }
  const AdamPParams k = adamp_params(lr, beta1, beta2, eps, weight_decay, delta, wd_ratio, nesterov);
  auto options = params[0].options().dtype(at::kFloat);
  auto partials = at::empty({std::max<int64_t>(1, plan.view.num_slots * 4)}, options);
  auto coefs = at::empty({std::max<int64_t>(1, plan.view.total_rows)}, options);
  auto factors = at::empty({plan.view.num_tensors}, options);
  const auto grid = static_cast<unsigned>(plan.view.num_chunks);
  adamp_stage1_kernel<<<grid, kThreads, 0, stream>>>(plan.view, k, partials.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  adamp_finalize_kernel<<<static_cast<unsigned>(plan.view.num_tensors), kThreads, 0, stream>>>(
      plan.view, k, partials.const_data_ptr<float>(), coefs.mutable_data_ptr<float>(),
      factors.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  adamp_stage2_kernel<<<grid, kThreads, 0, stream>>>(
      plan.view, k, coefs.const_data_ptr<float>(), factors.const_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(vitops, CUDA, m) {
  m.impl("adamp_step", &cuda::adamp_step_cuda);
}

}  // namespace vitops
