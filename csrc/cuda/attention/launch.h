#pragma once
// The launchers of the attention kernels, one explicit instantiation per (head_dim, dtype) in its own .cu file
// (fwd_hdim64_bf16.cu, bwd_hdim64_bf16.cu, ...), so nvcc compiles them in parallel. Host code only: attention.cu
// includes this without any device code. Each returns the launch's error (cudaSuccess when it was queued).
#include <cuda_runtime_api.h>

#include "../warp_mma.cuh"
#include "params.h"

namespace vitops {
namespace cuda {
namespace attention {

// The head dims with an instantiation. 80 has its own (5 k-steps of 16) rather than a masked 96 tile.
#define VITOPS_ATTENTION_FOR_EACH_HEAD_DIM(X) X(32) X(64) X(80) X(96) X(128)

// out, lse
template <int D, class Dtype>
cudaError_t run_forward(const ForwardParams& params, cudaStream_t stream);

// delta, then grad_q, then grad_k and grad_v
template <int D, class Dtype>
cudaError_t run_backward(const BackwardParams& params, cudaStream_t stream);

#define VITOPS_ATTENTION_DECLARE(D)                                                            \
  extern template cudaError_t run_forward<D, warp::Fp16>(const ForwardParams&, cudaStream_t);   \
  extern template cudaError_t run_forward<D, warp::Bf16>(const ForwardParams&, cudaStream_t);   \
  extern template cudaError_t run_backward<D, warp::Fp16>(const BackwardParams&, cudaStream_t); \
  extern template cudaError_t run_backward<D, warp::Bf16>(const BackwardParams&, cudaStream_t);
VITOPS_ATTENTION_FOR_EACH_HEAD_DIM(VITOPS_ATTENTION_DECLARE)
#undef VITOPS_ATTENTION_DECLARE

}  // namespace attention
}  // namespace cuda
}  // namespace vitops
