// Attention without a mask on tensor cores, sm_80 and newer: FlashAttention-2 in design, forward and backward,
// the four ops of vitops/ops/schemas.def (attention, attention_backward, attention_packed,
// attention_packed_backward). NOT RUN ON A GPU: written and compiled without one (nvcc, sm_80 and sm_90, zero
// spills), checked by running the same device code on the CPU with the warp-level instructions emulated
// (tests/ops/test_attention_cuda_emulation.py, tests/ops/test_warp_mma_emulation.py).
//
// Support predicate: these ops take exactly the inputs below and raise a "vitops.<op>: ..." error naming the
// argument for anything else (the Python layer sends such inputs to the Triton kernels):
//  - q, k, v (packed: qkv), and for the backward grad_out and out: CUDA tensors on one device of compute
//    capability >= 8.0, all float16 or all bfloat16;
//  - q (B, H, Nq, D), k and v (B, H, Nk, D), grad_out and out (B, H, Nq, D); packed: qkv (B, N, 3*H*D),
//    grad_out and out (B, N, H*D); D in {32, 64, 80, 96, 128}; Nq >= 1 and Nk >= 1 (Nq != Nk allowed unpacked);
//    B or H may be 0 (empty results);
//  - each of those tensors: last dim contiguous (stride 1), every other dim of size > 1 a stride that is a
//    multiple of 8 elements (16 bytes), data pointer 16-byte aligned (cp.async and the 16-byte stores);
//  - lse: float32 of shape (B, H, Nq) (copied if not contiguous);
//  - B * H * ceil(max(Nq, Nk) / 16) < 2^31 (the 1-D grids).
// scale is any float (default D^-0.5). Outputs are contiguous: out (B, H, Nq, D) or (B, N, H*D), lse float32
// (B, H, Nq) natural log; dq, dk, dv like q, k, v, or one (B, N, 3*H*D) grad_qkv.
//
// Design (csrc/cuda/attention/: params.h tile shapes, tile.cuh shared helpers, forward.cuh, backward.cuh; one
// launcher instantiation per (head_dim, dtype) per .cu file):
//  - Instructions: mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16} with float32 accumulators, ldmatrix.x4 for
//    every operand (.trans for the B operands stored k-major: V in P V, K in dS K, dO in P^T dO, Q in dS^T Q),
//    cp.async.cg 16-byte copies with zero-fill for rows past N, all in csrc/cuda/warp_mma.cuh.
//  - CTAs of 4 warps; each warp owns 16 rows of its CTA's 64-row block and keeps them in registers (accumulators,
//    and the A fragments it reuses). The streamed operand goes through two shared-memory stages: block j + 1 is
//    copied (cp.async) while block j computes, one __syncthreads per block. Streamed blocks are 64 rows at
//    D = 32 and 32 rows above (the score tiles' registers beside D's accumulators). Tiles are row-major with rows
//    padded by 16 bytes, which makes ldmatrix and the 16-byte copies bank-conflict-free without a swizzle.
//    __launch_bounds__ promise each kernel's CTAs per SM (params.h), the most that compile without spills.
//  - Forward: a CTA per (b, h, 64 queries). S = Q K^T, scaled into base 2 (scale * log2 e folded in once), online
//    softmax in registers (running max and sum per row, O rescaled by exp2), P rounded to the input dtype for
//    O += P V; out = O / l through shared memory as 16-byte rows; lse = ln 2 * (m + log2 l).
//  - Backward, deterministic and without atomics: delta = rowsum(dO * O) (float32); a dQ kernel (CTA per query
//    block, looping over key blocks: S, P from lse, dP = dO V^T, dS = P (dP - delta), dQ += dS K) and a dK/dV
//    kernel (CTA per key block, looping over query blocks, working on the transposed tiles S^T = K Q^T so that
//    P^T and dS^T are A operands in registers: dV += P^T dO, dK += dS^T Q). The trade-off against
//    FlashAttention-2's single pass with atomic dQ: S and dP are computed twice (7 tile products per block pair
//    instead of 5, 1.4x the backward's tensor-core FLOPs), but there is no float32 dQ buffer, no atomics, no
//    conversion pass, and the result is bitwise reproducible. At ViT sizes (N = 197, D = 64) attention is
//    memory-bound (about 98 FLOP/byte against a ~295 ridge on H100), so the recomputation should cost less than
//    it does at long sequences; whether an atomic dQ wins must be measured on a GPU before adding it.
//  - sm_90 runs the same mma.sync kernel (compiled for sm_90, plus compute_90 PTX). wgmma and TMA were not used:
//    their warpgroup-wide asynchronous fragments and descriptors could not be validated without a GPU (the CPU
//    emulation covers mma.sync and ldmatrix from the PTX ISA's tables), and at N ~ 200 the kernels are bound by
//    memory traffic and tile padding more than by mma.sync's throughput. A wgmma/TMA variant for sm_90a is the
//    next step once a GPU can check it.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../checks.h"
#include "attention/launch.h"

namespace vitops {
namespace cuda {
namespace {

using namespace attention;

bool supported_head_dim(int64_t d) {
#define VITOPS_ATTENTION_IS(D) d == D ||
  return VITOPS_ATTENTION_FOR_EACH_HEAD_DIM(VITOPS_ATTENTION_IS) false;
#undef VITOPS_ATTENTION_IS
}

// fn(std::integral_constant<int, D>, Dtype) for the instantiation serving (d, dtype), both already checked.
template <class Fn>
void dispatch(int64_t d, at::ScalarType dtype, Fn&& fn) {
  auto with_dtype = [&](auto head_dim) {
    if (dtype == at::kHalf) {
      fn(head_dim, warp::Fp16{});
    } else {
      fn(head_dim, warp::Bf16{});
    }
  };
#define VITOPS_ATTENTION_CASE(D)                 \
  case D:                                        \
    with_dtype(std::integral_constant<int, D>{}); \
    return;
  switch (d) { VITOPS_ATTENTION_FOR_EACH_HEAD_DIM(VITOPS_ATTENTION_CASE) }
#undef VITOPS_ATTENTION_CASE
  TORCH_INTERNAL_ASSERT(false, "attention: no kernel for head_dim ", d);
}

// One (B, H, N, D) operand: `name` as the user knows it (qkv for the packed views).
void check_operand(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  VITOPS_CHECK(t.is_cuda(), op, name, " must be a CUDA tensor, got one on ", t.device());
  check_same_device(op, name, t, "q", q);
  VITOPS_CHECK_TYPE(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op, name,
                    " must be float16 or bfloat16 for the tensor-core kernels, got ", t.scalar_type());
  VITOPS_CHECK_TYPE(t.scalar_type() == q.scalar_type(), op, name, " is ", t.scalar_type(), " but q is ",
                    q.scalar_type());
  VITOPS_CHECK(t.stride(-1) == 1, op, name, "'s last dim must be contiguous, got strides ", t.strides());
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {
    VITOPS_CHECK(t.size(i) <= 1 || t.stride(i) % 8 == 0, op, name,
                 "'s strides must be multiples of 8 elements (16 bytes) for the kernels' 16-byte copies, got ",
                 t.strides());
  }
  VITOPS_CHECK(reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0, op, name,
               "'s data must be 16-byte aligned for the kernels' 16-byte copies");
}

// q, k, v as (B, H, N, D) views; the names say which argument each came from.
void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const char* q_name = "q", const char* k_name = "k", const char* v_name = "v") {
  VITOPS_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, "q, k, v must be 4-D (B, H, N, D), got ",
               q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  VITOPS_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1) &&
                   q.size(3) == k.size(3),
               op, "expected q (B, H, Nq, D) and k, v (B, H, Nk, D), got ", q.sizes(), ", ", k.sizes(), ", ",
               v.sizes());
  VITOPS_CHECK(supported_head_dim(q.size(3)), op, "head_dim must be 32, 64, 80, 96 or 128 for the tensor-core ",
               "kernels, got ", q.size(3));
  VITOPS_CHECK(q.size(2) >= 1 && k.size(2) >= 1, op, "q and k need at least one token each, got Nq=", q.size(2),
               ", Nk=", k.size(2));
  const int64_t rows = std::max(q.size(2), k.size(2));
  VITOPS_CHECK(q.size(0) * q.size(1) * ceil_div(rows, kDeltaRowsPerCta) <= std::numeric_limits<int32_t>::max(),
               op, "B * H * ceil(N / 16) must be below 2^31, got shapes ", q.sizes(), " and ", k.sizes());
  check_operand(op, q_name, q, q);
  check_operand(op, k_name, k, q);
  check_operand(op, v_name, v, q);
  const auto* props = at::cuda::getDeviceProperties(q.get_device());
  VITOPS_CHECK(props->major >= 8, op, "the tensor-core kernels need compute capability 8.0 or newer, ", q.device(),
               " is ", props->major, ".", props->minor);
}

Strides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2)};
}

Problem problem_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::optional<double> scale) {
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  Problem p{};
  p.q = q.const_data_ptr(), p.k = k.const_data_ptr(), p.v = v.const_data_ptr();
  p.q_strides = strides_of(q), p.k_strides = strides_of(k), p.v_strides = strides_of(v);
  p.batch = q.size(0);
  p.heads = static_cast<int>(q.size(1));
  p.nq = static_cast<int>(q.size(2));
  p.nk = static_cast<int>(k.size(2));
  p.scale = static_cast<float>(s);
  p.scale_log2 = static_cast<float>(s * 1.4426950408889634);  // log2(e)
  return p;
}

// Writes out (a (B, H, Nq, D) view with a contiguous last dim) and lse (contiguous), all checked.
void forward_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::optional<double> scale,
                  const at::Tensor& out, const at::Tensor& lse) {
  ForwardParams params{problem_of(q, k, v, scale)};
  params.out = out.mutable_data_ptr(), params.out_strides = strides_of(out);
  params.lse = lse.mutable_data_ptr<float>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(q.size(3), q.scalar_type(), [&](auto head_dim, auto dtype) {
    C10_CUDA_CHECK((run_forward<decltype(head_dim)::value, decltype(dtype)>(params, stream)));
  });
}

void backward_into(const char* op, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, std::optional<double> scale,
                   const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v) {
  VITOPS_CHECK_TYPE(lse.scalar_type() == at::kFloat, op, "lse must be float32, got ", lse.scalar_type());
  VITOPS_CHECK(lse.sizes() == q.sizes().slice(0, 3), op, "lse must be (B, H, Nq) = ", q.sizes().slice(0, 3),
               ", got ", lse.sizes());
  check_same_device(op, "lse", lse, "q", q);
  const at::Tensor lse_rows = lse.contiguous();
  auto delta = at::empty(lse.sizes(), lse.options());
  BackwardParams params{problem_of(q, k, v, scale)};
  params.out = out.const_data_ptr(), params.out_strides = strides_of(out);
  params.grad_out = grad_out.const_data_ptr(), params.grad_out_strides = strides_of(grad_out);
  params.lse = lse_rows.const_data_ptr<float>(), params.delta = delta.mutable_data_ptr<float>();
  params.grad_q = grad_q.mutable_data_ptr(), params.grad_q_strides = strides_of(grad_q);
  params.grad_k = grad_k.mutable_data_ptr(), params.grad_k_strides = strides_of(grad_k);
  params.grad_v = grad_v.mutable_data_ptr(), params.grad_v_strides = strides_of(grad_v);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(q.size(3), q.scalar_type(), [&](auto head_dim, auto dtype) {
    C10_CUDA_CHECK((run_backward<decltype(head_dim)::value, decltype(dtype)>(params, stream)));
  });
}

void check_like_q(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  VITOPS_CHECK(t.sizes() == q.sizes(), op, name, " must be shaped like q ", q.sizes(), ", got ", t.sizes());
  check_operand(op, name, t, q);
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  std::optional<double> scale) {
  constexpr const char* op = "attention";
  check_qkv(op, q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty(q.sizes().slice(0, 3), q.options().dtype(at::kFloat));
  if (q.numel() > 0) forward_into(q, k, v, scale, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, std::optional<double> scale) {
  constexpr const char* op = "attention_backward";
  check_qkv(op, q, k, v);
  check_like_q(op, "grad_out", grad_out, q);
  check_like_q(op, "out", out, q);
  const c10::cuda::CUDAGuard guard(q.device());
  auto grad_q = at::empty(q.sizes(), q.options());
  auto grad_k = at::empty(k.sizes(), k.options());
  auto grad_v = at::empty(v.sizes(), v.options());
  if (q.numel() > 0) backward_into(op, grad_out, q, k, v, out, lse, scale, grad_q, grad_k, grad_v);
  return {grad_q, grad_k, grad_v};
}

// The (B, H, N, D) view of part `part` of a (B, N, parts*H*D) tensor, in place.
at::Tensor head_view(const at::Tensor& packed, int64_t parts, int64_t heads, int64_t part) {
  return packed.unflatten(2, {parts, heads, packed.size(2) / (parts * heads)}).select(2, part).transpose(1, 2);
}

void check_packed(const char* op, const at::Tensor& qkv, int64_t heads) {
  VITOPS_CHECK(qkv.dim() == 3, op, "qkv must be 3-D (B, N, 3*H*D), got ", qkv.sizes());
  VITOPS_CHECK(heads >= 1, op, "num_heads must be a positive int, got ", heads);
  VITOPS_CHECK(qkv.size(2) % (3 * heads) == 0, op, "qkv's last dim ", qkv.size(2),
               " is not 3 * num_heads * head_dim for num_heads=", heads);
}

void check_packed_like_out(const char* op, const char* name, const at::Tensor& t, const at::Tensor& qkv) {
  VITOPS_CHECK(t.dim() == 3 && t.size(0) == qkv.size(0) && t.size(1) == qkv.size(1) &&
                   3 * t.size(2) == qkv.size(2),
               op, name, " must be (B, N, H*D) for qkv ", qkv.sizes(), ", got ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor> attention_packed_cuda(const at::Tensor& qkv, int64_t heads,
                                                         std::optional<double> scale) {
  constexpr const char* op = "attention_packed";
  check_packed(op, qkv, heads);
  const auto q = head_view(qkv, 3, heads, 0), k = head_view(qkv, 3, heads, 1), v = head_view(qkv, 3, heads, 2);
  check_qkv(op, q, k, v, "qkv", "qkv", "qkv");
  const c10::cuda::CUDAGuard guard(qkv.device());
  auto out = at::empty({qkv.size(0), qkv.size(1), qkv.size(2) / 3}, qkv.options());
  auto lse = at::empty({qkv.size(0), heads, qkv.size(1)}, qkv.options().dtype(at::kFloat));
  if (qkv.numel() > 0) forward_into(q, k, v, scale, head_view(out, 1, heads, 0), lse);
  return {out, lse};
}

at::Tensor attention_packed_backward_cuda(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
                                          const at::Tensor& lse, int64_t heads, std::optional<double> scale) {
  constexpr const char* op = "attention_packed_backward";
  check_packed(op, qkv, heads);
  check_packed_like_out(op, "grad_out", grad_out, qkv);
  check_packed_like_out(op, "out", out, qkv);
  const auto q = head_view(qkv, 3, heads, 0), k = head_view(qkv, 3, heads, 1), v = head_view(qkv, 3, heads, 2);
  check_qkv(op, q, k, v, "qkv", "qkv", "qkv");
  const auto grad_out_heads = head_view(grad_out, 1, heads, 0), out_heads = head_view(out, 1, heads, 0);
  check_operand(op, "grad_out", grad_out_heads, q);
  check_operand(op, "out", out_heads, q);
  const c10::cuda::CUDAGuard guard(qkv.device());
  auto grad_qkv = at::empty(qkv.sizes(), qkv.options());
  if (qkv.numel() > 0) {
    backward_into(op, grad_out_heads, q, k, v, out_heads, lse, scale, head_view(grad_qkv, 3, heads, 0),
                  head_view(grad_qkv, 3, heads, 1), head_view(grad_qkv, 3, heads, 2));
  }
  return grad_qkv;
}

}  // namespace
}  // namespace cuda
}  // namespace vitops

TORCH_LIBRARY_IMPL(vitops, CUDA, m) {
  m.impl("attention", &vitops::cuda::attention_cuda);
  m.impl("attention_backward", &vitops::cuda::attention_backward_cuda);
  m.impl("attention_packed", &vitops::cuda::attention_packed_cuda);
  m.impl("attention_packed_backward", &vitops::cuda::attention_packed_backward_cuda);
}
