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

std::tuple<at::Tensor, at::Tensor> fuse_conv_bn_cuda(
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps) {
  const c10::cuda::CUDAGuard device_guard(weight.device());
  auto args = prepare_fuse_conv_bn(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps);
  if (args.channels == 0) {
    return {args.fused_weight, args.fused_bias};
  }
  VITOPS_CHECK(
      args.channels <= std::numeric_limits<int32_t>::max(), "fuse_conv_bn", "weight has ", args.channels,
      " output channels; the CUDA kernel takes at most 2^31 - 1");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "vitops::fuse_conv_bn", [&] {
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
  return {args.fused_weight, args.fused_bias};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(vitops, CUDA, m) {
  m.impl("fuse_conv_bn", &cuda::fuse_conv_bn_cuda);
}

}  // namespace vitops
