// CPU kernel of fuse_conv_bn: one pass over the weights, parallel over output channels, with the per-channel math
// of ../fuse_conv_bn.h.
#include "../fuse_conv_bn.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace vitops {
namespace cpu {
namespace {

template <typename scalar_t, typename acc_t>
void fuse_conv_bn_kernel(const FuseConvBnArgs& args, acc_t eps) {
  const scalar_t* w = args.weight.const_data_ptr<scalar_t>();
  const acc_t* bias = data_or_null<acc_t>(args.bias);
  const acc_t* mean = args.running_mean.const_data_ptr<acc_t>();
  const acc_t* var = args.running_var.const_data_ptr<acc_t>();
  const acc_t* bn_weight = data_or_null<acc_t>(args.bn_weight);
  const acc_t* bn_bias = data_or_null<acc_t>(args.bn_bias);
  scalar_t* out_w = args.fused_weight.mutable_data_ptr<scalar_t>();
  scalar_t* out_b = args.fused_bias.mutable_data_ptr<scalar_t>();
  const int64_t n = args.per_channel;
  // Enough channels per task that a task does some thousands of multiplies.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  at::parallel_for(0, args.channels, grain, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const acc_t inv_std = bn_inv_std(var[c], eps);
      const acc_t g = bn_weight ? bn_weight[c] : acc_t(1);
      const scalar_t* src = w + c * n;
      scalar_t* dst = out_w + c * n;
      for (int64_t j = 0; j < n; ++j) {
        dst[j] = static_cast<scalar_t>(fused_conv_weight(acc_t(src[j]), g, inv_std));
      }
      out_b[c] = static_cast<scalar_t>(fused_conv_bias(
          bias ? bias[c] : acc_t(-0.0), mean[c], inv_std, g, bn_bias ? bn_bias[c] : acc_t(-0.0)));
    }
  });
}

void launch_fuse_conv_bn(const FuseConvBnArgs& args, double eps) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.weight.scalar_type(), "vitops::fuse_conv_bn", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fuse_conv_bn_kernel<scalar_t, acc_t>(args, static_cast<acc_t>(eps));
  });
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("fuse_conv_bn", &fuse_conv_bn_op<cpu::launch_fuse_conv_bn>);
}

}  // namespace vitops
