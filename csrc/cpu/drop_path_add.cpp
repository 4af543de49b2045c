// CPU kernels of drop_path_add: one pass over memory forward, one backward, parallel over fixed chunks so that
// gamma's gradient is summed in the same order whatever the thread count.
#include "../drop_path_add.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

namespace vitops {
namespace {

constexpr int64_t kChunk = 1 << 15;

// Calls fn(p, n, sample, channel) for each run of n elements starting at memory position p, inside
// [begin, end), over which the sample is fixed and the channel is either fixed (inner > 1) or counts up from
// `channel` one per element (inner == 1).
template <typename Fn>
inline void for_each_run(const DropPathAddLayout& L, int64_t begin, int64_t end, const Fn& fn) {
  int64_t p = begin;
  while (p < end) {
    const int64_t sample = p / L.per_sample;
    const int64_t position = p / L.inner;
    const int64_t channel = position % L.channels;
    int64_t run_end = std::min(end, (sample + 1) * L.per_sample);
    run_end = std::min(run_end, L.inner == 1 ? p + (L.channels - channel) : (position + 1) * L.inner);
    fn(p, run_end - p, sample, channel);
    p = run_end;
  }
}

// One run of the forward: o = r + (b * g) * s, in this order and without contraction, so float32 results are
// bit-identical to timm's `r + drop_path(b * gamma)`. Branch-free loops the compiler vectorizes.
template <bool kResidual, bool kGammaPerElement, typename out_t, typename branch_t, typename acc_t>
inline void forward_run(
    const out_t* __restrict__ r,
    const branch_t* __restrict__ b,
    const acc_t* __restrict__ g,
    acc_t s,
    out_t* __restrict__ o,
    int64_t n) {
  const acc_t g0 = g[0];
  for (int64_t j = 0; j < n; ++j) {
    const acc_t t = (acc_t(b[j]) * (kGammaPerElement ? g[j] : g0)) * s;
    o[j] = static_cast<out_t>(kResidual ? acc_t(r[j]) + t : t);
  }
}

template <typename out_t, typename branch_t>
void forward_kernel(
    const out_t* residual,
    const branch_t* branch,
    const at::opmath_type<out_t>* gamma,
    const at::opmath_type<out_t>* scale,
    out_t* out,
    const DropPathAddLayout& L) {
  using acc_t = at::opmath_type<out_t>;
  const int64_t num_chunks = (L.numel + kChunk - 1) / kChunk;
  at::parallel_for(0, num_chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      const int64_t chunk_end = std::min(L.numel, (chunk + 1) * kChunk);
      for_each_run(L, chunk * kChunk, chunk_end, [&](int64_t p, int64_t n, int64_t sample, int64_t channel) {
        const acc_t s = scale ? scale[sample] : acc_t(1);
        const out_t* r = residual ? residual + p : nullptr;
        out_t* o = out + p;
        if (s == acc_t(0)) {
          if (r) {
            std::copy_n(r, n, o);
          } else {
            std::fill_n(o, n, out_t(0));
          }
          return;
        }
        const bool per_element = L.inner == 1 && gamma;
        const acc_t* g = gamma ? gamma + channel : nullptr;
        const acc_t one = 1;
        if (r && per_element) {
          forward_run<true, true>(r, branch + p, g, s, o, n);
        } else if (r) {
          forward_run<true, false>(r, branch + p, g ? g : &one, s, o, n);
        } else if (per_element) {
          forward_run<false, true>(r, branch + p, g, s, o, n);
        } else {
          forward_run<false, false>(r, branch + p, g ? g : &one, s, o, n);
        }
      });
    }
  });
}

// sum(a[j] * b[j]) over independent lanes: a single running sum is one long dependency chain that the compiler
// may not reorder, so it neither vectorizes nor hides the add latency.
template <typename acc_t, typename a_t, typename b_t>
inline acc_t dot(const a_t* __restrict__ a, const b_t* __restrict__ b, int64_t n) {
  constexpr int kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      lanes[l] += acc_t(a[j + l]) * acc_t(b[j + l]);
    }
  }
  for (; j < n; ++j) {
    lanes[0] += acc_t(a[j]) * acc_t(b[j]);
  }
  acc_t sum = 0;
  for (int l = 0; l < kLanes; ++l) {
    sum += lanes[l];
  }
  return sum;
}

template <typename out_t, typename branch_t>
void backward_kernel(
    const out_t* grad_out,
    const branch_t* branch,
    const at::opmath_type<out_t>* gamma,
    const at::opmath_type<out_t>* scale,
    branch_t* grad_branch,
    at::opmath_type<out_t>* gamma_partials,  // [num_chunks, channels], zero-filled; null when not needed
    const DropPathAddLayout& L) {
  using acc_t = at::opmath_type<out_t>;
  const int64_t num_chunks = (L.numel + kChunk - 1) / kChunk;
  at::parallel_for(0, num_chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      const int64_t chunk_end = std::min(L.numel, (chunk + 1) * kChunk);
      acc_t* partial = gamma_partials ? gamma_partials + chunk * L.channels : nullptr;
      for_each_run(L, chunk * kChunk, chunk_end, [&](int64_t p, int64_t n, int64_t sample, int64_t channel) {
        const acc_t s = scale ? scale[sample] : acc_t(1);
        const out_t* go = grad_out + p;
        if (s == acc_t(0)) {
          if (grad_branch) {
            std::fill_n(grad_branch + p, n, branch_t(0));
          }
          return;
        }
        if (grad_branch) {
          branch_t* gb = grad_branch + p;
          if (L.inner == 1 && gamma) {
            const acc_t* g = gamma + channel;
            for (int64_t j = 0; j < n; ++j) {
              gb[j] = static_cast<branch_t>((acc_t(go[j]) * s) * g[j]);
            }
          } else {
            const acc_t g = gamma ? gamma[channel] : acc_t(1);
            for (int64_t j = 0; j < n; ++j) {
              gb[j] = static_cast<branch_t>((acc_t(go[j]) * s) * g);
            }
          }
        }
        if (partial) {
          const branch_t* b = branch + p;
          if (L.inner == 1) {
            acc_t* acc = partial + channel;
            for (int64_t j = 0; j < n; ++j) {
              acc[j] += (acc_t(go[j]) * s) * acc_t(b[j]);
            }
          } else {
            partial[channel] += dot<acc_t>(go, b, n) * s;
          }
        }
      });
    }
  });
}

at::Tensor drop_path_add_cpu(
    const std::optional<at::Tensor>& residual,
    const at::Tensor& branch,
    const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& sample_scale) {
  auto args = prepare_forward(residual, branch, gamma, sample_scale);
  if (args.layout.numel == 0) {
    return args.out;
  }
  dispatch_pair(args.out.scalar_type(), args.branch.scalar_type(), [&](auto out_v, auto branch_v) {
    using out_t = decltype(out_v);
    using branch_t = decltype(branch_v);
    using acc_t = at::opmath_type<out_t>;
    forward_kernel<out_t, branch_t>(
        data_or_null<out_t>(args.residual), args.branch.const_data_ptr<branch_t>(),
        data_or_null<acc_t>(args.gamma), data_or_null<acc_t>(args.sample_scale),
        args.out.mutable_data_ptr<out_t>(), args.layout);
  });
  return args.out;
}

std::tuple<at::Tensor, at::Tensor> drop_path_add_backward_cpu(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& branch,
    const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& sample_scale,
    at::ScalarType branch_dtype,
    bool need_branch_grad) {
  auto args = prepare_backward(grad_out, branch, gamma, sample_scale, branch_dtype, need_branch_grad);
  const bool need_gamma_grad = args.branch.has_value();
  const int64_t num_chunks = (args.layout.numel + kChunk - 1) / kChunk;
  at::Tensor partials = need_gamma_grad
      ? at::zeros({num_chunks, args.layout.channels}, grad_out.options().dtype(args.accumulate))
      : at::Tensor();
  if (args.layout.numel > 0 && (need_branch_grad || need_gamma_grad)) {
    dispatch_pair(args.grad_out.scalar_type(), branch_dtype, [&](auto out_v, auto branch_v) {
      using out_t = decltype(out_v);
      using branch_t = decltype(branch_v);
      using acc_t = at::opmath_type<out_t>;
      backward_kernel<out_t, branch_t>(
          args.grad_out.const_data_ptr<out_t>(), data_or_null<branch_t>(args.branch),
          data_or_null<acc_t>(args.gamma), data_or_null<acc_t>(args.sample_scale),
          need_branch_grad ? args.grad_branch.mutable_data_ptr<branch_t>() : nullptr,
          need_gamma_grad ? partials.mutable_data_ptr<acc_t>() : nullptr, args.layout);
    });
  }
  at::Tensor grad_gamma = need_gamma_grad ? at::sum(partials, 0).view(gamma->sizes())
                                          : at::empty({0}, grad_out.options().dtype(args.accumulate));
  return {args.grad_branch, grad_gamma};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("drop_path_add", &drop_path_add_cpu);
  m.impl("drop_path_add_backward", &drop_path_add_backward_cpu);
}

}  // namespace vitops
