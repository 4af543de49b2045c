"""Property-based tests of drop_path_add / drop_path and the ops torch.ops.vitops.drop_path_add(_backward) on every
backend: drawn shapes (empty, batch 1, odd sizes, 1-D to 5-D), dtypes and dtype mixes, layouts, values (huge,
subnormal, NaN, inf), gamma shapes and sample scales. The forward is the reference bit for bit (one rounding of
the same float32/float64 products); float32 is also timm's `residual + drop_path(branch * gamma)` bit for bit."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.harness import (
    FLOAT_DTYPES,
    LOW_PRECISION,
    VALUE_KINDS,
    assert_identical,
    assert_matches_fake,
    assert_reduction_close,
    assert_rounded_alike,
    assert_unchanged,
    backends,
    budget,
    exact_bfloat16,
    examples,
    expect_error,
    interpreted,
    laid_out,
    on_backend,
    runs_on,
    shapes,
    snapshot,
    values,
)
from vitops.ops import drop_path, drop_path_add, reference

try:
    from timm.layers import drop_path as timm_drop_path
except ImportError:  # timm is optional: its drop_path is restated in the reference
    timm_drop_path = reference.drop_path

BACKENDS = backends("drop_path_add")
GAMMA_LAYOUTS = ("contiguous", "sliced", "offset", "expanded")
# Scales a drop-path mask holds (0: dropped; 1, 1/keep: kept), and arbitrary ones the op must take too.
SCALES = (0.0, 1.0, 1 / 0.7, 2.0, 1 / 0.9, -1.5, 1e-30, float("inf"), float("nan"))


def max_numel(device, backend):
    return 96 if interpreted(device, backend) else 4096


class Target:
    """Where a case runs, and what its strategies must leave out there."""

    def __init__(self, device, backend):
        self.device, self.backend = device, backend
        self.numel = max_numel(device, backend)

    def values(self, shape, dtype, **kwargs):
        exact = dtype != torch.bfloat16 or exact_bfloat16(self.device, self.backend)
        return values(shape, dtype, subnormal=exact, **kwargs)


@st.composite
def gammas(draw, target, shape, dtype):
    """None, or a LayerScale gamma (C,) for the last dim or (C, 1, ..., 1) for an earlier one."""
    if len(shape) < 2 or not draw(st.booleans()):
        return None
    channel_dim = draw(st.integers(1, len(shape) - 1))
    gamma_shape = (shape[channel_dim],) + (1,) * (len(shape) - 1 - channel_dim)
    return draw(laid_out(draw(target.values(gamma_shape, dtype, kinds=VALUE_KINDS)), GAMMA_LAYOUTS))


@st.composite
def sample_scales(draw, target, batch, acc):
    if not draw(st.booleans()):
        return None
    scale = torch.tensor(draw(st.lists(st.sampled_from(SCALES), min_size=batch, max_size=batch)), dtype=acc)
    return draw(laid_out(scale, GAMMA_LAYOUTS))


@st.composite
def forward_args(draw, target):
    """(residual, branch, gamma, sample_scale) as the op takes them: residual of a kernel dtype (or None), branch
    of the same dtype or half/bfloat16 beside a float32 residual, gamma and sample_scale in the compute dtype."""
    out_dtype = draw(st.sampled_from(FLOAT_DTYPES))
    has_residual = draw(st.booleans())
    branch_dtype = out_dtype
    if has_residual and out_dtype == torch.float32:
        branch_dtype = draw(st.sampled_from((torch.float32, *LOW_PRECISION)))
    shape = draw(shapes(1, 5, 17, target.numel))
    acc = reference.accumulate_dtype(out_dtype)
    residual = draw(laid_out(draw(target.values(shape, out_dtype)))) if has_residual else None
    branch = draw(laid_out(draw(target.values(shape, branch_dtype))))
    return residual, branch, draw(gammas(target, shape, acc)), draw(sample_scales(target, shape[0], acc))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_forward_op_is_the_reference_bit_for_bit(device, backend):
    op = torch.ops.vitops.drop_path_add

    @settings(max_examples=budget(device, backend, 200, 25))
    @given(args=forward_args(Target(device, backend)))
    def check(args):
        args = tuple(a.to(device) if a is not None else None for a in args)
        before = snapshot(*args)
        with on_backend(backend):
            got = op(*args)
        assert_unchanged(before, args, ("residual", "branch", "gamma", "sample_scale"))
        assert_rounded_alike(got, reference.drop_path_add(*args), device, backend)
        assert_matches_fake(op, args, got)

    check()


@st.composite
def backward_args(draw, target):
    """(grad_out, branch, gamma, sample_scale, branch_dtype, need_branch_grad): branch only with gamma (it is
    passed exactly when gamma's gradient is wanted)."""
    out_dtype = draw(st.sampled_from(FLOAT_DTYPES))
    branch_dtype = out_dtype
    if out_dtype == torch.float32:
        branch_dtype = draw(st.sampled_from((torch.float32, *LOW_PRECISION)))
    shape = draw(shapes(1, 5, 17, target.numel))
    acc = reference.accumulate_dtype(out_dtype)
    grad_out = draw(laid_out(draw(target.values(shape, out_dtype))))
    gamma = draw(gammas(target, shape, acc))
    want_gamma_grad = gamma is not None and draw(st.booleans())
    branch = draw(laid_out(draw(target.values(shape, branch_dtype)))) if want_gamma_grad else None
    need_branch_grad = draw(st.booleans())
    return grad_out, branch, gamma, draw(sample_scales(target, shape[0], acc)), branch_dtype, need_branch_grad


def gamma_grad_terms(grad_out, branch, gamma, sample_scale):
    """The products whose sums are gamma's gradient, in the compute dtype (0 for a dropped sample, whatever its
    branch holds), and the dims summed over."""
    acc = reference.accumulate_dtype(grad_out.dtype)
    terms = grad_out.to(acc)
    if sample_scale is not None:
        per_sample = sample_scale.view((-1,) + (1,) * (terms.ndim - 1))
        terms = torch.where(per_sample == 0, 0.0, terms * per_sample * branch.to(acc))
    else:
        terms = terms * branch.to(acc)
    channel_dim = terms.ndim - gamma.ndim
    return terms, [d for d in range(terms.ndim) if d != channel_dim]


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_backward_op_matches_the_reference(device, backend):
    """grad_branch bit for bit (one rounding of the same products); grad_gamma within a sum's rounding error."""
    op = torch.ops.vitops.drop_path_add_backward

    @settings(max_examples=budget(device, backend, 200, 25))
    @given(args=backward_args(Target(device, backend)))
    def check(args):
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        grad_out, branch, gamma, sample_scale, branch_dtype, need_branch_grad = args
        before = snapshot(*args)
        with on_backend(backend):
            grad_branch, grad_gamma = op(*args)
        assert_unchanged(before, args, ("grad_out", "branch", "gamma", "sample_scale"))
        want_branch, want_gamma = reference.drop_path_add_backward(*args)
        assert_rounded_alike(grad_branch, want_branch, device, backend, "grad_branch")
        if branch is None:
            assert grad_gamma.numel() == 0
        else:
            terms, dims = gamma_grad_terms(grad_out, branch, gamma, sample_scale)
            assert_reduction_close(grad_gamma.flatten(), terms, dims, "grad_gamma")
        assert_matches_fake(op, args, (grad_branch, grad_gamma))

    check()


# --- the public functions, with autograd --------------------------------------------------------------------------


@st.composite
def public_args(draw, target):
    """Any floating dtypes (mixed as users mix them), drop_prob 0, 1 or between, training on or off."""
    shape = draw(shapes(1, 5, 17, target.numel))
    residual = draw(laid_out(draw(target.values(shape, draw(st.sampled_from(FLOAT_DTYPES))))))
    branch = draw(laid_out(draw(target.values(shape, draw(st.sampled_from(FLOAT_DTYPES))))))
    gamma = draw(gammas(target, shape, draw(st.sampled_from(FLOAT_DTYPES))))
    drop_prob = draw(st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0)))
    return residual, branch, gamma, drop_prob, draw(st.booleans()), draw(st.booleans())


def timm_block_end(residual, branch, gamma, drop_prob, training, scale_by_keep):
    return residual + timm_drop_path(branch if gamma is None else branch * gamma, drop_prob, training, scale_by_keep)


def spec(residual, branch, gamma, drop_prob, training, scale_by_keep):
    """The public function's promise: the op's reference, in the promoted dtype of the three tensors, with a
    mask drawn as timm draws it (in the dtype of branch * gamma)."""
    x_dtype = branch.dtype if gamma is None else torch.promote_types(branch.dtype, gamma.dtype)
    out_dtype = torch.promote_types(residual.dtype, x_dtype)
    scale = None
    if training and drop_prob > 0:
        scale = reference.sample_scale(branch.shape[0], drop_prob, scale_by_keep, dtype=x_dtype, device=branch.device)
    return reference.drop_path_add(residual.to(out_dtype), branch, gamma, scale), scale


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_drop_path_add_is_timms_and_the_spec(device, backend):
    """The forward as the spec says, bit for bit; and where everything is float32, timm's composition bit for
    bit (a dropped sample is exactly its residual even where the branch is inf or NaN, where timm gives NaN).
    Gradients: the residual's is grad_out itself, the branch's the spec's bit for bit, gamma's a sum's rounding
    error away."""

    @settings(max_examples=budget(device, backend, 150, 20))
    @given(args=public_args(Target(device, backend)), seed=st.integers(0, 2**16))
    def check(args, seed):
        residual, branch, gamma, drop_prob, training, scale_by_keep = args
        residual, branch = (t.to(device).requires_grad_() for t in (residual, branch))
        gamma = gamma.to(device).requires_grad_() if gamma is not None else None
        tensors = [t for t in (residual, branch, gamma) if t is not None]
        before = snapshot(*tensors)
        torch.manual_seed(seed)
        with on_backend(backend):
            got = drop_path_add(residual, branch, drop_prob, training, gamma, scale_by_keep)
        assert_unchanged(before, tensors, ("residual", "branch", "gamma"))
        torch.manual_seed(seed)
        want, scale = spec(residual.detach(), branch.detach(), gamma.detach() if gamma is not None else None,
                           drop_prob, training, scale_by_keep)  # fmt: skip
        assert_rounded_alike(got, want, device, backend)
        if want.dtype == torch.float32 and (gamma if gamma is not None else branch).dtype == torch.float32:
            torch.manual_seed(seed)
            timm = timm_block_end(residual, branch, gamma, drop_prob, training, scale_by_keep).detach()
            kept = torch.ones(branch.shape[0], dtype=torch.bool) if scale is None else scale.cpu() != 0
            assert_identical(got[kept], timm[kept], "kept samples against timm")
            assert_identical(got[~kept], residual.detach()[~kept].float(), "dropped samples")

        grad_out = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed)).to(got)
        with on_backend(backend):
            grads = torch.autograd.grad(got, tensors, grad_out)
        assert_identical(grads[0], grad_out.to(residual.dtype), "grad_residual")
        acc = reference.accumulate_dtype(got.dtype)
        want_branch, _ = reference.drop_path_add_backward(
            grad_out, None, gamma.detach().to(acc) if gamma is not None else None,
            scale.to(acc) if scale is not None else None, branch.dtype, True,
        )  # fmt: skip
        assert_rounded_alike(grads[1], want_branch, device, backend, "grad_branch")
        if gamma is not None:
            terms, dims = gamma_grad_terms(grad_out, branch.detach(), gamma.detach(),
                                           scale.to(acc) if scale is not None else None)  # fmt: skip
            assert grads[2].dtype == gamma.dtype
            assert_reduction_close(grads[2].flatten(), terms, dims, "grad_gamma")

    check()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_drop_path_is_timms(device, backend):
    @settings(max_examples=budget(device, backend, 80, 15))
    @given(
        x=st.tuples(shapes(1, 4, 17, 512), st.sampled_from(FLOAT_DTYPES)).flatmap(
            lambda shape_dtype: Target(device, backend).values(*shape_dtype)
        ),
        drop_prob=st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0)),
        training=st.booleans(),
        scale_by_keep=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def check(x, drop_prob, training, scale_by_keep, seed):
        x = x.to(device)
        torch.manual_seed(seed)
        with on_backend(backend):
            got = drop_path(x, drop_prob, training, scale_by_keep)
        torch.manual_seed(seed)
        want = timm_drop_path(x, drop_prob, training, scale_by_keep)
        finite_rows = torch.isfinite(x).flatten(1).all(1) if x.ndim > 1 else torch.isfinite(x)
        assert_rounded_alike(got[finite_rows], want[finite_rows], device, backend)

    check()


# --- bad arguments: the error names the argument --------------------------------------------------------------


@st.composite
def broken_call(draw):
    """A valid drop_path_add call with one argument broken, and the error and name it must raise."""
    shape = draw(shapes(2, 4, 6, 256, nonempty=True))
    residual, branch = torch.randn(shape), torch.randn(shape)
    gamma = torch.randn(shape[-1])
    kwargs = dict(residual=residual, branch=branch, drop_prob=0.3, training=True, gamma=gamma)
    fault = draw(st.sampled_from(["int_branch", "int_residual", "bool_gamma", "shape", "gamma_shape", "drop_prob",
                                  "not_tensor", "device"]))  # fmt: skip
    if fault == "int_branch":
        kwargs["branch"] = branch.to(draw(st.sampled_from([torch.int32, torch.int64, torch.uint8])))
        return kwargs, TypeError, "branch"
    if fault == "int_residual":
        kwargs["residual"] = residual.long()
        return kwargs, TypeError, "residual"
    if fault == "bool_gamma":
        kwargs["gamma"] = gamma > 0
        return kwargs, TypeError, "gamma"
    if fault == "shape":
        kwargs["residual"] = torch.randn(shape[:-1] + (shape[-1] + draw(st.integers(1, 3)),))
        return kwargs, ValueError, "same shape"
    if fault == "gamma_shape":
        bad = draw(st.sampled_from([(shape[-1] + 1,), (shape[-1], 2), shape]))  # each wrong for any shape
        kwargs["gamma"] = torch.randn(bad)
        return kwargs, ValueError, "gamma"
    if fault == "drop_prob":
        kwargs["drop_prob"] = draw(st.sampled_from([-0.01, 1.01, float("nan"), float("inf")]))
        return kwargs, ValueError, "drop_prob"
    if fault == "not_tensor":
        kwargs["branch"] = branch.tolist()
        return kwargs, TypeError, "branch"
    kwargs[draw(st.sampled_from(["residual", "gamma"]))] = torch.randn(1, device="meta")
    return kwargs, ValueError, "is on meta|on cpu but"


@settings(max_examples=examples(60))
@given(case=broken_call())
def test_bad_arguments_are_named(case):
    kwargs, error, name = case
    with expect_error(error, name):
        drop_path_add(**kwargs)


# --- regressions: defects the tests above found ------------------------------------------------------------------

requires_triton_cpu = pytest.mark.skipif(not runs_on("drop_path_add", "cpu", "triton"), reason="Triton can't run here")


@requires_triton_cpu
@pytest.mark.parametrize(
    "gamma,sample_scale",
    [
        (torch.tensor([1.0, 7.0, 2.0, 7.0, 3.0, 7.0])[::2], None),  # a strided gamma
        (torch.full((1,), 2.0).expand(3), None),  # a broadcast gamma: stride 0
        (None, torch.tensor([0.0, 7.0, 1.0, 7.0])[::2]),  # a strided sample_scale
        (None, torch.ones(1).expand(2)),
    ],
    ids=["strided_gamma", "expanded_gamma", "strided_scale", "expanded_scale"],
)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_triton_reads_strided_gamma_and_scale(gamma, sample_scale, direction):
    x = torch.arange(6.0).view(2, 3) + 1
    args = (x, gamma, sample_scale)
    if direction == "forward":
        op, want = torch.ops.vitops.drop_path_add, reference.drop_path_add(None, *args)
        call = (None, *args)
    else:
        op = torch.ops.vitops.drop_path_add_backward
        want = reference.drop_path_add_backward(x, None, gamma, sample_scale, torch.float32, True)[0]
        call = (x, None, gamma, sample_scale, torch.float32, True)
    with on_backend("triton"):
        got = op(*call)
    got = got if direction == "forward" else got[0]
    assert_identical(got, want)


@requires_triton_cpu
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_triton_dropped_sample_ignores_non_finite_gamma(direction):
    x = torch.ones(2, 3)
    gamma, scale = torch.tensor([float("nan"), float("inf"), 1.0]), torch.tensor([0.0, 2.0])
    with on_backend("triton"):
        if direction == "forward":
            got = torch.ops.vitops.drop_path_add(x, x, gamma, scale)
        else:
            got = torch.ops.vitops.drop_path_add_backward(x, None, gamma, scale, torch.float32, True)[0]
    assert torch.equal(got[0], x[0] if direction == "forward" else torch.zeros(3))  # dropped: untouched by gamma
