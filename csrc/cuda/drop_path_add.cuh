#pragma once
// CUDA kernels of drop_path_add. Memory-bound, so the design is about bytes:
//  - 16-byte vector accesses for the narrowest tensor;
//  - each thread strides through memory by a multiple of gamma's period, so it always meets the same channels:
//    it loads its gamma values once, and sums gamma's gradient in registers;
//  - a dropped sample reads nothing of its branch, forward or backward.
#include "../drop_path_add.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

namespace vitops {
namespace cuda {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

// Explicitly rounded arithmetic, never contracted into an FMA, so float32 results are bit-identical to
// timm's `residual + drop_path(branch * gamma)` evaluated op by op.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

struct LaunchPlan {
  int64_t numel;
  int64_t per_sample;
  int64_t inner;
  int64_t period;         // elements after which a thread meets the same channels again
  int64_t threads;        // threads that do work; each starts at thread_index * VEC
  int64_t stride;         // threads * VEC, a multiple of period
  int64_t stride_samples; // stride / per_sample
  int64_t stride_rem;     // stride % per_sample
  bool channel_per_lane;  // inner == 1: the VEC lanes of a vector hold VEC consecutive channels
};

inline bool is_aligned(const void* p, int bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// The vector width the tensors allow: 16 bytes of the narrowest type, or 1.
template <typename out_t, typename branch_t>
inline int pick_vec(const DropPathAddLayout& L, std::initializer_list<std::pair<const void*, int>> pointers) {
  constexpr int vec = 16 / sizeof(branch_t);
  bool ok = L.per_sample % vec == 0;
  if (L.channels > 1) {
    ok = ok && (L.inner == 1 ? L.channels % vec == 0 : L.inner % vec == 0);
  }
  for (const auto& [ptr, elem_bytes] : pointers) {
    ok = ok && (ptr == nullptr || is_aligned(ptr, elem_bytes * vec));
  }
  return ok ? vec : 1;
}

inline LaunchPlan make_plan(const DropPathAddLayout& L, int vec, int64_t target_threads) {
  LaunchPlan plan;
  plan.numel = L.numel;
  plan.per_sample = L.per_sample;
  plan.inner = L.inner;
  plan.channel_per_lane = L.channels > 1 && L.inner == 1;
  plan.period = L.channels > 1 ? L.channels * L.inner : vec;
  const int64_t threads_per_period = plan.period / vec;
  const int64_t periods = (L.numel + plan.period - 1) / plan.period;
  const int64_t repeats = std::max<int64_t>(1, std::min(periods, target_threads / threads_per_period));
  plan.threads = repeats * threads_per_period;
  plan.stride = plan.threads * vec;
  plan.stride_samples = plan.stride / L.per_sample;
  plan.stride_rem = plan.stride % L.per_sample;
  return plan;
}

// Walks this thread's positions: calls fn(p, sample) for p = first, first + stride, ... below numel.
template <typename Fn>
__device__ __forceinline__ void for_each_position(const LaunchPlan& plan, int64_t first, const Fn& fn) {
  int64_t sample = first / plan.per_sample;
  int64_t rem = first - sample * plan.per_sample;
  for (int64_t p = first; p < plan.numel; p += plan.stride) {
    fn(p, sample);
    sample += plan.stride_samples;
    rem += plan.stride_rem;
    if (rem >= plan.per_sample) {
      rem -= plan.per_sample;
      ++sample;
    }
  }
}

// The gamma values of the VEC elements at position `first` (and at every position this thread visits).
template <typename acc_t, int VEC>
__device__ __forceinline__ void load_gamma(const acc_t* gamma, const LaunchPlan& plan, int64_t first, acc_t (&g)[VEC]) {
  if (gamma == nullptr) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) g[j] = acc_t(1);
    return;
  }
  const int64_t channel = (first % plan.period) / plan.inner;
#pragma unroll
  for (int j = 0; j < VEC; ++j) g[j] = gamma[plan.channel_per_lane ? channel + j : channel];
}

template <typename out_t, typename branch_t, int VEC>
__global__ void drop_path_add_forward_kernel(
    const out_t* __restrict__ residual,
    const branch_t* __restrict__ branch,
    const at::opmath_type<out_t>* __restrict__ gamma,
    const at::opmath_type<out_t>* __restrict__ scale,
    out_t* __restrict__ out,
    LaunchPlan plan) {
  using acc_t = at::opmath_type<out_t>;
  const int64_t thread = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (thread >= plan.threads) return;
  const int64_t first = thread * VEC;
  acc_t g[VEC];
  load_gamma<acc_t, VEC>(gamma, plan, first, g);
  for_each_position(plan, first, [&](int64_t p, int64_t sample) {
    const acc_t s = scale ? scale[sample] : acc_t(1);
    Vec<out_t, VEC> r;
    if (residual) {
      r = *reinterpret_cast<const Vec<out_t, VEC>*>(residual + p);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) r.val[j] = out_t(0);
    }
    if (s == acc_t(0)) {
      *reinterpret_cast<Vec<out_t, VEC>*>(out + p) = r;
      return;
    }
    const auto b = *reinterpret_cast<const Vec<branch_t, VEC>*>(branch + p);
    Vec<out_t, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t t = mul_rn(mul_rn(acc_t(b.val[j]), g[j]), s);
      o.val[j] = static_cast<out_t>(residual ? add_rn(acc_t(r.val[j]), t) : t);
    }
    *reinterpret_cast<Vec<out_t, VEC>*>(out + p) = o;
  });
}

// grad_branch = (grad_out * s) * gamma; gamma's gradient is summed per thread into `gamma_partials`:
// VEC values per thread when the lanes hold different channels, else one.
template <typename out_t, typename branch_t, int VEC>
__global__ void drop_path_add_backward_kernel(
    const out_t* __restrict__ grad_out,
    const branch_t* __restrict__ branch,
    const at::opmath_type<out_t>* __restrict__ gamma,
    const at::opmath_type<out_t>* __restrict__ scale,
    branch_t* __restrict__ grad_branch,
    at::opmath_type<out_t>* __restrict__ gamma_partials,
    LaunchPlan plan) {
  using acc_t = at::opmath_type<out_t>;
  const int64_t thread = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (thread >= plan.threads) return;
  const int64_t first = thread * VEC;
  acc_t g[VEC];
  load_gamma<acc_t, VEC>(gamma, plan, first, g);
  acc_t acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
  for_each_position(plan, first, [&](int64_t p, int64_t sample) {
    const acc_t s = scale ? scale[sample] : acc_t(1);
    if (s == acc_t(0)) {
      if (grad_branch) {
        Vec<branch_t, VEC> zero;
#pragma unroll
        for (int j = 0; j < VEC; ++j) zero.val[j] = branch_t(0);
        *reinterpret_cast<Vec<branch_t, VEC>*>(grad_branch + p) = zero;
      }
      return;
    }
    const auto go = *reinterpret_cast<const Vec<out_t, VEC>*>(grad_out + p);
    if (grad_branch) {
      Vec<branch_t, VEC> gb;
#pragma unroll
      for (int j = 0; j < VEC; ++j) gb.val[j] = static_cast<branch_t>(mul_rn(mul_rn(acc_t(go.val[j]), s), g[j]));
      *reinterpret_cast<Vec<branch_t, VEC>*>(grad_branch + p) = gb;
    }
    if (gamma_partials) {
      const auto b = *reinterpret_cast<const Vec<branch_t, VEC>*>(branch + p);
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] += acc_t(go.val[j]) * s * acc_t(b.val[j]);
    }
  });
  if (gamma_partials) {
    if (plan.channel_per_lane) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) gamma_partials[first + j] = acc[j];
    } else {
      acc_t sum = 0;
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum += acc[j];
      gamma_partials[thread] = sum;
    }
  }
}

constexpr int kThreadsPerBlock = 256;

inline int64_t resident_threads() {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  return int64_t(props->multiProcessorCount) * props->maxThreadsPerMultiProcessor;
}

inline unsigned blocks_for(const LaunchPlan& plan) {
  return static_cast<unsigned>((plan.threads + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

}  // namespace cuda
}  // namespace vitops
