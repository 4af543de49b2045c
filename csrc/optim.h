#pragma once
// Argument checks of the optimizer ops (lamb_*, adamp_*), shared by their CPU and CUDA entry points. The math is
// in the ATen-free lamb.h and adamp.h.
//
// Every list holds one entry per param. Params and grads are float32, float16 or bfloat16 (a grad has its
// param's dtype), moment buffers float32, all contiguous, of the param's shape, on one device. The Python
// optimizers send any other param (float64, non-contiguous, ...) to the reference implementation.
#include "adamp.h"
#include "checks.h"
#include "cpu/chunk_plan.h"

#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <numeric>
#include <vector>

namespace vitops {

inline bool is_optim_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline Dtype dtype_code(at::ScalarType t) {
  return t == at::kFloat ? kF32 : t == at::kHalf ? kF16 : kBF16;
}

// A list checked against params: `param_dtype` (grads) or float32 (moments).
struct StepList {
  const char* name;
  at::TensorList tensors;
  bool param_dtype;
};

// params (named `params_name`) are float32, float16 or bfloat16, contiguous, on one device.
inline void check_step_lists(const char* op, at::TensorList params, std::initializer_list<StepList> lists,
                             const char* params_name = "params") {
  const size_t n = params.size();
  for (const StepList& list : lists) {
    VITOPS_CHECK(list.tensors.size() == n, op, list.name, " has ", list.tensors.size(), " tensors but ", params_name,
                 " has ", n, "; they need one per param");
  }
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    VITOPS_CHECK_TYPE(is_optim_dtype(p.scalar_type()), op, params_name, "[", i,
                      "] must be float32, float16 or bfloat16, got ", p.scalar_type());
    VITOPS_CHECK(p.is_contiguous(), op, params_name, "[", i, "] must be contiguous");
    VITOPS_CHECK(p.device() == params[0].device(), op, params_name, "[", i, "] is on ", p.device(), " but ",
                 params_name, "[0] is on ", params[0].device());
    for (const StepList& list : lists) {
      const auto& t = list.tensors[i];
      VITOPS_CHECK(!t.is_sparse(), op, list.name, "[", i, "] is sparse; sparse gradients are not supported");
      VITOPS_CHECK(t.sizes() == p.sizes(), op, list.name, "[", i, "] has shape ", t.sizes(), " but params[", i,
                   "] has ", p.sizes());
      VITOPS_CHECK(t.device() == p.device(), op, list.name, "[", i, "] is on ", t.device(), " but params[", i,
                   "] is on ", p.device());
      VITOPS_CHECK(t.is_contiguous(), op, list.name, "[", i, "] must be contiguous");
      const auto want = list.param_dtype ? p.scalar_type() : at::kFloat;
      VITOPS_CHECK_TYPE(t.scalar_type() == want, op, list.name, "[", i, "] must be ", want, " (params[", i, "] is ",
                        p.scalar_type(), "), got ", t.scalar_type());
    }
  }
}

// A float32 tensor of `shape` on the params' device.
inline void check_float_tensor(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                               at::TensorList params) {
  VITOPS_CHECK_TYPE(t.scalar_type() == at::kFloat, op, name, " must be float32, got ", t.scalar_type());
  VITOPS_CHECK(t.sizes() == shape, op, name, " must have shape ", shape, ", got ", t.sizes());
  VITOPS_CHECK(t.is_contiguous(), op, name, " must be contiguous");
  if (!params.empty()) {
    check_same_device(op, name, t, "params[0]", params[0]);
  }
}

// found_inf, the optimizers' skip_nonfinite flag: a float32 0-d tensor on the params' device.
inline void check_found_inf(const char* op, const std::optional<at::Tensor>& found_inf, at::TensorList params) {
  if (found_inf.has_value()) {
    check_float_tensor(op, "found_inf", *found_inf, {}, params);
  }
}

// Whether found_inf says the step is skipped, read on the host: for the CPU kernels only (on a GPU this would wait
// for it).
inline bool step_skipped_on_host(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->item<float>() != 0.f;
}

inline void check_per_param(const char* op, const char* name, size_t size, at::TensorList params) {
  VITOPS_CHECK(size == params.size(), op, name, " needs one value per param, got ", size, " for ", params.size(),
               " params");
}

// The checks of each op, run by its CPU and CUDA kernels alike (vitops/optim/_kernels.py checks the same in
// Python for the Triton and reference backends).
inline void check_lamb_grad_sq_sums(at::TensorList grads) {
  check_step_lists("lamb_grad_sq_sums", grads, {}, "grads");
}

inline void check_lamb_moments(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, const std::optional<at::Tensor>& grad_sq_sum,
                               double max_grad_norm, const std::optional<at::Tensor>& found_inf) {
  const char* op = "lamb_moments";
  check_step_lists(op, params, {{"grads", grads, true}, {"exp_avgs", exp_avgs, false},
                                {"exp_avg_sqs", exp_avg_sqs, false}});
  if (grad_sq_sum.has_value()) {
    check_float_tensor(op, "grad_sq_sum", *grad_sq_sum, {}, params);
    VITOPS_CHECK(max_grad_norm > 0, op, "max_grad_norm must be > 0, got ", max_grad_norm);
  }
  check_found_inf(op, found_inf, params);
}

inline void check_lamb_apply(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                             const at::Tensor& sums, const std::optional<at::Tensor>& found_inf) {
  const char* op = "lamb_apply";
  check_step_lists(op, params, {{"exp_avgs", exp_avgs, false}, {"exp_avg_sqs", exp_avg_sqs, false}});
  check_float_tensor(op, "sums", sums, {int64_t(params.size()), 2}, params);
  check_found_inf(op, found_inf, params);
}

inline void check_adamp_lists(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::ArrayRef<double> bias_correction1,
                              at::ArrayRef<double> bias_correction2) {
  check_step_lists(op, params, {{"grads", grads, true}, {"exp_avgs", exp_avgs, false},
                                {"exp_avg_sqs", exp_avg_sqs, false}});
  check_per_param(op, "bias_correction1", bias_correction1.size(), params);
  check_per_param(op, "bias_correction2", bias_correction2.size(), params);
}

inline void check_adamp_moments(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                at::TensorList exp_avg_sqs, at::ArrayRef<double> bias_correction1,
                                at::ArrayRef<double> bias_correction2, const std::optional<at::Tensor>& found_inf) {
  const char* op = "adamp_moments";
  check_adamp_lists(op, params, grads, exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2);
  check_found_inf(op, found_inf, params);
}

// AdamP's projection views a param of 2 or more dims as (size(0), numel / size(0)) rows; any other is one row.
inline int64_t adamp_rows(const at::Tensor& p) {
  return p.dim() > 1 && p.numel() > 0 ? p.size(0) : 1;
}

// adamp_rows of each param.
inline std::vector<int64_t> adamp_rows(at::TensorList params) {
  std::vector<int64_t> rows;
  rows.reserve(params.size());
  for (const auto& p : params) {
    rows.push_back(adamp_rows(p));
  }
  return rows;
}

// row_coefs has adamp_rows rows per param, tensor_sums adamp::kTensorSums values per param.
inline void check_adamp_apply(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, const at::Tensor& row_coefs, const at::Tensor& tensor_sums,
                              at::IntArrayRef full_numels, at::ArrayRef<double> bias_correction1,
                              at::ArrayRef<double> bias_correction2, const std::optional<at::Tensor>& found_inf) {
  const char* op = "adamp_apply";
  check_adamp_lists(op, params, grads, exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2);
  check_per_param(op, "full_numels", full_numels.size(), params);
  const std::vector<int64_t> rows = adamp_rows(params);
  check_float_tensor(op, "row_coefs", row_coefs, {std::accumulate(rows.begin(), rows.end(), int64_t(0))}, params);
  check_float_tensor(op, "tensor_sums", tensor_sums, {int64_t(params.size()), adamp::kTensorSums}, params);
  check_found_inf(op, found_inf, params);
}

}  // namespace vitops
