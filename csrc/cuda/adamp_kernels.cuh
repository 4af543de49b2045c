#pragma once
// Device code of adamp_step on CUDA (see adamp.cu for the design), and the kernels' constants from the op's
// arguments. No ATen: tests/cpp/optim_emulation.cpp runs this on the CPU.
#include "multi_tensor_kernels.cuh"

namespace vitops {
namespace cuda {

struct AdamPParams {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
  float plain_factor;      // 1 - lr * wd (or 1)
  float projected_factor;  // 1 - lr * wd * wd_ratio (or 1)
  double delta;
  bool nesterov;
};

inline AdamPParams adamp_params(
    double lr, double beta1, double beta2, double eps, double weight_decay, double delta, double wd_ratio,
    bool nesterov) {
  AdamPParams k;
  k.beta1 = float(beta1);
  k.one_minus_beta1 = float(1.0 - beta1);
  k.beta2 = float(beta2);
  k.one_minus_beta2 = float(1.0 - beta2);
  k.eps = float(eps);
  const bool decay = weight_decay > 0.0;
  k.plain_factor = decay ? float(1.0 - lr * weight_decay) : 1.f;
  k.projected_factor = decay ? float(1.0 - lr * weight_decay * wd_ratio) : 1.f;
  k.delta = delta;
  k.nesterov = nesterov;
  return k;
}

// A tensor's per-step fields: the projection applies to params of 2 or more dims; AdamP counts steps per param.
inline void adamp_tensor_fields(TensorMeta& meta, int64_t dim, double lr, double bias_correction1,
                                double bias_correction2) {
  meta.flag = dim > 1;
  meta.f0 = float(std::sqrt(bias_correction2));
  meta.f1 = float(-(lr / bias_correction1));
}

// TensorMeta: f0 = sqrt(bc2), f1 = -lr / bc1, flag = projectable.
template <typename T, int STAGE>
__device__ __forceinline__ void adamp_element(
    const AdamPParams& k, const TensorMeta& t, int64_t i, float factor, float coef, float (&acc)[4]) {
  const float pv = load_as_float<T>(t.p, i);
  float m, v, g = 0.f;
  if (STAGE == 2) {
    m = t.m[i];
    v = t.v[i];
    if (k.nesterov) {
      g = load_as_float<T>(t.g, i);
    }
  } else {
    g = load_as_float<T>(t.g, i);
    m = fadd(fmul(t.m[i], k.beta1), fmul(k.one_minus_beta1, g));
    v = fadd(fmul(t.v[i], k.beta2), fmul(fmul(k.one_minus_beta2, g), g));
    t.m[i] = m;
    t.v[i] = v;
  }
  const float denom = fadd(fdiv(fsqrt(v), t.f0), k.eps);
  const float q = k.nesterov ? fdiv(fadd(fmul(k.beta1, m), fmul(k.one_minus_beta1, g)), denom) : fdiv(m, denom);
  if (STAGE == 1) {
    acc[0] = fadd(acc[0], fmul(g, pv));
    acc[1] = fadd(acc[1], fmul(g, g));
    acc[2] = fadd(acc[2], fmul(pv, pv));
    acc[3] = fadd(acc[3], fmul(pv, q));
  } else if (STAGE == 2) {
    store_from_float<T>(t.p, i, fadd(fmul(pv, factor), fmul(t.f1, fsub(q, fmul(pv, coef)))));
  } else {
    store_from_float<T>(t.p, i, fadd(fmul(pv, factor), fmul(t.f1, q)));
  }
}

template <int STAGE>
__device__ __forceinline__ void adamp_segment(
    const AdamPParams& k, const TensorMeta& t, int64_t begin, int64_t end, float factor, float coef,
    float (&acc)[4]) {
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    switch (t.dtype) {
      case kF32: adamp_element<float, STAGE>(k, t, i, factor, coef, acc); break;
      case kF16: adamp_element<c10::Half, STAGE>(k, t, i, factor, coef, acc); break;
      default: adamp_element<c10::BFloat16, STAGE>(k, t, i, factor, coef, acc);
    }
  }
}

__global__ void __launch_bounds__(kThreads) adamp_stage1_kernel(PlanView plan, AdamPParams k, float* partials) {
  __shared__ float shared[4 * (kThreads / 32)];
  for_each_block_segment(plan, [&](const TensorMeta& t, int64_t begin, int64_t end, int64_t slot) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    if (!t.flag) {
      adamp_segment<0>(k, t, begin, end, k.plain_factor, 0.f, acc);
      return;
    }
    adamp_segment<1>(k, t, begin, end, 1.f, 0.f, acc);
    block_sum<4>(acc, shared);
    if (threadIdx.x == 0) {
      for (int q = 0; q < 4; ++q) {
        partials[4 * slot + q] = acc[q];
      }
    }
  });
}

__global__ void __launch_bounds__(kThreads) adamp_stage2_kernel(
    PlanView plan, AdamPParams k, const float* coefs, const float* factors) {
  const ChunkMeta c = plan.chunks[blockIdx.x];
  const TensorMeta& t = plan.tensors[c.tensor];
  if (!t.flag) {
    return;
  }
  const float factor = factors[c.tensor];
  for_each_block_segment(plan, [&](const TensorMeta& tm, int64_t begin, int64_t end, int64_t) {
    float acc[4];
    const float coef = coefs[tm.row_base + begin / tm.row_len];
    adamp_segment<2>(k, tm, begin, end, factor, coef, acc);
  });
}

__device__ __forceinline__ void row_sums(const PlanView& plan, const float* partials, int64_t row, double (&s)[4]) {
  s[0] = s[1] = s[2] = s[3] = 0.0;
  for (int64_t slot = plan.row_slots[row]; slot < plan.row_slots[row + 1]; ++slot) {
    for (int q = 0; q < 4; ++q) {
      s[q] += partials[4 * slot + q];
    }
  }
}

__device__ __forceinline__ float cosine(double gp, double gg, double pp, double eps) {
  return float(fabs(gp) / (fmax(sqrt(gg), eps) * fmax(sqrt(pp), eps)));
}

// One block per tensor.
__global__ void __launch_bounds__(kThreads) adamp_finalize_kernel(
    PlanView plan, AdamPParams k, const float* partials, float* coefs, float* factors) {
  const TensorMeta& t = plan.tensors[blockIdx.x];
  if (!t.flag || t.numel == 0) {
    if (threadIdx.x == 0) {
      factors[blockIdx.x] = k.plain_factor;
    }
    return;
  }
  __shared__ double totals[kThreads][4];
  __shared__ float max_cos[kThreads];
  __shared__ int mode;  // 0 none, 1 channel, 2 layer
  double mine[4] = {0.0, 0.0, 0.0, 0.0};
  float my_max = 0.f;
  for (int64_t r = threadIdx.x; r < t.rows; r += blockDim.x) {
    double s[4];
    row_sums(plan, partials, t.row_base + r, s);
    my_max = fmaxf(my_max, cosine(s[0], s[1], s[2], double(k.eps)));
    for (int q = 0; q < 4; ++q) {
      mine[q] += s[q];
    }
  }
  for (int q = 0; q < 4; ++q) {
    totals[threadIdx.x][q] = mine[q];
  }
  max_cos[threadIdx.x] = my_max;
  __syncthreads();
  if (threadIdx.x == 0) {
    double tot[4] = {0.0, 0.0, 0.0, 0.0};
    float mx = 0.f;
    for (int i = 0; i < int(blockDim.x); ++i) {
      for (int q = 0; q < 4; ++q) {
        tot[q] += totals[i][q];
      }
      mx = fmaxf(mx, max_cos[i]);
    }
    for (int q = 0; q < 4; ++q) {
      totals[0][q] = tot[q];
    }
    if (mx < float(k.delta / sqrt(double(t.row_len)))) {
      mode = 1;
    } else if (cosine(tot[0], tot[1], tot[2], double(k.eps)) < float(k.delta / sqrt(double(t.numel)))) {
      mode = 2;
    } else {
      mode = 0;
    }
    factors[blockIdx.x] = mode ? k.projected_factor : k.plain_factor;
  }
  __syncthreads();
  const double eps = double(k.eps);
  float layer_coef = 0.f;
  if (mode == 2) {
    const double norm = sqrt(totals[0][2]) + eps;
    layer_coef = float(totals[0][3] / norm / norm);
  }
  for (int64_t r = threadIdx.x; r < t.rows; r += blockDim.x) {
    float coef = 0.f;
    if (mode == 1) {
      double s[4];
      row_sums(plan, partials, t.row_base + r, s);
      const double norm = sqrt(s[2]) + eps;
      coef = float(s[3] / norm / norm);
    } else if (mode == 2) {
      coef = layer_coef;
    }
    coefs[t.row_base + r] = coef;
  }
}

}  // namespace cuda
}  // namespace vitops
