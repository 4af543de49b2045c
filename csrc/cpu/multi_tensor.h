#pragma once
// CPU multi-tensor apply for the fused optimizer steps: every tensor of a step is cut into chunks of about
// kChunk elements, and one at::parallel_for runs over the chunks of all tensors at once, so small tensors
// (biases, norms) cost no extra parallel region.
//
// Reductions are per row: a tensor is `rows` rows of numel / rows elements (LAMB: one row per tensor; AdamP:
// size(0) rows for its per-channel cosine similarities). A chunk is either whole rows or a piece of one row, and
// writes its partial sums to its own slots; the slots are then added up row by row in a fixed order, so the
// results do not depend on the number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <vector>

namespace vitops {
namespace cpu {

constexpr int64_t kChunk = 1 << 14;
constexpr int kLanes = 8;

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
