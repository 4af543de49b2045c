#pragma once
// Host side of multi-tensor apply for the fused optimizer steps on CUDA (multi_tensor_kernels.cuh has the
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

struct DevicePlan {
  at::Tensor storage;  // keeps the device tables alive for the launches
  PlanView view;
};

inline int32_t dtype_code(at::ScalarType t) {
  return t == at::kFloat ? kF32 : t == at::kHalf ? kF16 : kBF16;
}

// `fill(t, meta)` sets the op-specific fields of tensor t's entry.
template <typename Fill>
DevicePlan upload_plan(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
    const std::vector<int64_t>& rows, const Fill& fill) {
  const size_t n = params.size();
  std::vector<int64_t> numel(n);
  for (size_t t = 0; t < n; ++t) {
    numel[t] = params[t].numel();
  }
  PlanTables tables = plan_tables(numel, rows);
  for (size_t t = 0; t < n; ++t) {
    TensorMeta& meta = tables.tensors[t];
    meta.p = params[t].data_ptr();
    meta.g = grads[t].const_data_ptr();
    meta.m = exp_avgs[t].mutable_data_ptr<float>();
    meta.v = exp_avg_sqs[t].mutable_data_ptr<float>();
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
