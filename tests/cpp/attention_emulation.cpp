// Runs the tensor-core attention kernels (csrc/cuda/attention/forward.cuh, backward.cuh) on the CPU: the CUDA
// runtime of cuda_emulation.h and the warp instructions of warp_mma_emulation.h, with fp16/bf16 values rounded
// as on the GPU. Launches them as the launchers of csrc/cuda/attention/launch.cuh do (same kernels, order, grids
// and shared memory: params.h), on operands laid out however the caller likes (any strides, packed or not).
// Built as a shared library and called through ctypes by tests/ops/test_attention_cuda_emulation.py, on tensors
// the test allocates, which checks the results against the reference.
#include "warp_mma_emulation.h"

#include <vector>

#include "../../csrc/cuda/attention/backward.cuh"
#include "../../csrc/cuda/attention/forward.cuh"

using namespace vitops::cuda;
using namespace vitops::cuda::attention;

namespace {

struct Operands {
  const void *q, *k, *v, *grad_out;
  void *out, *grad_q, *grad_k, *grad_v;
};

template <int D, class Dtype>
void run(const Problem& problem, const Operands& ops, const Strides* strides, float* lse) {
  std::vector<float> delta(problem.batch * problem.heads * problem.nq, std::nanf(""));
  ForwardParams f{problem};
  f.out = ops.out, f.out_strides = strides[4];
  f.lse = lse;
  launch(Dim3{unsigned(forward_ctas<D>(f)), 1, 1}, kThreads, ForwardTile<D>::kSmemBytes,
         [&] { attention_forward_kernel<D, Dtype>(f); });

  BackwardParams b{problem};
  b.out = ops.out, b.out_strides = strides[4];
  b.grad_out = ops.grad_out, b.grad_out_strides = strides[3];
  b.lse = lse, b.delta = delta.data();
  b.grad_q = ops.grad_q, b.grad_q_strides = strides[5];
  b.grad_k = ops.grad_k, b.grad_k_strides = strides[6];
  b.grad_v = ops.grad_v, b.grad_v_strides = strides[7];
  launch(Dim3{unsigned(delta_ctas(b)), 1, 1}, kThreads, 0, [&] { attention_delta_kernel<D, Dtype>(b); });
  launch(Dim3{unsigned(grad_q_ctas<D>(b)), 1, 1}, kThreads, GradQTile<D>::kSmemBytes,
         [&] { attention_grad_q_kernel<D, Dtype>(b); });
  launch(Dim3{unsigned(grad_kv_ctas<D>(b)), 1, 1}, kThreads, GradKVTile<D>::kSmemBytes,
         [&] { attention_grad_kv_kernel<D, Dtype>(b); });
}

template <class Dtype>
int dispatch(const Problem& problem, int d, const Operands& ops, const Strides* strides, float* lse) {
  switch (d) {
    case 32: return run<32, Dtype>(problem, ops, strides, lse), 0;
    case 64: return run<64, Dtype>(problem, ops, strides, lse), 0;
    case 80: return run<80, Dtype>(problem, ops, strides, lse), 0;
    case 96: return run<96, Dtype>(problem, ops, strides, lse), 0;
    case 128: return run<128, Dtype>(problem, ops, strides, lse), 0;
  }
  return -1;
}

}  // namespace

extern "C" {

// The forward (out, lse), then the backward (grad_q, grad_k, grad_v). dtype: 0 float16, 1 bfloat16. operands: the
// data of q, k, v, grad_out, out, grad_q, grad_k, grad_v as (B, H, N, D) views; strides: their batch, head and row
// strides in elements, 8 x 3. lse: (B, H, NQ) float32. Returns 0, or -1 for a head_dim without kernels.
int attention(int dtype, int64_t batch, int heads, int nq, int nk, int d, double scale, void* const* operands,
              const int64_t* strides, float* lse) {
  Strides views[8];
  for (int i = 0; i < 8; ++i) views[i] = Strides{strides[3 * i], strides[3 * i + 1], strides[3 * i + 2]};
  const Operands ops{operands[0], operands[1], operands[2], operands[3],
                     operands[4], operands[5], operands[6], operands[7]};
  Problem problem{};
  problem.q = ops.q, problem.k = ops.k, problem.v = ops.v;
  problem.q_strides = views[0], problem.k_strides = views[1], problem.v_strides = views[2];
  problem.batch = batch, problem.heads = heads, problem.nq = nq, problem.nk = nk;
  problem.scale = float(scale);
  problem.scale_log2 = float(scale * 1.4426950408889634);  // as attention.cu computes it
  return dtype == 0 ? dispatch<warp::Fp16>(problem, d, ops, views, lse)
                    : dispatch<warp::Bf16>(problem, d, ops, views, lse);
}

}  // extern "C"
