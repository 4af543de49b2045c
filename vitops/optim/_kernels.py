"""The fused optimizer-step ops: vitops::lamb_step, vitops::adamp_step and LAMB's global clipping coefficient
vitops::lamb_clip_coef (schemas in vitops/ops/schemas.def), registered with their fake kernels and backends.

Both step ops update params, exp_avgs and exp_avg_sqs in place and return nothing. The kernels take float32,
float16 and bfloat16 params (grads of the param's dtype) with float32 moments, all contiguous; the optimizers
send any other param down the reference path (vitops.optim.reference)."""
from __future__ import annotations

import torch

from vitops import _backend
from vitops.ops._define import define_op
from vitops.optim import reference

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The compiled multi-tensor CUDA kernels have not run on a GPU yet: on CUDA tensors the Triton kernels run by
# default, the CUDA ones only when forced with use_backend("cuda").
_ORDER = {"cuda": ("triton", "cuda", "torch")}


def _check_clip_args(grads, max_grad_norm) -> None:
    if not grads:
        raise ValueError("vitops.lamb_clip_coef: grads is empty")
    if not max_grad_norm > 0:
        raise ValueError(f"vitops.lamb_clip_coef: max_grad_norm must be > 0, got {max_grad_norm}")


def _lamb_clip_coef_fake(grads, max_grad_norm):
    _check_clip_args(grads, max_grad_norm)
    return grads[0].new_empty((), dtype=torch.float32)


define_op("lamb_step", fake=lambda *args: None, reference=reference.lamb_step, triton="optim:lamb_step", order=_ORDER)
define_op("adamp_step", fake=lambda *args: None, reference=reference.adamp_step, triton="optim:adamp_step",
          order=_ORDER)  # fmt: skip
define_op(
    "lamb_clip_coef",
    fake=_lamb_clip_coef_fake,
    reference=reference.lamb_clip_coef,
    check=_check_clip_args,
    no_kernel={
        "cuda": "none by design: the torch backend's torch._foreach_norm already is a multi-tensor CUDA kernel",
        "triton": "none by design: the torch backend's torch._foreach_norm already is a multi-tensor CUDA kernel",
    },
)


def kernel_ok(p: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether the fused kernels take this param and grad (else the reference path runs)."""
    return (
        p.dtype in KERNEL_DTYPES
        and grad.dtype == p.dtype
        and p.is_contiguous()
        and grad.is_contiguous()
        and p.device.type in _backend.DEVICE_TYPES
    )
