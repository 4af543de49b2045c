// Runs the elementwise ops' CUDA kernels on the CPU (cuda_emulation.h), as their host code launches them:
//  - drop_path_add (csrc/cuda/drop_path_add.cuh) with the vector width and launch plan that
//    csrc/cuda/drop_path_add.cu picks: its indexing, vector and tail paths, dropped samples and gamma's partial sums;
//  - fuse_conv_bn (csrc/cuda/fuse_conv_bn.cuh), one block per output channel as csrc/cuda/fuse_conv_bn.cu launches
//    it: its indexing and per-channel math (bit for bit against the CPU kernel, which shares it).
// Also single threads of each kernel on logical tensors far larger than memory, backed only by the elements they
// touch, to check their 64-bit offsets. Built as a shared library (tests/cpp/emulation.py) and called through
// ctypes by tests/ops/test_drop_path_add.py and test_fuse_conv_bn.py, on tensors the tests allocate.
//
// Dtype codes: 0 float32, 1 float16, 2 bfloat16, 3 float64. gamma, scale and the per-channel tensors are in the
// accumulate type (float64 for float64, else float32); absent tensors are null. drop_path_add's layout (numel,
// per_sample, channels, inner) is DropPathAddLayout's (csrc/drop_path_add.h); target_threads stands for the GPU's
// resident threads.
#include "cuda_emulation.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <functional>
#include <tuple>
#include <vector>

#include "../../csrc/cuda/drop_path_add.cuh"
#include "../../csrc/cuda/fuse_conv_bn.cuh"

using namespace vitops;
using namespace vitops::cuda;

namespace {

template <typename T>
T* shifted(T* window, int64_t first_index) {  // a pointer that makes window[0] the element at first_index
  return reinterpret_cast<T*>(reinterpret_cast<std::uintptr_t>(window) - first_index * int64_t(sizeof(T)));
}

// Calls fn(value_t(), acc_t()) for a dtype code.
template <typename Fn>
int dispatch(int dtype, const Fn& fn) {
  switch (dtype) {
    case 0: return fn(float(), float());
    case 1: return fn(c10::Half(), float());
    case 2: return fn(c10::BFloat16(), float());
    case 3: return fn(double(), double());
    default: return -1;
  }
}

// Calls fn.template operator()<out_t, branch_t, acc_t>() for the (output, branch) pairs drop_path_add takes: equal
// dtypes, or a float16/bfloat16 branch with a float32 output.
template <typename Fn>
int dispatch_pair(int out_dtype, int branch_dtype, const Fn& fn) {
  if (out_dtype == 0 && branch_dtype != 3) {
    return dispatch(branch_dtype, [&](auto branch_v, auto) {
      return fn.template operator()<float, decltype(branch_v), float>();
    });
  }
  if (out_dtype != branch_dtype) return -1;
  return dispatch(out_dtype, [&](auto value_v, auto acc_v) {
    return fn.template operator()<decltype(value_v), decltype(value_v), decltype(acc_v)>();
  });
}

void run(const LaunchPlan& plan, const std::function<void()>& kernel) {
  launch(Dim3{static_cast<unsigned>(blocks_for(plan)), 1, 1}, kThreadsPerBlock, 0, kernel);
}

// The plan of a float32 launch (4 lanes) over a layout, with the CUDA built-ins set to its thread `thread`.
LaunchPlan as_float32_thread(const DropPathAddLayout& layout, int64_t target_threads, int64_t thread) {
  blockDim = Dim3{kThreadsPerBlock, 1, 1};
  blockIdx = Dim3{static_cast<unsigned>(thread / kThreadsPerBlock), 0, 0};
  threadIdx = Dim3{static_cast<unsigned>(thread % kThreadsPerBlock), 0, 0};
  return make_plan(layout, 4, target_threads);
}

}  // namespace

extern "C" {

// The forward, as drop_path_add_cuda launches it. Returns the vector width used.
int drop_path_add_forward(
    int out_dtype, int branch_dtype, const void* residual, const void* branch, const void* gamma, const void* scale,
    void* out, int64_t numel, int64_t per_sample, int64_t channels, int64_t inner, int64_t target_threads) {
  const DropPathAddLayout layout{numel, per_sample, channels, inner};
  return dispatch_pair(out_dtype, branch_dtype, [&]<typename out_t, typename branch_t, typename acc_t>() {
    const int vec = forward_vec<out_t, branch_t>(layout, residual, branch, out);
    const auto plan = make_plan(layout, vec, target_threads);
    const auto args = std::make_tuple(
        static_cast<const out_t*>(residual), static_cast<const branch_t*>(branch), static_cast<const acc_t*>(gamma),
        static_cast<const acc_t*>(scale), static_cast<out_t*>(out), plan);
    run(plan, [&] {
      with_vec<branch_t>(vec, [&](auto lanes) {
        std::apply(drop_path_add_forward_kernel<out_t, branch_t, acc_t, decltype(lanes)::value>, args);
      });
    });
    return vec;
  });
}

// The backward, as drop_path_add_backward_cuda launches it, with the partial sums of gamma's gradient reduced
// into grad_gamma (`channels` values) the way that function's reduce_partials views them. grad_branch and
// grad_gamma may be null (not asked for; grad_gamma needs branch). Returns the vector width used.
int drop_path_add_backward(
    int out_dtype, int branch_dtype, const void* grad_out, const void* branch, const void* gamma, const void* scale,
    void* grad_branch, void* grad_gamma, int64_t numel, int64_t per_sample, int64_t channels, int64_t inner,
    int64_t target_threads) {
  const DropPathAddLayout layout{numel, per_sample, channels, inner};
  return dispatch_pair(out_dtype, branch_dtype, [&]<typename out_t, typename branch_t, typename acc_t>() {
    const int vec = backward_vec<out_t, branch_t>(layout, grad_out, branch, grad_branch);
    const auto plan = make_plan(layout, vec, target_threads / 2);
    std::vector<acc_t> partials(grad_gamma ? (plan.channel_per_lane ? plan.threads * vec : plan.threads) : 0);
    const auto args = std::make_tuple(
        static_cast<const out_t*>(grad_out), static_cast<const branch_t*>(branch), static_cast<const acc_t*>(gamma),
        static_cast<const acc_t*>(scale), static_cast<branch_t*>(grad_branch), grad_gamma ? partials.data() : nullptr,
        plan);
    run(plan, [&] {
      with_vec<branch_t>(vec, [&](auto lanes) {
        std::apply(drop_path_add_backward_kernel<out_t, branch_t, acc_t, decltype(lanes)::value>, args);
      });
    });
    if (grad_gamma) {
      auto* sums = static_cast<acc_t*>(grad_gamma);
      std::fill_n(sums, channels, acc_t(0));
      const int64_t per_channel = plan.channel_per_lane || channels == 1 ? 1 : inner / vec;
      for (int64_t i = 0; i < int64_t(partials.size()); ++i) {
        sums[(i / per_channel) % channels] += partials[i];
      }
    }
    return vec;
  });
}

// Thread `thread` of the forward kernel (float32, 4 lanes), run alone on a logical tensor that may be far larger
// than memory: each tensor is backed by a window of 4 elements, the ones at the thread's first position
// 4 * thread, which must be the only position it visits. gamma and scale are whole. Checks the kernel's 64-bit
// indexing: past 2^32 threads, blockIdx.x * blockDim.x overflows 32 bits.
void drop_path_add_forward_one_thread(
    const float* residual_window, const float* branch_window, const float* gamma, const float* scale,
    float* out_window, int64_t numel, int64_t per_sample, int64_t channels, int64_t inner, int64_t target_threads,
    int64_t thread) {
  const auto plan = as_float32_thread(DropPathAddLayout{numel, per_sample, channels, inner}, target_threads, thread);
  const int64_t first = thread * 4;
  drop_path_add_forward_kernel<float, float, float, 4>(
      shifted(residual_window, first), shifted(branch_window, first), gamma, scale, shifted(out_window, first), plan);
}

// The same for the backward kernel: grad_out, branch and grad_branch windows of 4 elements, and gamma's partial
// sums in a window of 4 at the thread's partial index (4 * thread per lane, else thread).
void drop_path_add_backward_one_thread(
    const float* grad_out_window, const float* branch_window, const float* gamma, const float* scale,
    float* grad_branch_window, float* partials_window, int64_t numel, int64_t per_sample, int64_t channels,
    int64_t inner, int64_t target_threads, int64_t thread) {
  const auto plan = as_float32_thread(DropPathAddLayout{numel, per_sample, channels, inner}, target_threads, thread);
  const int64_t first = thread * 4;
  drop_path_add_backward_kernel<float, float, float, 4>(
      shifted(grad_out_window, first), shifted(branch_window, first), gamma, scale,
      shifted(grad_branch_window, first), shifted(partials_window, plan.channel_per_lane ? first : thread), plan);
}

// The positions for_each_position visits for `thread`, and their samples; returns how many (at most `capacity`).
int64_t drop_path_add_thread_positions(
    int64_t numel, int64_t per_sample, int64_t channels, int64_t inner, int vec, int64_t target_threads,
    int64_t thread, int64_t* positions, int64_t* samples, int64_t capacity) {
  const auto plan = make_plan(DropPathAddLayout{numel, per_sample, channels, inner}, vec, target_threads);
  int64_t count = 0;
  for_each_position(plan, thread * vec, [&](int64_t p, int64_t sample) {
    if (count < capacity) {
      positions[count] = p;
      samples[count] = sample;
    }
    ++count;
  });
  return count;
}

// The kernel over every output channel, as fuse_conv_bn_cuda launches it. Returns the threads per block.
int fuse_conv_bn(
    int dtype, const void* weight, const void* bias, const void* running_mean, const void* running_var,
    const void* bn_weight, const void* bn_bias, void* fused_weight, void* fused_bias, int64_t channels,
    int64_t per_channel, double eps) {
  return dispatch(dtype, [&](auto scalar_v, auto acc_v) {
    using scalar_t = decltype(scalar_v);
    using acc_t = decltype(acc_v);
    const int threads = fuse_conv_bn_threads(per_channel);
    launch(Dim3{static_cast<unsigned>(channels), 1, 1}, threads, 0, [&] {
      fuse_conv_bn_kernel<scalar_t, acc_t>(
          static_cast<const scalar_t*>(weight), static_cast<const acc_t*>(bias),
          static_cast<const acc_t*>(running_mean), static_cast<const acc_t*>(running_var),
          static_cast<const acc_t*>(bn_weight), static_cast<const acc_t*>(bn_bias),
          static_cast<scalar_t*>(fused_weight), static_cast<scalar_t*>(fused_bias), per_channel,
          static_cast<acc_t>(eps));
    });
    return threads;
  });
}

// The block of output channel `channel` alone (float32), its threads run one after another, on a weight far
// larger than memory: the weights are windows of the channel's per_channel elements, each per-channel tensor a
// window of its one element. Checks the kernel's 64-bit indexing: channel * per_channel may exceed 2^32.
void fuse_conv_bn_one_channel(
    const float* weight_window, const float* bias_window, const float* running_mean_window,
    const float* running_var_window, const float* bn_weight_window, const float* bn_bias_window,
    float* fused_weight_window, float* fused_bias_window, int64_t channel, int64_t per_channel, double eps) {
  const int threads = fuse_conv_bn_threads(per_channel);
  const int64_t base = channel * per_channel;
  blockDim = Dim3{static_cast<unsigned>(threads), 1, 1};
  blockIdx = Dim3{static_cast<unsigned>(channel), 0, 0};
  for (int t = 0; t < threads; ++t) {
    threadIdx = Dim3{static_cast<unsigned>(t), 0, 0};
    fuse_conv_bn_kernel<float, float>(
        shifted(weight_window, base), shifted(bias_window, channel), shifted(running_mean_window, channel),
        shifted(running_var_window, channel), shifted(bn_weight_window, channel), shifted(bn_bias_window, channel),
        shifted(fused_weight_window, base), shifted(fused_bias_window, channel), per_channel, float(eps));
  }
}

}  // extern "C"
