#pragma once
// Device code of LAMB's ops on CUDA (lamb.cu launches it): csrc/lamb.h's arithmetic on RoundedFloat, one block per
// chunk of the multi-tensor plan, partial sums per row segment to their own slots. No ATen: the CPU emulation
// (tests/cpp/optim_emulation.cpp) runs it too.
#include "../lamb.h"
#include "multi_tensor_kernels.cuh"

namespace vitops {
namespace cuda {

template <typename T>
__device__ __forceinline__ void sq_sum_segment(const TensorMeta& t, int64_t begin, int64_t end, float (&acc)[1]) {
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const RoundedFloat x = load_as_float<T>(t.p, i);
    acc[0] = (acc[0] + x * x).value;
  }
}

// Each segment's sum of squares (of the planned tensors: the grads) to its slot.
__global__ void __launch_bounds__(kThreads) lamb_sq_sum_kernel(PlanView plan, float* partials) {
  __shared__ float shared[kThreads / 32];
  for_each_block_segment(plan, [&](const TensorMeta& t, int64_t begin, int64_t end, int64_t slot, int64_t) {
    float acc[1] = {0.f};
    switch (t.dtype) {
      case kF32: sq_sum_segment<float>(t, begin, end, acc); break;
      case kF16: sq_sum_segment<c10::Half>(t, begin, end, acc); break;
      default: sq_sum_segment<c10::BFloat16>(t, begin, end, acc);
    }
    block_sum<1>(acc, shared);
    if (threadIdx.x == 0) {
      partials[slot] = acc[0];
    }
  });
}

template <typename T, bool FINISH>
__device__ __forceinline__ void lamb_moments_segment(
    const lamb::Constants& k, float inv_clip, const TensorMeta& t, int64_t begin, int64_t end, float (&acc)[2]) {
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const RoundedFloat g = RoundedFloat(load_as_float<T>(t.g, i)) * inv_clip;
    const RoundedFloat m = lamb::first_moment(k, RoundedFloat(t.m[i]), g);
    const RoundedFloat v = lamb::second_moment(k, RoundedFloat(t.v[i]), g);
    t.m[i] = m.value;
    t.v[i] = v.value;
    const RoundedFloat p_decayed = lamb::decayed(k, RoundedFloat(load_as_float<T>(t.p, i)));
    const RoundedFloat u = lamb::update(k, m, v, p_decayed);
    acc[0] = (acc[0] + p_decayed * p_decayed).value;
    acc[1] = (acc[1] + u * u).value;
    if constexpr (FINISH) {
      store_from_float<T>(t.p, i, lamb::apply(k, p_decayed, u, 1.f).value);
    }
  }
}

// The moments, and each segment's sums of p'^2 and u^2 to its slot; FINISH (no layer adaptation): the params too.
template <bool FINISH>
__global__ void __launch_bounds__(kThreads) lamb_moments_kernel(
    PlanView plan, lamb::Constants k, const float* grad_sq_sum, float max_grad_norm, float* partials,
    const float* found_inf) {
  __shared__ float shared[2 * (kThreads / 32)];
  const float inv_clip = grad_sq_sum ? lamb::inverse_clip(*grad_sq_sum, max_grad_norm) : 1.f;
  const bool skipped = step_skipped(found_inf);
  for_each_block_segment(plan, [&](const TensorMeta& t, int64_t begin, int64_t end, int64_t slot, int64_t) {
    float acc[2] = {0.f, 0.f};
    const int64_t stop = skipped ? begin : end;
    switch (t.dtype) {
      case kF32: lamb_moments_segment<float, FINISH>(k, inv_clip, t, begin, stop, acc); break;
      case kF16: lamb_moments_segment<c10::Half, FINISH>(k, inv_clip, t, begin, stop, acc); break;
      default: lamb_moments_segment<c10::BFloat16, FINISH>(k, inv_clip, t, begin, stop, acc);
    }
    block_sum<2>(acc, shared);
    if (threadIdx.x == 0) {
      partials[2 * slot] = acc[0];
      partials[2 * slot + 1] = acc[1];
    }
  });
}

template <typename T>
__device__ __forceinline__ void lamb_apply_segment(
    const lamb::Constants& k, float ratio, const TensorMeta& t, int64_t begin, int64_t end) {
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const RoundedFloat p_decayed = lamb::decayed(k, RoundedFloat(load_as_float<T>(t.p, i)));
    const RoundedFloat u = lamb::update(k, RoundedFloat(t.m[i]), RoundedFloat(t.v[i]), p_decayed);
    store_from_float<T>(t.p, i, lamb::apply(k, p_decayed, u, ratio).value);
  }
}

// The params, u recomputed from the moments and scaled by the trust ratio from sums[tensor] (p'^2, u^2).
__global__ void __launch_bounds__(kThreads) lamb_apply_kernel(
    PlanView plan, lamb::Constants k, const float* sums, bool trust_clip, const float* found_inf) {
  if (step_skipped(found_inf)) {
    return;
  }
  const int64_t tensor = plan.chunks[blockIdx.x].tensor;
  const float ratio = lamb::trust_ratio(sums[2 * tensor], sums[2 * tensor + 1], trust_clip);
  for_each_block_segment(plan, [&](const TensorMeta& t, int64_t begin, int64_t end, int64_t, int64_t) {
    switch (t.dtype) {
      case kF32: lamb_apply_segment<float>(k, ratio, t, begin, end); break;
      case kF16: lamb_apply_segment<c10::Half>(k, ratio, t, begin, end); break;
      default: lamb_apply_segment<c10::BFloat16>(k, ratio, t, begin, end);
    }
  });
}

}  // namespace cuda
}  // namespace vitops
