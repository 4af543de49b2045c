// drop_path_add and its backward for CUDA tensors: the checks and outputs of ../drop_path_add.h, the kernels and
// launch plans of drop_path_add.cuh, launched on the current stream.
#include "drop_path_add.cuh"

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

namespace vitops {
namespace cuda {
namespace {

int64_t resident_threads() {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  return int64_t(props->multiProcessorCount) * props->maxThreadsPerMultiProcessor;
}

unsigned grid_size(const LaunchPlan& plan) {
  const int64_t blocks = blocks_for(plan);
  // A plan has at most max(target, per_sample / VEC) threads: past 2^31 blocks a sample would be over 2^39 elements.
  TORCH_INTERNAL_ASSERT(blocks <= std::numeric_limits<int32_t>::max(), "drop_path_add: grid of ", blocks, " blocks");
  return static_cast<unsigned>(blocks);
}

template <typename out_t, typename branch_t, int VEC>
void launch_forward_kernel(const ForwardArgs& args, const LaunchPlan& plan) {
  using acc_t = at::opmath_type<out_t>;
  drop_path_add_forward_kernel<out_t, branch_t, acc_t, VEC>
      <<<grid_size(plan), kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
          data_or_null<out_t>(args.residual), args.branch.const_data_ptr<branch_t>(),
          data_or_null<acc_t>(args.gamma), data_or_null<acc_t>(args.sample_scale),
          args.out.mutable_data_ptr<out_t>(), plan);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_forward(const ForwardArgs& args) {
  const c10::cuda::CUDAGuard device_guard(args.out.device());
  dispatch_pair(args.out.scalar_type(), args.branch.scalar_type(), [&](auto out_v, auto branch_v) {
    using out_t = decltype(out_v);
    using branch_t = decltype(branch_v);
    const int vec = forward_vec<out_t, branch_t>(
        args.layout, args.residual ? args.residual->const_data_ptr() : nullptr, args.branch.const_data_ptr(),
        args.out.const_data_ptr());
    const auto plan = make_plan(args.layout, vec, resident_threads());
    with_vec<branch_t>(vec, [&](auto lanes) {
      launch_forward_kernel<out_t, branch_t, decltype(lanes)::value>(args, plan);
    });
  });
}

template <typename out_t, typename branch_t, int VEC>
void launch_backward_kernel(const BackwardArgs& args, const LaunchPlan& plan, const at::Tensor& partials) {
  using acc_t = at::opmath_type<out_t>;
  drop_path_add_backward_kernel<out_t, branch_t, acc_t, VEC>
      <<<grid_size(plan), kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
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

// Returns gamma's gradient when asked for.
at::Tensor launch_backward(const BackwardArgs& args) {
  const c10::cuda::CUDAGuard device_guard(args.grad_out.device());
  const bool need_gamma_grad = args.branch.has_value();
  at::Tensor grad_gamma;
  dispatch_pair(args.grad_out.scalar_type(), args.grad_branch.scalar_type(), [&](auto out_v, auto branch_v) {
    using out_t = decltype(out_v);
    using branch_t = decltype(branch_v);
    const int vec = backward_vec<out_t, branch_t>(
        args.layout, args.grad_out.const_data_ptr(), args.branch ? args.branch->const_data_ptr() : nullptr,
        args.need_branch_grad ? args.grad_branch.const_data_ptr() : nullptr);
    // Fewer threads than the forward: each one writes its partial sums of gamma's gradient.
    const auto plan = make_plan(args.layout, vec, resident_threads() / 2);
    at::Tensor partials;
    if (need_gamma_grad) {
      const int64_t count = plan.channel_per_lane ? plan.threads * vec : plan.threads;
      partials = at::empty({count}, args.grad_out.options().dtype(args.accumulate));
    }
    with_vec<branch_t>(vec, [&](auto lanes) {
      launch_backward_kernel<out_t, branch_t, decltype(lanes)::value>(args, plan, partials);
    });
    if (need_gamma_grad) {
      grad_gamma = reduce_partials(partials, plan, args.layout, vec);
    }
  });
  return grad_gamma;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(vitops, CUDA, m) {
  m.impl("drop_path_add", &drop_path_add_op<cuda::launch_forward>);
  m.impl("drop_path_add_backward", &drop_path_add_backward_op<cuda::launch_backward>);
}

}  // namespace vitops
