#pragma once
// Multi-tensor apply for the fused optimizer steps on CUDA. One launch covers every tensor of a step: the host
// cuts the tensors into chunks (csrc/cpu/multi_tensor.h's plan: a chunk is whole rows or a piece of one row),
// and sends the tensor and chunk tables to the device in one asynchronous copy from pinned memory. Block b
// works on chunk b. Reductions (LAMB's norms, AdamP's per-row dot products) are written per row segment to
// their own slot, then summed per row in a fixed order by a finalize kernel: deterministic, no atomics, and no
// host sync anywhere in the step.
#include "../cpu/multi_tensor.h"
#include "../optim.h"

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>
#include <vector>

namespace vitops {
namespace cuda {

constexpr int kThreads = 256;
constexpr int64_t kCudaChunk = 1 << 13;

enum Dtype : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct TensorMeta {
  void* p;
  const void* g;
  float* m;
  float* v;
  int64_t numel;
  int64_t row_len;
  int64_t rows;
  int64_t row_base;   // global index of the tensor's first row
  int32_t dtype;
  int32_t flag;       // op-specific (AdamP: projectable)
  float f0, f1;       // op-specific per-tensor constants
};

struct ChunkMeta {
  int64_t tensor;
  int64_t begin;
  int64_t end;
  int64_t slot;
};

// Device copies of the tables, as kernels take them. row_slots[r] .. row_slots[r + 1] are the slots of global
// row r.
struct PlanView {
  const TensorMeta* tensors;
  const ChunkMeta* chunks;
  const int64_t* row_slots;
  int64_t num_tensors;
  int64_t num_chunks;
  int64_t num_slots;
  int64_t total_rows;
};

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
  const cpu::ChunkPlan plan = cpu::make_chunk_plan(numel, rows, kCudaChunk);
  std::vector<TensorMeta> tensors(n);
  for (size_t t = 0; t < n; ++t) {
    TensorMeta& meta = tensors[t];
    meta.p = params[t].data_ptr();
    meta.g = grads[t].const_data_ptr();
    meta.m = exp_avgs[t].mutable_data_ptr<float>();
    meta.v = exp_avg_sqs[t].mutable_data_ptr<float>();
    meta.numel = numel[t];
    meta.row_len = plan.row_len[t];
    meta.rows = rows[t];
    meta.row_base = plan.row_base[t];
    meta.dtype = dtype_code(params[t].scalar_type());
    meta.flag = 0;
    meta.f0 = meta.f1 = 0.f;
    fill(t, meta);
  }
  std::vector<ChunkMeta> chunks(plan.chunks.size());
  for (size_t c = 0; c < chunks.size(); ++c) {
    chunks[c] = {plan.chunks[c].tensor, plan.chunks[c].begin, plan.chunks[c].end, plan.chunks[c].slot};
  }
  // Slots are numbered row by row, so each row's slots are a contiguous range.
  std::vector<int64_t> row_slots(size_t(plan.total_rows) + 1, int64_t(plan.slot_row.size()));
  for (int64_t s = int64_t(plan.slot_row.size()) - 1; s >= 0; --s) {
    row_slots[plan.slot_row[s]] = s;
  }
  for (int64_t r = plan.total_rows - 1; r >= 0; --r) {  // rows without slots (empty tensors): empty ranges
    row_slots[r] = std::min(row_slots[r], row_slots[r + 1]);
  }
  const size_t tensor_bytes = tensors.size() * sizeof(TensorMeta);
  const size_t chunk_bytes = chunks.size() * sizeof(ChunkMeta);
  const size_t row_bytes = row_slots.size() * sizeof(int64_t);
  const size_t words = (tensor_bytes + chunk_bytes + row_bytes) / 8;
  auto host = at::empty({int64_t(words)}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  char* h = reinterpret_cast<char*>(host.data_ptr<int64_t>());
  std::memcpy(h, tensors.data(), tensor_bytes);
  std::memcpy(h + tensor_bytes, chunks.data(), chunk_bytes);
  std::memcpy(h + tensor_bytes + chunk_bytes, row_slots.data(), row_bytes);
  DevicePlan out;
  out.storage = host.to(params[0].device(), /*non_blocking=*/true);
  const char* d = reinterpret_cast<const char*>(out.storage.const_data_ptr<int64_t>());
  out.view.tensors = reinterpret_cast<const TensorMeta*>(d);
  out.view.chunks = reinterpret_cast<const ChunkMeta*>(d + tensor_bytes);
  out.view.row_slots = reinterpret_cast<const int64_t*>(d + tensor_bytes + chunk_bytes);
  out.view.num_tensors = int64_t(n);
  out.view.num_chunks = int64_t(chunks.size());
  out.view.num_slots = int64_t(plan.slot_row.size());
  out.view.total_rows = plan.total_rows;
  return out;
}

// IEEE-rounded arithmetic, never contracted into FMAs: the operations of the CPU kernels, in their order.
__device__ __forceinline__ float fadd(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float fsub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float fmul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float fdiv(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float fsqrt(float a) { return __fsqrt_rn(a); }

template <typename T>
__device__ __forceinline__ float load_as_float(const void* base, int64_t i) {
  return static_cast<float>(static_cast<const T*>(base)[i]);
}

template <typename T>
__device__ __forceinline__ void store_from_float(void* base, int64_t i, float x) {
  static_cast<T*>(base)[i] = static_cast<T>(x);
}

// Sums N values over the block; the result is valid in thread 0. `shared` holds N * (kThreads / 32) floats.
template <int N>
__device__ __forceinline__ void block_sum(float (&vals)[N], float* shared) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    float x = vals[k];
    for (int offset = 16; offset > 0; offset /= 2) {
      x += __shfl_down_sync(0xffffffffu, x, offset);
    }
    if (lane == 0) {
      shared[k * (kThreads / 32) + warp] = x;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float s = 0.f;
      for (int w = 0; w < kThreads / 32; ++w) {
        s += shared[k * (kThreads / 32) + w];
      }
      vals[k] = s;
    }
  }
  __syncthreads();
}

// Calls body(t, begin, end, slot) for each row segment of this block's chunk; the whole block calls it
// together (body may use block_sum).
template <typename Body>
__device__ __forceinline__ void for_each_block_segment(const PlanView& plan, const Body& body) {
  const ChunkMeta c = plan.chunks[blockIdx.x];
  const TensorMeta& t = plan.tensors[c.tensor];
  int64_t pos = c.begin;
  int64_t slot = c.slot;
  while (pos < c.end) {
    const int64_t seg_end = min(c.end, (pos / t.row_len + 1) * t.row_len);
    body(t, pos, seg_end, slot);
    ++slot;
    pos = seg_end;
  }
}

}  // namespace cuda
}  // namespace vitops
