#pragma once
// Argument checks shared by the CPU and CUDA kernels of fuse_conv_bn. The Python wrapper and the fake kernel in
// vitops/ops/fuse_conv_bn.py apply the same rules, so every backend accepts the same arguments.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

namespace vitops {

#ifndef VITOPS_CHECK_ARG
#define VITOPS_CHECK_ARG(cond, op, ...) TORCH_CHECK(cond, "vitops.", op, ": ", __VA_ARGS__)
#endif

// The dtype every per-channel tensor must have, and the kernels compute in: double for a double weight,
// float otherwise.
inline at::ScalarType fuse_conv_bn_accumulate_dtype(at::ScalarType weight) {
  return weight == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_fuse_conv_bn_channel_tensor(
    const char* name, const at::Tensor& t, const at::Tensor& weight, at::ScalarType acc) {
  constexpr const char* op = "fuse_conv_bn";
  VITOPS_CHECK_ARG(
      t.device() == weight.device(), op, name, " is on ", t.device(), " but weight is on ", weight.device());
  VITOPS_CHECK_ARG(
      t.scalar_type() == acc, op, name, " must be ", acc, " for a ", weight.scalar_type(), " weight, got ",
      t.scalar_type());
  VITOPS_CHECK_ARG(
      t.dim() == 1 && t.size(0) == weight.size(0), op, name, " must have shape (", weight.size(0),
      ",), one value per output channel of weight ", weight.sizes(), ", got ", t.sizes());
}

// Checks every argument; returns the accumulate dtype.
inline at::ScalarType check_fuse_conv_bn(
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps) {
  constexpr const char* op = "fuse_conv_bn";
  const auto dtype = weight.scalar_type();
  VITOPS_CHECK_ARG(
      dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble, op,
      "weight must be float32, float16, bfloat16 or float64, got ", dtype);
  VITOPS_CHECK_ARG(
      weight.dim() >= 2, op, "weight must have shape (out_channels, in_channels / groups, *kernel), got ",
      weight.sizes());
  VITOPS_CHECK_ARG(std::isfinite(eps) && eps > 0, op, "eps must be a finite number > 0, got ", eps);
  const auto acc = fuse_conv_bn_accumulate_dtype(dtype);
  if (bias.has_value()) {
    check_fuse_conv_bn_channel_tensor("bias", *bias, weight, acc);
  }
  check_fuse_conv_bn_channel_tensor("running_mean", running_mean, weight, acc);
  check_fuse_conv_bn_channel_tensor("running_var", running_var, weight, acc);
  if (bn_weight.has_value()) {
    check_fuse_conv_bn_channel_tensor("bn_weight", *bn_weight, weight, acc);
  }
  if (bn_bias.has_value()) {
    check_fuse_conv_bn_channel_tensor("bn_bias", *bn_bias, weight, acc);
  }
  return acc;
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

inline std::optional<at::Tensor> fuse_conv_bn_contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

inline FuseConvBnArgs prepare_fuse_conv_bn(
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps) {
  check_fuse_conv_bn(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps);
  FuseConvBnArgs args;
  args.weight = weight.contiguous();
  args.bias = fuse_conv_bn_contiguous(bias);
  args.running_mean = running_mean.contiguous();
  args.running_var = running_var.contiguous();
  args.bn_weight = fuse_conv_bn_contiguous(bn_weight);
  args.bn_bias = fuse_conv_bn_contiguous(bn_bias);
  args.channels = weight.size(0);
  args.per_channel = args.channels == 0 ? 0 : weight.numel() / args.channels;
  args.fused_weight = at::empty(weight.sizes(), weight.options());
  args.fused_bias = at::empty({args.channels}, weight.options());
  return args;
}

template <typename T>
inline const T* fuse_conv_bn_data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

}  // namespace vitops
