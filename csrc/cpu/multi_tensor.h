#pragma once
// CPU multi-tensor apply for the fused optimizer steps: every tensor of a step is cut into chunks of about
// kChunk elements (chunk_plan.h), and one at::parallel_for runs over the chunks of all tensors at once, so small
// tensors (biases, norms) cost no extra parallel region. Partial sums are added up row by row in a fixed order,
// so the results do not depend on the number of threads.
#include "chunk_plan.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <vector>

namespace vitops {
namespace cpu {

constexpr int kLanes = 8;

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

// Two-pass steps run pass 1 and pass 2 per group of consecutive tensors of at most VITOPS_OPTIM_CACHE_GROUP
// elements (default 2^18; a larger tensor is a group of its own; 0: one group), so that pass 2 re-reads what
// pass 1 just touched, and the direction it saved, from the cache.
inline int64_t cache_group_elements() {
  static const int64_t value = [] {
    const char* env = std::getenv("VITOPS_OPTIM_CACHE_GROUP");
    return env ? std::atoll(env) : int64_t(1) << 18;
  }();
  return value;
}

template <typename Fn>
inline void for_each_cache_group(at::TensorList tensors, const Fn& fn) {
  const int64_t budget = cache_group_elements();
  size_t first = 0;
  int64_t total = 0;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t n = tensors[t].numel();
    if (t > first && budget > 0 && total + n > budget) {
      fn(first, t - first);
      first = t;
      total = 0;
    }
    total += n;
  }
  if (first < tensors.size()) {
    fn(first, tensors.size() - first);
  }
}

// A float buffer of at least n elements, kept per calling thread between steps (no allocation per step).
inline float* scratch_buffer(int64_t n) {
  static thread_local std::vector<float> buffer;
  if (int64_t(buffer.size()) < n) {
    buffer.resize(size_t(n));
  }
  return buffer.data();
}

inline float load_float(float x) { return x; }
inline float load_float(c10::Half x) { return static_cast<float>(x); }
inline float load_float(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
inline T store_as(float x) {
  return static_cast<T>(x);
}

}  // namespace cpu
}  // namespace vitops
