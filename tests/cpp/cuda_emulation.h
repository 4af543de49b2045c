#pragma once
// A CPU stand-in for the CUDA runtime, to run vitops' kernels without a GPU: every CUDA thread of a block is a
// std::thread, __syncthreads/__syncwarp are barriers, warp shuffles go through a per-warp exchange buffer, and
// blocks run one after another (so a kernel's `__shared__` variables, made function statics, are per block).
// It checks the kernels' indexing, masking and synchronisation, not their speed nor anything specific to the
// hardware. Included before the kernels' headers.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define VITOPS_EMULATE_CUDA 1
#define __shared__ static
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __restrict__

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
thread_local Dim3 threadIdx, blockIdx;
Dim3 blockDim, gridDim;

struct BlockState {
  explicit BlockState(int threads) : block_barrier(threads) {
    for (int w = 0; w < threads / 32; ++w) warp_barriers.emplace_back(std::make_unique<std::barrier<>>(32));
    exchange.resize(threads);
  }
  std::barrier<> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<float> exchange;
  std::vector<float> smem;
};
BlockState* g_block = nullptr;

inline float* dynamic_smem() { return g_block->smem.data(); }
inline void __syncthreads() { g_block->block_barrier.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { g_block->warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float x, int offset) {
  const int t = threadIdx.x, lane = t % 32, base = t - lane;
  g_block->exchange[t] = x;
  __syncwarp();
  const float y = g_block->exchange[base + (lane ^ offset)];
  __syncwarp();
  return y;
}
inline float __shfl_down_sync(unsigned, float x, int offset) {
  const int t = threadIdx.x, lane = t % 32;
  g_block->exchange[t] = x;
  __syncwarp();
  const float y = lane + offset < 32 ? g_block->exchange[t + offset] : x;
  __syncwarp();
  return y;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
using std::max;
using std::min;

// Launches `kernel(args...)` on a grid, one block at a time, each block's threads in parallel.
template <typename Kernel>
void launch(Dim3 grid, int threads, size_t smem_bytes, Kernel kernel) {
  gridDim = grid;
  blockDim = Dim3{(unsigned)threads, 1, 1};
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      BlockState block(threads);
      block.smem.assign(smem_bytes / sizeof(float) + 1, std::nanf(""));  // garbage-like, as on the GPU
      g_block = &block;
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([=] {
          threadIdx = Dim3{(unsigned)t, 0, 0};
          blockIdx = Dim3{bx, by, 0};
          kernel();
        });
      }
      for (auto& th : pool) th.join();
    }
  }
}

