"""Plain PyTorch definitions of every vitops op: the specification that all backends are tested against, and
the backend of last resort ("torch")."""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype vitops kernels compute in: float64 for float64 tensors, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- drop path ----------------------------------------------------------------------------------------------


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True) -> Tensor:
    """Stochastic depth with timm's semantics: each sample (dim 0) is kept with probability 1 - drop_prob, and
    scaled by 1 / (1 - drop_prob) when kept if `scale_by_keep`. Identity when drop_prob == 0 or not training."""
    if drop_prob == 0.0 or not training:
        return x
    scale = sample_scale(x.shape[0], drop_prob, scale_by_keep, dtype=x.dtype, device=x.device)
    per_sample: List[int] = [-1] + [1] * (x.ndim - 1)  # a list, not a tuple: TorchScript compiles this function
    return x * scale.view(per_sample)


def sample_scale(
    batch: int, drop_prob: float, scale_by_keep: bool, *, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """The per-sample factor of drop path: 0 for a dropped sample, 1 or 1/keep_prob for a kept one. It is drawn
    exactly as timm draws it (bernoulli_ in the branch's dtype, then div_), so a seed gives the same mask."""
    keep_prob = 1.0 - drop_prob
    scale = torch.empty(batch, dtype=dtype, device=device).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        scale.div_(keep_prob)
    return scale


def drop_path_add_empty_output(like: Tensor, dtype: torch.dtype) -> Tensor:
    """The output (or gradient) of drop_path_add for an input `like`: in `like`'s layout when that is dense with
    the batch dim outermost in memory (contiguous, channels_last, ...), which the kernels walk in memory order
    without copies; contiguous otherwise."""
    batch_outer_dense = torch._prims_common.is_non_overlapping_and_dense_or_false(like) and (
        like.shape[0] <= 1 or like.stride(0) * like.shape[0] == like.numel()
    )
    if batch_outer_dense:
        return torch.empty_like(like, dtype=dtype)
    return torch.empty(like.shape, dtype=dtype, device=like.device)


def drop_path_add(
    residual: Tensor | None, branch: Tensor, gamma: Tensor | None = None, sample_scale: Tensor | None = None
) -> Tensor:
    """`residual + branch * gamma * sample_scale[sample]`, computed in the accumulate dtype and rounded once to
    the residual's dtype (the branch's without a residual). A sample whose scale is 0 is dropped: its output is
    exactly its residual (zeros without one), whatever its branch holds, even inf or nan. `gamma` broadcasts
    against the trailing dims of branch: (C,) scales the last dim, (C, 1, 1) dim 1 of an NCHW tensor. The
    products are taken in timm's order, so float32 results equal `residual + drop_path(branch * gamma)`."""
    out_dtype = residual.dtype if residual is not None else branch.dtype
    acc = accumulate_dtype(out_dtype)
    out = branch.to(acc)
    if gamma is not None:
        out = out * gamma.to(acc)
    if sample_scale is not None:
        per_sample = sample_scale.to(acc).view((-1,) + (1,) * (branch.ndim - 1))
        out = torch.where(per_sample == 0, torch.zeros((), dtype=acc, device=out.device), out * per_sample)
    if residual is not None:
        out = residual.to(acc) + out
    return out.to(out_dtype)


def drop_path_add_backward(
    grad_out: Tensor,
    branch: Tensor | None,
    gamma: Tensor | None,
    sample_scale: Tensor | None,
    branch_dtype: torch.dtype,
    need_branch_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients of drop_path_add for branch and gamma: (grad_branch, grad_gamma), where a gradient that is not
    asked for is an empty tensor. `branch` is given exactly when gamma's gradient is wanted. A dropped sample
    (scale 0) takes no part: its branch gradient is exactly 0 and it adds nothing to gamma's, whatever grad_out,
    gamma and its branch hold (inf or nan included), as its branch never reaches the output."""
    acc = accumulate_dtype(grad_out.dtype)
    grad = grad_out.to(acc)

    def kept_only(t: Tensor) -> Tensor:
        return t if sample_scale is None else torch.where(dropped, torch.zeros((), dtype=acc, device=t.device), t)

    if sample_scale is not None:
        per_sample = sample_scale.to(acc).view((-1,) + (1,) * (grad.ndim - 1))
        dropped = per_sample == 0
        grad = grad * per_sample
    grad_branch = grad_out.new_empty(0, dtype=branch_dtype)
    if need_branch_grad:
        grad_branch = kept_only(grad if gamma is None else grad * gamma.to(acc)).to(branch_dtype)
    grad_gamma = grad_out.new_empty(0, dtype=acc)
    if branch is not None:
        assert gamma is not None
        per_channel = kept_only(grad * branch.to(acc))
        dims = [d for d in range(grad.ndim) if d != grad.ndim - gamma.ndim]
        grad_gamma = per_channel.sum(dims).view(gamma.shape)
    return grad_branch, grad_gamma


# --- attention ----------------------------------------------------------------------------------------------


def attention_scale(head_dim: int, scale: float | None) -> float:
    """The softmax scale: `scale` if given, else head_dim ** -0.5 (what SDPA and timm use)."""
    return head_dim**-0.5 if scale is None else float(scale)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """softmax(q @ k^T * scale) @ v over (..., N, D) tensors, computed in the inputs' own dtype with plain
    differentiable PyTorch ops (SDPA's math path without a mask). Upcast the inputs to get a precise reference."""
    s = (q @ k.transpose(-2, -1)) * attention_scale(q.shape[-1], scale)
    return torch.softmax(s, dim=-1) @ v


def attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """What the attention kernels return: (out, lse). Computed in the accumulate dtype; `out` is rounded once
    to q's dtype, `lse` (..., N) is the natural-log log-sum-exp of each query's scaled scores, in the
    accumulate dtype (float32, or float64 for float64 inputs)."""
    acc = accumulate_dtype(q.dtype)
    s = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * attention_scale(q.shape[-1], scale)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.exp(s - lse.unsqueeze(-1)) @ v.to(acc)
    return out.to(q.dtype), lse


def attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of attention_forward, recomputing the probabilities from the saved lse (FlashAttention's
    backward): P = exp(S - lse), dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = dS K * scale,
    dK = dS^T Q * scale. Computed in the accumulate dtype, each gradient rounded once to its input's dtype."""
    acc = accumulate_dtype(q.dtype)
    sc = attention_scale(q.shape[-1], scale)
    qa, ka, va, go = q.to(acc), k.to(acc), v.to(acc), grad_out.to(acc)
    p = torch.exp((qa @ ka.transpose(-2, -1)) * sc - lse.to(acc).unsqueeze(-1))
    dv = p.transpose(-2, -1) @ go
    dp = go @ va.transpose(-2, -1)
    delta = (go * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = (ds @ ka) * sc
    dk = (ds.transpose(-2, -1) @ qa) * sc
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def split_packed_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Views q, k, v of shape (B, H, N, D) into a packed (B, N, 3*H*D) qkv Linear output (no copies), in timm's
    order: qkv.reshape(B, N, 3, H, D)."""
    b, n, c3 = qkv.shape
    d = c3 // (3 * num_heads)
    parts = qkv.unflatten(-1, (3, num_heads, d)).permute(2, 0, 3, 1, 4)
    return parts[0], parts[1], parts[2]


def attention_packed(qkv: Tensor, num_heads: int, scale: float | None = None) -> Tensor:
    """Attention of a packed (B, N, 3*H*D) qkv, returned as (B, N, H*D): exactly what timm's Attention computes
    between its qkv and proj Linears (in the input's own dtype)."""
    q, k, v = split_packed_qkv(qkv, num_heads)
    return attention(q, k, v, scale).transpose(1, 2).flatten(2)


# --- conv-BN fusion -----------------------------------------------------------------------------------------


def fuse_conv_bn(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Folds an inference-mode BatchNorm into the convolution before it. Returns (fused_weight, fused_bias):
    `fused_weight = weight * bn_weight / sqrt(running_var + eps)` per output channel (dim 0) and
    `fused_bias = (bias - running_mean) / sqrt(running_var + eps) * bn_weight + bn_bias`, where a missing bias
    is 0, a missing bn_weight 1 and a missing bn_bias 0. Computed in float32 (float64 for a float64 weight),
    both results in the weight's dtype. Differentiable in every tensor argument."""
    acc = accumulate_dtype(weight.dtype)
    inv_std = 1 / torch.sqrt(running_var.to(acc) + eps)  # as the kernels round it: sqrt, then divide
    gamma = bn_weight.to(acc) if bn_weight is not None else None
    scale = inv_std if gamma is None else gamma * inv_std
    fused_weight = weight.to(acc) * scale.view((-1,) + (1,) * (weight.ndim - 1))
    centred = -running_mean.to(acc) if bias is None else bias.to(acc) - running_mean.to(acc)
    fused_bias = centred * inv_std
    if gamma is not None:
        fused_bias = fused_bias * gamma
    if bn_bias is not None:
        fused_bias = fused_bias + bn_bias.to(acc)
    return fused_weight.to(weight.dtype).contiguous(), fused_bias.to(weight.dtype)
