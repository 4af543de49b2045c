#pragma once
// drop_path_add's one truth, shared by its CPU kernel (cpu/drop_path_add.cpp), its CUDA kernels
// (cuda/drop_path_add.cuh, launched from cuda/drop_path_add.cu) and their emulation on the CPU
// (tests/cpp/elementwise_emulation.cpp):
//  1. the per-element math and the memory-order indexing, ATen-free C10_HOST_DEVICE functions;
//  2. the ops as each backend registers them (drop_path_add_op, drop_path_add_backward_op, given the backend's
//     launcher): the argument checks and the outputs' layout, which need ATen and which the CUDA emulation leaves
//     out.
#include "rounded.h"

#include <c10/macros/Macros.h>

#include <cstdint>

namespace vitops {

// --- 1. per-element math ------------------------------------------------------------------------------------
// Templates over the arithmetic type T (rounded.h): the accumulate type (float; double for double tensors) on
// the host, its Rounded twin on the device, SIMD lanes in the CPU kernel's vector loops. Every backend performs
// the same IEEE operations in the same order, so it computes the same bits.
// A sample whose scale is 0 is dropped: the kernels copy its residual (write zeros without one) and never read
// its branch, so a non-finite branch of a dropped sample cannot reach the output or the gradients.

// A kept sample's branch term (branch * gamma) * scale, in the order of timm's `drop_path(branch * gamma)`, each
// product rounded: float32 results are bit-identical to timm's on every backend. Without LayerScale gamma is 1,
// which changes nothing (x * 1 == x exactly).
template <typename T>
VITOPS_MATH T drop_path_term(T branch, T gamma, T scale) {
  return (branch * gamma) * scale;
}

template <typename T>
VITOPS_MATH T drop_path_add_element(T residual, T branch, T gamma, T scale) {
  return residual + drop_path_term(branch, gamma, scale);
}

// The backward's products, the upstream gradient scaled by the sample's scale first as in the reference: times
// gamma it is the branch's gradient, times the branch one element's share of gamma's gradient.
template <typename T>
VITOPS_MATH T drop_path_grad(T grad_out, T scale, T factor) {
  return (grad_out * scale) * factor;
}

// --- memory-order indexing ------------------------------------------------------------------------------------
// The kernels walk every tensor in memory order. Memory position p belongs to sample p / per_sample and to
// channel (p / inner) % channels. That holds for any dense layout whose batch dim is outermost in memory
// (contiguous, channels_last, ...), so such inputs run without copies; any other layout is copied to contiguous
// first. Positions and counts are 64-bit everywhere: a tensor may hold more than 2^31 elements.
struct DropPathAddLayout {
  int64_t numel;
  int64_t per_sample;
  int64_t channels;  // gamma's length; 1 without gamma
  int64_t inner;     // memory distance between two channels; per_sample when there is a single channel

  C10_HOST_DEVICE int64_t sample_of(int64_t p) const {
    return p / per_sample;
  }
  C10_HOST_DEVICE int64_t channel_of(int64_t p) const {
    return (p / inner) % channels;
  }
};

}  // namespace vitops

#ifndef VITOPS_EMULATE_CUDA
// --- 2. argument checks and outputs (ATen) -------------------------------------------------------------------
#include "checks.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <optional>
#include <tuple>
#include <type_traits>

namespace vitops {

inline bool is_batch_outer_dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() && (t.size(0) <= 1 || t.stride(0) * t.size(0) == t.numel());
}

// Outputs take the layout of `like` when the kernels can walk it, else the contiguous one, as
// reference.drop_path_add_empty_output (vitops/ops/reference.py) gives the fake kernels.
inline at::Tensor empty_in_kernel_layout(const at::Tensor& like, at::ScalarType dtype) {
  auto options = like.options().dtype(dtype);
  return is_batch_outer_dense(like) ? at::empty_like(like, options) : at::empty(like.sizes(), options);
}

// `x` with the strides of `layout`, copied only when they differ.
inline at::Tensor with_layout_of(const at::Tensor& x, const at::Tensor& layout) {
  if (x.strides() == layout.strides()) {
    return x;
  }
  auto copy = at::empty_like(layout, x.options());
  copy.copy_(x);
  return copy;
}

// The branch may be stored in a narrower type than the output (a half/bfloat16 branch added to a float
// residual under autocast); every other pairing is cast by the Python wrapper before it reaches the kernels.
inline bool is_supported_pair(at::ScalarType out, at::ScalarType branch) {
  return branch == out || (out == at::kFloat && (branch == at::kHalf || branch == at::kBFloat16));
}

inline void check_gamma_and_scale(
    const char* op,
    const at::Tensor& like,
    at::ScalarType acc,
    const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& sample_scale) {
  if (gamma.has_value()) {
    const auto& g = *gamma;
    check_same_device(op, "gamma", g, "branch", like);
    VITOPS_CHECK_TYPE(
        g.scalar_type() == acc, op, "gamma must be ", acc, " for ", like.scalar_type(), " inputs, got ",
        g.scalar_type());
    bool broadcastable = g.dim() >= 1 && g.dim() < like.dim() && g.size(0) == like.size(like.dim() - g.dim());
    for (int64_t d = 1; broadcastable && d < g.dim(); ++d) {
      broadcastable = g.size(d) == 1;
    }
    VITOPS_CHECK(
        broadcastable, op, "gamma of shape ", g.sizes(), " can't scale branch of shape ", like.sizes(),
        ": give (C,) for the last dim, or (C, 1, ..., 1) for an earlier one, e.g. (C, 1, 1) for dim 1 of NCHW");
  }
  if (sample_scale.has_value()) {
    const auto& s = *sample_scale;
    check_same_device(op, "sample_scale", s, "branch", like);
    VITOPS_CHECK_TYPE(s.scalar_type() == acc, op, "sample_scale must be ", acc, ", got ", s.scalar_type());
    VITOPS_CHECK(
        s.dim() == 1 && s.size(0) == like.size(0), op, "sample_scale must have shape (", like.size(0),
        ",), one value per sample, got ", s.sizes());
  }
}

inline void check_drop_path_add(
    const std::optional<at::Tensor>& residual,
    const at::Tensor& branch,
    const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& sample_scale) {
  constexpr const char* op = "drop_path_add";
  VITOPS_CHECK_TYPE(
      is_floating_kernel_dtype(branch.scalar_type()), op,
      "branch must be float32, float16, bfloat16 or float64, got ", branch.scalar_type());
  VITOPS_CHECK(branch.dim() >= 1, op, "branch must have a batch dim, got a 0-d tensor");
  at::ScalarType out_dtype = branch.scalar_type();
  if (residual.has_value()) {
    const auto& r = *residual;
    check_same_device(op, "residual", r, "branch", branch);
    VITOPS_CHECK(
        r.sizes() == branch.sizes(), op, "residual and branch must have the same shape, got ", r.sizes(), " and ",
        branch.sizes());
    out_dtype = r.scalar_type();
    VITOPS_CHECK_TYPE(
        is_floating_kernel_dtype(out_dtype) && is_supported_pair(out_dtype, branch.scalar_type()), op,
        "residual must be float32, float16, bfloat16 or float64 and branch the same dtype (or float16/bfloat16 "
        "with a float32 residual), got residual ", out_dtype, " and branch ", branch.scalar_type());
  }
  check_gamma_and_scale(op, branch, accumulate_dtype(out_dtype), gamma, sample_scale);
}

inline void check_drop_path_add_backward(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& branch,
    const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& sample_scale,
    at::ScalarType branch_dtype) {
  constexpr const char* op = "drop_path_add_backward";
  VITOPS_CHECK_TYPE(
      is_floating_kernel_dtype(grad_out.scalar_type()) && is_supported_pair(grad_out.scalar_type(), branch_dtype),
      op, "unsupported grad_out ", grad_out.scalar_type(), " for branch dtype ", branch_dtype);
  VITOPS_CHECK(grad_out.dim() >= 1, op, "grad_out must have a batch dim, got a 0-d tensor");
  if (branch.has_value()) {
    VITOPS_CHECK(gamma.has_value(), op, "branch is only needed, and only accepted, for gamma's gradient");
    VITOPS_CHECK(
        branch->sizes() == grad_out.sizes() && branch->scalar_type() == branch_dtype &&
            branch->device() == grad_out.device(),
        op, "branch must match grad_out's shape and device and have dtype branch_dtype");
  }
  check_gamma_and_scale(op, grad_out, accumulate_dtype(grad_out.scalar_type()), gamma, sample_scale);
}

inline DropPathAddLayout make_layout(const at::Tensor& out, const std::optional<at::Tensor>& gamma) {
  DropPathAddLayout layout;
  layout.numel = out.numel();
  layout.per_sample = out.size(0) == 0 ? 0 : layout.numel / out.size(0);
  layout.channels = gamma.has_value() ? gamma->size(0) : 1;
  layout.inner = layout.channels > 1 ? out.stride(out.dim() - gamma->dim()) : layout.per_sample;
  return layout;
}

// What the forward and backward kernels both read: gamma and sample_scale contiguous, and the layout they walk.
struct GammaAndScale {
  std::optional<at::Tensor> gamma;
  std::optional<at::Tensor> sample_scale;
  DropPathAddLayout layout;

  GammaAndScale(
      const at::Tensor& walked, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& sample_scale)
      : gamma(contiguous_or_none(gamma)),
        sample_scale(contiguous_or_none(sample_scale)),
        layout(make_layout(walked, gamma)) {}
};

// The forward's tensors as the kernels read them: all in the output's layout.
struct ForwardArgs : GammaAndScale {
  at::Tensor out;
  at::Tensor branch;
  std::optional<at::Tensor> residual;
};

// The backward's tensors as the kernels read them, all in grad_out's layout when the kernels can walk it (else
// contiguous). `grad_branch` is allocated (empty when not asked for); `branch` is present exactly when gamma's
// gradient is asked for.
struct BackwardArgs : GammaAndScale {
  at::Tensor grad_out;
  std::optional<at::Tensor> branch;
  at::Tensor grad_branch;
  bool need_branch_grad;
  at::ScalarType accumulate;
};

// drop_path_add on one backend: the checks, the output and the inputs in its layout, then launch(args) to write
// the output unless it is empty.
template <void (*launch)(const ForwardArgs&)>
at::Tensor drop_path_add_op(
    const std::optional<at::Tensor>& residual,
    const at::Tensor& branch,
    const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& sample_scale) {
  check_drop_path_add(residual, branch, gamma, sample_scale);
  const auto& primary = residual.has_value() ? *residual : branch;
  const at::Tensor out = empty_in_kernel_layout(primary, primary.scalar_type());
  const ForwardArgs args{
      {out, gamma, sample_scale},
      out,
      with_layout_of(branch, out),
      residual.has_value() ? std::optional<at::Tensor>(with_layout_of(*residual, out)) : std::nullopt};
  if (args.layout.numel > 0) {
    launch(args);
  }
  return out;
}

// drop_path_add_backward on one backend: the checks, grad_branch and the inputs in grad_out's layout, then
// launch(args) when there is a gradient to compute, which writes grad_branch (when asked for) and returns gamma's
// gradient, gamma's numel values in any shape (when asked for; else anything).
template <at::Tensor (*launch)(const BackwardArgs&)>
std::tuple<at::Tensor, at::Tensor> drop_path_add_backward_op(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& branch,
    const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& sample_scale,
    at::ScalarType branch_dtype,
    bool need_branch_grad) {
  check_drop_path_add_backward(grad_out, branch, gamma, sample_scale, branch_dtype);
  const at::Tensor walked = is_batch_outer_dense(grad_out) ? grad_out : grad_out.contiguous();
  const auto branch_options = grad_out.options().dtype(branch_dtype);
  const BackwardArgs args{
      {walked, gamma, sample_scale},
      walked,
      branch.has_value() ? std::optional<at::Tensor>(with_layout_of(*branch, walked)) : std::nullopt,
      need_branch_grad ? at::empty_like(walked, branch_options) : at::empty({0}, branch_options),
      need_branch_grad,
      accumulate_dtype(grad_out.scalar_type())};
  const bool need_gamma_grad = args.branch.has_value();
  const auto gamma_options = grad_out.options().dtype(args.accumulate);
  if (!need_gamma_grad) {
    if (args.layout.numel > 0 && need_branch_grad) {
      launch(args);
    }
    return {args.grad_branch, at::empty({0}, gamma_options)};
  }
  const at::Tensor grad_gamma = args.layout.numel > 0 ? launch(args) : at::zeros({gamma->size(0)}, gamma_options);
  return {args.grad_branch, grad_gamma.view(gamma->sizes())};
}

// Calls fn(out_type(), branch_type()) for the (output, branch) dtype pair; the checks above admit no other.
template <typename Fn>
void dispatch_pair(at::ScalarType out, at::ScalarType branch, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out, "vitops::drop_path_add", [&] {
    using out_type = scalar_t;
    if (branch == out) {
      fn(out_type(), out_type());
    } else if constexpr (std::is_same_v<out_type, float>) {
      AT_DISPATCH_REDUCED_FLOATING_TYPES(branch, "vitops::drop_path_add", [&] { fn(out_type(), scalar_t()); });
    } else {
      TORCH_INTERNAL_ASSERT(false, "unsupported dtype pair passed the argument checks");
    }
  });
}

}  // namespace vitops
#endif  // VITOPS_EMULATE_CUDA
