#pragma once
// CUDA kernels of drop_path_add and their launch plans, launched by drop_path_add.cu. ATen-free, so that the CUDA
// emulation (tests/cpp/elementwise_emulation.cpp) runs these very lines on the CPU. The per-element math is
// ../drop_path_add.h's. Memory-bound, so the design is about bytes:
//  - 16-byte vector accesses for the narrowest tensor;
//  - each thread strides through memory by a multiple of gamma's period, so it always meets the same channels:
//    it loads its gamma values once, and sums gamma's gradient in registers;
//  - a dropped sample reads nothing of its branch, forward or backward.
// Thread indices, positions and strides are 64-bit: a tensor may hold more than 2^31 elements.
#include "../drop_path_add.h"

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

namespace vitops {
namespace cuda {

constexpr int kThreadsPerBlock = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

struct LaunchPlan {
  int64_t numel;
  int64_t per_sample;
  int64_t inner;
  int64_t period;          // elements after which a thread meets the same channels again
  int64_t threads;         // threads that do work; thread t starts at memory position t * VEC
  int64_t stride;          // threads * VEC, a multiple of period
  int64_t stride_samples;  // stride / per_sample
  int64_t stride_rem;      // stride % per_sample
  bool channel_per_lane;   // inner == 1: the VEC lanes of a vector hold VEC consecutive channels
};

inline bool is_aligned(const void* p, int bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// The kernels' vector width: 16 bytes of the branch, the narrowest type.
template <typename branch_t>
constexpr int kVec = 16 / sizeof(branch_t);

// The vector width the tensors allow: kVec<branch_t>, or 1. `pointers` lists each tensor's data (null for an absent
// one) with its element size.
template <typename branch_t>
inline int pick_vec(const DropPathAddLayout& L, std::initializer_list<std::pair<const void*, int>> pointers) {
  constexpr int vec = kVec<branch_t>;
  bool ok = L.per_sample % vec == 0;
  if (L.channels > 1) {
    ok = ok && (L.inner == 1 ? L.channels % vec == 0 : L.inner % vec == 0);
  }
  for (const auto& [ptr, elem_bytes] : pointers) {
    ok = ok && (ptr == nullptr || is_aligned(ptr, elem_bytes * vec));
  }
  return ok ? vec : 1;
}

// The forward's vector width: what residual (null without one), branch and out allow.
template <typename out_t, typename branch_t>
inline int forward_vec(const DropPathAddLayout& L, const void* residual, const void* branch, const void* out) {
  return pick_vec<branch_t>(
      L, {{residual, int(sizeof(out_t))}, {branch, int(sizeof(branch_t))}, {out, int(sizeof(out_t))}});
}

// The backward's: what grad_out, branch and grad_branch (each null when absent) allow.
template <typename out_t, typename branch_t>
inline int backward_vec(const DropPathAddLayout& L, const void* grad_out, const void* branch, const void* grad_branch) {
  return pick_vec<branch_t>(
      L, {{grad_out, int(sizeof(out_t))}, {branch, int(sizeof(branch_t))}, {grad_branch, int(sizeof(branch_t))}});
}

// About `target_threads` threads (at least one per vector of gamma's period), each striding by a multiple of
// the period.
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

// Calls fn(std::integral_constant<int, VEC>()) with the vector width pick_vec chose: the kernels are built for
// kVec<branch_t> lanes and for single elements.
template <typename branch_t, typename Fn>
inline void with_vec(int vec, const Fn& fn) {
  if (vec == kVec<branch_t>) {
    fn(std::integral_constant<int, kVec<branch_t>>());
  } else {
    fn(std::integral_constant<int, 1>());
  }
}

inline int64_t blocks_for(const LaunchPlan& plan) {
  return (plan.threads + kThreadsPerBlock - 1) / kThreadsPerBlock;
}

// The global index of this thread, in 64 bits: blockIdx.x * blockDim.x alone is a 32-bit product.
__device__ __forceinline__ int64_t global_thread_index() {
  return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
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

template <typename out_t, typename branch_t, typename acc_t, int VEC>
__global__ void drop_path_add_forward_kernel(
    const out_t* __restrict__ residual, const branch_t* __restrict__ branch, const acc_t* __restrict__ gamma,
    const acc_t* __restrict__ scale, out_t* __restrict__ out, LaunchPlan plan) {
  const int64_t thread = global_thread_index();
  if (thread >= plan.threads) return;
  using R = Rounded<acc_t>;
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
    if (s == acc_t(0)) {  // dropped: its residual, or zeros; its branch is not read
      *reinterpret_cast<Vec<out_t, VEC>*>(out + p) = r;
      return;
    }
    const auto b = *reinterpret_cast<const Vec<branch_t, VEC>*>(branch + p);
    Vec<out_t, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const R bj = acc_t(b.val[j]);
      const R o_j = residual ? drop_path_add_element<R>(acc_t(r.val[j]), bj, g[j], s) : drop_path_term<R>(bj, g[j], s);
      o.val[j] = static_cast<out_t>(o_j.value);
    }
    *reinterpret_cast<Vec<out_t, VEC>*>(out + p) = o;
  });
}

// grad_branch = drop_path_grad(grad_out, s, gamma), and gamma's gradient summed per thread into
// `gamma_partials`: per lane at [thread * VEC + lane] when the lanes hold different channels (channel_per_lane;
// partial i belongs to channel i % channels), else at [thread] (partial i belongs to channel
// (i / (inner / VEC)) % channels).
template <typename out_t, typename branch_t, typename acc_t, int VEC>
__global__ void drop_path_add_backward_kernel(
    const out_t* __restrict__ grad_out, const branch_t* __restrict__ branch, const acc_t* __restrict__ gamma,
    const acc_t* __restrict__ scale, branch_t* __restrict__ grad_branch, acc_t* __restrict__ gamma_partials,
    LaunchPlan plan) {
  using R = Rounded<acc_t>;
  const int64_t thread = global_thread_index();
  if (thread >= plan.threads) return;
  const int64_t first = thread * VEC;
  acc_t g[VEC];
  load_gamma<acc_t, VEC>(gamma, plan, first, g);
  acc_t acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
  for_each_position(plan, first, [&](int64_t p, int64_t sample) {
    const acc_t s = scale ? scale[sample] : acc_t(1);
    if (s == acc_t(0)) {  // dropped: its gradients are exactly 0, even where grad_out is not finite
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
      for (int j = 0; j < VEC; ++j) {
        gb.val[j] = static_cast<branch_t>(drop_path_grad<R>(acc_t(go.val[j]), s, g[j]).value);
      }
      *reinterpret_cast<Vec<branch_t, VEC>*>(grad_branch + p) = gb;
    }
    if (gamma_partials) {
      const auto b = *reinterpret_cast<const Vec<branch_t, VEC>*>(branch + p);
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] += drop_path_grad<R>(acc_t(go.val[j]), s, acc_t(b.val[j])).value;
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

}  // namespace cuda
}  // namespace vitops
