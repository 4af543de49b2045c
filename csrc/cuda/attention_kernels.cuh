#pragma once
// Device code of the attention CUDA kernels (see attention.cu for the design). No ATen here: the same source is
// compiled by nvcc for the GPU and, with VITOPS_EMULATE_CUDA defined, as plain C++ by tests/test_attention_cuda_emulation.py,
// which runs it on the CPU with one std::thread per CUDA thread to check its indexing and synchronisation.
#include <cmath>
#include <cstdint>

namespace vitops {
namespace cuda {
namespace attention_kernels {

#ifndef VITOPS_EMULATE_CUDA
__device__ __forceinline__ float* dynamic_smem() {
  extern __shared__ float4 vitops_attention_smem[];
  return reinterpret_cast<float*>(vitops_attention_smem);
}
#endif

constexpr int kMaxN = 256;       // keys (forward, dq) or queries (dkdv) held per warp row: 8 per lane
constexpr int kPerLane = kMaxN / 32;
constexpr int kMaxD = 128;
constexpr int kWarps = 4;
constexpr int kRowsPerCta = 32;  // rows of the tiled side per CTA: 8 per warp

struct BHN {
  int64_t b, h, n;
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Row stride of the staged tiles: an odd number of 4-byte words for 2-byte types with even d.
__host__ __device__ inline int padded(int d) {
  return d + 2;
}

template <typename T>
__device__ void stage_rows(T* dst, const T* src, int64_t stride_n, int rows, int d) {
  for (int idx = threadIdx.x; idx < rows * d; idx += blockDim.x) {
    const int r = idx / d, c = idx - r * d;
    dst[r * padded(d) + c] = src[r * stride_n + c];
  }
}

template <typename T>
__device__ __forceinline__ float dot_row(const T* row, const float* x, int d) {
  float acc = 0.f;
  for (int c = 0; c < d; ++c) acc += static_cast<float>(row[c]) * x[c];
  return acc;
}

// Per-warp scratch: two d-vectors and two kMaxN-vectors of floats.
constexpr int kWarpScratch = 2 * kMaxD + 2 * kMaxN;

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) attention_forward_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
    float* __restrict__ lse, BHN sq, BHN sk, BHN sv, BHN so, int heads, int nq, int nk, int d, float scale) {
  float* scratch = dynamic_smem();
  T* ks = reinterpret_cast<T*>(scratch + kWarps * kWarpScratch);
  T* vs = ks + nk * padded(d);
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / heads, h = bh % heads;
  stage_rows(ks, k + b * sk.b + h * sk.h, sk.n, nk, d);
  stage_rows(vs, v + b * sv.b + h * sv.h, sv.n, nk, d);
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* qbuf = scratch + warp * kWarpScratch;
  float* pbuf = qbuf + 2 * kMaxD;
  const int row_end = min(nq, (int)(blockIdx.y + 1) * kRowsPerCta);
  for (int i = blockIdx.y * kRowsPerCta + warp; i < row_end; i += kWarps) {
    const T* qrow = q + b * sq.b + h * sq.h + (int64_t)i * sq.n;
    for (int c = lane; c < d; c += 32) qbuf[c] = static_cast<float>(qrow[c]) * scale;
    __syncwarp();
    float s[kPerLane];
    float m = -INFINITY;
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) {
      const int j = lane + 32 * t;
      s[t] = j < nk ? dot_row(ks + j * padded(d), qbuf, d) : -INFINITY;
      m = fmaxf(m, s[t]);
    }
    m = warp_max(m);  // finite: nk >= 1
    float l = 0.f;
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) {
      const int j = lane + 32 * t;
      if (j < nk) {
        const float p = expf(s[t] - m);
        pbuf[j] = p;
        l += p;
      }
    }
    l = warp_sum(l);
    __syncwarp();
    const float inv_l = 1.f / l;
    T* orow = o + b * so.b + h * so.h + (int64_t)i * so.n;
    for (int c = lane; c < d; c += 32) {
      float acc = 0.f;
      for (int j = 0; j < nk; ++j) acc += pbuf[j] * static_cast<float>(vs[j * padded(d) + c]);
      orow[c] = static_cast<T>(acc * inv_l);
    }
    if (lane == 0) lse[bh * nq + i] = m + logf(l);
    __syncwarp();  // qbuf and pbuf are rewritten by the next row
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) attention_backward_dq_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ o,
    const T* __restrict__ dout, const float* __restrict__ lse, float* __restrict__ delta, T* __restrict__ dq,
    BHN sq, BHN sk, BHN sv, BHN so, BHN sdo, BHN sdq, int heads, int nq, int nk, int d, float scale) {
  float* scratch = dynamic_smem();
  T* ks = reinterpret_cast<T*>(scratch + kWarps * kWarpScratch);
  T* vs = ks + nk * padded(d);
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / heads, h = bh % heads;
  stage_rows(ks, k + b * sk.b + h * sk.h, sk.n, nk, d);
  stage_rows(vs, v + b * sv.b + h * sv.h, sv.n, nk, d);
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* qbuf = scratch + warp * kWarpScratch;
  float* dobuf = qbuf + kMaxD;
  float* dsbuf = qbuf + 2 * kMaxD;
  const int row_end = min(nq, (int)(blockIdx.y + 1) * kRowsPerCta);
  for (int i = blockIdx.y * kRowsPerCta + warp; i < row_end; i += kWarps) {
    const T* qrow = q + b * sq.b + h * sq.h + (int64_t)i * sq.n;
    const T* orow = o + b * so.b + h * so.h + (int64_t)i * so.n;
    const T* dorow = dout + b * sdo.b + h * sdo.h + (int64_t)i * sdo.n;
    float part = 0.f;
    for (int c = lane; c < d; c += 32) {
      qbuf[c] = static_cast<float>(qrow[c]) * scale;
      const float g = static_cast<float>(dorow[c]);
      dobuf[c] = g;
      part += g * static_cast<float>(orow[c]);
    }
    const float dlt = warp_sum(part);
    const float row_lse = lse[bh * nq + i];
    __syncwarp();
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) {
      const int j = lane + 32 * t;
      if (j < nk) {
        const float p = expf(dot_row(ks + j * padded(d), qbuf, d) - row_lse);
        const float dp = dot_row(vs + j * padded(d), dobuf, d);
        dsbuf[j] = p * (dp - dlt);
      }
    }
    __syncwarp();
    T* dqrow = dq + b * sdq.b + h * sdq.h + (int64_t)i * sdq.n;
    for (int c = lane; c < d; c += 32) {
      float acc = 0.f;
      for (int j = 0; j < nk; ++j) acc += dsbuf[j] * static_cast<float>(ks[j * padded(d) + c]);
      dqrow[c] = static_cast<T>(acc * scale);
    }
    if (lane == 0) delta[bh * nq + i] = dlt;
    __syncwarp();
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) attention_backward_dkdv_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
    const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv,
    BHN sq, BHN sk, BHN sv, BHN sdo, BHN sdk, BHN sdv, int heads, int nq, int nk, int d, float scale) {
  float* scratch = dynamic_smem();
  float* lse_s = scratch + kWarps * kWarpScratch;
  float* delta_s = lse_s + kMaxN;
  T* qs = reinterpret_cast<T*>(delta_s + kMaxN);
  T* dos = qs + nq * padded(d);
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / heads, h = bh % heads;
  stage_rows(qs, q + b * sq.b + h * sq.h, sq.n, nq, d);
  stage_rows(dos, dout + b * sdo.b + h * sdo.h, sdo.n, nq, d);
  for (int i = threadIdx.x; i < nq; i += blockDim.x) {
    lse_s[i] = lse[bh * nq + i];
    delta_s[i] = delta[bh * nq + i];
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* kbuf = scratch + warp * kWarpScratch;
  float* vbuf = kbuf + kMaxD;
  float* pbuf = kbuf + 2 * kMaxD;
  float* dsbuf = pbuf + kMaxN;
  const int row_end = min(nk, (int)(blockIdx.y + 1) * kRowsPerCta);
  for (int j = blockIdx.y * kRowsPerCta + warp; j < row_end; j += kWarps) {
    const T* krow = k + b * sk.b + h * sk.h + (int64_t)j * sk.n;
    const T* vrow = v + b * sv.b + h * sv.h + (int64_t)j * sv.n;
    for (int c = lane; c < d; c += 32) {
      kbuf[c] = static_cast<float>(krow[c]) * scale;
      vbuf[c] = static_cast<float>(vrow[c]);
    }
    __syncwarp();
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) {
      const int i = lane + 32 * t;
      if (i < nq) {
        const float p = expf(dot_row(qs + i * padded(d), kbuf, d) - lse_s[i]);
        const float dp = dot_row(dos + i * padded(d), vbuf, d);
        pbuf[i] = p;
        dsbuf[i] = p * (dp - delta_s[i]);
      }
    }
    __syncwarp();
    T* dkrow = dk + b * sdk.b + h * sdk.h + (int64_t)j * sdk.n;
    T* dvrow = dv + b * sdv.b + h * sdv.h + (int64_t)j * sdv.n;
    for (int c = lane; c < d; c += 32) {
      float acc_k = 0.f, acc_v = 0.f;
      for (int i = 0; i < nq; ++i) {
        acc_k += dsbuf[i] * static_cast<float>(qs[i * padded(d) + c]);
        acc_v += pbuf[i] * static_cast<float>(dos[i * padded(d) + c]);
      }
      dkrow[c] = static_cast<T>(acc_k * scale);
      dvrow[c] = static_cast<T>(acc_v);
    }
    __syncwarp();
  }
}

}  // namespace attention_kernels
}  // namespace cuda
}  // namespace vitops
