#pragma once
// The definitions of the launchers declared in launch.h; included only by the one-instantiation .cu files.
#include "backward.cuh"
#include "forward.cuh"
#include "launch.h"

namespace vitops {
namespace cuda {
namespace attention {

template <class Kernel, class Params>
cudaError_t launch(Kernel kernel, int64_t ctas, size_t smem_bytes, const Params& params, cudaStream_t stream) {
  if (ctas == 0) return cudaSuccess;
  if (smem_bytes > 48 * 1024) {  // above the default limit, dynamic shared memory must be opted into
    const cudaError_t error =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
    if (error != cudaSuccess) return error;
  }
  kernel<<<static_cast<unsigned>(ctas), kThreads, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

template <int D, class Dtype>
cudaError_t run_forward(const ForwardParams& params, cudaStream_t stream) {
  return launch(attention_forward_kernel<D, Dtype>, forward_ctas<D>(params), ForwardTile<D>::kSmemBytes, params,
                stream);
}

template <int D, class Dtype>
cudaError_t run_backward(const BackwardParams& params, cudaStream_t stream) {
  cudaError_t error = launch(attention_delta_kernel<D, Dtype>, delta_ctas(params), 0, params, stream);
  if (error == cudaSuccess) {
    error = launch(attention_grad_q_kernel<D, Dtype>, grad_q_ctas<D>(params), GradQTile<D>::kSmemBytes, params,
                   stream);
  }
  if (error == cudaSuccess) {
    error = launch(attention_grad_kv_kernel<D, Dtype>, grad_kv_ctas<D>(params), GradKVTile<D>::kSmemBytes, params,
                   stream);
  }
  return error;
}

}  // namespace attention
}  // namespace cuda
}  // namespace vitops
