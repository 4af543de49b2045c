#pragma once
// Argument checks and the memory-order layout shared by the CPU and CUDA kernels of drop_path_add.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <optional>
#include <type_traits>

namespace vitops {

#define VITOPS_CHECK_ARG(cond, op, ...) TORCH_CHECK(cond, "vitops.", op, ": ", __VA_ARGS__)

// The kernels walk every tensor in memory order. Element p belongs to sample p / per_sample and to channel
// (p / inner) % channels. That holds for any dense layout whose batch dim is outermost in memory (contiguous,
// channels_last, ...), so such inputs run without copies; any other layout is copied to contiguous first.
struct DropPathAddLayout {
  int64_t numel;
  int64_t per_sample;
  int64_t channels;  // gamma's length; 1 without gamma
  int64_t inner;     // memory distance between two channels; per_sample when there is a single channel
};

inline bool is_batch_outer_dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() && (t.size(0) <= 1 || t.stride(0) * t.size(0) == t.numel());
}

// Outputs take the layout of `like` when the kernels can walk it, else the contiguous one. The fake kernels
// in vitops/ops/drop_path.py follow the same rule.
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

inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// The dtype gamma, sample_scale and all arithmetic use: float for float/half/bfloat16 outputs, double for double.
inline at::ScalarType accumulate_dtype(at::ScalarType out) {
  return out == at::kDouble ? at::kDouble : at::kFloat;
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
    VITOPS_CHECK_ARG(g.device() == like.device(), op, "gamma is on ", g.device(), " but branch is on ", like.device());
    VITOPS_CHECK_ARG(g.scalar_type() == acc, op, "gamma must be ", acc, " for ", like.scalar_type(), " inputs, got ", g.scalar_type());
    VITOPS_CHECK_ARG(
        g.dim() >= 1 && g.dim() < like.dim(), op, "gamma must have between 1 and ", like.dim() - 1,
        " dims to broadcast against a ", like.dim(), "-d branch, got shape ", g.sizes());
    const int64_t channel_dim = like.dim() - g.dim();
    bool broadcastable = g.size(0) == like.size(channel_dim);
    for (int64_t d = 1; d < g.dim(); ++d) {
      broadcastable = broadcastable && g.size(d) == 1;
    }
    VITOPS_CHECK_ARG(
        broadcastable, op, "gamma must have shape (C,) or (C, 1, ..., 1) matching dim ", channel_dim,
        " of branch ", like.sizes(), ", got ", g.sizes());
  }
  if (sample_scale.has_value()) {
    const auto& s = *sample_scale;
    VITOPS_CHECK_ARG(s.device() == like.device(), op, "sample_scale is on ", s.device(), " but branch is on ", like.device());
    VITOPS_CHECK_ARG(s.scalar_type() == acc, op, "sample_scale must be ", acc, ", got ", s.scalar_type());
    VITOPS_CHECK_ARG(
        s.dim() == 1 && s.size(0) == like.size(0), op, "sample_scale must have shape (", like.size(0),
        ",), one value per sample, got ", s.sizes());
  }
}

inline DropPathAddLayout make_layout(const at::Tensor& out, const std::optional<at::Tensor>& gamma) {
  DropPathAddLayout layout;
  layout.numel = out.numel();
  layout.per_sample = out.size(0) == 0 ? 0 : layout.numel / out.size(0);
  layout.channels = gamma.has_value() ? gamma->size(0) : 1;
  layout.inner = layout.per_sample;
  if (layout.channels > 1) {
    layout.inner = out.stride(out.dim() - gamma->dim());
  }
  return layout;
}

// Checks the forward's arguments; returns the accumulate dtype.
inline at::ScalarType check_drop_path_add(
    const std::optional<at::Tensor>& residual,
    const at::Tensor& branch,
    const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& sample_scale) {
  constexpr const char* op = "drop_path_add";
  VITOPS_CHECK_ARG(
      is_kernel_dtype(branch.scalar_type()), op,
      "branch must be float32, float16, bfloat16 or float64, got ", branch.scalar_type());
  VITOPS_CHECK_ARG(branch.dim() >= 1, op, "branch must have a batch dim, got a 0-d tensor");
  at::ScalarType out_dtype = branch.scalar_type();
  if (residual.has_value()) {
    const auto& r = *residual;
    VITOPS_CHECK_ARG(r.device() == branch.device(), op, "residual is on ", r.device(), " but branch is on ", branch.device());
    VITOPS_CHECK_ARG(
        r.sizes() == branch.sizes(), op, "residual and branch must have the same shape, got ", r.sizes(),
        " and ", branch.sizes());
    out_dtype = r.scalar_type();
    VITOPS_CHECK_ARG(
        is_kernel_dtype(out_dtype) && is_supported_pair(out_dtype, branch.scalar_type()), op,
        "residual must be float32, float16, bfloat16 or float64 and branch the same dtype (or float16/bfloat16 "
        "with a float32 residual), got residual ", out_dtype, " and branch ", branch.scalar_type());
  }
  const auto acc = accumulate_dtype(out_dtype);
  check_gamma_and_scale(op, branch, acc, gamma, sample_scale);
  return acc;
}

inline void check_drop_path_add_backward(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& branch,
    const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& sample_scale,
    at::ScalarType branch_dtype) {
  constexpr const char* op = "drop_path_add_backward";
  VITOPS_CHECK_ARG(
      is_kernel_dtype(grad_out.scalar_type()) && is_supported_pair(grad_out.scalar_type(), branch_dtype), op,
      "unsupported grad_out ", grad_out.scalar_type(), " for branch dtype ", branch_dtype);
  VITOPS_CHECK_ARG(grad_out.dim() >= 1, op, "grad_out must have a batch dim, got a 0-d tensor");
  if (branch.has_value()) {
    VITOPS_CHECK_ARG(gamma.has_value(), op, "branch is only needed, and only accepted, for gamma's gradient");
    VITOPS_CHECK_ARG(
        branch->sizes() == grad_out.sizes() && branch->scalar_type() == branch_dtype &&
            branch->device() == grad_out.device(),
        op, "branch must match grad_out's shape and device and have dtype branch_dtype");
  }
  check_gamma_and_scale(op, grad_out, accumulate_dtype(grad_out.scalar_type()), gamma, sample_scale);
}

template <typename T>
inline const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

inline std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// The forward's tensors as the kernels read them: all in the output's layout.
struct ForwardArgs {
  at::Tensor out;
  std::optional<at::Tensor> residual;
  at::Tensor branch;
  std::optional<at::Tensor> gamma;
  std::optional<at::Tensor> sample_scale;
  DropPathAddLayout layout;
};

inline ForwardArgs prepare_forward(
    const std::optional<at::Tensor>& residual,
    const at::Tensor& branch,
    const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& sample_scale) {
  check_drop_path_add(residual, branch, gamma, sample_scale);
  const auto& primary = residual.has_value() ? *residual : branch;
  ForwardArgs args;
  args.out = empty_in_kernel_layout(primary, primary.scalar_type());
  args.branch = with_layout_of(branch, args.out);
  if (residual.has_value()) {
    args.residual = with_layout_of(*residual, args.out);
  }
  args.gamma = contiguous_or_none(gamma);
  args.sample_scale = contiguous_or_none(sample_scale);
  args.layout = make_layout(args.out, gamma);
  return args;
}

// The backward's tensors as the kernels read them. `grad_branch` is allocated (empty when not asked for);
// `branch` is present exactly when gamma's gradient is asked for.
struct BackwardArgs {
  at::Tensor grad_out;
  std::optional<at::Tensor> branch;
  std::optional<at::Tensor> gamma;
  std::optional<at::Tensor> sample_scale;
  at::Tensor grad_branch;
  bool need_branch_grad;
  at::ScalarType accumulate;
  DropPathAddLayout layout;
};

inline BackwardArgs prepare_backward(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& branch,
    const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& sample_scale,
    at::ScalarType branch_dtype,
    bool need_branch_grad) {
  check_drop_path_add_backward(grad_out, branch, gamma, sample_scale, branch_dtype);
  BackwardArgs args;
  args.need_branch_grad = need_branch_grad;
  args.accumulate = accumulate_dtype(grad_out.scalar_type());
  at::Tensor layout_ref = empty_in_kernel_layout(grad_out, branch_dtype);
  args.grad_branch = need_branch_grad ? layout_ref : at::empty({0}, grad_out.options().dtype(branch_dtype));
  args.grad_out = with_layout_of(grad_out, layout_ref);
  if (branch.has_value()) {
    args.branch = with_layout_of(*branch, layout_ref);
  }
  args.gamma = contiguous_or_none(gamma);
  args.sample_scale = contiguous_or_none(sample_scale);
  args.layout = make_layout(layout_ref, gamma);
  return args;
}

// Dispatches over the (output, branch) dtype pairs the kernels support.
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
