#pragma once
// Device code of AdamP's ops on CUDA (adamp.cu launches it): csrc/adamp.h's arithmetic on RoundedFloat, one block
// per chunk of the multi-tensor plan (whole channel rows or a piece of one). No ATen: the CPU emulation
// (tests/cpp/optim_emulation.cpp) runs it too.
//
// TensorMeta fields: flag = projectable (2 or more dims); f0, f1 = the tensor's adamp::StepConstants.
#include "../adamp.h"
#include "multi_tensor_kernels.cuh"

namespace vitops {
namespace cuda {

__device__ __forceinline__ adamp::StepConstants step_constants(const TensorMeta& t) {
  return adamp::StepConstants{t.f0, t.f1};
}

template <typename T, bool PROJECTABLE>
__device__ __forceinline__ void adamp_moments_segment(
    const adamp::Constants& k, const TensorMeta& t, int64_t begin, int64_t end, float (&acc)[4]) {
  const adamp::StepConstants s = step_constants(t);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const RoundedFloat g = load_as_float<T>(t.g, i);
    const RoundedFloat p = load_as_float<T>(t.p, i);
    const RoundedFloat m = adamp::first_moment(k, RoundedFloat(t.m[i]), g);
    const RoundedFloat v = adamp::second_moment(k, RoundedFloat(t.v[i]), g);
    t.m[i] = m.value;
    t.v[i] = v.value;
    const RoundedFloat q = adamp::direction(k, s, m, v, g);
    if constexpr (PROJECTABLE) {
      acc[0] = (acc[0] + g * p).value;
      acc[1] = (acc[1] + g * g).value;
      acc[2] = (acc[2] + p * p).value;
      acc[3] = (acc[3] + p * q).value;
    } else {
      store_from_float<T>(t.p, i, adamp::apply(s, p, q, k.plain_factor, 0.f).value);
    }
  }
}

// The moments; projectable params write each segment's g.p, g.g, p.p, p.q to its slot, the others are updated.
__global__ void __launch_bounds__(kThreads) adamp_moments_kernel(
    PlanView plan, adamp::Constants k, float* partials, const float* found_inf) {
  __shared__ float shared[4 * (kThreads / 32)];
  const bool skipped = step_skipped(found_inf);
  for_each_block_segment(plan, [&](const TensorMeta& t, int64_t begin, int64_t end, int64_t slot, int64_t) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    const int64_t stop = skipped ? begin : end;
    if (!t.flag) {
      switch (t.dtype) {
        case kF32: adamp_moments_segment<float, false>(k, t, begin, stop, acc); break;
        case kF16: adamp_moments_segment<c10::Half, false>(k, t, begin, stop, acc); break;
        default: adamp_moments_segment<c10::BFloat16, false>(k, t, begin, stop, acc);
      }
      return;
    }
    switch (t.dtype) {
      case kF32: adamp_moments_segment<float, true>(k, t, begin, stop, acc); break;
      case kF16: adamp_moments_segment<c10::Half, true>(k, t, begin, stop, acc); break;
      default: adamp_moments_segment<c10::BFloat16, true>(k, t, begin, stop, acc);
    }
    block_sum<4>(acc, shared);
    if (threadIdx.x == 0) {
      for (int q = 0; q < 4; ++q) {
        partials[4 * slot + q] = acc[q];
      }
    }
  });
}

// One block per tensor: each row's sums from its slots (in slot order), its channel-wise test and projection
// coefficient; the tensor's sums over its rows and its count of failing rows (adamp.h's kTensorSums), added in a
// fixed order. Tensors never projected, and every tensor of a skipped step, get zeros.
__global__ void __launch_bounds__(kThreads) adamp_finalize_kernel(
    PlanView plan, adamp::Constants k, const float* partials, float* row_coefs, float* tensor_sums,
    const float* found_inf) {
  const TensorMeta& t = plan.tensors[blockIdx.x];
  __shared__ double totals[kThreads][adamp::kTensorSums];
  double mine[adamp::kTensorSums] = {0.0, 0.0, 0.0, 0.0, 0.0};
  const bool projected = t.flag && t.numel > 0 && !step_skipped(found_inf);
  for (int64_t r = t.row_base + threadIdx.x; r < t.row_base + t.rows; r += blockDim.x) {
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t slot = plan.row_slots[r]; projected && slot < plan.row_slots[r + 1]; ++slot) {
      for (int q = 0; q < 4; ++q) {
        s[q] += partials[4 * slot + q];
      }
    }
    row_coefs[r] = projected ? adamp::projection_coef(s[3], s[2], k.eps_double) : 0.f;
    mine[4] += projected && !adamp::passes(adamp::cosine(s[0], s[1], s[2], k.eps_double), k.delta, t.row_len);
    for (int q = 0; q < 4; ++q) {
      mine[q] += s[q];
    }
  }
  for (int q = 0; q < adamp::kTensorSums; ++q) {
    totals[threadIdx.x][q] = mine[q];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int q = 0; q < adamp::kTensorSums; ++q) {
      double total = 0.0;
      for (int i = 0; i < int(blockDim.x); ++i) {
        total += totals[i][q];
      }
      tensor_sums[adamp::kTensorSums * blockIdx.x + q] = float(total);
    }
  }
}

template <typename T>
__device__ __forceinline__ void adamp_apply_segment(
    const adamp::Constants& k, const TensorMeta& t, int64_t begin, int64_t end, float factor, float coef) {
  const adamp::StepConstants s = step_constants(t);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const RoundedFloat g = k.nesterov ? load_as_float<T>(t.g, i) : 0.f;
    const RoundedFloat q = adamp::direction(k, s, RoundedFloat(t.m[i]), RoundedFloat(t.v[i]), g);
    store_from_float<T>(t.p, i, adamp::apply(s, RoundedFloat(load_as_float<T>(t.p, i)), q, factor, coef).value);
  }
}

// Projectable params: the projection each takes, from its sums over all ranks (tensor_sums) and its numel over all
// ranks, then the update with its row's coefficient (row_coefs) or the tensor's.
__global__ void __launch_bounds__(kThreads) adamp_apply_kernel(
    PlanView plan, adamp::Constants k, const float* row_coefs, const float* tensor_sums, const float* found_inf) {
  const int64_t tensor = plan.chunks[blockIdx.x].tensor;
  const TensorMeta& meta = plan.tensors[tensor];
  if (!meta.flag || step_skipped(found_inf)) {
    return;
  }
  const float* sums = tensor_sums + adamp::kTensorSums * tensor;
  const int projection = adamp::projection(sums, k, meta.full_numel);
  const float layer_coef = adamp::projection_coef(sums[3], sums[2], k.eps_double);
  const float factor = projection == adamp::kNone ? k.plain_factor : k.projected_factor;
  for_each_block_segment(plan, [&](const TensorMeta& t, int64_t begin, int64_t end, int64_t, int64_t row) {
    const float coef = projection == adamp::kChannel ? row_coefs[row]
                       : projection == adamp::kLayer ? layer_coef
                                                     : 0.f;
    switch (t.dtype) {
      case kF32: adamp_apply_segment<float>(k, t, begin, end, factor, coef); break;
      case kF16: adamp_apply_segment<c10::Half>(k, t, begin, end, factor, coef); break;
      default: adamp_apply_segment<c10::BFloat16>(k, t, begin, end, factor, coef);
    }
  });
}

}  // namespace cuda
}  // namespace vitops
