"""vitops.optim's optimizers: timm parity on every backend, optimizer behaviour, the op contracts. (create_optimizer
and ModelEma: test_factory.py, test_model_ema.py.)"""

import copy
import math

import pytest
import torch
from torch import nn

import vitops
from vitops import _backend
from vitops.optim import AdamP, Lamb, Lookahead, reference

try:
    import timm.optim as timm_optim
except ImportError:  # the package reference is still checked
    timm_optim = None

requires_timm = pytest.mark.skipif(timm_optim is None, reason="timm is not installed")


def cpu_backends(op):
    """Backends that run CPU tensors here (Triton only under its interpreter)."""
    params = []
    for backend in _backend.BACKENDS:
        reason = _backend.availability()[op]["cpu"][backend]
        if reason is not None and reason.startswith("runs "):
            continue
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(backend, id=backend, marks=marks))
    return params


# --- the mixed param set -------------------------------------------------------------------------------------

SHAPES = {
    "conv": (8, 4, 3, 3),
    "linear": (16, 12),
    "bias": (16,),
    "zero_grad": (6, 5),
    "all_zero": (7, 3),
    "no_grad": (5,),
    "ortho_rows": (6, 10),  # grad orthogonal to p in every row: AdamP's channel-wise projection
    "ortho_layer": (9, 12),  # grad orthogonal to p as a whole only: AdamP's layer-wise projection
    "big": (3, 2100),  # more than one CPU chunk per row, odd lengths for the vector tails
}


def make_params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    params = []
    for name, shape in SHAPES.items():
        if name == "all_zero":
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=g)
        params.append(nn.Parameter(t.to(dtype)))
    return params


def orthogonal_to(r, w, per_row):
    """r less its component along w: in each row of w.reshape(size(0), -1) (AdamP's channel-wise projection
    then applies), or over the whole tensor (its layer-wise one)."""
    rows = w.shape[0] if per_row else 1
    r2, w2 = r.reshape(rows, -1), w.reshape(rows, -1)
    return (r2 - w2 * ((r2 * w2).sum(1, keepdim=True) / (w2 * w2).sum(1, keepdim=True))).reshape(r.shape)


def set_grads(params, gen, scale=1.0):
    """Grads for one step: random, except a zero grad, no grad, and grads orthogonal to their param."""
    for name, p in zip(SHAPES, params):
        if name == "no_grad":
            p.grad = None
            continue
        r = torch.randn(p.shape, generator=gen) * scale
        w = p.detach().float()
        if name == "zero_grad":
            r.zero_()
        elif name in ("ortho_rows", "ortho_layer"):
            r = orthogonal_to(r, w, per_row=name == "ortho_rows")
        p.grad = r.to(p.dtype)


def run_steps(opt_factory, steps=50, backend=None, seed=0, dtype=torch.float32, grad_scale=1.0):
    params = make_params(seed, dtype)
    opt = opt_factory(params)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        set_grads(params, gen, grad_scale)
        if backend is None:
            opt.step()
        else:
            with vitops.use_backend(backend):
                opt.step()
    return params, opt


def assert_params_close(got, want, rtol=1e-5, atol=1e-6):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.detach().float(), b.detach().float(), rtol=rtol, atol=atol, msg=f"param {i}")


LAMB_CONFIGS = {
    "default": {"lr": 1e-2},
    "clipping": {"lr": 1e-2, "max_grad_norm": 0.5},
    "no_clip": {"lr": 1e-2, "max_grad_norm": None},
    "no_grad_averaging": {"lr": 1e-2, "grad_averaging": False, "betas": (0.8, 0.99)},
    "lerp_high": {"lr": 1e-2, "betas": (0.3, 0.99)},
    "decoupled": {"lr": 1e-2, "weight_decay": 0.1, "decoupled_decay": True, "corrected_weight_decay": True},
    "trust_clip": {"lr": 1e-2, "weight_decay": 0.05, "trust_clip": True},
    "always_adapt": {"lr": 1e-2, "weight_decay": 0.0, "always_adapt": True},
    "no_adapt": {"lr": 1e-2, "weight_decay": 0.0},
    "no_bias_correction": {"lr": 1e-3, "bias_correction": False},
    "caution": {"lr": 1e-2, "caution": True},
}

ADAMP_CONFIGS = {
    "default": {"lr": 1e-2},
    "weight_decay": {"lr": 1e-2, "weight_decay": 0.1, "wd_ratio": 0.2},
    "nesterov": {"lr": 1e-2, "weight_decay": 0.05, "nesterov": True},
    "delta": {"lr": 1e-2, "weight_decay": 0.05, "delta": 0.3},
    "caution": {"lr": 1e-2, "weight_decay": 0.05, "caution": True},
}


# name: (the class, the op whose backends it runs on, its configs, timm's extra options)
OPTIMIZERS = {
    "Lamb": (Lamb, "lamb_moments", LAMB_CONFIGS, {"foreach": False}),
    "AdamP": (AdamP, "adamp_moments", ADAMP_CONFIGS, {}),
}


def _steps_for(backend):
    return 3 if backend == "triton" else 50  # the Triton interpreter is slow; on a GPU these are fast


@pytest.mark.parametrize(
    "name,config,backend",
    [pytest.param(name, config, *b.values, id=f"{name}-{config}-{b.id}", marks=b.marks)
     for name, (_, op, configs, _) in OPTIMIZERS.items() for config in configs for b in cpu_backends(op)],
)  # fmt: skip
def test_matches_timm(name, config, backend):
    cls, _, configs, timm_options = OPTIMIZERS[name]
    kwargs = configs[config]
    steps = _steps_for(backend)
    got, _ = run_steps(lambda p: cls(p, **kwargs), steps, backend)
    if timm_optim is not None:
        want, _ = run_steps(lambda p: getattr(timm_optim, name)(p, **timm_options, **kwargs), steps)
        assert_params_close(got, want)
    # The package reference is timm's single-tensor math; the reference backend is it exactly.
    with vitops.use_backend("torch"):
        ref, _ = run_steps(lambda p: cls(p, **kwargs), steps)
    assert_params_close(got, ref)
    assert not torch.equal(got[0], make_params()[0])  # it moved
    assert torch.equal(got[5], make_params()[5])  # no grad: untouched


def test_adamp_projection_branches_are_exercised():
    """The orthogonal-grad params take the channel and layer projections; a random one takes neither."""
    params = make_params()
    gen = torch.Generator().manual_seed(1)
    set_grads(params, gen)
    names = list(SHAPES)
    eps, delta = 1e-8, 0.1

    def branch(p):
        g = p.grad
        for view in (lambda x: x.reshape(x.size(0), -1), lambda x: x.reshape(1, -1)):
            cos = torch.nn.functional.cosine_similarity(view(g), view(p.detach()), dim=1, eps=eps).abs()
            if cos.max() < delta / math.sqrt(view(p).size(1)):
                return "channel" if view(p).size(0) == p.size(0) and p.size(0) > 1 else "layer"
        return "none"

    assert branch(params[names.index("ortho_rows")]) == "channel"
    assert branch(params[names.index("ortho_layer")]) == "layer"
    assert branch(params[names.index("linear")]) == "none"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls,kwargs", [(Lamb, {"lr": 1e-2}), (AdamP, {"lr": 1e-2, "weight_decay": 0.1})])
def test_low_precision_params_kernel_vs_reference(cls, kwargs, dtype):
    """float16/bfloat16 params keep float32 moments; the compiled kernel agrees with the reference to the
    param's resolution."""
    if _backend.availability()["lamb_moments"]["cpu"]["cpu"] is not None:
        pytest.skip("no compiled CPU kernels")
    got, opt = run_steps(lambda p: cls(p, **kwargs), 10, "cpu", dtype=dtype)
    ref, _ = run_steps(lambda p: cls(p, **kwargs), 10, "torch", dtype=dtype)
    for p in got:
        assert p.dtype == dtype
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    assert_params_close(got, ref, rtol=1e-2, atol=1e-2)


def test_float64_params_take_the_reference_path():
    got, _opt = run_steps(lambda p: Lamb(p, lr=1e-2), 5, dtype=torch.float64)
    ref, _ = run_steps(lambda p: Lamb(p, lr=1e-2), 5, "torch", dtype=torch.float64)
    assert_params_close(got, ref, rtol=0, atol=0)
    assert got[0].dtype == torch.float64


def test_param_groups_with_own_hyperparameters():
    params = make_params()
    groups = [
        {"params": params[:3], "lr": 1e-2, "weight_decay": 0.1},
        {"params": params[3:6], "lr": 3e-3, "weight_decay": 0.0, "trust_clip": True},
        {"params": params[6:], "betas": (0.8, 0.9)},
    ]
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    ref_groups = [dict(g, params=ref_params[i:j]) for g, (i, j) in zip(groups, [(0, 3), (3, 6), (6, 9)])]
    opt = Lamb(groups, lr=5e-3)
    gen, gen2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    if timm_optim is not None:
        ref = timm_optim.Lamb(ref_groups, lr=5e-3, foreach=False)
    else:
        ref = Lamb(ref_groups, lr=5e-3)
    for _ in range(10):
        set_grads(params, gen)
        set_grads(ref_params, gen2)
        opt.step()
        if timm_optim is None:
            with vitops.use_backend("torch"):
                ref.step()
        else:
            ref.step()
    assert_params_close(params, ref_params)
    assert [float(g["step"]) for g in opt.param_groups] == [10.0, 10.0, 10.0]


def test_lamb_group_step_counts_groups_without_grads():
    a, b = nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(4))
    opt = Lamb([{"params": [a]}, {"params": [b]}])
    a.grad = torch.randn(3, 3)
    opt.step()
    opt.step()
    assert torch.is_tensor(opt.param_groups[1]["step"]) and opt.param_groups[1]["step"].device.type == "cpu"
    assert float(opt.param_groups[1]["step"]) == 2.0 and len(opt.state[b]) == 0
    b.grad = torch.randn(4)
    b0 = b.detach().clone()
    opt.step()
    # b's first update uses step 3's bias corrections, as timm
    ref = b0.clone()
    m, v = torch.zeros(4), torch.zeros(4)
    grad_sq_sum = reference.lamb_grad_sq_sums([a.grad, b.grad]).sum()  # the norm over both groups' grads
    hyper = (1e-3, 0.9, 0.999, 0.1, 1 - 0.9**3, 1 - 0.999**3, 1e-6, 0.01, 1e-3, False)
    sums = reference.lamb_moments([ref], [b.grad], [m], [v], grad_sq_sum, 1.0, *hyper, True)
    reference.lamb_apply([ref], [m], [v], sums, *hyper, False)
    torch.testing.assert_close(b.detach(), ref)


def test_adamp_step_is_a_python_int_per_param():
    params, opt = run_steps(lambda p: AdamP(p), 3)
    steps = {opt.state[p]["step"] for p in params if p.grad is not None}
    assert steps == {3} and all(type(opt.state[p]["step"]) is int for p in params if p.grad is not None)


def test_closure_and_zero_grad():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    opt = Lamb(model.parameters(), lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure)
    for _ in range(20):
        last = opt.step(closure)
    assert torch.is_tensor(first) and last < first


def rosenbrock(xy):
    x, y = xy[0], xy[1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


@pytest.mark.parametrize(
    "factory", [lambda p: Lamb(p, lr=2e-2, weight_decay=0.0), lambda p: AdamP(p, lr=2e-2)], ids=["lamb", "adamp"]
)
def test_rosenbrock_converges(factory):
    """With the lr annealed: at a constant lr the iterate keeps circling the minimum at a distance of about lr,
    and where it stops depends on every rounding."""
    xy = nn.Parameter(torch.tensor([-1.5, 2.0]))
    opt = factory([xy])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 3000)
    start = rosenbrock(xy).item()
    for _ in range(3000):
        opt.zero_grad()
        rosenbrock(xy).backward()
        opt.step()
        schedule.step()
    assert rosenbrock(xy).item() < start * 1e-3
    torch.testing.assert_close(xy.detach(), torch.tensor([1.0, 1.0]), atol=0.1, rtol=0)


# --- state dicts -------------------------------------------------------------------------------------------


def _continue(opt, params, seed, steps=5):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        set_grads(params, gen)
        opt.step()


@pytest.mark.parametrize(
    "cls,kwargs", [(Lamb, {"lr": 1e-2, "weight_decay": 0.05}), (AdamP, {"lr": 1e-2, "weight_decay": 0.05})]
)
def test_state_dict_round_trip(cls, kwargs):
    params, opt = run_steps(lambda p: cls(p, **kwargs), 5)
    clone = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = cls(clone, **kwargs)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    _continue(opt, params, 9)
    _continue(opt2, clone, 9)
    assert_params_close(clone, params, rtol=0, atol=0)


@requires_timm
@pytest.mark.parametrize("name", ["Lamb", "AdamP"])
@pytest.mark.parametrize("direction", ["timm_to_vitops", "vitops_to_timm"])
def test_state_dict_cross_loads_with_timm(name, direction):
    kwargs = {"lr": 1e-2, "weight_decay": 0.05}
    ours, theirs = OPTIMIZERS[name][0], getattr(timm_optim, name)
    first, second = (theirs, ours) if direction == "timm_to_vitops" else (ours, theirs)
    params, opt = run_steps(lambda p: first(p, **kwargs), 5)
    clone = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = second(clone, **kwargs)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    if name == "Lamb":
        assert float(opt2.param_groups[0]["step"]) == 5.0
    _continue(opt, params, 9)
    _continue(opt2, clone, 9)
    assert_params_close(clone, params)


# --- Lookahead -----------------------------------------------------------------------------------------------


@requires_timm
def test_lookahead_matches_timm():
    kwargs = {"lr": 1e-2, "weight_decay": 0.05}
    got, opt = run_steps(lambda p: Lookahead(Lamb(p, **kwargs), alpha=0.6, k=3), 14)
    want, _ = run_steps(lambda p: timm_optim.Lookahead(timm_optim.Lamb(p, foreach=False, **kwargs), alpha=0.6, k=3), 14)
    assert_params_close(got, want)
    assert opt.param_groups[0]["lookahead_step"] == 14
    state = opt.state_dict()
    assert any("lookahead_slow_buff" in s for s in state["state"].values())
    with pytest.raises(ValueError):
        Lookahead(Lamb(make_params()), alpha=1.5)


@pytest.mark.parametrize("cls", [Lamb, AdamP])
def test_lookahead_sync_on_a_skipped_step_changes_nothing(cls):
    """skip_nonfinite: a step the base optimizer skips leaves the slow and fast weights as they were when a sync
    falls on it (the sync would pull the fast weights back to the slow ones); the syncs of steps taken are those of
    skip_nonfinite=False, bit for bit."""
    runs = []
    for skip_nonfinite in (True, False):
        params = make_params()
        opt = Lookahead(cls(params, lr=1e-2, skip_nonfinite=skip_nonfinite), alpha=0.5, k=2)
        _continue(opt, params, 1, steps=4)  # syncs at steps 2 and 4
        runs.append((params, opt))
    (all_params, opt), (twin_params, twin_opt) = runs
    params, twin_params = ([p for p in ps if p.grad is not None] for ps in (all_params, twin_params))

    def equal(xs, ys):
        return [torch.equal(x, y) for x, y in zip(xs, ys)]

    def slow_weights(opt, params):
        return [opt.base_optimizer.state[p]["lookahead_slow_buff"].clone() for p in params]

    assert all(equal(params, twin_params))
    assert all(equal(slow_weights(opt, params), slow_weights(twin_opt, twin_params)))
    slow = slow_weights(opt, params)
    _continue(opt, all_params, 2, steps=1)  # step 5: no sync
    assert all(equal(slow, slow_weights(opt, params))) and not all(equal(params, slow))
    fast = [p.detach().clone() for p in params]
    params[0].grad[0, 0, 0, 0] = math.nan
    opt.step()  # step 6: skipped, and a sync
    assert float(opt.param_groups[0]["skipped_steps"]) == 1 and opt.param_groups[0]["lookahead_step"] == 6
    assert all(equal(params, fast)) and all(equal(slow, slow_weights(opt, params)))
    _continue(opt, all_params, 3, steps=2)  # step 8 syncs again
    assert all(equal(params, slow_weights(opt, params))) and not all(equal(slow, slow_weights(opt, params)))


def test_lookahead_decides_a_skipped_sync_on_the_device():
    """A sync on a step skip_nonfinite may skip reads nothing on the host: meta tensors, which have no values, go
    through."""
    params = [nn.Parameter(torch.empty(shape, device="meta")) for shape in SHAPES.values()]
    opt = Lookahead(Lamb(params, lr=1e-2, skip_nonfinite=True), k=1)
    for _ in range(2):
        for p in params:
            p.grad = torch.empty_like(p)
        opt.step()
    assert opt.param_groups[0]["lookahead_step"] == 2 and opt.param_groups[0]["skipped_steps"].is_meta


# --- argument checks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Lamb, AdamP])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": -1e-3},
        {"betas": (1.0, 0.999)},
        {"betas": (0.9, -0.1)},
        {"eps": -1e-8},
        {"weight_decay": -0.1},
        {"betas": (0.9, 1.0)},
    ],
    ids=["lr", "beta1", "beta2_negative", "eps", "weight_decay", "beta2_one"],
)
def test_bad_hyperparameters_raise(cls, kwargs):
    with pytest.raises(ValueError, match=r"vitops\.optim\."):
        cls([nn.Parameter(torch.randn(3))], **kwargs)


@pytest.mark.parametrize("cls", [Lamb, AdamP])
def test_complex_and_sparse_rejected(cls):
    with pytest.raises(ValueError, match="complex"):
        cls([nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="sparse"):
        cls([nn.Parameter(torch.randn(3, 3).to_sparse())])
    p = nn.Parameter(torch.randn(4, 3))
    opt = cls([p])
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


# --- the ops ------------------------------------------------------------------------------------------------

OPS = ("lamb_grad_sq_sums", "lamb_moments", "lamb_apply", "adamp_moments", "adamp_apply")
# lr, beta1, beta2, beta3, bias_correction1, bias_correction2, eps, weight_decay, decay_scale, decoupled_decay
LAMB_HYPER = (1e-2, 0.9, 0.999, 0.1, 0.5, 0.3, 1e-6, 0.01, 1e-2, False)
# bias_correction1, bias_correction2 (three params), lr, beta1, beta2, eps, weight_decay, delta, wd_ratio, nesterov
ADAMP_HYPER = ([0.5, 0.3, 0.2], [0.1, 0.05, 0.02], 1e-2, 0.9, 0.999, 1e-8, 0.1, 0.1, 0.1, True)


def step_lists(dtype=torch.float32, device="cpu", shapes=((5, 7), (33,), (2, 3, 4)), seed=0):
    """params, grads, exp_avgs, exp_avg_sqs."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(dtype).to(device) for s in shapes]
    grads = [torch.randn(s, generator=g).to(dtype).to(device) for s in shapes]
    m = [(torch.randn(s, generator=g) * 0.1).to(device) for s in shapes]
    v = [(torch.rand(s, generator=g) * 0.1).to(device) for s in shapes]
    return params, grads, m, v


def op_args(name, dtype=torch.float32, device="cpu", lists=None, lamb_hyper=LAMB_HYPER, adamp_hyper=ADAMP_HYPER):
    """Arguments of op `name` over `lists` (step_lists): LAMB with its clipping and layer adaptation, AdamP's apply
    with the sums of its moments (as if summed over ranks: a row more fails the channel-wise test)."""
    params, grads, m, v = lists if lists is not None else step_lists(dtype, device)
    if name == "lamb_grad_sq_sums":
        return (grads,)
    if name == "lamb_moments":
        grad_sq_sum = reference.lamb_grad_sq_sums(grads).sum() * 4  # max_grad_norm 1: the grads are clipped
        return (params, grads, m, v, grad_sq_sum, 1.0, *lamb_hyper, True)
    if name == "lamb_apply":
        sums = torch.rand(len(params), 2, generator=torch.Generator().manual_seed(1)).to(device) * 10
        return (params, m, v, sums, *lamb_hyper, False)
    if name == "adamp_moments":
        return (params, grads, m, v, *adamp_hyper)
    copies = [[t.clone() for t in ts] for ts in (params, grads, m, v)]
    row_coefs, tensor_sums = reference.adamp_moments(*copies, *adamp_hyper)
    return (params, grads, m, v, row_coefs, tensor_sums, [p.numel() for p in params], *adamp_hyper)


def _run_op(name, backend, args):
    with vitops.use_backend(backend):
        return getattr(torch.ops.vitops, name)(*args)


def _assert_op_close(got_args, want_args, got, want):
    """The lists an op updates in place, and its outputs: float32 to 1e-5, float16/bfloat16 to their resolution."""
    for k, (a, b) in enumerate(zip(got_args[:4], want_args[:4])):
        if not isinstance(a, list):
            continue
        for i, (x, y) in enumerate(zip(a, b)):
            tol = {"rtol": 1e-5, "atol": 1e-6} if x.dtype == torch.float32 else {}
            where = f"args[{k}][{i}] {tuple(x.shape)}"
            torch.testing.assert_close(x, y, **tol, msg=lambda m, where=where: f"{where}: {m}")
    for x, y in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(name, backend):
    if _backend.availability()[name]["cpu"][backend] is not None:
        pytest.skip(_backend.availability()[name]["cpu"][backend])
    with vitops.use_backend(backend):
        torch.library.opcheck(getattr(torch.ops.vitops, name), op_args(name))
        torch.library.opcheck(getattr(torch.ops.vitops, name), op_args(name, torch.bfloat16))


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_op_matches_reference(name, backend):
    if _backend.availability()[name]["cpu"][backend] is not None:
        pytest.skip(_backend.availability()[name]["cpu"][backend])
    got, want = op_args(name), op_args(name)
    _assert_op_close(got, want, _run_op(name, backend, got), getattr(reference, name)(*want))


def test_lamb_grad_sq_sums_spans_chunks_and_empty_grads():
    grads = [torch.randn(3 * 2**14 + 5), torch.zeros(0, 3), torch.randn(7, 3, 3, 3).bfloat16()]
    got = torch.ops.vitops.lamb_grad_sq_sums(grads)
    assert got.dtype == torch.float32 and got.shape == (3,) and got[1] == 0
    torch.testing.assert_close(got, reference.lamb_grad_sq_sums(grads), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", OPS)
def test_op_compiles_fullgraph(name):
    op = getattr(torch.ops.vitops, name)

    def step(*args):
        out = op(*args)
        return args[0][0] * 2, out

    got, want = op_args(name), op_args(name)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    doubled, out = compiled(*got)
    want_out = op(*want)
    _assert_op_close(got, want, out, want_out)
    torch.testing.assert_close(doubled, want[0][0] * 2)


@pytest.mark.parametrize("backend", ["cpu", "triton", "torch"])
def test_op_argument_errors_name_the_argument(backend):
    """Every backend raises the same kind of error, naming the argument: TypeError for a dtype, ValueError else."""
    if _backend.availability()["lamb_moments"]["cpu"][backend] is not None:
        pytest.skip(_backend.availability()["lamb_moments"]["cpu"][backend])
    args = list(op_args("lamb_moments"))
    args[2] = [m.double() for m in args[2]]
    with pytest.raises(TypeError, match=r"exp_avgs\[0\]"):
        _run_op("lamb_moments", backend, args)
    args = list(op_args("lamb_apply"))
    args[3] = args[3][:2]
    with pytest.raises(ValueError, match="sums must have shape"):
        _run_op("lamb_apply", backend, args)
    args = list(op_args("adamp_moments"))
    args[4] = [0.5]
    with pytest.raises(ValueError, match="bias_correction1"):
        _run_op("adamp_moments", backend, args)
    args = list(op_args("adamp_apply"))
    args[1] = [g.t() if g.ndim == 2 else g for g in args[1]]  # (5, 7) -> a non-contiguous (7, 5)
    with pytest.raises(ValueError, match=r"grads\[0\]"):
        _run_op("adamp_apply", backend, args)
    with pytest.raises(TypeError, match=r"grads\[1\]"):
        _run_op("lamb_grad_sq_sums", backend, ([torch.ones(2), torch.ones(2, dtype=torch.float64)],))


# --- the Triton multi-tensor kernels -----------------------------------------------------------------------

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: under the interpreter
requires_triton = pytest.mark.skipif(
    _backend.availability()["lamb_moments"][TRITON_DEVICE]["triton"] is not None,
    reason=str(_backend.availability()["lamb_moments"][TRITON_DEVICE]["triton"]),
)
MIXED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (shape, grad): many small tensors around a few that take several programs, dtypes interleaved (the kernels
# group them). "rows" / "layer": grads orthogonal to p per row / as a whole, so that AdamP projects.
MULTI_TENSOR_CASES = [
    ((2, 17000), "rows"),  # AdamP rows longer than a chunk: pieces of a row add up to its sums
    ((100, 300), "rows"),  # short rows, a tile of them at a time, over two chunks
    ((21000,), "random"),  # a 1-D param over two chunks
    ((200, 3), "rows"),  # rows shorter than a tile
    ((70, 3, 5), "layer"),
    ((0,), "random"),
    ((0, 4), "random"),  # a rank's empty shard of a 2-D param
    ((6, 1100), "rows"),  # rows just over a block
] + [((i % 7 + 1, i % 5 + 2), "random") if i % 3 else ((i % 9 + 1,), "random") for i in range(18)]


def multi_tensor_args(name, cases=MULTI_TENSOR_CASES, dtypes=MIXED_DTYPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params, grads, exp_avgs, exp_avg_sqs = [], [], [], []
    for i, (shape, grad_kind) in enumerate(cases):
        p = torch.randn(shape, generator=gen)
        g = torch.randn(shape, generator=gen)
        if grad_kind != "random":
            g = orthogonal_to(g, p, per_row=grad_kind == "rows")
        dtype = dtypes[i % len(dtypes)]
        params.append(p.to(dtype).to(TRITON_DEVICE))
        grads.append(g.to(dtype).to(TRITON_DEVICE))
        exp_avgs.append((torch.randn(shape, generator=gen) * 0.1).to(TRITON_DEVICE))
        exp_avg_sqs.append((torch.rand(shape, generator=gen) * 0.1).to(TRITON_DEVICE))
    bc1 = [0.1 + 0.8 * i / len(cases) for i in range(len(cases))]
    bc2 = [0.01 + 0.5 * i / len(cases) for i in range(len(cases))]
    adamp_hyper = (bc1, bc2, 1e-2, 0.9, 0.999, 1e-8, 0.1, 0.1, 0.1, False)
    return op_args(name, device=TRITON_DEVICE, lists=(params, grads, exp_avgs, exp_avg_sqs), adamp_hyper=adamp_hyper)


def assert_adamp_sums_close(got, want):
    """AdamP's per-param sums (g.p, g.g, p.p, p.q, failing rows). g.p of nearly orthogonal tensors cancels: it is
    compared within 1e-5 of |g| |p|, p.q within 1e-5 of the largest p.q; the failing rows exactly."""
    torch.testing.assert_close(got[:, 1:3], want[:, 1:3], rtol=1e-5, atol=0)
    assert ((got[:, 0] - want[:, 0]).abs() <= 1e-5 * (want[:, 1] * want[:, 2]).sqrt()).all(), (got[:, 0], want[:, 0])
    assert ((got[:, 3] - want[:, 3]).abs() <= 1e-5 * want[:, 3].abs().max()).all(), (got[:, 3], want[:, 3])
    assert torch.equal(got[:, 4], want[:, 4])


@requires_triton
@pytest.mark.parametrize("name", OPS)
def test_triton_multi_tensor_ops_match_reference(name):
    """One call over many small tensors, tensors of several programs (AdamP: rows longer than a chunk, and
    hundreds of short rows), empty ones, and float32, bfloat16 and float16 params together."""
    got, want = multi_tensor_args(name), multi_tensor_args(name)
    out, want_out = _run_op(name, "triton", got), getattr(reference, name)(*want)
    if name == "adamp_moments":
        torch.testing.assert_close(out[0], want_out[0], rtol=1e-4, atol=1e-6)
        assert_adamp_sums_close(out[1], want_out[1])
        out = want_out = None
    _assert_op_close(got, want, out, want_out)


@requires_triton
def test_triton_adamp_multi_tensor_projects():
    """The cases above do take AdamP's projections: per channel, also for rows split over chunks, and per layer."""
    args = multi_tensor_args("adamp_moments")
    for i, (shape, grad_kind) in enumerate(MULTI_TENSOR_CASES):
        p, g = args[0][i].float(), args[1][i].float()
        if grad_kind == "random":
            continue
        rows = p.shape[0] if grad_kind == "rows" else 1
        cos = torch.nn.functional.cosine_similarity(g.reshape(rows, -1), p.reshape(rows, -1), dim=1).abs()
        assert cos.max() < 0.1 / math.sqrt(p.numel() // rows), shape


@requires_triton
@pytest.mark.parametrize("name", OPS)
def test_triton_ops_are_deterministic(name):
    """No atomics: the sums are added in a fixed order, so two runs are bit-identical."""
    cases = [MULTI_TENSOR_CASES[0], MULTI_TENSOR_CASES[2]] + MULTI_TENSOR_CASES[-3:]  # sums over chunks, all dtypes
    first, second = multi_tensor_args(name, cases), multi_tensor_args(name, cases)
    out1, out2 = _run_op(name, "triton", first), _run_op(name, "triton", second)
    for a, b in zip(first[:4], second[:4]):
        for x, y in zip(a, b) if isinstance(a, list) else ():
            assert torch.equal(x, y)
    for x, y in zip(out1 if isinstance(out1, tuple) else (out1,), out2 if isinstance(out2, tuple) else (out2,)):
        assert x is None or torch.equal(x, y)


@requires_triton
@pytest.mark.parametrize("name", OPS)
def test_triton_launches_do_not_grow_with_tensor_count(name, monkeypatch):
    """Multi-tensor apply: 3 tensors or 30 (all three dtypes, 1-D and 2-D in both), the same kernel launches and
    the same torch ops."""
    from vitops.ops.triton import _multi_tensor, adamp, lamb

    launches = []

    class CountedKernel:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(self.kernel)
            return self.kernel[grid]

    for module, kernels in ((lamb, ("_lamb_sq_sum_kernel", "_lamb_moments_kernel", "_lamb_apply_kernel")),
                            (adamp, ("_adamp_kernel",)),
                            (_multi_tensor, ("_segment_sum_kernel",))):  # fmt: skip
        for kernel in kernels:
            monkeypatch.setattr(module, kernel, CountedKernel(getattr(module, kernel)))
    cases = [((i + 2, 3) if i % 6 < 3 else (i + 2,), "random") for i in range(30)]

    def counts(n):
        _run_op(name, "triton", multi_tensor_args(name, cases[:n]))  # plans are built and cached on first use
        args = multi_tensor_args(name, cases[:n])
        launches.clear()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _run_op(name, "triton", args)
        return len(launches), sum(event.name.startswith("aten::") for event in prof.events())

    few, many = counts(3), counts(30)
    assert few == many
    assert 0 < few[0] <= 6  # a kernel per dtype, and the segment sums


@requires_triton
@pytest.mark.parametrize("name", OPS)
def test_triton_ops_take_empty_tensors(name):
    """Lists of empty tensors: nothing to launch, zero sums."""
    args = multi_tensor_args(name, [((0,), "random"), ((0, 3), "random")])
    out = _run_op(name, "triton", args)
    for x in out if isinstance(out, tuple) else (out,):
        assert x is None or not x.any()


@requires_timm
@pytest.mark.parametrize("name", ["Lamb", "AdamP"])
def test_low_precision_timm_state_loads_as_float32(name):
    """timm keeps the moments of bfloat16 params in bfloat16; loaded into vitops they become float32, and the
    step runs."""
    kwargs = {"lr": 1e-2, "weight_decay": 0.05}
    ours, theirs = OPTIMIZERS[name][0], getattr(timm_optim, name)
    params, opt = run_steps(lambda p: theirs(p, **kwargs), 3, dtype=torch.bfloat16)
    assert any(s["exp_avg"].dtype == torch.bfloat16 for s in opt.state.values())
    clone = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = ours(clone, **kwargs)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for state in opt2.state.values():
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    _continue(opt2, clone, 9, steps=2)
    assert all(torch.isfinite(p).all() and p.dtype == torch.bfloat16 for p in clone)


@pytest.mark.slow  # 4.3 GB of bfloat16 grad, one pass: ~10 s
def test_grad_sum_of_squares_reaches_past_2_31_elements():
    """The CPU kernels' element offsets are 64-bit: a grad of 2^31 + 2048 elements is summed to its last element.
    (A whole step on such a param needs its float32 moments too, 26 GB with the param and grad: more than CI has;
    the step kernels share this chunk plan and its 64-bit offsets.)"""
    numel = 2**31 + 2048
    grad = torch.zeros(numel, dtype=torch.bfloat16)
    grad[:1024] = 1.0
    grad[-1024:] = 2.0  # past element 2^31: dropped if an offset wrapped at 32 bits
    with vitops.use_backend("cpu"):
        (total,) = torch.ops.vitops.lamb_grad_sq_sums([grad]).tolist()
    assert total == 1024 * 1.0 + 1024 * 4.0
