// CPU kernels of drop_path_add: one pass over memory forward, one backward, each element computed by the
// functions of ../drop_path_add.h. Parallel over fixed chunks, so that gamma's gradient is summed in the same
// order whatever the thread count.
#include "../drop_path_add.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#define VITOPS_STREAMING_STORES 1
#endif

namespace vitops {
namespace cpu {
namespace {

// Elements per parallel task. Fixed, so that gamma's gradient, summed per chunk, does not depend on the thread
// count.
constexpr int64_t kChunk = 1 << 15;

// Outputs from this size on are written with non-temporal (streaming) stores: they skip reading the destination
// into the cache (a quarter of the forward's memory traffic, a third of the backward's) and leave the inputs
// cached. A smaller output is better left in the cache for the next op. Measured on a 32 MiB-L3 EPYC (2 cores of
// a shared VM), float32, one thread: a plain loop with the next op's read of its output, streaming 25% slower at
// 4 MiB and 17% faster from 10 MiB on; this op on ViT-S tokens B=64 and NCHW 64x56x56 B=32 (19 and 25 MiB), the
// forward 15-35% faster, the backward within 15% either way, as the rest of the machine uses the memory.
constexpr int64_t kStreamingBytes = 8 << 20;

// Calls fn(p, n, sample, channel) for each run of n elements starting at memory position p, inside
// [begin, end), over which the sample is fixed and the channel is either fixed (inner > 1) or counts up from
// `channel` one per element (inner == 1).
template <typename Fn>
inline void for_each_run(const DropPathAddLayout& layout, int64_t begin, int64_t end, const Fn& fn) {
  int64_t p = begin;
  while (p < end) {
    const int64_t sample = layout.sample_of(p);
    const int64_t channel = layout.channel_of(p);
    const int64_t next_sample = (sample + 1) * layout.per_sample;
    const int64_t next_channel =
        layout.inner == 1 ? p + (layout.channels - channel) : (p / layout.inner + 1) * layout.inner;
    const int64_t run_end = std::min({end, next_sample, next_channel});
    fn(p, run_end - p, sample, channel);
    p = run_end;
  }
}

// Calls body(chunk, begin, end) for each chunk [begin, end) of [0, numel), chunks in parallel.
template <typename Body>
inline void parallel_over_chunks(int64_t numel, const Body& body) {
  at::parallel_for(0, (numel + kChunk - 1) / kChunk, 1, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      body(chunk, chunk * kChunk, std::min(numel, (chunk + 1) * kChunk));
    }
#if VITOPS_STREAMING_STORES
    _mm_sfence();  // streaming stores are weakly ordered: make them visible before the caller reads the output
#endif
  });
}

// How the run loops read their operands. Scalar reads one element in the accumulate type; Float4 (SSE2) reads
// four float32 lanes, whose * and + are single IEEE operations per lane. The per-element functions of
// drop_path_add.h are templates over their arithmetic type, so the vector loop performs the very operations of
// the scalar one, four lanes at a time: the results are bit-identical.
template <typename acc_t>
struct Scalar {
  template <typename T>
  static acc_t load(const T* p) {
    return acc_t(*p);
  }
  static acc_t splat(acc_t x) {
    return x;
  }
};

#if VITOPS_STREAMING_STORES
struct Float4 {
  static constexpr int kLanes = 4;
  __m128 v;
  static Float4 load(const float* p) {
    return {_mm_loadu_ps(p)};
  }
  static Float4 splat(float x) {
    return {_mm_set1_ps(x)};
  }
};
inline Float4 operator*(Float4 a, Float4 b) {
  return {_mm_mul_ps(a.v, b.v)};
}
inline Float4 operator+(Float4 a, Float4 b) {
  return {_mm_add_ps(a.v, b.v)};
}
#endif

// Streaming stores are used for float32 outputs of float32 inputs, the only ones Float4 reads.
template <typename out_t, typename branch_t>
constexpr bool kStreamable = std::is_same_v<out_t, float> && std::is_same_v<branch_t, float>;

template <typename out_t, typename branch_t>
inline bool use_streaming_stores(int64_t numel) {
  return kStreamable<out_t, branch_t> && numel * int64_t(sizeof(out_t)) >= kStreamingBytes;
}

// out[j] = element(Lanes(), j) for j in [0, n), where element returns the values at j, j + 1, ... as Lanes
// holds them. With `streaming` the aligned middle of the run goes through Float4 and streaming stores, the ends
// through Scalar.
template <bool kCanStream, typename out_t, typename acc_t, typename Element>
inline void write_run(out_t* __restrict__ out, int64_t n, bool streaming, const Element& element) {
  int64_t j = 0;
#if VITOPS_STREAMING_STORES
  if constexpr (kCanStream) {
    if (streaming) {
      for (; j < n && reinterpret_cast<std::uintptr_t>(out + j) % sizeof(__m128) != 0; ++j) {
        out[j] = element(Scalar<acc_t>(), j);
      }
      for (; j + Float4::kLanes <= n; j += Float4::kLanes) {
        _mm_stream_ps(out + j, element(Float4(), j).v);
      }
    }
  }
#endif
  for (; j < n; ++j) {
    out[j] = static_cast<out_t>(element(Scalar<acc_t>(), j));
  }
}

// Calls fn(std::bool_constant<flag>()...): choices that hold for a whole run are made at compile time, so that
// every loop is branch-free and vectorizes.
template <typename Fn>
inline void with_flags(const Fn& fn) {
  fn();
}

template <typename Fn, typename... Flags>
inline void with_flags(const Fn& fn, bool flag, Flags... flags) {
  if (flag) {
    with_flags([&](auto... known) { fn(std::true_type(), known...); }, flags...);
  } else {
    with_flags([&](auto... known) { fn(std::false_type(), known...); }, flags...);
  }
}

template <typename out_t, typename branch_t, typename acc_t>
void forward_kernel(const ForwardArgs& args) {
  const out_t* residual = data_or_null<out_t>(args.residual);
  const branch_t* branch = args.branch.const_data_ptr<branch_t>();
  const acc_t* gamma = data_or_null<acc_t>(args.gamma);
  const acc_t* scale = data_or_null<acc_t>(args.sample_scale);
  out_t* out = args.out.mutable_data_ptr<out_t>();
  const DropPathAddLayout& layout = args.layout;
  constexpr bool kCanStream = kStreamable<out_t, branch_t>;
  const bool streaming = use_streaming_stores<out_t, branch_t>(layout.numel);
  parallel_over_chunks(layout.numel, [&](int64_t, int64_t begin, int64_t end) {
    for_each_run(layout, begin, end, [&](int64_t p, int64_t n, int64_t sample, int64_t channel) {
      const acc_t s = scale ? scale[sample] : acc_t(1);
      const out_t* r = residual ? residual + p : nullptr;
      const branch_t* b = branch + p;
      out_t* o = out + p;
      if (s == acc_t(0)) {  // dropped: its residual, or zeros; its branch is not read
        with_flags([&](auto has_residual) {
          constexpr bool kResidual = decltype(has_residual)::value;
          write_run<kCanStream, out_t, acc_t>(o, n, streaming, [&](auto lanes, int64_t j) {
            using V = decltype(lanes);
            if constexpr (kResidual) {
              return V::load(r + j);
            } else {
              return V::splat(acc_t(0));
            }
          });
        }, r != nullptr);
        return;
      }
      // gamma varies along the run when channels are innermost in memory, else it is one value.
      const acc_t* g = gamma && layout.inner == 1 ? gamma + channel : nullptr;
      const acc_t g0 = gamma ? gamma[channel] : acc_t(1);
      with_flags([&](auto has_residual, auto per_element_gamma) {
        constexpr bool kResidual = decltype(has_residual)::value;
        constexpr bool kPerElementGamma = decltype(per_element_gamma)::value;
        write_run<kCanStream, out_t, acc_t>(o, n, streaming, [&](auto lanes, int64_t j) {
          using V = decltype(lanes);
          const auto gj = kPerElementGamma ? V::load(g + j) : V::splat(g0);
          if constexpr (kResidual) {
            return drop_path_add_element(V::load(r + j), V::load(b + j), gj, V::splat(s));
          } else {
            return drop_path_term(V::load(b + j), gj, V::splat(s));
          }
        });
      }, r != nullptr, g != nullptr);
    });
  });
}

// The sum of drop_path_grad(grad_out[j], s, branch[j]) over 16 independent lanes: one running sum would be a
// dependency chain that the compiler may not reorder, so it would neither vectorize nor hide the add latency.
template <typename acc_t, typename out_t, typename branch_t>
inline acc_t sum_of_gamma_grads(const out_t* __restrict__ go, const branch_t* __restrict__ b, acc_t s, int64_t n) {
  constexpr int kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      lanes[l] += drop_path_grad(acc_t(go[j + l]), s, acc_t(b[j + l]));
    }
  }
  for (; j < n; ++j) {
    lanes[0] += drop_path_grad(acc_t(go[j]), s, acc_t(b[j]));
  }
  acc_t sum = 0;
  for (int l = 0; l < kLanes; ++l) {
    sum += lanes[l];
  }
  return sum;
}

// gamma_partials: [num_chunks, channels], zero-filled; null when gamma's gradient is not asked for.
template <typename out_t, typename branch_t, typename acc_t>
void backward_kernel(const BackwardArgs& args, acc_t* gamma_partials) {
  const out_t* grad_out = args.grad_out.const_data_ptr<out_t>();
  const branch_t* branch = data_or_null<branch_t>(args.branch);
  const acc_t* gamma = data_or_null<acc_t>(args.gamma);
  const acc_t* scale = data_or_null<acc_t>(args.sample_scale);
  branch_t* grad_branch = args.need_branch_grad ? args.grad_branch.mutable_data_ptr<branch_t>() : nullptr;
  const DropPathAddLayout& layout = args.layout;
  constexpr bool kCanStream = kStreamable<out_t, branch_t>;
  const bool streaming = use_streaming_stores<out_t, branch_t>(layout.numel);
  parallel_over_chunks(layout.numel, [&](int64_t chunk, int64_t begin, int64_t end) {
    acc_t* partial = gamma_partials ? gamma_partials + chunk * layout.channels : nullptr;
    for_each_run(layout, begin, end, [&](int64_t p, int64_t n, int64_t sample, int64_t channel) {
      const acc_t s = scale ? scale[sample] : acc_t(1);
      const out_t* go = grad_out + p;
      const bool dropped = s == acc_t(0);  // its gradients are exactly 0, even where grad_out is not finite
      if (grad_branch && dropped) {
        write_run<kCanStream, branch_t, acc_t>(grad_branch + p, n, streaming, [](auto lanes, int64_t) {
          return decltype(lanes)::splat(acc_t(0));
        });
      } else if (grad_branch) {
        const acc_t* g = gamma && layout.inner == 1 ? gamma + channel : nullptr;
        const acc_t g0 = gamma ? gamma[channel] : acc_t(1);
        with_flags([&](auto per_element_gamma) {
          constexpr bool kPerElementGamma = decltype(per_element_gamma)::value;
          write_run<kCanStream, branch_t, acc_t>(grad_branch + p, n, streaming, [&](auto lanes, int64_t j) {
            using V = decltype(lanes);
            const auto gj = kPerElementGamma ? V::load(g + j) : V::splat(g0);
            return drop_path_grad(V::load(go + j), V::splat(s), gj);
          });
        }, g != nullptr);
      }
      if (partial && !dropped) {
        const branch_t* b = branch + p;
        if (layout.inner == 1) {  // one channel per element
          acc_t* sums = partial + channel;
          for (int64_t j = 0; j < n; ++j) {
            sums[j] += drop_path_grad(acc_t(go[j]), s, acc_t(b[j]));
          }
        } else {
          partial[channel] += sum_of_gamma_grads(go, b, s, n);
        }
      }
    });
  });
}

void launch_forward(const ForwardArgs& args) {
  dispatch_pair(args.out.scalar_type(), args.branch.scalar_type(), [&](auto out_v, auto branch_v) {
    using out_t = decltype(out_v);
    forward_kernel<out_t, decltype(branch_v), at::opmath_type<out_t>>(args);
  });
}

// Returns gamma's gradient when asked for: the per-chunk partial sums, summed in chunk order.
at::Tensor launch_backward(const BackwardArgs& args) {
  const bool need_gamma_grad = args.branch.has_value();
  const int64_t num_chunks = (args.layout.numel + kChunk - 1) / kChunk;
  const at::Tensor partials = need_gamma_grad
      ? at::zeros({num_chunks, args.layout.channels}, args.grad_out.options().dtype(args.accumulate))
      : at::Tensor();
  dispatch_pair(args.grad_out.scalar_type(), args.grad_branch.scalar_type(), [&](auto out_v, auto branch_v) {
    using out_t = decltype(out_v);
    using acc_t = at::opmath_type<out_t>;
    acc_t* gamma_partials = need_gamma_grad ? partials.mutable_data_ptr<acc_t>() : nullptr;
    backward_kernel<out_t, decltype(branch_v), acc_t>(args, gamma_partials);
  });
  return need_gamma_grad ? at::sum(partials, 0) : at::Tensor();
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("drop_path_add", &drop_path_add_op<cpu::launch_forward>);
  m.impl("drop_path_add_backward", &drop_path_add_backward_op<cpu::launch_backward>);
}

}  // namespace vitops
