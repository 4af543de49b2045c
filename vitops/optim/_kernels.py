"""The optimizer ops (schemas and what each computes: vitops/ops/schemas.def), registered once each with define_op:
LAMB's lamb_grad_sq_sums, lamb_moments and lamb_apply, AdamP's adamp_moments and adamp_apply. A step is split into
them so that sharded params can add up their ranks' partial sums in between (vitops/optim/_sharding.py).

Backends: the compiled kernels (csrc/cpu/lamb.cpp, adamp.cpp; csrc/cuda/lamb.cu, adamp.cu, sharing csrc/lamb.h's and
adamp.h's arithmetic), the Triton launchers (vitops/ops/triton/lamb.py, adamp.py) and the reference
(vitops/optim/reference.py). They take float32, float16 and bfloat16 params (grads of the param's dtype) with
float32 moments, all contiguous; the optimizers send any other param to the reference directly."""

from __future__ import annotations

import torch

from vitops import _backend
from vitops.ops._define import define_op
from vitops.optim import reference

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ADAMP_TENSOR_SUMS = reference.ADAMP_TENSOR_SUMS
# The compiled multi-tensor CUDA kernels have not run on a GPU yet: on CUDA tensors the Triton kernels run by
# default, the CUDA ones only when forced with use_backend("cuda").
_ORDER = {"cuda": ("triton", "cuda", "torch")}


def _check_lists(op: str, params, *lists, params_name: str = "params") -> None:
    """csrc/optim.h's check_step_lists: params (named `params_name`) are float32, float16 or bfloat16, contiguous,
    on one device; `lists` are (name, tensors, whether they have the params' dtype (grads) or float32 (moments)),
    each with one tensor per param, of its shape, contiguous, on its device."""
    for name, tensors, _ in lists:
        if len(tensors) != len(params):
            raise ValueError(f"vitops.{op}: {name} has {len(tensors)} tensors but {params_name} has {len(params)}; "
                             "they need one per param")  # fmt: skip
    for i, p in enumerate(params):
        if p.dtype not in KERNEL_DTYPES:
            raise TypeError(f"vitops.{op}: {params_name}[{i}] must be float32, float16 or bfloat16, got {p.dtype}")
        if p.layout != torch.strided or not p.is_contiguous():
            raise ValueError(f"vitops.{op}: {params_name}[{i}] must be contiguous")
        if p.device != params[0].device:
            raise ValueError(f"vitops.{op}: {params_name}[{i}] is on {p.device} but {params_name}[0] is on "
                             f"{params[0].device}")  # fmt: skip
        for name, tensors, param_dtype in lists:
            t = tensors[i]
            if t.shape != p.shape:
                raise ValueError(f"vitops.{op}: {name}[{i}] has shape {tuple(t.shape)} but params[{i}] has "
                                 f"{tuple(p.shape)}")  # fmt: skip
            if t.device != p.device:
                raise ValueError(f"vitops.{op}: {name}[{i}] is on {t.device} but params[{i}] is on {p.device}")
            if t.layout != torch.strided or not t.is_contiguous():
                raise ValueError(f"vitops.{op}: {name}[{i}] must be contiguous")
            want = p.dtype if param_dtype else torch.float32
            if t.dtype != want:
                raise TypeError(f"vitops.{op}: {name}[{i}] must be {want} (params[{i}] is {p.dtype}), got {t.dtype}")


def _check_float_tensor(op: str, name: str, t, shape: tuple, params) -> None:
    if t.dtype != torch.float32:
        raise TypeError(f"vitops.{op}: {name} must be float32, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"vitops.{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    if params and t.device != params[0].device:
        raise ValueError(f"vitops.{op}: {name} is on {t.device} but params[0] is on {params[0].device}")


def _check_per_param(op: str, name: str, values, params) -> None:
    if len(values) != len(params):
        raise ValueError(f"vitops.{op}: {name} needs one value per param, got {len(values)} for {len(params)} params")


def _check_found_inf(op: str, found_inf, params) -> None:
    if found_inf is not None:
        _check_float_tensor(op, "found_inf", found_inf, (), params)


def _check_grad_sq_sums(grads) -> None:
    _check_lists("lamb_grad_sq_sums", grads, params_name="grads")


def _check_lamb_moments(params, grads, exp_avgs, exp_avg_sqs, grad_sq_sum, max_grad_norm, lr, beta1, beta2, beta3,
                        bias_correction1, bias_correction2, eps, weight_decay, decay_scale, decoupled_decay, adapt,
                        found_inf=None) -> None:  # fmt: skip
    op = "lamb_moments"
    _check_lists(op, params, ("grads", grads, True), ("exp_avgs", exp_avgs, False),
                 ("exp_avg_sqs", exp_avg_sqs, False))  # fmt: skip
    if grad_sq_sum is not None:
        _check_float_tensor(op, "grad_sq_sum", grad_sq_sum, (), params)
        if not max_grad_norm > 0:
            raise ValueError(f"vitops.{op}: max_grad_norm must be > 0, got {max_grad_norm}")
    _check_found_inf(op, found_inf, params)


def _check_lamb_apply(params, exp_avgs, exp_avg_sqs, sums, lr, beta1, beta2, beta3, bias_correction1,
                      bias_correction2, eps, weight_decay, decay_scale, decoupled_decay, trust_clip,
                      found_inf=None) -> None:  # fmt: skip
    op = "lamb_apply"
    _check_lists(op, params, ("exp_avgs", exp_avgs, False), ("exp_avg_sqs", exp_avg_sqs, False))
    _check_float_tensor(op, "sums", sums, (len(params), 2), params)
    _check_found_inf(op, found_inf, params)


def _check_adamp_lists(op, params, grads, exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2) -> None:
    _check_lists(op, params, ("grads", grads, True), ("exp_avgs", exp_avgs, False),
                 ("exp_avg_sqs", exp_avg_sqs, False))  # fmt: skip
    _check_per_param(op, "bias_correction1", bias_correction1, params)
    _check_per_param(op, "bias_correction2", bias_correction2, params)


def _check_adamp_moments(params, grads, exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2, lr, beta1, beta2,
                         eps, weight_decay, delta, wd_ratio, nesterov, found_inf=None) -> None:  # fmt: skip
    op = "adamp_moments"
    _check_adamp_lists(op, params, grads, exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2)
    _check_found_inf(op, found_inf, params)


def _check_adamp_apply(params, grads, exp_avgs, exp_avg_sqs, row_coefs, tensor_sums, full_numels, bias_correction1,
                       bias_correction2, lr, beta1, beta2, eps, weight_decay, delta, wd_ratio, nesterov,
                       found_inf=None) -> None:  # fmt: skip
    op = "adamp_apply"
    _check_adamp_lists(op, params, grads, exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2)
    _check_per_param(op, "full_numels", full_numels, params)
    _check_float_tensor(op, "row_coefs", row_coefs, (sum(reference.adamp_rows(p) for p in params),), params)
    _check_float_tensor(op, "tensor_sums", tensor_sums, (len(params), ADAMP_TENSOR_SUMS), params)
    _check_found_inf(op, found_inf, params)


def _grad_sq_sums_fake(grads):
    _check_grad_sq_sums(grads)
    return grads[0].new_empty(len(grads), dtype=torch.float32)


def _lamb_moments_fake(params, *args):
    _check_lamb_moments(params, *args)
    return params[0].new_empty(len(params), 2, dtype=torch.float32)


def _lamb_apply_fake(*args):
    _check_lamb_apply(*args)


def _adamp_moments_fake(params, *args):
    _check_adamp_moments(params, *args)
    rows = sum(reference.adamp_rows(p) for p in params)
    return (params[0].new_empty(rows, dtype=torch.float32),
            params[0].new_empty(len(params), ADAMP_TENSOR_SUMS, dtype=torch.float32))  # fmt: skip


def _adamp_apply_fake(*args):
    _check_adamp_apply(*args)


for _name, _fake, _check, _module in (
    ("lamb_grad_sq_sums", _grad_sq_sums_fake, _check_grad_sq_sums, "lamb"),
    ("lamb_moments", _lamb_moments_fake, _check_lamb_moments, "lamb"),
    ("lamb_apply", _lamb_apply_fake, _check_lamb_apply, "lamb"),
    ("adamp_moments", _adamp_moments_fake, _check_adamp_moments, "adamp"),
    ("adamp_apply", _adamp_apply_fake, _check_adamp_apply, "adamp"),
):
    define_op(_name, fake=_fake, reference=getattr(reference, _name), check=_check, triton=f"{_module}:{_name}",
              order=_ORDER)  # fmt: skip


def kernel_ok(p: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether the ops take this param and grad (else the optimizers call the reference)."""
    return (
        p.dtype in KERNEL_DTYPES
        and grad.dtype == p.dtype
        and p.is_contiguous()
        and grad.is_contiguous()
        and p.device.type in _backend.DEVICE_TYPES
    )
