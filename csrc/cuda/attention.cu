// CUDA kernels of attention (no mask) for ViT's short sequences: Nq, Nk <= 256, head_dim <= 128, float16 and
// bfloat16, float32 accumulation. NOTE: written and compile-checked without a GPU; it has never been run.
//
// Design (short-sequence, one head's K and V resident in shared memory):
//  - forward: a CTA per (batch*head, tile of query rows) stages the head's K and V (padded rows, so the lanes
//    of a warp reading different keys hit different banks). A warp owns a query row: each lane scores up to 8
//    keys (lane, lane+32, ...), so the whole row of scores sits in registers and the softmax is a single pass
//    (max, exp, sum: two warp reductions); the probabilities go through a per-warp shared buffer and each lane
//    then accumulates up to 4 output dims over all keys. The row's natural-log log-sum-exp is saved.
//  - backward: `dq` kernel, the same shape as the forward: recomputes P from lse, dP = dO V^T, and
//    dS = P * (dP - delta), delta = rowsum(dO * O) (which it stores), dQ = scale * dS K. `dkdv` kernel, the
//    transpose: a CTA per (batch*head, tile of key rows) stages Q, dO, lse and delta of all queries; a warp owns
//    a key row and produces dV = P^T dO and dK = scale * dS^T Q. No atomics; everything is float32 inside.
// Inputs outside that range (longer sequences, larger head_dim, float32/float64, too little shared memory) run
// a plain ATen math fallback here; the Python layer sends long sequences to the Triton kernels instead.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "attention_kernels.cuh"

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

namespace vitops {
namespace cuda {
namespace {

using namespace attention_kernels;

inline BHN strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2)};
}

// --- host side ------------------------------------------------------------------------------------------------

#define VITOPS_CHECK_ARG(cond, op, ...) TORCH_CHECK(cond, "vitops.", op, ": ", __VA_ARGS__)

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  VITOPS_CHECK_ARG(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, "q, k, v must be 4-D (B, H, N, D)");
  VITOPS_CHECK_ARG(
      k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3), op,
      "expected q (B, H, Nq, D) and k, v (B, H, Nk, D), got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  VITOPS_CHECK_ARG(
      q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op, "q, k, v dtypes differ");
  VITOPS_CHECK_ARG(q.device() == k.device() && q.device() == v.device(), op, "q, k, v devices differ");
  for (const at::Tensor* t : {&q, &k, &v}) {
    VITOPS_CHECK_ARG(t->size(3) <= 1 || t->stride(3) == 1, op, "the last dim must be contiguous");
  }
  VITOPS_CHECK_ARG(q.size(3) >= 1 && q.size(3) <= 256, op, "head_dim must be in [1, 256], got ", q.size(3));
}

double resolve_scale(std::optional<double> scale, int64_t d) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d));
}

size_t forward_smem(int n_staged, int d, size_t item) {
  return sizeof(float) * kWarps * kWarpScratch + 2 * item * n_staged * padded(d);
}

size_t dkdv_smem(int nq, int d, size_t item) {
  return sizeof(float) * (kWarps * kWarpScratch + 2 * kMaxN) + 2 * item * nq * padded(d);
}

int max_smem_optin() {
  return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
}

// Whether the short-sequence kernels take these inputs (else the math fallback runs).
bool kernel_fits(const at::Tensor& q, const at::Tensor& k) {
  const auto dtype = q.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  const int64_t nq = q.size(2), nk = k.size(2), d = q.size(3);
  if (nq > kMaxN || nk > kMaxN || d > kMaxD) return false;
  const size_t item = q.element_size();
  const size_t need = std::max({forward_smem(nk, d, item), dkdv_smem(nq, d, item)});
  return need <= static_cast<size_t>(max_smem_optin());
}

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
  }
}

dim3 grid_for(int64_t bh, int64_t rows) {
  return dim3(static_cast<unsigned>(bh), static_cast<unsigned>((rows + kRowsPerCta - 1) / kRowsPerCta));
}

// The ATen math path: what vitops.ops.reference computes, in float32 (float64 for float64).
std::tuple<at::Tensor, at::Tensor> math_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto s = q.to(acc).matmul(k.to(acc).transpose(-2, -1)).mul(scale);
  auto lse = s.logsumexp({-1});
  auto out = s.sub(lse.unsqueeze(-1)).exp().matmul(v.to(acc));
  return {out.to(q.scalar_type()).contiguous(), lse.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> math_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale) {
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto qa = q.to(acc), ka = k.to(acc), va = v.to(acc), go = grad_out.to(acc);
  auto p = qa.matmul(ka.transpose(-2, -1)).mul(scale).sub(lse.to(acc).unsqueeze(-1)).exp();
  auto dv = p.transpose(-2, -1).matmul(go);
  auto dp = go.matmul(va.transpose(-2, -1));
  auto delta = go.mul(out.to(acc)).sum({-1}, true);
  auto ds = p.mul(dp.sub(delta));
  auto dq = ds.matmul(ka).mul(scale);
  auto dk = ds.transpose(-2, -1).matmul(qa).mul(scale);
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

// Writes the forward into `out` (any (B, H, Nq, D) view with a contiguous last dim) and `lse` (contiguous).
void forward_into(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    double scale) {
  const int64_t heads = q.size(1), nq = q.size(2), nk = k.size(2), d = q.size(3);
  const int64_t bh = q.size(0) * heads;
  if (bh == 0 || nq == 0) return;
  if (!kernel_fits(q, k) || nk == 0) {
    auto [o, l] = math_forward(q, k, v, scale);
    out.copy_(o);
    lse.copy_(l);
    return;
  }
  const size_t smem = forward_smem(nk, d, q.element_size());
  AT_DISPATCH_REDUCED_FLOATING_TYPES(q.scalar_type(), "vitops_attention_forward", [&] {
    auto kernel = attention_forward_kernel<scalar_t>;
    allow_smem(kernel, smem);
    kernel<<<grid_for(bh, nq), kWarps * 32, smem, at::cuda::getCurrentCUDAStream()>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>(), strides_of(q), strides_of(k),
        strides_of(v), strides_of(out), (int)heads, (int)nq, (int)nk, (int)d, (float)scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward_into(
    const at::Tensor& grad_out_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
    double scale) {
  const int64_t heads = q.size(1), nq = q.size(2), nk = k.size(2), d = q.size(3);
  const int64_t bh = q.size(0) * heads;
  if (bh == 0) return;
  if (!kernel_fits(q, k) || nq == 0 || nk == 0) {
    auto [gq, gk, gv] = math_backward(grad_out_in, q, k, v, out, lse, scale);
    dq.copy_(gq);
    dk.copy_(gk);
    dv.copy_(gv);
    return;
  }
  const at::Tensor grad_out = grad_out_in.stride(3) == 1 ? grad_out_in : grad_out_in.contiguous();
  auto delta = at::empty({q.size(0), heads, nq}, q.options().dtype(at::kFloat));
  const size_t item = q.element_size();
  const size_t smem_dq = forward_smem(nk, d, item);
  const size_t smem_dkdv = dkdv_smem(nq, d, item);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(q.scalar_type(), "vitops_attention_backward", [&] {
    auto dq_kernel = attention_backward_dq_kernel<scalar_t>;
    allow_smem(dq_kernel, smem_dq);
    dq_kernel<<<grid_for(bh, nq), kWarps * 32, smem_dq, stream>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        out.const_data_ptr<scalar_t>(), grad_out.const_data_ptr<scalar_t>(), lse.const_data_ptr<float>(),
        delta.mutable_data_ptr<float>(), dq.mutable_data_ptr<scalar_t>(), strides_of(q), strides_of(k),
        strides_of(v), strides_of(out), strides_of(grad_out), strides_of(dq), (int)heads, (int)nq, (int)nk,
        (int)d, (float)scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto dkdv_kernel = attention_backward_dkdv_kernel<scalar_t>;
    allow_smem(dkdv_kernel, smem_dkdv);
    dkdv_kernel<<<grid_for(bh, nk), kWarps * 32, smem_dkdv, stream>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        grad_out.const_data_ptr<scalar_t>(), lse.const_data_ptr<float>(), delta.const_data_ptr<float>(),
        dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(), strides_of(q), strides_of(k),
        strides_of(v), strides_of(grad_out), strides_of(dk), strides_of(dv), (int)heads, (int)nq, (int)nk, (int)d,
        (float)scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// (B, H, N, D) views of the `parts` (H, D) groups of a (B, N, parts*H*D) tensor.
at::Tensor packed_view(const at::Tensor& packed, int64_t parts, int64_t heads, int64_t index) {
  const int64_t d = packed.size(2) / (parts * heads);
  return packed.reshape({packed.size(0), packed.size(1), parts, heads, d}).select(2, index).transpose(1, 2);
}

at::ScalarType lse_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::optional<double> scale) {
  check_qkv("attention", q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_dtype(q)));
  forward_into(q, k, v, out, lse, resolve_scale(scale, q.size(3)));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, std::optional<double> scale) {
  check_qkv("attention_backward", q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  backward_into(grad_out, q, k, v, out, lse, dq, dk, dv, resolve_scale(scale, q.size(3)));
  return {dq, dk, dv};
}

void check_packed(const char* op, const at::Tensor& qkv, int64_t heads) {
  VITOPS_CHECK_ARG(qkv.dim() == 3, op, "qkv must be 3-D (B, N, 3*H*D)");
  VITOPS_CHECK_ARG(heads >= 1, op, "num_heads must be a positive int, got ", heads);
  VITOPS_CHECK_ARG(
      qkv.size(2) > 0 && qkv.size(2) % (3 * heads) == 0, op, "qkv's last dim ", qkv.size(2),
      " is not 3 * num_heads * head_dim for num_heads=", heads);
  VITOPS_CHECK_ARG(qkv.size(2) <= 1 || qkv.stride(2) == 1, op, "qkv's last dim must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> attention_packed_cuda(
    const at::Tensor& qkv, int64_t heads, std::optional<double> scale) {
  check_packed("attention_packed", qkv, heads);
  const c10::cuda::CUDAGuard guard(qkv.device());
  auto q = packed_view(qkv, 3, heads, 0), k = packed_view(qkv, 3, heads, 1), v = packed_view(qkv, 3, heads, 2);
  check_qkv("attention_packed", q, k, v);
  auto out = at::empty({qkv.size(0), qkv.size(1), qkv.size(2) / 3}, qkv.options());
  auto lse = at::empty({qkv.size(0), heads, qkv.size(1)}, qkv.options().dtype(lse_dtype(qkv)));
  forward_into(q, k, v, packed_view(out, 1, heads, 0), lse, resolve_scale(scale, q.size(3)));
  return {out, lse};
}

at::Tensor attention_packed_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse, int64_t heads,
    std::optional<double> scale) {
  check_packed("attention_packed_backward", qkv, heads);
  const c10::cuda::CUDAGuard guard(qkv.device());
  auto q = packed_view(qkv, 3, heads, 0), k = packed_view(qkv, 3, heads, 1), v = packed_view(qkv, 3, heads, 2);
  auto grad_qkv = at::empty(qkv.sizes(), qkv.options());
  backward_into(
      packed_view(grad_out, 1, heads, 0), q, k, v, packed_view(out, 1, heads, 0), lse,
      packed_view(grad_qkv, 3, heads, 0), packed_view(grad_qkv, 3, heads, 1), packed_view(grad_qkv, 3, heads, 2),
      resolve_scale(scale, q.size(3)));
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
