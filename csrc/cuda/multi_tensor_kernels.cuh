#pragma once
// Device side of multi-tensor apply for the optimizer ops, and the host tables it runs on. One launch covers every
// tensor of a step: block b works on chunk b (csrc/cpu/chunk_plan.h: whole rows or a piece of one row).
// Reductions (LAMB's norms, AdamP's per-row dot products) are written per row segment to their own slot, then
// summed per row in a fixed order by a finalize kernel: deterministic, and no atomics.
//
// No ATen here: this and the kernels built on it (lamb.cuh, adamp.cuh) also compile as plain C++ for the CPU
// emulation in tests/cpp/optim_emulation.cpp.
#include "../cpu/chunk_plan.h"
#include "../rounded.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace vitops {
namespace cuda {

constexpr int kThreads = 256;
constexpr int64_t kCudaChunk = 1 << 13;

struct TensorMeta {
  void* p;
  const void* g;
  float* m;
  float* v;
  int64_t numel;
  int64_t row_len;
  int64_t rows;
  int64_t row_base;   // global index of the tensor's first row
  int64_t full_numel;  // over all ranks, for sharded params (AdamP's layer-wise test)
  int32_t dtype;       // Dtype
  int32_t flag;        // op-specific (AdamP: projectable)
  float f0, f1;        // op-specific per-tensor constants
};

struct ChunkMeta {
  int64_t tensor;
  int64_t begin;
  int64_t end;
  int64_t slot;
  int64_t row;  // global index of the row of its first segment
};

// The tables as kernels take them. row_slots[r] .. row_slots[r + 1] are the slots of global row r.
struct PlanView {
  const TensorMeta* tensors;
  const ChunkMeta* chunks;
  const int64_t* row_slots;
  int64_t num_tensors;
  int64_t num_chunks;
  int64_t num_slots;
  int64_t total_rows;
};

// Host tables for tensors of numel[t] elements in rows[t] rows. The tensors' pointers, dtype and op-specific
// fields are left for the caller to fill.
struct PlanTables {
  std::vector<TensorMeta> tensors;
  std::vector<ChunkMeta> chunks;
  std::vector<int64_t> row_slots;
  int64_t num_slots = 0;
  int64_t total_rows = 0;
};

inline PlanTables plan_tables(const std::vector<int64_t>& numel, const std::vector<int64_t>& rows) {
  const cpu::ChunkPlan plan = cpu::make_chunk_plan(numel, rows, kCudaChunk);
  PlanTables out;
  out.tensors.resize(numel.size());
  for (size_t t = 0; t < numel.size(); ++t) {
    out.tensors[t] = TensorMeta{nullptr, nullptr, nullptr, nullptr, numel[t], plan.row_len[t], rows[t],
                                plan.row_base[t], numel[t], kF32, 0, 0.f, 0.f};
  }
  out.chunks.reserve(plan.chunks.size());
  for (const auto& c : plan.chunks) {
    out.chunks.push_back({c.tensor, c.begin, c.end, c.slot, plan.slot_row[c.slot]});
  }
  out.num_slots = int64_t(plan.slot_row.size());
  out.total_rows = plan.total_rows;
  out.row_slots.assign(size_t(plan.total_rows) + 1, out.num_slots);
  for (int64_t s = out.num_slots - 1; s >= 0; --s) {
    out.row_slots[plan.slot_row[s]] = s;
  }
  for (int64_t r = plan.total_rows - 1; r >= 0; --r) {  // rows without slots (empty tensors): empty ranges
    out.row_slots[r] = std::min(out.row_slots[r], out.row_slots[r + 1]);
  }
  return out;
}

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

// Calls body(t, begin, end, slot, row) for each row segment of this block's chunk; the whole block calls it
// together (body may use block_sum). A chunk is whole rows, or a piece of one row when rows are longer than a
// chunk (chunk_plan.h): no division to find where a row ends, whose 64-bit slow path would cost a stack frame.
template <typename Body>
__device__ __forceinline__ void for_each_block_segment(const PlanView& plan, const Body& body) {
  const ChunkMeta c = plan.chunks[blockIdx.x];
  const TensorMeta& t = plan.tensors[c.tensor];
  const int64_t step = t.row_len > kCudaChunk ? c.end - c.begin : t.row_len;
  int64_t slot = c.slot, row = c.row;
  for (int64_t pos = c.begin; pos < c.end; pos += step, ++slot, ++row) {
    body(t, pos, min(c.end, pos + step), slot, row);
  }
}

// Whether the step is skipped (skip_nonfinite): found_inf, nullptr without one, read on the device. A skipped
// step's kernels write no element and sum none.
__device__ __forceinline__ bool step_skipped(const float* found_inf) {
  return found_inf != nullptr && *found_inf != 0.f;
}

// out[r, :] = the WIDTH partial sums of row r's slots, added in slot order (one thread per row).
template <int WIDTH>
__global__ void row_sums_kernel(PlanView plan, const float* partials, float* out) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= plan.total_rows) {
    return;
  }
  double sums[WIDTH] = {};
  for (int64_t s = plan.row_slots[row]; s < plan.row_slots[row + 1]; ++s) {
    for (int k = 0; k < WIDTH; ++k) {
      sums[k] += partials[WIDTH * s + k];
    }
  }
  for (int k = 0; k < WIDTH; ++k) {
    out[WIDTH * row + k] = float(sums[k]);
  }
}

}  // namespace cuda
}  // namespace vitops
