"""Property-based tests of the fused optimizer ops (torch.ops.vitops.lamb_grad_sq_sums, lamb_moments, lamb_apply,
adamp_moments, adamp_apply) on every backend, and of the Lamb and AdamP optimizers that call them: drawn param lists
(1 to 4 params, float32, float16 and bfloat16 mixed, empty, 1-D to 3-D, odd sizes), values (zero params and grads:
LAMB's 0/0 trust ratio; NaN, inf, huge, subnormal), hyperparameters (lr 0, beta1 0, decoupled or not, trust
clipping, global clipping, AdamP's nesterov and projections, eps down to 1e-30).

Each stage is vitops.optim.reference's, given the same inputs: moment buffers and params within a rounding, sums
within a sum's rounding error, NaN and inf in the same places. What the optimizers do on non-finite gradients by
default (timm's NaN) is item 2 of issue 14 and tested there; here a NaN only has to land where the reference puts
it."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.harness import (
    assert_close_where_finite,
    backends,
    budget,
    exact_bfloat16,
    examples,
    expect_error,
    interpreted,
    on_backend,
    shapes,
    values,
)
from vitops.optim import AdamP, Lamb, reference

PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PARAM_KINDS = ("normal", "small", "large", "tiny", "special", "zero")
PARAM_SPECIALS = None  # NaN, +-inf, +-0, +-max, a subnormal (harness.special_values)
GRAD_KINDS = ("normal", "small", "large", "huge", "tiny", "special", "zero")
ADAMP_EPSILONS = (1e-8, 1e-6, 1e-30)
LAMB_BACKENDS = backends("lamb_moments")
ADAMP_BACKENDS = backends("adamp_moments")


@st.composite
def tensor(draw, shape, dtype, kinds, exact, positive=False, specials=None):
    kind = draw(st.sampled_from([k for k in kinds if exact or k != "tiny"]))
    if kind == "zero":
        return torch.zeros(shape, dtype=dtype)
    return draw(values(shape, dtype, kinds=(kind,), positive=positive, subnormal=exact, specials=specials))


@st.composite
def param_lists(draw, device, backend):
    """(params, grads, exp_avgs, exp_avg_sqs): contiguous, one dtype per param, float32 moments."""
    exact = exact_bfloat16(device, backend)
    numel = 64 if interpreted(device, backend) else 2048
    lists = ([], [], [], [])
    for _ in range(draw(st.integers(1, 4))):
        shape = draw(shapes(1, 3, 17, numel))
        dtype = draw(st.sampled_from(PARAM_DTYPES))
        lists[0].append(draw(tensor(shape, dtype, PARAM_KINDS, exact, specials=PARAM_SPECIALS)))
        lists[1].append(draw(tensor(shape, dtype, GRAD_KINDS, exact)))
        lists[2].append(draw(tensor(shape, torch.float32, ("normal", "small", "zero"), True)) * 0.1)
        lists[3].append(draw(tensor(shape, torch.float32, ("normal", "small", "zero"), True, positive=True)) * 0.1)
    return tuple([t.to(device) for t in ts] for ts in lists)


def bias_corrections(draw, beta1, beta2):
    if not draw(st.booleans()):
        return 1.0, 1.0
    step = draw(st.sampled_from([1, 2, 10, 1000]))
    return 1 - beta1**step if beta1 else 1.0, 1 - beta2**step if beta2 else 1.0


def _betas(draw):
    return draw(st.sampled_from([0.9, 0.0, 0.5])), draw(st.sampled_from([0.999, 0.95, 0.0]))


@st.composite
def lamb_args(draw, device, backend):
    """(lists, max_grad_norm, hyperparameters lr ... decoupled_decay, adapt, trust_clip)."""
    lists = draw(param_lists(device, backend))
    max_grad_norm = draw(st.sampled_from([None, 1.0, 1e-3, 5.0]))
    lr = draw(st.sampled_from([1e-3, 0.0, 1e-2, 1.0]))
    beta1, beta2 = _betas(draw)
    beta3 = 1 - beta1 if draw(st.booleans()) else 1.0
    bc1, bc2 = bias_corrections(draw, beta1, beta2)
    eps = draw(st.sampled_from([1e-6, 1e-8, 1e-30]))
    weight_decay = draw(st.sampled_from([0.01, 0.0, 1.0]))
    decay_scale = lr if draw(st.booleans()) else lr * lr / 2e-2
    hyper = (lr, beta1, beta2, beta3, bc1, bc2, eps, weight_decay, decay_scale, draw(st.booleans()))
    adapt = weight_decay != 0 or draw(st.booleans())
    return lists, max_grad_norm, hyper, adapt, draw(st.booleans())


@st.composite
def adamp_args(draw, device, backend):
    """(lists, hyperparameters bias_correction1 ... nesterov); a drawn share of the grads orthogonal to their
    param (per row or as a whole), so that AdamP projects."""
    params, grads, exp_avgs, exp_avg_sqs = draw(param_lists(device, backend))
    beta1, beta2 = _betas(draw)
    corrections = [bias_corrections(draw, beta1, beta2) for _ in params]
    for i, (p, g) in enumerate(zip(params, grads)):
        how = draw(st.sampled_from(["random", "rows", "layer"]))
        if how != "random" and p.ndim > 1 and p.numel() and torch.isfinite(p).all() and torch.isfinite(g).all():
            rows = p.shape[0] if how == "rows" else 1
            p64, g64 = p.double().reshape(rows, -1), g.double().reshape(rows, -1)
            norm2 = (p64 * p64).sum(1, keepdim=True)
            g64 = g64 - torch.where(norm2 > 0, (g64 * p64).sum(1, keepdim=True) / norm2, 0.0) * p64
            grads[i] = g64.reshape(g.shape).to(g.dtype)
    hyper = ([c[0] for c in corrections], [c[1] for c in corrections], draw(st.sampled_from([1e-3, 0.0, 1e-2, 1.0])),
             beta1, beta2, draw(st.sampled_from(ADAMP_EPSILONS)), draw(st.sampled_from([0.0, 0.01, 1.0])),
             draw(st.sampled_from([0.1, 0.5, 1e-3])), draw(st.sampled_from([0.1, 1.0, 0.0])),
             draw(st.booleans()))  # fmt: skip
    return (params, grads, exp_avgs, exp_avg_sqs), hyper


# --- checks --------------------------------------------------------------------------------------------------


def clone_lists(lists):
    return tuple([t.clone() for t in ts] for ts in lists)


def assert_lists_close(got, want, before, names, exact):
    """Per tensor: one rounding of its dtype (two where bfloat16 rounding is not `exact`: the interpreter
    truncates) at the size of its value before and after, plus a relative error of its change (trust ratios and
    projections are sums, added up in another order); NaN and inf in the same places."""
    ulps = 1 if exact else 2
    for name, gs, ws, bs in zip(names, got, want, before):
        for i, (g, w, b) in enumerate(zip(gs, ws, bs)):
            change = (w.double() - b.double()).abs()
            change = change[torch.isfinite(change)].max().item() if torch.isfinite(change).any() else 0.0
            size = torch.maximum(w.double().abs(), b.double().abs()).nan_to_num(nan=0.0, posinf=0.0)
            tolerance = ulps * torch.finfo(g.dtype).eps * size + 1e-4 * change
            assert_close_where_finite(g, w, tolerance, f"{name}[{i}] {tuple(g.shape)} {g.dtype}")


def assert_sums_close(got, want, magnitude, what):
    """float32 sums of computed terms: within 16 eps of `magnitude` (the sum of the terms' sizes), NaN and inf
    alike."""
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape, f"{what}: {got.shape} {want.shape}"
    assert_close_where_finite(got, want, 16 * torch.finfo(torch.float32).eps * magnitude.double().nan_to_num(nan=0.0),
                              what)  # fmt: skip


def adamp_sum_sizes(lists, hyper):
    """The sizes of the terms of adamp_moments' sums, which cancel: per row of row_coefs, sum |p q| / (||p|| +
    eps)^2 (q the Adam direction from the updated moments); per param of tensor_sums, sum |g p|, g.g, p.p,
    sum |p q| and 0 (a count). Times the row's or param's length: a bound on a float32 sum's error."""
    params, grads, exp_avgs, exp_avg_sqs = lists
    bc2, beta1, eps, nesterov = hyper[1], hyper[3], hyper[5], hyper[9]
    rows, tensors = [], []
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        if p.ndim <= 1 or p.numel() == 0:
            rows.append(torch.zeros(1, dtype=torch.float64, device=p.device))
            tensors.append(torch.zeros(5, dtype=torch.float64, device=p.device))
            continue
        q = (beta1 * m + (1 - beta1) * g.float() if nesterov else m) / (v.sqrt() / bc2[i] ** 0.5 + eps)
        pv, gv, qv = (t.double().reshape(p.shape[0], -1) for t in (p, g, q))
        pq, n = (pv * qv).abs(), pv.shape[1]
        rows.append(pq.sum(1) / (pv.square().sum(1).sqrt() + eps).square() * n)
        terms = [(gv * pv).abs().sum(), gv.square().sum(), pv.square().sum(), pq.sum(), pq.new_zeros(())]
        tensors.append(torch.stack(terms).to(torch.float64) * p.numel())
    return torch.cat(rows), torch.stack(tensors)


def square_sums(tensors, device):
    """Per tensor, the sum of |x|^2 in float64 times its length: a bound on a float32 sum's rounding error."""
    return torch.tensor([t.double().square().nan_to_num(nan=0.0).sum().item() * max(1, t.numel()) for t in tensors],
                        device=device)  # fmt: skip


# --- the ops -------------------------------------------------------------------------------------------------

NAMES = ("params", "grads", "exp_avgs", "exp_avg_sqs")


class Forced:
    """The ops of torch.ops.vitops, forced onto a backend (the same interface as the CUDA emulation's)."""

    def __init__(self, backend):
        self.backend = backend

    def __getattr__(self, name):
        op = getattr(torch.ops.vitops, name)

        def run(*args):
            with on_backend(self.backend):
                return op(*args)

        return run


def check_lamb_stages(ops, args, exact):
    """Each LAMB stage of `ops`, given the reference's inputs, against the reference: lamb_grad_sq_sums;
    lamb_moments (moments, the sums of squares of p' and u, and the params without layer adaptation); lamb_apply
    (the params)."""
    lists, max_grad_norm, hyper, adapt, trust_clip = args
    grads, device = lists[1], lists[1][0].device
    want_grad_sq_sums = reference.lamb_grad_sq_sums(grads)
    assert_sums_close(ops.lamb_grad_sq_sums(grads), want_grad_sq_sums, square_sums(grads, device), "grad_sq_sums")

    grad_sq_sum = want_grad_sq_sums.sum() if max_grad_norm is not None else None
    want_lists, before = clone_lists(lists), clone_lists(lists)
    sums = ops.lamb_moments(*lists, grad_sq_sum, max_grad_norm or 1.0, *hyper, adapt)
    want_sums = reference.lamb_moments(*want_lists, grad_sq_sum, max_grad_norm or 1.0, *hyper, adapt)
    assert_lists_close(lists, want_lists, before, NAMES, exact)
    numels = torch.tensor([[max(1, p.numel())] * 2 for p in lists[0]], dtype=torch.float64, device=device)
    assert_sums_close(sums, want_sums, want_sums.double().abs() * numels, "sums")
    if adapt:
        apply_lists = (want_lists[0], want_lists[2], want_lists[3])
        got_apply, want_apply = clone_lists(apply_lists), clone_lists(apply_lists)
        ops.lamb_apply(*got_apply, want_sums, *hyper, trust_clip)
        reference.lamb_apply(*want_apply, want_sums, *hyper, trust_clip)
        assert_lists_close(got_apply, want_apply, apply_lists, ("params", "exp_avgs", "exp_avg_sqs"), exact)


def check_adamp_stages(ops, args, exact):
    """adamp_moments (moments, 1-D params, row coefficients, tensor sums) and adamp_apply (the params of 2 or
    more dims) of `ops`, each given the reference's inputs, against the reference."""
    lists, hyper = args
    want_lists, before = clone_lists(lists), clone_lists(lists)
    row_coefs, tensor_sums = ops.adamp_moments(*lists, *hyper)
    want_coefs, want_tensor_sums = reference.adamp_moments(*want_lists, *hyper)
    assert_lists_close(lists, want_lists, before, NAMES, exact)
    row_sizes, tensor_sizes = adamp_sum_sizes(want_lists, hyper)
    assert_sums_close(row_coefs, want_coefs, row_sizes, "row_coefs")
    assert_sums_close(tensor_sums, want_tensor_sums, tensor_sizes, "tensor_sums")

    full_numels = [p.numel() for p in want_lists[0]]
    got_apply, want_apply = clone_lists(want_lists), clone_lists(want_lists)
    ops.adamp_apply(*got_apply, want_coefs, want_tensor_sums, full_numels, *hyper)
    reference.adamp_apply(*want_apply, want_coefs, want_tensor_sums, full_numels, *hyper)
    assert_lists_close(got_apply, want_apply, want_lists, NAMES, exact)


STAGES = {  # optimizer: its ops' backends, the arguments drawn for them, the check of its stages
    "lamb": (LAMB_BACKENDS, lamb_args, check_lamb_stages),
    "adamp": (ADAMP_BACKENDS, adamp_args, check_adamp_stages),
}


@pytest.mark.parametrize(
    "optimizer,device,backend",
    [
        pytest.param(name, *p.values, id=f"{name}-{p.id}", marks=p.marks)
        for name, stage in STAGES.items()
        for p in stage[0]
    ],
)
def test_ops_match_the_reference(optimizer, device, backend):
    _, draw_args, check_stages = STAGES[optimizer]

    @settings(max_examples=budget(device, backend, 150, 20))
    @given(args=draw_args(device, backend))
    def check(args):
        check_stages(Forced(backend), args, exact_bfloat16(device, backend))

    check()


# --- through the optimizers -----------------------------------------------------------------------------------


@st.composite
def models(draw):
    """Params as a model holds them: float32/16/bf16 (kernels), float64 and non-contiguous ones (reference path),
    some without a grad; the grads for two steps."""
    params, grads = [], []
    for _ in range(draw(st.integers(1, 5))):
        shape = draw(shapes(1, 3, 9, 256, nonempty=True))
        dtype = draw(st.sampled_from((*PARAM_DTYPES, torch.float64)))
        transpose = len(shape) == 2 and draw(st.booleans())  # a transposed param, as after a weight-tying trick
        p = draw(values(shape, dtype, kinds=("normal", "small", "large")))
        params.append(p.t() if transpose else p)
        kinds = ("normal", "small", "large")
        step_grads = [draw(values(shape, dtype, kinds=kinds)) if draw(st.integers(0, 5)) else None for _ in range(2)]
        grads.append([g.t() if transpose and g is not None else g for g in step_grads])
    return params, grads


OPTIMIZERS = {
    "Lamb": (
        Lamb,
        [
            {},
            {"weight_decay": 0.0, "max_grad_norm": None},
            {"decoupled_decay": True, "trust_clip": True},
            {"grad_averaging": False, "always_adapt": True, "bias_correction": False},
        ],
    ),
    "AdamP": (AdamP, [{}, {"weight_decay": 0.1, "nesterov": True}, {"delta": 0.5, "wd_ratio": 0.0}]),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("device,backend", [p for p in LAMB_BACKENDS if p.values[1] != "torch"])
def test_optimizer_on_each_backend_matches_the_torch_backend(name, device, backend):
    """Two steps of Lamb/AdamP forced onto a backend give the torch backend's (the reference's) params and state."""
    cls, configs = OPTIMIZERS[name]

    @settings(max_examples=budget(device, backend, 60, 10))
    @given(model=models(), config=st.sampled_from(configs), lr=st.sampled_from([1e-3, 1e-1]))
    def check(model, config, lr):
        params, grads = model
        runs = {}
        for run_backend in (backend, "torch"):
            ps = [torch.nn.Parameter(p.clone().to(device)) for p in params]
            opt = cls(ps, lr=lr, **config)
            with on_backend(run_backend):
                for step in range(2):
                    for p, g in zip(ps, grads):
                        p.grad = g[step].to(device) if g[step] is not None else None
                    opt.step()
            runs[run_backend] = [p.detach() for p in ps], opt.state_dict()["state"]
        (got, got_state), (want, want_state) = runs[backend], runs["torch"]
        # Two roundings of the param's dtype (one a step, at the size of the param before and after it), six where
        # the interpreter truncates bfloat16.
        ulps = 2 if exact_bfloat16(device, backend) else 6
        for i, (g, w, p0) in enumerate(zip(got, want, params)):
            p0 = p0.to(device).double()
            step = (w.double() - p0).abs().max().item()
            size = torch.maximum(w.double().abs(), p0.abs()) + step
            tol = torch.finfo(g.dtype).eps * size * ulps + 1e-4 * step
            assert_close_where_finite(g, w, tol, f"param {i}")
        assert got_state.keys() == want_state.keys()
        for i in got_state:
            for key in ("exp_avg", "exp_avg_sq"):
                g, w = got_state[i][key], want_state[i][key]
                # Relative to the tensor's scale: clipping divides by a global norm summed in another order.
                scale = w.double().abs().nan_to_num(posinf=0.0).max().item() if w.numel() else 0.0
                assert_close_where_finite(g, w, 1e-5 * (w.double().abs() + scale) + 1e-12, f"state[{i}][{key}]")

    check()


# --- bad arguments ---------------------------------------------------------------------------------------------


@st.composite
def broken_step(draw, device):
    """A valid lamb_moments or adamp_moments call with one list entry broken, the error and the name it must
    raise."""
    op = draw(st.sampled_from(["lamb_moments", "adamp_moments"]))
    shape = (draw(st.integers(2, 6)), draw(st.integers(2, 6)))  # no size-1 dim: a transpose is not contiguous
    lists = [[torch.randn(shape, device=device)] for _ in range(4)]
    fault = draw(st.sampled_from(["float64", "grad_dtype", "moment_dtype", "noncontiguous", "shape", "length"]))
    which = draw(st.integers(0, 3))
    name, error = NAMES[which], ValueError
    if fault == "float64":
        lists[0][0], lists[1][0] = lists[0][0].double(), lists[1][0].double()
        name, error = "params", TypeError
    elif fault == "grad_dtype":
        lists[1][0] = lists[1][0].half()
        name, error = "grads", TypeError
    elif fault == "moment_dtype":
        which = draw(st.integers(2, 3))
        lists[which][0] = lists[which][0].bfloat16()
        name, error = NAMES[which], TypeError
    elif fault == "noncontiguous":
        lists[which][0] = torch.randn(shape[::-1], device=device).t()
    elif fault == "shape":
        lists[which][0] = torch.randn(shape[0] + 1, *shape[1:], device=device)
        if which == 0:
            name = "grads|exp_avgs|exp_avg_sqs"  # the others no longer match the param
    else:
        lists[which].append(torch.randn(shape, device=device))
        name = "one per param|" + name
    if op == "lamb_moments":
        args = (*lists, None, 1.0, 1e-3, 0.9, 0.999, 0.1, 0.5, 0.5, 1e-6, 0.01, 1e-3, False, True)
    else:
        args = (*lists, [0.5], [0.5], 1e-3, 0.9, 0.999, 1e-8, 0.01, 0.1, 0.1, False)
    return getattr(torch.ops.vitops, op), args, error, name


@pytest.mark.parametrize("device,backend", LAMB_BACKENDS)
def test_bad_step_arguments_are_named(device, backend):
    """Every backend rejects what the kernels don't take, with the same error (the Triton launchers read every
    tensor as contiguous, and had no dtype table entry for float64)."""

    @settings(max_examples=examples(60))
    @given(case=broken_step(device))
    def check(case):
        op, args, error, name = case
        with on_backend(backend), expect_error(error, name):
            op(*args)

    check()


# --- regressions: defects the tests above found (fixed in the kernels and the reference) -------------------------


@pytest.mark.parametrize("device,backend", [p for p in LAMB_BACKENDS if p.values[1] != "torch"])
@pytest.mark.parametrize("param,weight_decay", [([math.inf, -0.29], 0.01), ([math.nan, -0.29], 0.0),
                                                ([math.inf, -0.29], 0.0)])  # fmt: skip
def test_lamb_inf_or_nan_param(device, backend, param, weight_decay):
    """The LAMB kernels used to add timm's skipped zero-coefficient terms (p + p * -0 without decoupled decay,
    u + 0 * p' without weight decay): an inf or NaN param made both sums NaN, the trust ratio 1 (NaN > 0 is
    false) where timm's is inf / inf = NaN, and the other elements took a finite step."""

    def sums(run_backend):
        lists = ([torch.tensor(param, device=device)], [torch.tensor([1.5, -0.3], device=device)],
                 [torch.tensor([0.15, -0.03], device=device)], [torch.tensor([0.15, 0.03], device=device)])  # fmt: skip
        with on_backend(run_backend):
            return torch.ops.vitops.lamb_moments(*lists, None, 1.0, 1e-3, 0.9, 0.999, 0.1, 1.0, 1.0, 1e-6,
                                                 weight_decay, 1e-3, False, True)  # fmt: skip

    got, want = sums(backend), sums("torch")  # want [[inf, inf]], [[nan, 0.642]], [[inf, 0.642]]
    assert_close_where_finite(got, want, 1e-6 * want.abs().nan_to_num(posinf=0.0), "sums")


@pytest.mark.parametrize("device,backend", ADAMP_BACKENDS)
def test_adamp_zero_param_tiny_eps(device, backend):
    """A zero-initialised 2-D param (a head, a projection) with a tiny eps: timm takes a plain step. The
    projection coefficient p.q / (||p|| + eps)^2 used to be 0 / 0 there: eps^2 underflows float32 below ~1e-23
    (the reference and Triton; dividing twice by ||p|| + eps is 0)."""
    param = torch.nn.Parameter(torch.zeros(3, 4, device=device))
    opt = AdamP([param], lr=1e-3, eps=1e-30)
    param.grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).to(device)
    with on_backend(backend):
        opt.step()
    torch.testing.assert_close(param.detach().abs(), torch.full_like(param, 1e-3), rtol=1e-5, atol=0)  # timm's
