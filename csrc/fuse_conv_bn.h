#pragma once
// fuse_conv_bn's one truth, shared by its CPU kernel (cpu/fuse_conv_bn.cpp), its CUDA kernel
// (cuda/fuse_conv_bn.cuh, launched from cuda/fuse_conv_bn.cu) and their emulation on the CPU
// (tests/cpp/elementwise_emulation.cpp):
//  1. the per-channel math, ATen-free templates over the arithmetic type (rounded.h): the accumulate type (float;
//     double for a double weight) on the host, its Rounded twin on the device;
//  2. the op as each backend registers it (fuse_conv_bn_op, given the backend's launcher): the argument checks and
//     outputs, which need ATen and which the CUDA emulation leaves out. The Python check and fake kernel in
//     vitops/ops/_fuse_conv_bn.py apply the same rules, so every backend accepts the same arguments.
#include "rounded.h"

namespace vitops {

// --- 1. per-channel math --------------------------------------------------------------------------------------
// Folds an inference-mode BatchNorm into the convolution before it, in the reference's order:
//   inv_std = 1 / sqrt(running_var + eps)
//   fused_weight = weight * (bn_weight * inv_std)                        per output channel
//   fused_bias = ((bias - running_mean) * inv_std) * bn_weight + bn_bias
// An absent tensor takes the value that gives exactly the reference's formula without it: bias -0
// (-0 - m == -m), bn_weight 1, bn_bias -0 (x + -0 == x, -0 included).
template <typename T>
VITOPS_MATH T bn_inv_std(T running_var, T eps) {
  return T(1) / sqrt_rn(running_var + eps);
}

template <typename T>
VITOPS_MATH T fused_conv_weight(T weight, T bn_weight, T inv_std) {
  return weight * (bn_weight * inv_std);
}

template <typename T>
VITOPS_MATH T fused_conv_bias(T bias, T running_mean, T inv_std, T bn_weight, T bn_bias) {
  return ((bias - running_mean) * inv_std) * bn_weight + bn_bias;
}

}  // namespace vitops

#ifndef VITOPS_EMULATE_CUDA
// --- 2. argument checks and outputs (ATen) -------------------------------------------------------------------
#include "checks.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <utility>

namespace vitops {

inline void check_fuse_conv_bn_channel_tensor(
    const char* name, const at::Tensor& t, const at::Tensor& weight, at::ScalarType acc) {
  constexpr const char* op = "fuse_conv_bn";
  check_same_device(op, name, t, "weight", weight);
  VITOPS_CHECK_TYPE(
      t.scalar_type() == acc, op, name, " must be ", acc, " for a ", weight.scalar_type(), " weight, got ",
      t.scalar_type());
  VITOPS_CHECK(
      t.dim() == 1 && t.size(0) == weight.size(0), op, name, " must have shape (", weight.size(0),
      ",), one value per output channel of weight ", weight.sizes(), ", got ", t.sizes());
}

// The kernels' view of the arguments: contiguous tensors, and the two outputs allocated contiguous.
struct FuseConvBnArgs {
  at::Tensor weight;
  std::optional<at::Tensor> bias;
  at::Tensor running_mean;
  at::Tensor running_var;
  std::optional<at::Tensor> bn_weight;
  std::optional<at::Tensor> bn_bias;
  at::Tensor fused_weight;
  at::Tensor fused_bias;
  int64_t channels;
  int64_t per_channel;  // weight elements of one output channel
};

// fuse_conv_bn on one backend: the checks and outputs, then launch(args, eps) to fill the outputs unless the
// weight has no output channel.
template <void (*launch)(const FuseConvBnArgs&, double)>
std::tuple<at::Tensor, at::Tensor> fuse_conv_bn_op(
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps) {
  constexpr const char* op = "fuse_conv_bn";
  VITOPS_CHECK_TYPE(
      is_floating_kernel_dtype(weight.scalar_type()), op, "weight must be float32, float16, bfloat16 or float64, got ",
      weight.scalar_type());
  VITOPS_CHECK(
      weight.dim() >= 2, op, "weight must have shape (out_channels, in_channels / groups, *kernel), got ",
      weight.sizes());
  VITOPS_CHECK(std::isfinite(eps) && eps > 0, op, "eps must be a finite number > 0, got ", eps);
  const auto acc = accumulate_dtype(weight.scalar_type());
  const std::pair<const char*, const at::Tensor*> channel_tensors[] = {
      {"bias", bias ? &*bias : nullptr},
      {"running_mean", &running_mean},
      {"running_var", &running_var},
      {"bn_weight", bn_weight ? &*bn_weight : nullptr},
      {"bn_bias", bn_bias ? &*bn_bias : nullptr}};
  for (const auto& [name, t] : channel_tensors) {
    if (t != nullptr) {
      check_fuse_conv_bn_channel_tensor(name, *t, weight, acc);
    }
  }

  FuseConvBnArgs args;
  args.weight = weight.contiguous();
  args.bias = contiguous_or_none(bias);
  args.running_mean = running_mean.contiguous();
  args.running_var = running_var.contiguous();
  args.bn_weight = contiguous_or_none(bn_weight);
  args.bn_bias = contiguous_or_none(bn_bias);
  args.channels = weight.size(0);
  args.per_channel = args.channels == 0 ? 0 : weight.numel() / args.channels;
  args.fused_weight = at::empty(weight.sizes(), weight.options());
  args.fused_bias = at::empty({args.channels}, weight.options());
  if (args.channels > 0) {
    launch(args, eps);
  }
  return {args.fused_weight, args.fused_bias};
}

}  // namespace vitops
#endif  // VITOPS_EMULATE_CUDA
