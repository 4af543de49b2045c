#pragma once
// Argument checks and dtype helpers shared by every op's CPU and CUDA entry points. A check that fails raises
// a c10::Error (RuntimeError in Python) whose message starts with "vitops.<op>: " and names the argument.
// Per-element math shared by host and device lives in the ATen-free csrc/<op>.h headers, marked C10_HOST_DEVICE.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

// TORCH_CHECK for errors the caller can cause; the message is prefixed with "vitops.<op>: ".
#define VITOPS_CHECK(cond, op, ...) TORCH_CHECK(cond, "vitops.", op, ": ", __VA_ARGS__)

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

}  // namespace vitops
