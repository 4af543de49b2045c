// drop_path_add forward for CUDA tensors.
#include "drop_path_add.cuh"

#include <torch/library.h>

namespace vitops {
namespace cuda {
namespace {

template <typename out_t, typename branch_t, int VEC>
void launch_forward(const ForwardArgs& args, const LaunchPlan& plan) {
  using acc_t = at::opmath_type<out_t>;
  drop_path_add_forward_kernel<out_t, branch_t, VEC>
      <<<blocks_for(plan), kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
          data_or_null<out_t>(args.residual), args.branch.const_data_ptr<branch_t>(),
          data_or_null<acc_t>(args.gamma), data_or_null<acc_t>(args.sample_scale),
          args.out.mutable_data_ptr<out_t>(), plan);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor drop_path_add_cuda(
    const std::optional<at::Tensor>& residual,
    const at::Tensor& branch,
    const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& sample_scale) {
  const c10::cuda::CUDAGuard device_guard(branch.device());
  auto args = prepare_forward(residual, branch, gamma, sample_scale);
  if (args.layout.numel == 0) {
    return args.out;
  }
  dispatch_pair(args.out.scalar_type(), args.branch.scalar_type(), [&](auto out_v, auto branch_v) {
    using out_t = decltype(out_v);
    using branch_t = decltype(branch_v);
    constexpr int kVec = 16 / sizeof(branch_t);
    const int vec = pick_vec<out_t, branch_t>(
        args.layout,
        {{args.residual ? args.residual->const_data_ptr() : nullptr, int(sizeof(out_t))},
         {args.branch.const_data_ptr(), int(sizeof(branch_t))},
         {args.out.const_data_ptr(), int(sizeof(out_t))}});
    const auto plan = make_plan(args.layout, vec, resident_threads());
    if (vec == kVec) {
      launch_forward<out_t, branch_t, kVec>(args, plan);
    } else {
      launch_forward<out_t, branch_t, 1>(args, plan);
    }
  });
  return args.out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(vitops, CUDA, m) {
  m.impl("drop_path_add", &cuda::drop_path_add_cuda);
}

}  // namespace vitops
