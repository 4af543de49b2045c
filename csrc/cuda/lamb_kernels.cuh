#pragma once
// Device code of lamb_step on CUDA (see lamb.cu for the design), and the kernels' constants from the op's
// arguments. No ATen: tests/cpp/optim_emulation.cpp runs this on the CPU.
#include "multi_tensor_kernels.cuh"

namespace vitops {
namespace cuda {

struct LambParams {
  const float* clip;  // null: no clipping
  float beta1, beta2, beta3, one_minus_beta3, one_minus_beta2;
  float bc1, sqrt_bc2, eps, neg_decay, coupled_wd, neg_lr;
  int mode;  // 0: lerp, weight < 0.5; 1: lerp, weight >= 0.5; 2: m * beta1 + beta3 * g
  bool trust_clip;
};

inline LambParams lamb_params(
    const float* clip, double lr, double beta1, double beta2, double beta3, double bias_correction1,
    double bias_correction2, double eps, double weight_decay, double decay_scale, bool decoupled_decay,
    bool trust_clip) {
  LambParams k;
  k.clip = clip;
  k.beta1 = float(beta1);
  k.beta2 = float(beta2);
  k.beta3 = float(beta3);
  k.one_minus_beta3 = float(1.0 - beta3);
  k.one_minus_beta2 = float(1.0 - beta2);
  k.bc1 = float(bias_correction1);
  k.sqrt_bc2 = float(std::sqrt(bias_correction2));
  k.eps = float(eps);
  const bool decay = weight_decay != 0.0;
  k.neg_decay = decay && decoupled_decay ? float(-decay_scale * weight_decay) : 0.f;
  k.coupled_wd = decay && !decoupled_decay ? float(weight_decay) : 0.f;
  k.neg_lr = float(-lr);
  k.mode = beta3 == 1.0 - beta1 ? (beta3 < 0.5 ? 0 : 1) : 2;
  k.trust_clip = trust_clip;
  return k;
}

// STAGE 0: moments and param. 1: moments, returns (p'.p', u.u) in acc. 2: param from the ratio.
template <typename T, int STAGE>
__device__ __forceinline__ void lamb_element(
    const LambParams& k, const TensorMeta& t, int64_t i, float clip, float ratio, float (&acc)[2]) {
  const float pv = load_as_float<T>(t.p, i);
  const float pd = fadd(pv, fmul(pv, k.neg_decay));
  float m, v;
  if (STAGE == 2) {
    m = t.m[i];
    v = t.v[i];
  } else {
    const float g = fdiv(load_as_float<T>(t.g, i), clip);
    const float m0 = t.m[i];
    if (k.mode == 0) {
      m = fadd(m0, fmul(k.beta3, fsub(g, m0)));
    } else if (k.mode == 1) {
      m = fsub(g, fmul(fsub(g, m0), k.one_minus_beta3));
    } else {
      m = fadd(fmul(m0, k.beta1), fmul(k.beta3, g));
    }
    v = fadd(fmul(t.v[i], k.beta2), fmul(fmul(k.one_minus_beta2, g), g));
    t.m[i] = m;
    t.v[i] = v;
  }
  const float denom = fadd(fdiv(fsqrt(v), k.sqrt_bc2), k.eps);
  float u = fdiv(fdiv(m, k.bc1), denom);
  u = fadd(u, fmul(k.coupled_wd, pd));
  if (STAGE == 1) {
    acc[0] = fadd(acc[0], fmul(pd, pd));
    acc[1] = fadd(acc[1], fmul(u, u));
  } else if (STAGE == 2) {
    store_from_float<T>(t.p, i, fadd(pd, fmul(k.neg_lr, fmul(u, ratio))));
  } else {
    store_from_float<T>(t.p, i, fadd(pd, fmul(k.neg_lr, u)));
  }
}

template <int STAGE>
__device__ __forceinline__ void lamb_segment(
    const LambParams& k, const TensorMeta& t, int64_t begin, int64_t end, float clip, float ratio,
    float (&acc)[2]) {
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    switch (t.dtype) {
      case kF32: lamb_element<float, STAGE>(k, t, i, clip, ratio, acc); break;
      case kF16: lamb_element<c10::Half, STAGE>(k, t, i, clip, ratio, acc); break;
      default: lamb_element<c10::BFloat16, STAGE>(k, t, i, clip, ratio, acc);
    }
  }
}

template <int STAGE>
__global__ void __launch_bounds__(kThreads) lamb_stage_kernel(
    PlanView plan, LambParams k, float* partials, const float* ratios) {
  __shared__ float shared[2 * (kThreads / 32)];
  const float clip = k.clip ? *k.clip : 1.f;
  for_each_block_segment(plan, [&](const TensorMeta& t, int64_t begin, int64_t end, int64_t slot) {
    float acc[2] = {0.f, 0.f};
    const float ratio = STAGE == 2 ? ratios[plan.chunks[blockIdx.x].tensor] : 1.f;
    lamb_segment<STAGE>(k, t, begin, end, clip, ratio, acc);
    if (STAGE == 1) {
      block_sum<2>(acc, shared);
      if (threadIdx.x == 0) {
        partials[2 * slot] = acc[0];
        partials[2 * slot + 1] = acc[1];
      }
    }
  });
}

// One thread per tensor (a tensor is one row): its slots summed in order, then timm's trust ratio.
__global__ void lamb_ratio_kernel(PlanView plan, const float* partials, float* ratios, bool trust_clip) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= plan.num_tensors) {
    return;
  }
  const int64_t row = plan.tensors[t].row_base;
  double pp = 0.0, uu = 0.0;
  for (int64_t s = plan.row_slots[row]; s < plan.row_slots[row + 1]; ++s) {
    pp += partials[2 * s];
    uu += partials[2 * s + 1];
  }
  const float w_norm = float(sqrt(pp));
  const float u_norm = float(sqrt(uu));
  float r = (w_norm > 0.f && u_norm > 0.f) ? fdiv(w_norm, u_norm) : 1.f;
  ratios[t] = trust_clip ? fminf(r, 1.f) : r;
}

}  // namespace cuda
}  // namespace vitops
