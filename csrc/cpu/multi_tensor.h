#pragma once
// CPU multi-tensor apply for the optimizer ops: every tensor of a step is cut into chunks of about kChunk elements
// (chunk_plan.h), and one at::parallel_for runs over the chunks of all tensors at once, so small tensors (biases,
// norms) cost no parallel region of their own. Partial sums are added up row by row in a fixed order, so the
// results do not depend on the number of threads.
#include "chunk_plan.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace vitops {
namespace cpu {

// Calls fn(chunk, begin, end, slot) for each row segment of each chunk, in parallel over chunks.
template <typename Fn>
inline void for_each_segment(const ChunkPlan& plan, const Fn& fn) {
  at::parallel_for(0, int64_t(plan.chunks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const Chunk& chunk = plan.chunks[c];
      const int64_t L = plan.row_len[chunk.tensor];
      int64_t pos = chunk.begin;
      int64_t slot = chunk.slot;
      while (pos < chunk.end) {
        const int64_t seg_end = std::min(chunk.end, (pos / L + 1) * L);
        fn(chunk, pos, seg_end, slot);
        ++slot;
        pos = seg_end;
      }
    }
  });
}

// Adds `width` partial sums per slot into per-row sums, in slot order.
inline std::vector<double> reduce_slots(const ChunkPlan& plan, const std::vector<double>& partials, int width) {
  std::vector<double> row_sums(size_t(plan.total_rows) * width, 0.0);
  for (size_t s = 0; s < plan.slot_row.size(); ++s) {
    for (int k = 0; k < width; ++k) {
      row_sums[size_t(plan.slot_row[s]) * width + k] += partials[s * width + k];
    }
  }
  return row_sums;
}

// The plan of tensors whose sums are taken over rows[t] rows each.
inline ChunkPlan plan_for(at::TensorList tensors, const std::vector<int64_t>& rows) {
  std::vector<int64_t> numel;
  for (const auto& t : tensors) {
    numel.push_back(t.numel());
  }
  return make_chunk_plan(numel, rows);
}

// Element `offset` of a contiguous tensor, as an untyped pointer.
inline void* element_ptr(const at::Tensor& t, int64_t offset) {
  return static_cast<char*>(t.data_ptr()) + offset * t.element_size();
}

inline const void* const_element_ptr(const at::Tensor& t, int64_t offset) {
  return static_cast<const char*>(t.const_data_ptr()) + offset * t.element_size();
}

}  // namespace cpu
}  // namespace vitops
