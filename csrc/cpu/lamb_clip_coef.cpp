// CPU kernel of lamb_clip_coef: one parallel pass over every grad of the step (multi_tensor.h's chunk plan, so
// small tensors cost no parallel region of their own), sums of squares in double per chunk, added up in a fixed
// order so the result does not depend on the number of threads. torch._foreach_norm, the alternative, runs one
// parallel region per tensor and is about half as fast on the parameter sets of vision transformers.
#include "multi_tensor.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <cmath>

namespace vitops {
namespace cpu {
namespace {

template <typename T>
double sum_of_squares(const T* x, int64_t n) {
  float acc[kLanes] = {0.f};  // lanes the compiler vectorizes; a chunk is short enough for float partials
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = load_float(x[i + l]);
      acc[l] += v * v;
    }
  }
  double total = 0;
  for (; i < n; ++i) {
    const double v = double(x[i]);
    total += v * v;
  }
  for (int l = 0; l < kLanes; ++l) {
    total += acc[l];
  }
  return total;
}

template <>
double sum_of_squares<double>(const double* x, int64_t n) {
  double total = 0;
  for (int64_t i = 0; i < n; ++i) {
    total += x[i] * x[i];
  }
  return total;
}

at::Tensor lamb_clip_coef_cpu(at::TensorList grads, double max_grad_norm) {
  TORCH_CHECK(!grads.empty(), "vitops.lamb_clip_coef: grads is empty");
  TORCH_CHECK(max_grad_norm > 0, "vitops.lamb_clip_coef: max_grad_norm must be > 0, got ", max_grad_norm);
  std::vector<at::Tensor> dense;
  std::vector<int64_t> numel, rows;
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& g = grads[i];
    TORCH_CHECK(g.device().is_cpu(), "vitops.lamb_clip_coef: grads[", i, "] is on ", g.device(), ", not the CPU");
    TORCH_CHECK(!g.is_sparse(), "vitops.lamb_clip_coef: grads[", i, "] is sparse; sparse gradients are not supported");
    TORCH_CHECK(at::isFloatingType(g.scalar_type()), "vitops.lamb_clip_coef: grads[", i,
                "] must be floating point, got ", g.scalar_type());
    dense.push_back(g.contiguous());
    numel.push_back(g.numel());
    rows.push_back(1);
  }
  const ChunkPlan plan = make_chunk_plan(numel, rows);
  std::vector<double> partials(plan.slot_row.size(), 0.0);
  for_each_segment(plan, [&](const Chunk& c, int64_t begin, int64_t end, int64_t slot) {
    const at::Tensor& g = dense[c.tensor];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "vitops::lamb_clip_coef", [&] {
      partials[slot] = sum_of_squares(g.const_data_ptr<scalar_t>() + begin, end - begin);
    });
  });
  double total = 0;
  for (const double p : partials) {
    total += p;
  }
  const double coef = std::max(1.0, std::sqrt(total) / max_grad_norm);
  return at::scalar_tensor(coef, at::TensorOptions().dtype(at::kFloat));
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("lamb_clip_coef", &cpu::lamb_clip_coef_cpu);
}

}  // namespace vitops
