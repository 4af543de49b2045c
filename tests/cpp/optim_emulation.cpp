// Runs the optimizer ops' CUDA kernels (csrc/cuda/lamb.cuh, adamp.cuh) on the CPU (cuda_emulation.h), on the
// tables the CUDA host code builds (plan_tables), launching them as csrc/cuda/lamb.cu and adamp.cu do, so that
// without a GPU the kernels' multi-tensor indexing, block reductions and finalize kernels are checked. Built as a
// shared library and called through ctypes by tests/optim/test_optim_cuda_emulation.py, on tensors the test
// allocates: each function takes an op's arguments (vitops/ops/schemas.def) with its tensor lists as arrays of
// pointers, one entry per param, and the params' numel, dtype (csrc/cpu/chunk_plan.h's Dtype) and size(0).
#include "cuda_emulation.h"

#include <vector>

#include "../../csrc/cuda/adamp.cuh"
#include "../../csrc/cuda/lamb.cuh"

using namespace vitops;
using namespace vitops::cuda;

namespace {

// The tables the host code uploads, with this process's pointers: adamp_rows (csrc/optim.h) rows per param for
// AdamP, one for LAMB.
struct HostPlan {
  PlanTables tables;
  PlanView view;

  HostPlan(int64_t n, void* const* p, const void* const* g, float* const* m, float* const* v, const int64_t* numel,
           const int32_t* dtype, const int64_t* rows = nullptr) {
    std::vector<int64_t> numels(numel, numel + n), row_counts(n, 1);
    for (int64_t t = 0; rows != nullptr && t < n; ++t) row_counts[t] = rows[t];
    tables = plan_tables(numels, row_counts);
    for (int64_t t = 0; t < n; ++t) {
      TensorMeta& meta = tables.tensors[t];
      meta.p = p[t];
      meta.g = g ? g[t] : nullptr;
      meta.m = m ? m[t] : nullptr;
      meta.v = v ? v[t] : nullptr;
      meta.dtype = dtype[t];
    }
    view = PlanView{tables.tensors.data(), tables.chunks.data(), tables.row_slots.data(), n,
                    int64_t(tables.chunks.size()), tables.num_slots, tables.total_rows};
  }
};

Dim3 grid(int64_t blocks) { return Dim3{unsigned(blocks), 1, 1}; }

std::vector<float> partials_for(const HostPlan& h, int width) {
  return std::vector<float>(std::max<int64_t>(1, width * h.view.num_slots), std::nanf(""));  // garbage-like
}

// As lamb.cu's tensor_sums: the per-tensor sums of a one-row-per-tensor plan.
template <int WIDTH>
void tensor_sums(const HostPlan& h, const std::vector<float>& partials, float* out) {
  launch(grid((h.view.total_rows + kThreads - 1) / kThreads), kThreads, 0,
         [&] { row_sums_kernel<WIDTH>(h.view, partials.data(), out); });
}

// As adamp.cu's adamp_plan.
HostPlan adamp_plan(int64_t n, void* const* p, const void* const* g, float* const* m, float* const* v,
                    const int64_t* numel, const int32_t* dtype, const int64_t* dim, const int64_t* rows,
                    const double* bc1, const double* bc2, double lr, const int64_t* full_numel) {
  HostPlan h(n, p, g, m, v, numel, dtype, rows);
  for (int64_t t = 0; t < n; ++t) {
    TensorMeta& meta = h.tables.tensors[t];
    const adamp::StepConstants s = adamp::step_constants(lr, bc1[t], bc2[t]);
    meta.flag = dim[t] > 1;
    meta.f0 = s.inv_sqrt_bc2;
    meta.f1 = s.neg_step;
    if (full_numel) meta.full_numel = full_numel[t];
  }
  return h;
}

}  // namespace

extern "C" {

void lamb_grad_sq_sums(int64_t n, void* const* grads, const int64_t* numel, const int32_t* dtype, float* out) {
  const HostPlan h(n, grads, nullptr, nullptr, nullptr, numel, dtype);
  auto partials = partials_for(h, 1);
  launch(grid(h.view.num_chunks), kThreads, 0, [&] { lamb_sq_sum_kernel(h.view, partials.data()); });
  tensor_sums<1>(h, partials, out);
}

void lamb_moments(int64_t n, void* const* p, const void* const* g, float* const* m, float* const* v,
                  const int64_t* numel, const int32_t* dtype, const float* grad_sq_sum, double max_grad_norm,
                  double lr, double beta1, double beta2, double beta3, double bc1, double bc2, double eps,
                  double weight_decay, double decay_scale, int decoupled, int adapt, const float* found_inf,
                  float* sums) {
  const HostPlan h(n, p, g, m, v, numel, dtype);
  const auto k = lamb::make_constants(lr, beta1, beta2, beta3, bc1, bc2, eps, weight_decay, decay_scale, decoupled);
  auto partials = partials_for(h, 2);
  launch(grid(h.view.num_chunks), kThreads, 0, [&] {
    if (adapt) {
      lamb_moments_kernel<false>(h.view, k, grad_sq_sum, float(max_grad_norm), partials.data(), found_inf);
    } else {
      lamb_moments_kernel<true>(h.view, k, grad_sq_sum, float(max_grad_norm), partials.data(), found_inf);
    }
  });
  tensor_sums<2>(h, partials, sums);
}

void lamb_apply(int64_t n, void* const* p, float* const* m, float* const* v, const int64_t* numel,
                const int32_t* dtype, const float* sums, double lr, double beta1, double beta2, double beta3,
                double bc1, double bc2, double eps, double weight_decay, double decay_scale, int decoupled,
                int trust_clip, const float* found_inf) {
  const HostPlan h(n, p, nullptr, m, v, numel, dtype);
  const auto k = lamb::make_constants(lr, beta1, beta2, beta3, bc1, bc2, eps, weight_decay, decay_scale, decoupled);
  launch(grid(h.view.num_chunks), kThreads, 0, [&] { lamb_apply_kernel(h.view, k, sums, trust_clip, found_inf); });
}

void adamp_moments(int64_t n, void* const* p, const void* const* g, float* const* m, float* const* v,
                   const int64_t* numel, const int32_t* dtype, const int64_t* dim, const int64_t* rows,
                   const double* bc1, const double* bc2, double lr, double beta1, double beta2, double eps,
                   double weight_decay, double delta, double wd_ratio, int nesterov, const float* found_inf,
                   float* row_coefs, float* tensor_sums) {
  const HostPlan h = adamp_plan(n, p, g, m, v, numel, dtype, dim, rows, bc1, bc2, lr, nullptr);
  const auto k = adamp::make_constants(lr, beta1, beta2, eps, weight_decay, delta, wd_ratio, nesterov);
  auto partials = partials_for(h, 4);
  launch(grid(h.view.num_chunks), kThreads, 0, [&] { adamp_moments_kernel(h.view, k, partials.data(), found_inf); });
  launch(grid(h.view.num_tensors), kThreads, 0,
         [&] { adamp_finalize_kernel(h.view, k, partials.data(), row_coefs, tensor_sums, found_inf); });
}

void adamp_apply(int64_t n, void* const* p, const void* const* g, float* const* m, float* const* v,
                 const int64_t* numel, const int32_t* dtype, const int64_t* dim, const int64_t* rows,
                 const float* row_coefs, const float* tensor_sums, const int64_t* full_numel, const double* bc1,
                 const double* bc2, double lr, double beta1, double beta2, double eps, double weight_decay,
                 double delta, double wd_ratio, int nesterov, const float* found_inf) {
  const HostPlan h = adamp_plan(n, p, g, m, v, numel, dtype, dim, rows, bc1, bc2, lr, full_numel);
  const auto k = adamp::make_constants(lr, beta1, beta2, eps, weight_decay, delta, wd_ratio, nesterov);
  launch(grid(h.view.num_chunks), kThreads, 0,
         [&] { adamp_apply_kernel(h.view, k, row_coefs, tensor_sums, found_inf); });
}

}  // extern "C"
