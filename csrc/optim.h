#pragma once
// Argument checks shared by the CPU and CUDA kernels of the fused optimizer steps (lamb_step, adamp_step).
//
// Every list holds one entry per parameter. Params and grads are float32, float16 or bfloat16 (a grad has its
// param's dtype), the moment buffers are float32, and all are contiguous tensors of the param's shape on one
// device. The Python optimizers send any other param (float64, non-contiguous, ...) down the reference path.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

namespace vitops {

#define VITOPS_OPTIM_CHECK(cond, op, ...) TORCH_CHECK(cond, "vitops.", op, ": ", __VA_ARGS__)

inline bool is_optim_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_optim_lists(
    const char* op,
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs) {
  const size_t n = params.size();
  VITOPS_OPTIM_CHECK(
      grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n, op,
      "params, grads, exp_avgs and exp_avg_sqs must have the same length, got ", n, ", ", grads.size(), ", ",
      exp_avgs.size(), " and ", exp_avg_sqs.size());
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    VITOPS_OPTIM_CHECK(
        is_optim_param_dtype(p.scalar_type()), op, "params[", i, "] must be float32, float16 or bfloat16, got ",
        p.scalar_type());
    VITOPS_OPTIM_CHECK(p.is_contiguous(), op, "params[", i, "] must be contiguous");
    VITOPS_OPTIM_CHECK(
        p.device() == params[0].device(), op, "params[", i, "] is on ", p.device(), " but params[0] is on ",
        params[0].device());
    const at::Tensor* others[3] = {&grads[i], &exp_avgs[i], &exp_avg_sqs[i]};
    const char* names[3] = {"grads", "exp_avgs", "exp_avg_sqs"};
    for (int k = 0; k < 3; ++k) {
      const auto& t = *others[k];
      VITOPS_OPTIM_CHECK(!t.is_sparse(), op, names[k], "[", i, "] is sparse; sparse gradients are not supported");
      VITOPS_OPTIM_CHECK(
          t.sizes() == p.sizes(), op, names[k], "[", i, "] has shape ", t.sizes(), " but params[", i, "] has ",
          p.sizes());
      VITOPS_OPTIM_CHECK(t.device() == p.device(), op, names[k], "[", i, "] is on ", t.device(), " but params[", i,
                         "] is on ", p.device());
      VITOPS_OPTIM_CHECK(t.is_contiguous(), op, names[k], "[", i, "] must be contiguous");
    }
    VITOPS_OPTIM_CHECK(
        grads[i].scalar_type() == p.scalar_type(), op, "grads[", i, "] must have its param's dtype ",
        p.scalar_type(), ", got ", grads[i].scalar_type());
    VITOPS_OPTIM_CHECK(
        exp_avgs[i].scalar_type() == at::kFloat && exp_avg_sqs[i].scalar_type() == at::kFloat, op,
        "exp_avgs[", i, "] and exp_avg_sqs[", i, "] must be float32");
  }
}

inline void check_lamb_args(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs,
    const std::optional<at::Tensor>& clip_coef) {
  check_optim_lists("lamb_step", params, grads, exp_avgs, exp_avg_sqs);
  if (clip_coef.has_value()) {
    VITOPS_OPTIM_CHECK(
        clip_coef->numel() == 1 && clip_coef->scalar_type() == at::kFloat, "lamb_step",
        "clip_coef must be a one-element float32 tensor, got ", clip_coef->scalar_type(), " of shape ",
        clip_coef->sizes());
    if (!params.empty()) {
      VITOPS_OPTIM_CHECK(
          clip_coef->device() == params[0].device(), "lamb_step", "clip_coef is on ", clip_coef->device(),
          " but params are on ", params[0].device());
    }
  }
}

inline void check_adamp_args(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs,
    at::ArrayRef<double> bias_correction1,
    at::ArrayRef<double> bias_correction2) {
  check_optim_lists("adamp_step", params, grads, exp_avgs, exp_avg_sqs);
  VITOPS_OPTIM_CHECK(
      bias_correction1.size() == params.size() && bias_correction2.size() == params.size(), "adamp_step",
      "bias_correction1 and bias_correction2 need one value per param, got ", bias_correction1.size(), " and ",
      bias_correction2.size(), " for ", params.size(), " params");
}

// AdamP's projection views a param of 2 or more dims as (size(0), numel / size(0)) rows; others are one row.
inline int64_t adamp_rows(const at::Tensor& p) {
  return p.dim() > 1 && p.numel() > 0 ? p.size(0) : 1;
}

}  // namespace vitops
