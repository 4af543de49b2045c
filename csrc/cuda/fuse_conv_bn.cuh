#pragma once
// CUDA kernel of fuse_conv_bn, launched by fuse_conv_bn.cu: one thread block per output channel, its threads
// striding over the channel's weights, with the per-channel math of ../fuse_conv_bn.h in its Rounded form.
// ATen-free, so that the CUDA emulation (tests/cpp/elementwise_emulation.cpp) runs these very lines on the CPU.
// The op only touches weights once, at export time, so the kernel is kept simple.
#include "../fuse_conv_bn.h"

#include <algorithm>
#include <cstdint>

namespace vitops {
namespace cuda {

// A warp multiple that covers one channel's weights, at most 256 threads.
inline int fuse_conv_bn_threads(int64_t per_channel) {
  const int64_t warps = std::max<int64_t>(1, (per_channel + 31) / 32);
  return static_cast<int>(std::min<int64_t>(256, warps * 32));
}

template <typename scalar_t, typename acc_t>
__global__ void fuse_conv_bn_kernel(
    const scalar_t* __restrict__ weight,
    const acc_t* __restrict__ bias,
    const acc_t* __restrict__ running_mean,
    const acc_t* __restrict__ running_var,
    const acc_t* __restrict__ bn_weight,
    const acc_t* __restrict__ bn_bias,
    scalar_t* __restrict__ fused_weight,
    scalar_t* __restrict__ fused_bias,
    int64_t per_channel,
    acc_t eps) {
  using R = Rounded<acc_t>;
  const int64_t c = blockIdx.x;
  const int64_t base = c * per_channel;  // 64-bit: the weight may hold more than 2^31 elements
  const R inv_std = bn_inv_std<R>(running_var[c], eps);
  const R g = bn_weight ? bn_weight[c] : acc_t(1);
  for (int64_t j = threadIdx.x; j < per_channel; j += blockDim.x) {
    fused_weight[base + j] = static_cast<scalar_t>(fused_conv_weight<R>(acc_t(weight[base + j]), g, inv_std).value);
  }
  if (threadIdx.x == 0) {
    const R b = bias ? bias[c] : acc_t(-0.0);
    const R beta = bn_bias ? bn_bias[c] : acc_t(-0.0);
    fused_bias[c] = static_cast<scalar_t>(fused_conv_bias<R>(b, running_mean[c], inv_std, g, beta).value);
  }
}

}  // namespace cuda
}  // namespace vitops
