#pragma once
// Argument checks and dtype helpers shared by every op's CPU and CUDA entry points. A check that fails raises
// an error whose message starts with "vitops.<op>: " and names the argument: TypeError for a wrong dtype
// (VITOPS_CHECK_TYPE), ValueError for anything else (VITOPS_CHECK), as the Python checks of the same ops do.
// Per-element math shared by host and device lives in the ATen-free csrc/<op>.h headers, marked C10_HOST_DEVICE.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

// For errors the caller can cause; the message is prefixed with "vitops.<op>: ".
#define VITOPS_CHECK(cond, op, ...) TORCH_CHECK_VALUE(cond, "vitops.", op, ": ", __VA_ARGS__)
#define VITOPS_CHECK_TYPE(cond, op, ...) TORCH_CHECK_TYPE(cond, "vitops.", op, ": ", __VA_ARGS__)

namespace vitops {

// The dtype every kernel computes in: double for double tensors, float for float, half and bfloat16.
inline at::ScalarType accumulate_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// `name` must be on `like`'s device.
inline void check_same_device(
    const char* op, const char* name, const at::Tensor& t, const char* like_name, const at::Tensor& like) {
  VITOPS_CHECK(t.device() == like.device(), op, name, " is on ", t.device(), " but ", like_name, " is on ",
               like.device());
}

// The floating dtypes the elementwise kernels are built for: float32, float16, bfloat16 and float64.
inline bool is_floating_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// The data of an optional tensor argument, null when it is absent.
template <typename T>
inline const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

}  // namespace vitops
