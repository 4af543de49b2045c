// fuse_conv_bn for CUDA tensors: the checks and outputs of ../fuse_conv_bn.h, the kernel of fuse_conv_bn.cuh,
// launched on the current stream.
#include "fuse_conv_bn.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

namespace vitops {
namespace cuda {
namespace {

void launch_fuse_conv_bn(const FuseConvBnArgs& args, double eps) {
  const c10::cuda::CUDAGuard device_guard(args.weight.device());
  VITOPS_CHECK(
      args.channels <= std::numeric_limits<int32_t>::max(), "fuse_conv_bn", "weight has ", args.channels,
      " output channels; the CUDA kernel takes at most 2^31 - 1");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.weight.scalar_type(), "vitops::fuse_conv_bn", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto blocks = static_cast<unsigned>(args.channels);
    fuse_conv_bn_kernel<scalar_t, acc_t>
        <<<blocks, fuse_conv_bn_threads(args.per_channel), 0, at::cuda::getCurrentCUDAStream()>>>(
            args.weight.const_data_ptr<scalar_t>(), data_or_null<acc_t>(args.bias),
            args.running_mean.const_data_ptr<acc_t>(), args.running_var.const_data_ptr<acc_t>(),
            data_or_null<acc_t>(args.bn_weight), data_or_null<acc_t>(args.bn_bias),
            args.fused_weight.mutable_data_ptr<scalar_t>(), args.fused_bias.mutable_data_ptr<scalar_t>(),
            args.per_channel, static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(vitops, CUDA, m) {
  m.impl("fuse_conv_bn", &fuse_conv_bn_op<cuda::launch_fuse_conv_bn>);
}

}  // namespace vitops
