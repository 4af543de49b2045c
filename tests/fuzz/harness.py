"""What the property-based tests of every op share: budgets, the backends to run, and strategies that draw tensors
(values, dtypes, memory layouts) and check results (against a reference, for untouched inputs, against the fake
kernel's metadata).

A tensor's values are drawn as a seed, a scale and a few special values at drawn places, not element by element:
cheap for large tensors, and a failing case still shrinks (to seed 0, normal values, fewer specials)."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st

import vitops
from tests.conftest import device_backend_params
from vitops import _backend

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LOW_PRECISION = (torch.float16, torch.bfloat16)
# The "ci" profile's max_examples (tests/conftest.py): a test's budget is given for it and scales with the profile.
CI_MAX_EXAMPLES = 20


def examples(ci_count: int) -> int:
    """`ci_count` examples under the "ci" profile, proportionally more under "thorough"."""
    return max(1, ci_count * settings.default.max_examples // CI_MAX_EXAMPLES)


def budget(device: str, backend: str, ci_count: int, ci_count_interpreted: int) -> int:
    """examples() for a test of (device, backend): the smaller count under Triton's interpreter."""
    return examples(ci_count_interpreted if interpreted(device, backend) else ci_count)


def interpreted(device: str, backend: str) -> bool:
    """Triton on CPU tensors runs in its interpreter: about 100x slower, so smaller budgets and tensors."""
    return backend == "triton" and device == "cpu"


def exact_bfloat16(device: str, backend: str) -> bool:
    """Whether bfloat16 conversions are IEEE-exact. Triton's interpreter (triton 3.x, runtime/interpreter.py
    _convert_float) truncates float32 -> bfloat16 instead of rounding to nearest even, and misreads bfloat16
    subnormals (6.8e-39 loads as 1.8e-39); GPUs convert exactly. So under the interpreter bfloat16 results may
    be one unit in the last place off, and bfloat16 inputs are drawn without subnormals."""
    return not interpreted(device, backend)


def assert_rounded_alike(got: torch.Tensor, want: torch.Tensor, device: str, backend: str, what: str = "output"):
    """assert_identical, but within one bfloat16 unit in the last place where bfloat16 rounding is inexact."""
    if got.dtype == torch.bfloat16 and not exact_bfloat16(device, backend):
        assert_close_where_finite(got, want, torch.finfo(torch.bfloat16).eps * want.double().abs(), what)
    else:
        assert_identical(got, want, what)


def backends(op: str):
    """(device, backend) pytest params of `op`: every backend that can run here, CUDA ones skipped without a GPU."""
    return device_backend_params(op)


@contextlib.contextmanager
def on_backend(backend: str):
    with vitops.use_backend(backend):
        yield


# --- shapes ------------------------------------------------------------------------------------------------------

# Sizes that catch indexing mistakes: empty, one, primes around powers of two and vector widths.
AWKWARD_SIZES = (1, 0, 2, 3, 5, 7, 8, 13, 16, 17, 31, 33)


def sizes(max_size: int):
    return st.one_of(st.sampled_from([s for s in AWKWARD_SIZES if s <= max_size]), st.integers(0, max_size))


@st.composite
def shapes(draw, min_dims: int, max_dims: int, max_size: int, max_numel: int, nonempty: bool = False):
    ndim = draw(st.integers(min_dims, max_dims))
    shape = tuple(draw(sizes(max_size)) for _ in range(ndim))
    if nonempty:
        shape = tuple(max(s, 1) for s in shape)
    while math.prod(shape) > max_numel:  # shrink the largest dim rather than reject the case
        i = max(range(ndim), key=lambda d: shape[d])
        shape = shape[:i] + (max(1, shape[i] // 2),) + shape[i + 1 :]
    return shape


# --- values ------------------------------------------------------------------------------------------------------

VALUE_KINDS = ("normal", "small", "large", "huge", "tiny", "special")


def special_values(dtype: torch.dtype) -> tuple[float, ...]:
    info = torch.finfo(dtype)
    return (math.nan, math.inf, -math.inf, 0.0, -0.0, info.max, -info.max, info.smallest_normal / 4, 1.0)


@st.composite
def values(draw, shape, dtype: torch.dtype, kinds=VALUE_KINDS, positive: bool = False, subnormal: bool = True,
           specials=None):
    """A contiguous tensor: normal values at a drawn scale (huge: overflows are likely; tiny: around the smallest
    normal, so products are subnormal), or normal values with NaN, +-inf, +-0, +-max and a subnormal at a few
    drawn places ("special"; `specials` chooses others). `subnormal=False` leaves subnormal values out (see
    exact_bfloat16)."""
    if not subnormal:
        kinds = tuple(k for k in kinds if k != "tiny")
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**16))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    info = torch.finfo(dtype)
    x = x * {"normal": 1.0, "small": 1e-3, "large": 30.0, "huge": info.max / 4, "tiny": info.smallest_normal * 2}.get(
        kind, 1.0
    )
    if positive:
        x = x.abs()
    x = x.to(dtype)
    if kind == "special" and x.numel():
        flat = x.view(-1)
        specials = special_values(dtype) if specials is None else specials
        specials = [v for v in specials if subnormal or not 0 < abs(v) < info.smallest_normal]
        for _ in range(draw(st.integers(1, min(4, x.numel())))):
            value = draw(st.sampled_from(specials))
            flat[draw(st.integers(0, x.numel() - 1))] = abs(value) if positive else value
    return x


# --- memory layouts ------------------------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "channels_last", "permuted", "sliced", "offset", "expanded")


@st.composite
def laid_out(draw, x: torch.Tensor, layouts=LAYOUTS, keep_last_dim: bool = False):
    """`x`'s values in a drawn memory layout: contiguous, channels_last (4-D/5-D), a dense permutation
    ("transposed"), a strided slice of a larger tensor, a view at a storage offset, or a broadcast (stride 0)
    along dims where x is constant (some are made so; read-only inputs only). `keep_last_dim` keeps the last
    dim contiguous (permutations and slices then touch the other dims only)."""
    layout = draw(st.sampled_from(layouts))
    ndim = x.ndim
    movable = ndim - 1 if keep_last_dim else ndim
    if layout == "channels_last" and ndim in (4, 5) and not keep_last_dim:
        return x.contiguous(memory_format=torch.channels_last if ndim == 4 else torch.channels_last_3d)
    if layout == "permuted" and movable >= 2:
        order = draw(st.permutations(range(movable))) + list(range(movable, ndim))
        inverse = [order.index(d) for d in range(ndim)]
        return x.permute(order).contiguous().permute(inverse)
    if layout == "sliced" and movable >= 1:
        dim = draw(st.integers(0, movable - 1))
        start, step = draw(st.integers(0, 2)), draw(st.integers(2, 3))
        big_shape = list(x.shape)
        big_shape[dim] = start + step * x.shape[dim] + 1
        big = torch.full(big_shape, 7.0, dtype=x.dtype)  # any read outside the view shows as a wrong value
        view = big.narrow(dim, start, step * x.shape[dim])[(slice(None),) * dim + (slice(None, None, step),)]
        view.copy_(x)
        return view
    if layout == "offset":
        pad = draw(st.integers(1, 9))
        storage = torch.full((x.numel() + 2 * pad,), 7.0, dtype=x.dtype)
        view = storage[pad : pad + x.numel()].view(x.shape)
        view.copy_(x)
        return view
    if layout == "expanded" and movable >= 1 and x.numel():
        dims = draw(st.lists(st.integers(0, movable - 1), min_size=1, max_size=movable, unique=True))
        index = tuple(slice(0, 1) if d in dims else slice(None) for d in range(ndim))
        return x[index].expand(x.shape)
    return x.contiguous()


# --- checks ------------------------------------------------------------------------------------------------------


def snapshot(*args):
    """Copies of every tensor in args (lists too), to check later that an op left its inputs alone."""
    def copy(a):
        if isinstance(a, torch.Tensor):
            return a.detach().clone(memory_format=torch.preserve_format), a.stride(), a.storage_offset()
        if isinstance(a, (list, tuple)):
            return [copy(x) for x in a]
        return a

    return [copy(a) for a in args]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype.is_floating_point:
        ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.detach().view(ints), b.detach().view(ints))
    return torch.equal(a, b)


def assert_unchanged(before, args, names):
    """Every tensor input holds the same bits (NaN payloads and -0 included), strides and offset as before."""
    for name, old, new in zip(names, before, args):
        if isinstance(new, torch.Tensor):
            value, stride, offset = old
            assert _same_bits(value, new), f"{name} was modified"
            assert (new.stride(), new.storage_offset()) == (stride, offset), f"{name}'s layout was changed"
        elif isinstance(new, (list, tuple)) and new and isinstance(new[0], torch.Tensor):
            assert_unchanged(old, new, [f"{name}[{i}]" for i in range(len(new))])


def fake_outputs(op, args):
    """The op's outputs as its fake kernel promises them (shape, dtype, strides) for these arguments: the op on
    meta tensors of the same metadata (register_fake serves the Meta key; a FakeTensorMode costs 100x more)."""
    def meta(a):
        if isinstance(a, torch.Tensor):
            return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
        if isinstance(a, (list, tuple)):
            return type(a)(meta(x) for x in a)
        return a

    return op(*[meta(a) for a in args])


def assert_matches_fake(op, args, got):
    want = fake_outputs(op, args)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g.shape, g.dtype) == (w.shape, w.dtype), f"output {i}: {g.shape} {g.dtype}, fake: {w.shape} {w.dtype}"
        if g.numel() > 1:  # the strides of size-1 dims mean nothing (torch.compile ignores them too)
            significant = [d for d in range(g.ndim) if g.shape[d] > 1]
            got_strides, fake_strides = ([t.stride(d) for d in significant] for t in (g, w))
            assert got_strides == fake_strides, f"output {i}: strides {g.stride()}, fake says {w.stride()}"


def assert_identical(got: torch.Tensor, want: torch.Tensor, what: str = "output"):
    """Equal values (+0 == -0), NaN in the same places, same dtype and shape."""
    assert (got.dtype, got.shape) == (want.dtype, want.shape), f"{what}: {got.dtype} {got.shape}, want {want.dtype}"
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_close_where_finite(got: torch.Tensor, want: torch.Tensor, tolerance: torch.Tensor | float, what: str):
    """NaN and +-inf in the same places; elsewhere |got - want| <= tolerance (a tensor broadcasting against want,
    in float64, or a number)."""
    assert (got.dtype, got.shape) == (want.dtype, want.shape), f"{what}: {got.dtype} {got.shape}, want {want.dtype}"
    g, w = got.double(), want.double()
    same_nan = torch.isnan(g) == torch.isnan(w)
    where = (~same_nan).nonzero()[:5].tolist()
    assert same_nan.all(), f"{what}: NaN at {where}: got {g[~same_nan][:5]}, want {w[~same_nan][:5]}"
    inf = torch.isinf(w)
    assert torch.equal(g[inf], w[inf]) and not torch.isinf(g[~inf]).any(), f"{what}: +-inf in other places"
    finite = torch.isfinite(w)
    err = (g - w).abs()
    bound = torch.as_tensor(tolerance, dtype=torch.float64).expand_as(w) if not isinstance(tolerance, float) else None
    over = err > (bound if bound is not None else tolerance)
    over &= finite
    if over.any():
        i = over.nonzero()[0].tolist()
        limit = bound[tuple(i)].item() if bound is not None else tolerance
        raise AssertionError(
            f"{what}: at {i} got {g[tuple(i)].item()!r}, want {w[tuple(i)].item()!r} (tolerance {limit:.3g}); "
            f"{int(over.sum())} elements out of tolerance"
        )


def assert_reduction_close(got: torch.Tensor, terms: torch.Tensor, dims: list[int], what: str):
    """`got` is `terms.sum(dims)` rounded to got's dtype, with terms the products the op adds up, in the dtype it
    adds them in, summed in any order: within the worst-case error of a sum of n terms (n * eps * sum |term|) plus
    the final rounding, with NaN where a term is NaN or +inf meets -inf and +-inf where an infinite term has no
    opposite (or the sum overflows got's dtype). Where the finite terms' magnitudes could overflow a partial sum,
    the order decides, so only a NaN term's NaN is required there."""
    t = terms.double()
    finite = torch.isfinite(t)
    n = math.prod(terms.shape[d] for d in dims) if dims else 1
    abs_sum = torch.where(finite, t.abs(), 0.0).sum(dims)
    want = t.sum(dims)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, want {want.shape}"
    g = got.double()
    nan_term = torch.isnan(t).sum(dims) > 0
    assert torch.isnan(g[nan_term]).all(), f"{what}: a NaN term did not give NaN: got {g[nan_term]}"
    defined = abs_sum <= torch.finfo(terms.dtype).max / 2
    bound = n * torch.finfo(terms.dtype).eps * abs_sum + torch.finfo(got.dtype).eps * want.abs()
    g, w, bound = g[defined], want.to(got.dtype).double()[defined], bound[defined]
    assert torch.equal(torch.isnan(g), torch.isnan(w)), f"{what}: NaN in other places: got {g}, want {w}"
    inf = torch.isinf(w)
    assert torch.equal(g[inf], w[inf]) and not torch.isinf(g[~inf]).any(), f"{what}: +-inf elsewhere: {g} vs {w}"
    ok = torch.isfinite(w)
    err = (g[ok] - w[ok]).abs()
    assert (err <= bound[ok]).all(), f"{what}: error {err.max().item():.3g} over the sum's bound; got {g}, want {w}"


def expect_error(errors, *names):
    """A context manager: the block raises one of `errors` whose message names one of `names`."""
    return pytest.raises(errors, match="|".join(names))


def runs_on(op: str, device: str, backend: str) -> bool:
    return _backend.availability()[op][device][backend] is None
