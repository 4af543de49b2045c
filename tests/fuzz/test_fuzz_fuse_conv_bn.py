"""Property-based tests of fuse_conv_bn and torch.ops.vitops.fuse_conv_bn on every backend: drawn conv weights
(linear to 3-D conv, empty, one channel, odd sizes, any layout), every optional tensor present or not, BatchNorm
statistics from zero variance to huge, NaN and inf, eps from 1e-12 up, and dtype mixes through the public function.

Each result is the reference's within a few roundings (the kernels may compute 1 / sqrt in another order), with
NaN and inf in the same places; gradients (the registered autograd formula) match autograd through the reference."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.harness import (
    FLOAT_DTYPES,
    assert_close_where_finite,
    assert_matches_fake,
    assert_unchanged,
    backends,
    budget,
    exact_bfloat16,
    examples,
    expect_error,
    interpreted,
    laid_out,
    on_backend,
    shapes,
    snapshot,
    values,
)
from vitops.ops import fuse_conv_bn, reference
from vitops.ops._fuse_conv_bn import CHANNEL_ARGS

BACKENDS = backends("fuse_conv_bn")
VECTOR_LAYOUTS = ("contiguous", "sliced", "offset", "expanded")
EPSILONS = (1e-5, 1e-3, 1e-12, 0.1, 1.0)
# No "huge" weights: weight * gamma * inv_std overflows or not depending on the order of the two products,
# which the op does not fix; huge statistics are drawn (their products overflow in every order alike).
WEIGHT_KINDS = ("normal", "small", "large", "tiny", "special")


@st.composite
def channel_vector(draw, c, dtype, exact, positive=False):
    return draw(laid_out(draw(values((c,), dtype, positive=positive, subnormal=exact)), VECTOR_LAYOUTS))


@st.composite
def op_args(draw, device, backend):
    """The op's arguments: a weight of a kernel dtype, per-channel tensors in its compute dtype."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    exact = dtype != torch.bfloat16 or exact_bfloat16(device, backend)
    shape = draw(shapes(2, 5, 9, 128 if interpreted(device, backend) else 2048))
    weight = draw(laid_out(draw(values(shape, dtype, kinds=WEIGHT_KINDS, subnormal=exact))))
    acc = reference.accumulate_dtype(dtype)
    c = shape[0]
    tensors = {}
    for name in CHANNEL_ARGS:
        required = name in ("running_mean", "running_var")
        if required or draw(st.booleans()):
            # Mostly positive variances, as BatchNorm keeps them; a negative one (a broken checkpoint) gives NaN.
            positive = name == "running_var" and draw(st.integers(0, 9)) > 0
            tensors[name] = draw(channel_vector(c, acc, True, positive=positive))
        else:
            tensors[name] = None
    return (weight, *tensors.values(), draw(st.sampled_from(EPSILONS)))


def tolerances(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps):
    """Per element of (fused_weight, fused_bias): a few roundings in the compute dtype of the magnitudes summed
    (the bias's centring may cancel), plus the final rounding to the weight's dtype; where a product is
    subnormal its rounding is absolute (a few of the smallest subnormal, times what multiplies it next)."""
    acc = reference.accumulate_dtype(weight.dtype)
    e_acc, e_out = torch.finfo(acc).eps, torch.finfo(weight.dtype).eps
    subnormal = 4 * torch.finfo(acc).smallest_normal * e_acc
    f64 = {k: (t.double().abs() if t is not None else None) for k, t in
           dict(b=bias, m=running_mean, v=running_var, g=bn_weight, beta=bn_bias).items()}  # fmt: skip
    inv_std = torch.rsqrt(running_var.double() + eps).abs()
    scale = inv_std * (f64["g"] if f64["g"] is not None else 1.0)
    w_scale = weight.double().abs() * scale.view((-1,) + (1,) * (weight.ndim - 1))
    centred = f64["m"] + (f64["b"] if f64["b"] is not None else 0.0)
    b_scale = centred * scale + (f64["beta"] if f64["beta"] is not None else 0.0)
    factors = (1 + inv_std) * (1 + (f64["g"] if f64["g"] is not None else 0.0))
    w_floor = subnormal * factors.view((-1,) + (1,) * (weight.ndim - 1)) * (1 + weight.double().abs())
    b_floor = subnormal * factors * (1 + centred)
    return w_scale * (4 * e_acc + e_out) + w_floor, b_scale * (6 * e_acc + e_out) + b_floor


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_op_matches_the_reference(device, backend):
    op = torch.ops.vitops.fuse_conv_bn
    names = ("weight", *CHANNEL_ARGS)

    @settings(max_examples=budget(device, backend, 200, 25))
    @given(args=op_args(device, backend))
    def check(args):
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        before = snapshot(*args)
        with on_backend(backend):
            got = op(*args)
        assert_unchanged(before, args, names)
        assert_matches_fake(op, args, got)
        want = reference.fuse_conv_bn(*args)
        for what, g, w, tol in zip(("fused_weight", "fused_bias"), got, want, tolerances(*args)):
            assert_close_where_finite(g, w, tol, what)

    check()


@st.composite
def public_args(draw, device, backend):
    """Any floating dtypes for each tensor (cast by the function), and gradients wanted for a drawn subset."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    exact = exact_bfloat16(device, backend)
    shape = draw(shapes(2, 4, 7, 96 if interpreted(device, backend) else 512, nonempty=True))
    weight = draw(laid_out(draw(values(shape, dtype, kinds=("normal", "small", "large"), subnormal=exact))))
    tensors = [weight]
    for name in CHANNEL_ARGS:
        if name in ("running_mean", "running_var") or draw(st.booleans()):
            dtype = draw(st.sampled_from(FLOAT_DTYPES))
            t = draw(values((shape[0],), dtype, kinds=("normal", "small"), subnormal=exact))
            tensors.append(t.abs() + 0.1 if name == "running_var" else t)
        else:
            tensors.append(None)
    wants_grad = [t is not None and draw(st.booleans()) for t in tensors]
    return tensors, wants_grad, draw(st.sampled_from(EPSILONS))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_function_and_gradients_match_the_reference(device, backend):
    """The public function casts each per-channel tensor to the compute dtype; gradients flow back to every
    tensor argument, in its own dtype, as autograd through the reference (in float64) gives them."""

    @settings(max_examples=budget(device, backend, 100, 15))
    @given(case=public_args(device, backend), seed=st.integers(0, 2**16))
    def check(case, seed):
        tensors, wants_grad, eps = case
        tensors = [t.to(device).requires_grad_(w) if t is not None else None for t, w in zip(tensors, wants_grad)]
        with on_backend(backend):
            fused_weight, fused_bias = fuse_conv_bn(*tensors, eps=eps)
        acc = reference.accumulate_dtype(tensors[0].dtype)
        cast = [t.detach().to(acc) if i and t is not None else t.detach() if t is not None else None
                for i, t in enumerate(tensors)]  # fmt: skip
        want = reference.fuse_conv_bn(*cast, eps)
        for what, g, w, tol in zip(("fused_weight", "fused_bias"), (fused_weight, fused_bias), want,
                                   tolerances(*cast, eps)):  # fmt: skip
            assert_close_where_finite(g.detach(), w, tol, what)

        leaves = [t for t in tensors if t is not None and t.requires_grad]
        if not leaves:
            return
        gen = torch.Generator().manual_seed(seed)
        upstream = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (fused_weight, fused_bias)]
        got = torch.autograd.grad((fused_weight, fused_bias), leaves, [u.to(fused_weight) for u in upstream])
        exact_leaves = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in tensors]
        exact = [(o, u) for o, u in zip(reference.fuse_conv_bn(*exact_leaves, eps), upstream) if o.requires_grad]
        wanted = [t for t in exact_leaves if t is not None and t.requires_grad]
        exact_grads = torch.autograd.grad([o for o, _ in exact], wanted, [u for _, u in exact], allow_unused=True,
                                          materialize_grads=True)  # fmt: skip
        for g, e, t in zip(got, exact_grads, leaves):
            assert g.dtype == t.dtype and g.shape == t.shape
            # Computed in the compute dtype from values rounded to the weight's dtype: relative to the largest term.
            rel = 64 * max(torch.finfo(t.dtype).eps, torch.finfo(tensors[0].dtype).eps)
            bound = rel * max(1.0, e.abs().max().item()) * (1 + math.prod(tensors[0].shape[1:]))
            assert (g.double() - e).abs().max().item() <= bound

    check()


@st.composite
def broken_call(draw):
    """A valid fuse_conv_bn call with one argument broken, the error and the name it must raise."""
    c = draw(st.integers(1, 6))
    kwargs = dict(weight=torch.randn(c, 3, 3, 3), bias=torch.randn(c), running_mean=torch.randn(c), eps=1e-5,
                  running_var=torch.rand(c) + 0.1, bn_weight=torch.randn(c), bn_bias=torch.randn(c))  # fmt: skip
    fault = draw(st.sampled_from(["eps", "channels", "weight_1d", "int", "not_tensor", "device"]))
    if fault == "eps":
        kwargs["eps"] = draw(st.sampled_from([0.0, -1e-5, math.nan, math.inf]))
        return kwargs, ValueError, "eps"
    name = draw(st.sampled_from(CHANNEL_ARGS))
    if fault == "channels":
        kwargs[name] = torch.randn(draw(st.sampled_from([c + 1, 2 * c + 1])))
        return kwargs, ValueError, name
    if fault == "weight_1d":
        kwargs["weight"] = torch.randn(c)
        return kwargs, ValueError, "weight"
    if fault == "int":
        kwargs[name] = torch.ones(c, dtype=torch.int64)
        return kwargs, TypeError, name
    if fault == "not_tensor":
        kwargs[name] = [1.0] * c
        return kwargs, TypeError, name
    kwargs[name] = torch.ones(c, device="meta")
    return kwargs, ValueError, name


@settings(max_examples=examples(60))
@given(case=broken_call())
def test_bad_arguments_are_named(case):
    kwargs, error, name = case
    with expect_error(error, name):
        fuse_conv_bn(**kwargs)
