#pragma once
// Host side of multi-tensor apply for the optimizer ops on CUDA (multi_tensor_kernels.cuh has the
// device side): the tensor and chunk tables go to the device in one asynchronous copy from pinned memory, so
// there is no host sync anywhere in the step.
#include "../optim.h"
#include "multi_tensor_kernels.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>
#include <vector>

namespace vitops {
namespace cuda {

// An optional float32 argument (grad_sq_sum, found_inf) as the kernels take it: its data, or null without one.
inline const float* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<float>() : nullptr;
}

struct DevicePlan {
  at::Tensor storage;  // keeps the device tables alive for the launches
  PlanView view;
};

// The plan of `params` (rows[t] rows each), on their device. Entry t gets params[t]'s pointer and dtype; `fill(t,
// meta)` sets the rest an op needs (grads, moments, per-tensor constants).
template <typename Fill>
DevicePlan upload_plan(at::TensorList params, const std::vector<int64_t>& rows, const Fill& fill) {
  const size_t n = params.size();
  std::vector<int64_t> numel(n);
  for (size_t t = 0; t < n; ++t) {
    numel[t] = params[t].numel();
  }
  PlanTables tables = plan_tables(numel, rows);
  for (size_t t = 0; t < n; ++t) {
    TensorMeta& meta = tables.tensors[t];
    meta.p = params[t].data_ptr();
    meta.dtype = dtype_code(params[t].scalar_type());
    fill(t, meta);
  }
  const size_t tensor_bytes = tables.tensors.size() * sizeof(TensorMeta);
  const size_t chunk_bytes = tables.chunks.size() * sizeof(ChunkMeta);
  const size_t row_bytes = tables.row_slots.size() * sizeof(int64_t);
  const size_t words = (tensor_bytes + chunk_bytes + row_bytes) / 8;
  auto host = at::empty({int64_t(words)}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  char* h = reinterpret_cast<char*>(host.data_ptr<int64_t>());
  std::memcpy(h, tables.tensors.data(), tensor_bytes);
  std::memcpy(h + tensor_bytes, tables.chunks.data(), chunk_bytes);
  std::memcpy(h + tensor_bytes + chunk_bytes, tables.row_slots.data(), row_bytes);
  DevicePlan out;
  out.storage = host.to(params[0].device(), /*non_blocking=*/true);
  const char* d = reinterpret_cast<const char*>(out.storage.const_data_ptr<int64_t>());
  out.view.tensors = reinterpret_cast<const TensorMeta*>(d);
  out.view.chunks = reinterpret_cast<const ChunkMeta*>(d + tensor_bytes);
  out.view.row_slots = reinterpret_cast<const int64_t*>(d + tensor_bytes + chunk_bytes);
  out.view.num_tensors = int64_t(n);
  out.view.num_chunks = int64_t(tables.chunks.size());
  out.view.num_slots = tables.num_slots;
  out.view.total_rows = tables.total_rows;
  return out;
}

}  // namespace cuda
}  // namespace vitops
