#pragma once
// How the optimizer ops cut a step's tensors into chunks, for the CPU kernels (multi_tensor.h) and the
// CUDA ones (csrc/cuda/multi_tensor_kernels.cuh) alike. Plain C++: no ATen, so the CUDA kernels' CPU emulation
// (tests/cpp/optim_emulation.cpp) builds the same tables.
//
// A tensor is `rows` rows of numel / rows elements (LAMB: one row per tensor; AdamP: size(0) rows for its
// per-channel cosine similarities). A chunk is either whole rows or a piece of one row, and writes its partial
// sums to its own slots, one per row segment; slots are numbered row by row, so the slots of a row are a
// contiguous range and adding them up in order gives results that do not depend on how chunks are scheduled.
#include <algorithm>
#include <cstdint>
#include <vector>

namespace vitops {

// The element type of a param or grad, for kernels that take raw pointers.
enum Dtype : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

namespace cpu {

constexpr int64_t kChunk = 1 << 14;

struct Chunk {
  int32_t tensor;
  int64_t begin;  // element range [begin, end) of the tensor
  int64_t end;
  int64_t slot;   // slot of the first row segment; one more per further row
};

struct ChunkPlan {
  std::vector<Chunk> chunks;
  std::vector<int64_t> row_len;     // per tensor
  std::vector<int64_t> row_base;    // per tensor: global index of its first row
  std::vector<int64_t> slot_row;    // per slot: global row index
  int64_t total_rows = 0;
};

// rows[t] rows per tensor, numel[t] elements.
inline ChunkPlan make_chunk_plan(
    const std::vector<int64_t>& numel, const std::vector<int64_t>& rows, int64_t chunk_size = kChunk) {
  ChunkPlan plan;
  const size_t n = numel.size();
  plan.row_len.resize(n);
  plan.row_base.resize(n);
  for (size_t t = 0; t < n; ++t) {
    const int64_t R = rows[t];
    const int64_t L = R > 0 ? numel[t] / R : 0;
    plan.row_len[t] = L;
    plan.row_base[t] = plan.total_rows;
    if (numel[t] == 0) {
      plan.total_rows += R;
      continue;
    }
    if (L <= chunk_size) {
      const int64_t rows_per_chunk = std::max<int64_t>(1, chunk_size / L);
      for (int64_t r0 = 0; r0 < R; r0 += rows_per_chunk) {
        const int64_t r1 = std::min(R, r0 + rows_per_chunk);
        plan.chunks.push_back({int32_t(t), r0 * L, r1 * L, int64_t(plan.slot_row.size())});
        for (int64_t r = r0; r < r1; ++r) {
          plan.slot_row.push_back(plan.total_rows + r);
        }
      }
    } else {
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t b = 0; b < L; b += chunk_size) {
          plan.chunks.push_back(
              {int32_t(t), r * L + b, r * L + std::min(L, b + chunk_size), int64_t(plan.slot_row.size())});
          plan.slot_row.push_back(plan.total_rows + r);
        }
      }
    }
    plan.total_rows += R;
  }
  return plan;
}

}  // namespace cpu
}  // namespace vitops
