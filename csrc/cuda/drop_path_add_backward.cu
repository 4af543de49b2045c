// drop_path_add backward for CUDA tensors: grad_branch and gamma's gradient in one pass over memory.
#include "drop_path_add.cuh"

#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace vitops {
namespace cuda {
namespace {

template <typename out_t, typename branch_t, int VEC>
void launch_backward(const BackwardArgs& args, const LaunchPlan& plan, const at::Tensor& partials) {
  using acc_t = at::opmath_type<out_t>;
  drop_path_add_backward_kernel<out_t, branch_t, VEC>
      <<<blocks_for(plan), kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
          args.grad_out.const_data_ptr<out_t>(), data_or_null<branch_t>(args.branch),
          data_or_null<acc_t>(args.gamma), data_or_null<acc_t>(args.sample_scale),
          args.need_branch_grad ? args.grad_branch.mutable_data_ptr<branch_t>() : nullptr,
          partials.defined() ? partials.mutable_data_ptr<acc_t>() : nullptr, plan);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Sums the per-thread partials (see drop_path_add_backward_kernel) into gamma's gradient.
at::Tensor reduce_partials(const at::Tensor& partials, const LaunchPlan& plan, const DropPathAddLayout& L, int vec) {
  if (L.channels == 1) {
    return partials.sum();
  }
  if (plan.channel_per_lane) {
    return partials.view({-1, L.channels}).sum(0);
  }
  return partials.view({-1, L.channels, L.inner / vec}).sum(at::IntArrayRef{0, 2});
}

std::tuple<at::Tensor, at::Tensor> drop_path_add_backward_cuda(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& branch,
    const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& sample_scale,
    at::ScalarType branch_dtype,
    bool need_branch_grad) {
  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  auto args = prepare_backward(grad_out, branch, gamma, sample_scale, branch_dtype, need_branch_grad);
  const bool need_gamma_grad = args.branch.has_value();
  at::Tensor grad_gamma = at::empty({0}, grad_out.options().dtype(args.accumulate));
  if (!need_branch_grad && !need_gamma_grad) {
    return {args.grad_branch, grad_gamma};
  }
  if (args.layout.numel == 0) {
    if (need_gamma_grad) {
      grad_gamma = at::zeros(gamma->sizes(), grad_out.options().dtype(args.accumulate));
    }
    return {args.grad_branch, grad_gamma};
  }
  dispatch_pair(args.grad_out.scalar_type(), branch_dtype, [&](auto out_v, auto branch_v) {
    using out_t = decltype(out_v);
    using branch_t = decltype(branch_v);
    constexpr int kVec = 16 / sizeof(branch_t);
    const int vec = pick_vec<out_t, branch_t>(
        args.layout,
        {{args.grad_out.const_data_ptr(), int(sizeof(out_t))},
         {args.branch ? args.branch->const_data_ptr() : nullptr, int(sizeof(branch_t))},
         {need_branch_grad ? args.grad_branch.const_data_ptr() : nullptr, int(sizeof(branch_t))}});
    // Fewer threads than the forward: each one writes its partial sums of gamma's gradient.
    const auto plan = make_plan(args.layout, vec, resident_threads() / 2);
    at::Tensor partials;
    if (need_gamma_grad) {
      partials = at::empty({plan.channel_per_lane ? plan.threads * vec : plan.threads}, grad_out.options().dtype(args.accumulate));
    }
    if (vec == kVec) {
      launch_backward<out_t, branch_t, kVec>(args, plan, partials);
    } else {
      launch_backward<out_t, branch_t, 1>(args, plan, partials);
    }
    if (need_gamma_grad) {
      grad_gamma = reduce_partials(partials, plan, args.layout, vec).view(gamma->sizes());
    }
  });
  return {args.grad_branch, grad_gamma};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(vitops, CUDA, m) {
  m.impl("drop_path_add_backward", &cuda::drop_path_add_backward_cuda);
}

}  // namespace vitops
