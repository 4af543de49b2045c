// The schema of every vitops op, declared once. Kernels register themselves per dispatch key from
// csrc/cpu/ and csrc/cuda/; fake kernels and autograd are registered in Python beside each public function.
#include <torch/library.h>

TORCH_LIBRARY(vitops, m) {
  // out = residual + branch * gamma * sample_scale[sample]. A sample whose scale is 0 is dropped: its output
  // is exactly its residual (zeros without one) and its branch is never read.
  m.def(
      "drop_path_add(Tensor? residual, Tensor branch, Tensor? gamma, Tensor? sample_scale) -> Tensor");
  // Returns (grad_branch, grad_gamma); an output that is not asked for is an empty tensor. `branch` is only
  // needed, and only passed, for grad_gamma.
  m.def(
      "drop_path_add_backward(Tensor grad_out, Tensor? branch, Tensor? gamma, Tensor? sample_scale, "
      "ScalarType branch_dtype, bool need_branch_grad) -> (Tensor, Tensor)");
  // Fused optimizer steps (vitops.optim), updating params and moment buffers in place. See vitops/optim/.
  // LAMB with timm's math; clip_coef = max(1, ||all grads|| / max_grad_norm) divides every grad.
  m.def(
      "lamb_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor? clip_coef, float lr, float beta1, float beta2, float beta3, float bias_correction1, "
      "float bias_correction2, float eps, float weight_decay, float decay_scale, bool decoupled_decay, "
      "bool adapt, bool trust_clip) -> ()");
  // LAMB's global clipping coefficient max(1, ||all grads||_2 / max_grad_norm), a float32 0-d tensor on the
  // grads' device, computed without a host sync. Compiled for CPU only: on CUDA, torch._foreach_norm already is
  // a multi-tensor kernel.
  m.def("lamb_clip_coef(Tensor[] grads, float max_grad_norm) -> Tensor");
  // AdamP with timm's math; the bias corrections are per param (AdamP counts steps per param).
  m.def(
      "adamp_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "float[] bias_correction1, float[] bias_correction2, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, float delta, float wd_ratio, bool nesterov) -> ()");

  // Attention without a mask over (B, H, N, D) q, k, v whose last dim is contiguous (other strides are free).
  // Returns (out, lse): out is contiguous (B, H, Nq, D) in q's dtype; lse (B, H, Nq) is the natural-log
  // log-sum-exp of each query's scaled scores, float32 (float64 for float64 inputs), kept for the backward.
  // scale defaults to D ** -0.5.
  m.def("attention(Tensor q, Tensor k, Tensor v, float? scale) -> (Tensor, Tensor)");
  // Returns contiguous (grad_q, grad_k, grad_v), recomputing the probabilities from lse.
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float? scale) "
      "-> (Tensor, Tensor, Tensor)");
  // The same on the packed (B, N, 3*H*D) output of a qkv Linear (timm's order), read in place. Returns
  // (out, lse) with out a contiguous (B, N, H*D), ready for the proj Linear.
  m.def("attention_packed(Tensor qkv, int num_heads, float? scale) -> (Tensor, Tensor)");
  // Returns one contiguous (B, N, 3*H*D) grad_qkv.
  m.def(
      "attention_packed_backward(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads, "
      "float? scale) -> Tensor");

  // Folds an inference-mode BatchNorm into the convolution before it: returns (fused_weight, fused_bias) with
  // fused_weight = weight * bn_weight / sqrt(running_var + eps) per output channel and
  // fused_bias = (bias - running_mean) * bn_weight / sqrt(running_var + eps) + bn_bias. A missing bias is 0, a
  // missing bn_weight 1 and bn_bias 0. The per-channel tensors are float32 (float64 for a float64 weight).
  m.def(
      "fuse_conv_bn(Tensor weight, Tensor? bias, Tensor running_mean, Tensor running_var, Tensor? bn_weight, "
      "Tensor? bn_bias, float eps) -> (Tensor, Tensor)");
}

#ifdef TORCH_EXTENSION_NAME
#include <Python.h>
// `import vitops._C` only has to load this library so that the static registrations run. There are no Python
// bindings: every op is reached through torch.ops.vitops, which torch.compile can trace.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#endif
