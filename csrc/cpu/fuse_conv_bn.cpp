// CPU kernel of fuse_conv_bn: one pass over the weights, parallel over output channels.
//   scale = bn_weight / sqrt(running_var + eps)
//   fused_weight = weight * scale                      (per output channel)
//   fused_bias = (bias - running_mean) / sqrt(running_var + eps) * bn_weight + bn_bias
// in the order torch.nn.utils.fusion.fuse_conv_bn_weights uses, computed in float (double for double weights).
#include "../fuse_conv_bn.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace vitops {
namespace {

template <typename scalar_t>
void fuse_conv_bn_kernel(const FuseConvBnArgs& args, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* w = args.weight.const_data_ptr<scalar_t>();
  const acc_t* b = fuse_conv_bn_data_or_null<acc_t>(args.bias);
  const acc_t* mean = args.running_mean.const_data_ptr<acc_t>();
  const acc_t* var = args.running_var.const_data_ptr<acc_t>();
  const acc_t* gamma = fuse_conv_bn_data_or_null<acc_t>(args.bn_weight);
  const acc_t* beta = fuse_conv_bn_data_or_null<acc_t>(args.bn_bias);
  scalar_t* out_w = args.fused_weight.mutable_data_ptr<scalar_t>();
  scalar_t* out_b = args.fused_bias.mutable_data_ptr<scalar_t>();
  const int64_t n = args.per_channel;
  // Enough channels per task that a task does some thousands of multiplies.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  at::parallel_for(0, args.channels, grain, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const acc_t inv_std = acc_t(1) / std::sqrt(var[c] + static_cast<acc_t>(eps));
      const acc_t g = gamma ? gamma[c] : acc_t(1);
      const acc_t scale = g * inv_std;
      const scalar_t* src = w + c * n;
      scalar_t* dst = out_w + c * n;
      for (int64_t j = 0; j < n; ++j) {
        dst[j] = static_cast<scalar_t>(acc_t(src[j]) * scale);
      }
      const acc_t centred = (b ? b[c] : acc_t(0)) - mean[c];
      out_b[c] = static_cast<scalar_t>((centred * inv_std) * g + (beta ? beta[c] : acc_t(0)));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fuse_conv_bn_cpu(
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps) {
  auto args = prepare_fuse_conv_bn(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps);
  if (args.channels > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "vitops::fuse_conv_bn", [&] {
      fuse_conv_bn_kernel<scalar_t>(args, eps);
    });
  }
  return {args.fused_weight, args.fused_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("fuse_conv_bn", &fuse_conv_bn_cpu);
}

}  // namespace vitops
