"""Lamb and AdamP on bad gradients and bad states: by default timm's result on every backend, NaN where timm gives
NaN (NaN and inf grads, zero grads, zero params, grads on some params only, params changing dtype), a clear error
where vitops deliberately differs (a param moved to another device, maximize); skip_nonfinite's no-op, decided on
the device; load_state_dict rejecting a state_dict that does not fit before it changes anything. (The CUDA
kernels' share: test_optim_cuda_emulation.py.)"""
import contextlib
import copy
import math

import pytest
import torch
from torch import nn

import vitops
from tests.optim.test_optim import cpu_backends, op_args, requires_timm, timm_optim
from vitops import _backend
from vitops.optim import AdamP, Lamb, Lookahead

# NaN arithmetic under Triton's interpreter (numpy) warns
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

BACKENDS = cpu_backends("lamb_moments")  # the reference ("torch"), the compiled CPU kernels, Triton's interpreter
CLASSES = {"Lamb": Lamb, "AdamP": AdamP}
SHAPES = ((6, 4, 2, 2), (8, 5), (8,), (5, 9))  # a conv, a linear, a bias and another matrix
STEPS = 3  # the bad grads come at step 1: one step before, one after


def make_params(zero=(), dtype=torch.float32):
    """The params, those at indices `zero` all zeros."""
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=gen) for shape in SHAPES]
    for i in zero:
        tensors[i].zero_()
    return [nn.Parameter(t.to(dtype)) for t in tensors]


def make_grads(step, case, dtype=torch.float32):
    """The grads of `step` (None: the param has none) for `case`, bad at step 1."""
    gen = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(shape, generator=gen) for shape in SHAPES]
    if step == 1:
        if case == "nan":
            grads[1][2, 3] = math.nan
        elif case == "inf":
            grads[3][4, 0] = math.inf
        elif case == "neg_inf_bias":
            grads[2][5] = -math.inf
        elif case == "zero_grad":
            grads = [g.zero_() for g in grads]  # the global grad norm is 0
    if case in ("zero_grad", "zero_param_and_grad"):
        grads[1].zero_()
    if case == "some_grads":
        grads[step % len(grads)] = None
    return [g.to(dtype) if g is not None else None for g in grads]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g


def run(factory, case, backend=None, steps=STEPS, zero=()):
    params = make_params(zero)
    opt = factory(params)
    for step in range(steps):
        set_grads(params, make_grads(step, case))
        with vitops.use_backend(backend) if backend else contextlib.nullcontext():
            opt.step()
    return params, opt


def assert_same_state(got, want, rtol=1e-5, atol=1e-6):
    """Params, moments and step counts of two runs on the same params: NaN in the same places, the rest close."""
    (got_params, got_opt), (want_params, want_opt) = got, want
    for i, (a, b) in enumerate(zip(got_params, want_params)):
        got_state, want_state = got_opt.state.get(a, {}), want_opt.state.get(b, {})
        assert got_state.keys() == want_state.keys(), f"param {i}"
        pairs = [("param", a, b)]
        for key, value in want_state.items():
            if isinstance(value, torch.Tensor):
                pairs.append((key, got_state[key], value))
            else:
                assert got_state[key] == value, f"param {i}: {key}"
        for what, x, y in pairs:
            x, y = x.detach().float(), y.detach().float()
            assert torch.equal(x.isnan(), y.isnan()), f"param {i}: {what} is NaN elsewhere than timm's"
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, equal_nan=True,
                                       msg=lambda m, i=i, what=what: f"param {i}: {what}: {m}")  # fmt: skip
    for got_group, want_group in zip(got_opt.param_groups, want_opt.param_groups):
        if "step" in want_group:
            assert float(got_group["step"]) == float(want_group["step"])


def timm_factory(name, kwargs):
    return lambda p: getattr(timm_optim, name)(p, **kwargs)


CONFIGS = {  # name, kwargs (the same for timm's optimizer)
    "lamb": ("Lamb", dict(lr=1e-2)),
    "lamb_no_clip": ("Lamb", dict(lr=1e-2, max_grad_norm=None)),
    "lamb_decoupled_trust_clip": ("Lamb", dict(lr=1e-2, weight_decay=0.1, decoupled_decay=True, trust_clip=True)),
    "lamb_foreach": ("Lamb", dict(lr=1e-2, foreach=True)),  # timm's multi-tensor path; vitops ignores foreach
    "adamp": ("AdamP", dict(lr=1e-2, weight_decay=0.1)),
    "adamp_nesterov": ("AdamP", dict(lr=1e-2, nesterov=True, delta=0.3)),
}


# --- the default: timm's result, NaN for NaN -------------------------------------------------------------------


@requires_timm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("case", ["nan", "inf", "neg_inf_bias"])
def test_nonfinite_grads_match_timm(case, config, backend):
    name, kwargs = CONFIGS[config]
    want = run(timm_factory(name, kwargs), case)
    assert any(p.isnan().any() for p in want[0]), "the bad grad should reach timm's params"
    assert_same_state(run(lambda p: CLASSES[name](p, **kwargs), case, backend), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lamb_one_nan_grad_turns_every_param_nan(backend):
    """timm's global clipping coefficient is NaN (clamp_(min=1) keeps NaN), and it divides every grad."""
    params, _ = run(lambda p: Lamb(p, lr=1e-2), "nan", backend, steps=2)
    assert all(p.isnan().all() for p in params)
    params, _ = run(lambda p: Lamb(p, lr=1e-2, max_grad_norm=None), "nan", backend, steps=2)
    assert [bool(p.isnan().any()) for p in params] == [False, True, False, False]


EDGE_CONFIGS = {
    "lamb": ("Lamb", dict(lr=1e-2)),
    "lamb_always_adapt": ("Lamb", dict(lr=1e-2, weight_decay=0.0, always_adapt=True, trust_clip=True)),
    "adamp": ("AdamP", dict(lr=1e-2, weight_decay=0.1)),
}


@requires_timm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(EDGE_CONFIGS))
@pytest.mark.parametrize("case", ["zero_grad", "zero_param", "zero_param_and_grad", "some_grads"])
def test_zero_grads_zero_params_and_missing_grads_match_timm(case, config, backend):
    """Zero grads (all of them at step 1: a zero global norm), zero params (LAMB's trust ratio ||p|| / ||u|| is 1
    where either is 0, 0 / 0 included; AdamP's cosine of a zero row), and grads on some params only (the others
    keep their state; LAMB's step still counts)."""
    name, kwargs = EDGE_CONFIGS[config]
    zero = (1, 2) if case.startswith("zero_param") else ()
    got = run(lambda p: CLASSES[name](p, **kwargs), case, backend, zero=zero)
    want = run(timm_factory(name, kwargs), case, zero=zero)
    assert all(torch.isfinite(p).all() for p in got[0])
    assert_same_state(got, want)


@pytest.mark.parametrize("name", list(CLASSES))
def test_maximize_and_foreach_as_timm_takes_them(name):
    """timm's Lamb takes foreach (vitops ignores it: test_nonfinite_grads_match_timm runs it against timm's
    multi-tensor path); neither takes maximize, nor timm's AdamP foreach: a TypeError, as timm's."""
    with pytest.raises(TypeError, match="maximize"):
        CLASSES[name](make_params(), maximize=True)
    if name == "Lamb":
        Lamb(make_params(), foreach=True)
    else:
        with pytest.raises(TypeError, match="foreach"):
            AdamP(make_params(), foreach=True)


# --- params changing dtype or device between steps --------------------------------------------------------------


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_params_changing_dtype_keep_going(name, dtype):
    """model.half() or .double() after a step: the moments stay float32 (become float64 for float64 params) and
    the step is the float32 one to the new dtype's resolution. timm's AdamP keeps going too, to the same params;
    timm's Lamb fails on the mixed dtypes."""
    factories = [lambda p: CLASSES[name](p, lr=1e-2, weight_decay=0.1)]
    if name == "AdamP" and timm_optim is not None:
        factories.append(timm_factory("AdamP", dict(lr=1e-2, weight_decay=0.1)))
    runs = []
    for factory in factories:
        params, opt = run(factory, "finite", steps=1)
        for p in params:
            p.data = p.data.to(dtype)
        set_grads(params, make_grads(1, "finite", dtype))
        opt.step()
        runs.append((params, opt))
    want, _ = run(factories[0], "finite", steps=2)
    ours, opt = runs[0]
    for p in ours:
        assert p.dtype == dtype
        assert opt.state[p]["exp_avg"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 2e-3 if dtype == torch.float16 else 1e-6
    for params, _ in runs:
        for p, q in zip(params, want):
            torch.testing.assert_close(p.float(), q.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(CLASSES))
def test_param_moved_to_another_device_raises_and_changes_nothing(name):
    params, opt = run(lambda p: CLASSES[name](p, lr=1e-2), "finite", steps=1)
    before = copy.deepcopy(opt.state_dict())
    moved = nn.Parameter(params[1].detach().to("meta"))
    torch.utils.swap_tensors(params[1], moved)  # the same Parameter, now on another device
    params[1].grad = torch.zeros_like(params[1])
    with pytest.raises(ValueError, match=r"param 1 .* is on meta but its exp_avg is on cpu.*load_state_dict"):
        opt.step()
    assert_bitwise_equal(opt.state_dict(), before)
    torch.utils.swap_tensors(params[1], moved)
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    twin_opt = CLASSES[name](twins, lr=1e-2)
    twin_opt.load_state_dict(copy.deepcopy(before))
    for ps, o in ((params, opt), (twins, twin_opt)):
        set_grads(ps, make_grads(1, "finite"))
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twins))


# --- skip_nonfinite ----------------------------------------------------------------------------------------------

SKIP_CONFIGS = {
    "lamb": ("Lamb", dict(lr=1e-2, weight_decay=0.05)),
    "lamb_no_clip": ("Lamb", dict(lr=1e-2, weight_decay=0.05, max_grad_norm=None)),
    "adamp": ("AdamP", dict(lr=1e-2, weight_decay=0.05)),
}


def two_groups(params):
    return [{"params": params[:2]}, {"params": params[2:], "lr": 3e-2}]


def snapshot(params, opt):
    """The params and moments (not the step counts: a skipped step counts)."""
    moments = [[opt.state[p][key].clone() for key in ("exp_avg", "exp_avg_sq")] for p in params if p in opt.state]
    return [p.detach().clone() for p in params], moments


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(SKIP_CONFIGS))
@pytest.mark.parametrize("case", ["nan", "inf"])
def test_skip_nonfinite_skips_the_whole_step(case, config, backend):
    """The bad grad is in one group ("inf": the second): every param of both groups keeps its bits, every group
    counts the skip; the steps around it are bit for bit those of skip_nonfinite=False with the step counts moved
    on by the skipped step (which counts, as apex's)."""
    name, kwargs = SKIP_CONFIGS[config]
    params = make_params()
    opt = CLASSES[name](two_groups(params), skip_nonfinite=True, **kwargs)
    twins = make_params()
    twin_opt = CLASSES[name](two_groups(twins), **kwargs)
    with vitops.use_backend(backend):
        for step in range(STEPS):
            set_grads(params, make_grads(step, case))
            before = snapshot(params, opt)
            opt.step()
            if step == 1:
                assert_bitwise_equal(snapshot(params, opt), before)
                for group in twin_opt.param_groups:  # the skipped step counts (Lamb per group, AdamP per param)
                    if "step" in group:
                        group["step"].add_(1)
                for state in twin_opt.state.values():
                    if "step" in state:
                        state["step"] += 1
            else:
                set_grads(twins, make_grads(step, case))
                twin_opt.step()
                assert all(torch.equal(p, q) for p, q in zip(params, twins)), f"step {step}"
    assert [float(g["skipped_steps"]) for g in opt.param_groups] == [1.0, 1.0]
    assert "skipped_steps" not in twin_opt.param_groups[0]
    assert all(torch.isfinite(p).all() for p in params)
    assert_bitwise_equal(opt.state_dict()["state"], twin_opt.state_dict()["state"])


@pytest.mark.parametrize("name", list(CLASSES))
def test_skip_nonfinite_reads_nothing_on_the_host(name):
    """The skip is decided on the device: a step on meta tensors, which have no values to read, goes through,
    skip included. (The kernels read found_inf on the device: test_found_inf_makes_an_op_a_no_op here, the CUDA
    kernels in test_optim_cuda_emulation.py.)"""
    params = [nn.Parameter(torch.empty(shape, device="meta")) for shape in SHAPES]
    opt = CLASSES[name](two_groups(params), lr=1e-2, weight_decay=0.1, skip_nonfinite=True)
    for _ in range(2):
        set_grads(params, [torch.empty_like(p) for p in params])
        opt.step()
    assert all(group["skipped_steps"].is_meta for group in opt.param_groups)


def test_skip_nonfinite_state_dict():
    """skipped_steps travels in the groups; skip_nonfinite is the constructor's, not the state_dict's."""
    _, opt = run(lambda p: Lamb(p, lr=1e-2, skip_nonfinite=True), "nan")
    state_dict = copy.deepcopy(opt.state_dict())
    assert state_dict["param_groups"][0]["skipped_steps"] == 1
    again = Lamb(make_params(), lr=1e-2, skip_nonfinite=True)
    again.load_state_dict(copy.deepcopy(state_dict))
    set_grads(again.param_groups[0]["params"], make_grads(1, "nan"))
    again.step()
    assert float(again.param_groups[0]["skipped_steps"]) == 2
    plain = Lamb(make_params(), lr=1e-2)
    plain.load_state_dict(copy.deepcopy(state_dict))
    assert not plain.defaults["skip_nonfinite"] and "skip_nonfinite" not in plain.param_groups[0]
    set_grads(plain.param_groups[0]["params"], make_grads(1, "nan"))
    plain.step()
    assert float(plain.param_groups[0]["skipped_steps"]) == 1
    assert all(p.isnan().all() for p in plain.param_groups[0]["params"])


@requires_timm
@pytest.mark.parametrize("name", list(CLASSES))
def test_state_dict_without_skip_nonfinite_is_timms(name):
    """timm's keys, and timm's optimizer loads the state_dict and steps on."""
    _, ours = run(lambda p: CLASSES[name](p, lr=1e-2), "finite")
    _, theirs = run(timm_factory(name, dict(lr=1e-2)), "finite")
    assert ours.state_dict()["param_groups"][0].keys() == theirs.state_dict()["param_groups"][0].keys()
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    theirs.step()


def test_skip_nonfinite_is_the_whole_optimizers():
    with pytest.raises(ValueError, match="skip_nonfinite applies to the whole step"):
        Lamb([{"params": make_params(), "skip_nonfinite": True}])


@pytest.mark.parametrize("backend", ["cpu", "triton", "torch"])
@pytest.mark.parametrize("name", ["lamb_moments", "lamb_apply", "adamp_moments", "adamp_apply"])
def test_found_inf_makes_an_op_a_no_op(name, backend):
    """The ops' found_inf: nonzero, nothing is written (NaN grads and moments included) and the sums are 0; zero,
    the op is the one without it, bit for bit."""
    if _backend.availability()[name]["cpu"][backend] is not None:
        pytest.skip(_backend.availability()[name]["cpu"][backend])
    op = getattr(torch.ops.vitops, name)
    args = op_args(name)
    for t in args[1][:2]:  # grads (moments for lamb_apply)
        t.view(-1)[0] = math.nan
    before = copy.deepcopy(args)
    with vitops.use_backend(backend):
        out = op(*args, torch.tensor(1.0))
        assert_bitwise_equal(args, before)
        if out is not None:
            assert not any(t.any() for t in (out if isinstance(out, tuple) else (out,)))
        plain, flagged = op_args(name), op_args(name)
        assert_bitwise_equal(op(*plain), op(*flagged, torch.tensor(0.0)))
        assert_bitwise_equal(plain, flagged)
        with pytest.raises(TypeError, match="found_inf must be float32"):
            op(*op_args(name), torch.tensor(1.0, dtype=torch.float64))
        with pytest.raises(ValueError, match="found_inf must have shape"):
            op(*op_args(name), torch.ones(1))


# --- load_state_dict ---------------------------------------------------------------------------------------------


def assert_bitwise_equal(a, b, where="state_dict"):
    """Equal (state_dicts, lists of tensors), tensors bit for bit (NaN included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan()), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _set(path, value):
    def change(state_dict):
        *inner, last = path
        target = state_dict
        for key in inner:
            target = target[key]
        target[last] = value

    return change


def _drop(path):
    def change(state_dict):
        *inner, last = path
        target = state_dict
        for key in inner:
            target = target[key]
        del target[last]

    return change


MALFORMED = {  # a change to a good state_dict -> what the error says
    "wrong_shape_exp_avg": (
        _set(("state", 1, "exp_avg"), torch.zeros(3)),
        r"param 1 \(shape \(8, 5\)\): exp_avg has shape \(3,\)",
    ),
    "missing_exp_avg_sq": (_drop(("state", 2, "exp_avg_sq")), "param 2 .* lacks exp_avg_sq"),
    "integer_moment": (_set(("state", 0, "exp_avg_sq"), torch.zeros(SHAPES[0], dtype=torch.long)), "floating"),
    "foreign_key": (_set(("state", 3, "momentum_buffer"), torch.zeros(SHAPES[3])), "momentum_buffer"),
    "unknown_param": (_set(("state", 17), {}), "param 17"),
    "group_without_betas": (_drop(("param_groups", 0, "betas")), r"param_groups\[0\] lacks betas"),
    "negative_lr": (_set(("param_groups", 0, "lr"), -1.0), "lr must be >= 0"),
    "negative_skipped_steps": (_set(("param_groups", 0, "skipped_steps"), -1), "skipped_steps"),
    "short_group": (lambda sd: sd["param_groups"][0]["params"].pop(), "has 3 params in the state_dict, 4"),
    "no_state": (_drop(("state",)), "'state' and 'param_groups'"),
}


def stepped(cls, **kwargs):
    params, opt = run(lambda p: cls(p, lr=1e-2, **kwargs), "finite", steps=2)
    return params, opt


def assert_rejected(opt, state_dict, error, match):
    """load_state_dict fails with `error` matching `match`, and the optimizer is as it was (and still steps)."""
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match):
        opt.load_state_dict(state_dict)
    assert_bitwise_equal(opt.state_dict(), before)


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_state_dict_is_rejected_at_load(case, name):
    params, opt = stepped(CLASSES[name])
    state_dict = copy.deepcopy(opt.state_dict())
    change, match = MALFORMED[case]
    change(state_dict)
    assert_rejected(opt, state_dict, (ValueError, TypeError), match)
    set_grads(params, make_grads(2, "finite"))
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)


FOREIGN = {"sgd": (torch.optim.SGD, dict(momentum=0.9)), "adam": (torch.optim.Adam, {}), "lamb": (Lamb, {}),
           "adamp": (AdamP, {})}  # fmt: skip


@pytest.mark.parametrize("name,other", [(n, other) for n in CLASSES for other in FOREIGN if other != n.lower()])
def test_another_optimizers_state_dict_is_rejected(name, other):
    """Its param groups lack this optimizer's options (SGD's, torch Adam's and each other's)."""
    _, opt = stepped(CLASSES[name])
    cls, kwargs = FOREIGN[other]
    _, theirs = stepped(cls, **kwargs)
    assert_rejected(opt, theirs.state_dict(), ValueError, "lacks")


def test_state_of_another_optimizer_with_the_same_options_is_rejected():
    """Per-param state a vitops optimizer does not keep, or of the wrong kind: torch Adam's step tensors in
    AdamP (timm's AdamP counts in an int), AdamP's per-param step in Lamb."""
    _, opt = stepped(AdamP)
    state_dict = copy.deepcopy(opt.state_dict())
    state_dict["state"][0]["step"] = torch.tensor(2.0)
    assert_rejected(opt, state_dict, TypeError, "step must be an int")
    _, opt = stepped(Lamb)
    state_dict = copy.deepcopy(opt.state_dict())
    state_dict["state"][0]["step"] = 2
    assert_rejected(opt, state_dict, ValueError, "step, which Lamb does not keep")
    state_dict = copy.deepcopy(opt.state_dict())
    state_dict["param_groups"][0]["step"] = "two"
    assert_rejected(opt, state_dict, ValueError, "step must be a count")


def test_lookahead_rejects_what_does_not_fit():
    params = make_params()
    opt = Lookahead(Lamb(params, lr=1e-2), k=1)
    for step in range(2):
        set_grads(params, make_grads(step, "finite"))
        opt.step()
    for path, value, match in ((("state", 1, "lookahead_slow_buff"), torch.zeros(2), "lookahead_slow_buff"),
                               (("param_groups", 0, "lookahead_k"), 0, "lookahead_k must be a number >= 1"),
                               (("state", 0, "exp_avg"), torch.zeros(1), "exp_avg has shape")):  # fmt: skip
        state_dict = copy.deepcopy(opt.state_dict())
        _set(path, value)(state_dict)
        assert_rejected(opt, state_dict, ValueError, match)
    # Around an optimizer that is not vitops': its slow weights are checked all the same.
    sgd = Lookahead(torch.optim.SGD(params, lr=0.1), k=1)
    set_grads(params, make_grads(0, "finite"))
    sgd.step()
    state_dict = copy.deepcopy(sgd.state_dict())
    state_dict["state"][0]["lookahead_slow_buff"] = torch.zeros(1)
    assert_rejected(sgd, state_dict, ValueError, "lookahead_slow_buff has shape")
