// CUDA kernel of fuse_conv_bn: one thread block per output channel, its threads striding over the channel's
// weights. The op only touches weights, so the kernel is kept simple; it computes in float (double for double
// weights) with explicitly rounded arithmetic, in the order of the CPU kernel.
#include "../fuse_conv_bn.h"

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

namespace vitops {
namespace cuda {
namespace {

__device__ __forceinline__ float fuse_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float fuse_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float fuse_inv_sqrt(float x) { return __fdiv_rn(1.0f, __fsqrt_rn(x)); }
__device__ __forceinline__ double fuse_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double fuse_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double fuse_inv_sqrt(double x) { return __ddiv_rn(1.0, __dsqrt_rn(x)); }

template <typename scalar_t>
__global__ void fuse_conv_bn_kernel(
    const scalar_t* __restrict__ weight,
    const at::opmath_type<scalar_t>* __restrict__ bias,
    const at::opmath_type<scalar_t>* __restrict__ mean,
    const at::opmath_type<scalar_t>* __restrict__ var,
    const at::opmath_type<scalar_t>* __restrict__ gamma,
    const at::opmath_type<scalar_t>* __restrict__ beta,
    scalar_t* __restrict__ fused_weight,
    scalar_t* __restrict__ fused_bias,
    int64_t per_channel,
    at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x;
  const acc_t inv_std = fuse_inv_sqrt(fuse_add(var[c], eps));
  const acc_t g = gamma ? gamma[c] : acc_t(1);
  const acc_t scale = fuse_mul(g, inv_std);
  const scalar_t* src = weight + c * per_channel;
  scalar_t* dst = fused_weight + c * per_channel;
  for (int64_t j = threadIdx.x; j < per_channel; j += blockDim.x) {
    dst[j] = static_cast<scalar_t>(fuse_mul(acc_t(src[j]), scale));
  }
  if (threadIdx.x == 0) {
    const acc_t centred = fuse_add(bias ? bias[c] : acc_t(0), -mean[c]);
    fused_bias[c] = static_cast<scalar_t>(fuse_add(fuse_mul(fuse_mul(centred, inv_std), g), beta ? beta[c] : acc_t(0)));
  }
}

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
  TORCH_CHECK(args.channels <= int64_t(0x7fffffff), "vitops.fuse_conv_bn: too many output channels");
  // A warp multiple that covers one channel's weights, at most 256 threads.
  const int64_t warps = std::max<int64_t>(1, (args.per_channel + 31) / 32);
  const int threads = static_cast<int>(std::min<int64_t>(256, warps * 32));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "vitops::fuse_conv_bn", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto blocks = static_cast<unsigned>(args.channels);
    fuse_conv_bn_kernel<scalar_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        args.weight.const_data_ptr<scalar_t>(), fuse_conv_bn_data_or_null<acc_t>(args.bias),
        args.running_mean.const_data_ptr<acc_t>(), args.running_var.const_data_ptr<acc_t>(),
        fuse_conv_bn_data_or_null<acc_t>(args.bn_weight), fuse_conv_bn_data_or_null<acc_t>(args.bn_bias),
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
