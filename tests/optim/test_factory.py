"""vitops.optim.create_optimizer and register_with_timm, called as timm users call timm's create_optimizer_v2 (its
argument order, defaults and names) and compared with what timm itself builds: param groups, hyperparameters and
updates."""
import copy
import logging
import sys
from argparse import Namespace

import pytest
import torch
from torch import nn

import vitops
from vitops.optim import AdamP, Lamb, Lookahead, create_optimizer, param_groups_weight_decay, register_with_timm
from vitops.optim.factory import FUSED_OPTIMIZERS

try:
    import timm.optim as timm_optim
    from timm.optim._optim_factory import default_registry as timm_registry
except ImportError:
    timm_optim = None

requires_timm = pytest.mark.skipif(timm_optim is None, reason="timm is not installed")


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        self.pos = nn.Parameter(torch.zeros(1, 8))
        self.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)

    def no_weight_decay(self):
        return {"pos"}

    def forward(self, x):
        return self.head(self.bn(self.conv(x).relu()).mean((2, 3)) + self.pos)


def tiny_net():
    torch.manual_seed(0)
    return TinyNet()


def train(model, optimizer, steps=3):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 6, 6, generator=gen)).square().mean().backward()
        optimizer.step()


def named_groups(model, optimizer):
    """Each param group as (param names, the other entries): comparable across two copies of a model."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [
        ([names[id(p)] for p in group["params"]], {k: v for k, v in group.items() if k != "params"})
        for group in optimizer.param_groups
    ]


def assert_same_as_timm(name, steps=3, **kwargs):
    """vitops' and timm's optimizer for `name`: same type family, param groups and hyperparameters, and the same
    params after a few steps."""
    model, ref_model = tiny_net(), tiny_net()
    got = create_optimizer(model, name, **kwargs)
    want = timm_optim.create_optimizer_v2(ref_model, name, **kwargs)
    assert named_groups(model, got) == named_groups(ref_model, want)
    train(model, got, steps)
    train(ref_model, want, steps)
    for (key, a), b in zip(model.state_dict().items(), ref_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(model.conv.weight, tiny_net().conv.weight)
    return got, want


TIMM_CLASSES = {Lamb: "Lamb", AdamP: "AdamP"}


@requires_timm
@pytest.mark.parametrize("name", list(FUSED_OPTIMIZERS))
def test_every_fused_name_is_timms(name):
    """Each name vitops builds is timm's, with timm's registry defaults: vitops' class where timm has its own."""
    cls, defaults = FUSED_OPTIMIZERS[name]
    info = timm_optim.get_optimizer_info(name)
    assert info.opt_class is getattr(timm_optim, TIMM_CLASSES[cls])
    assert (info.defaults or {}) == defaults and info.has_betas and info.has_eps and not info.has_momentum
    got, want = assert_same_as_timm(name, lr=1e-2, weight_decay=0.05)
    assert type(got) is cls and type(want) is info.opt_class


@requires_timm
def test_the_names_vitops_builds_are_all_timms_lamb_and_adamp_names():
    timm_names = {n for n in timm_optim.list_optimizers() if timm_optim.get_optimizer_info(n).opt_class in
                  (timm_optim.Lamb, timm_optim.AdamP)}  # fmt: skip
    assert timm_names == set(FUSED_OPTIMIZERS)


@requires_timm
@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("lamb", dict()),  # every default: lr and weight decay the optimizer's, one group
        ("lamb", dict(lr=2e-3, weight_decay=0.05, filter_bias_and_bn=False)),
        ("lambw", dict(lr=2e-3, weight_decay=0.05, betas=(0.8, 0.99), eps=1e-8, momentum=0.5)),
        ("adamp", dict(lr=1e-2, weight_decay=0.0)),
        ("lookahead_lambc", dict(lr=1e-2, weight_decay=0.05)),
        ("LookAhead_AdamP", dict(lr=1e-2, weight_decay=0.05)),
        ("adamw", dict(lr=1e-2, weight_decay=0.05)),
        ("lookahead_adamw", dict(lr=1e-2)),
        ("lamb", dict(lr=1e-2, weight_decay=0.05, foreach=True)),
    ],
)
def test_timm_arguments(name, kwargs):
    got, _ = assert_same_as_timm(name, steps=7, **kwargs)
    assert isinstance(got, Lookahead) == name.lower().startswith("lookahead_")


@requires_timm
def test_timm_positional_order():
    """create_optimizer_v2(model, opt, lr, weight_decay, momentum, foreach, filter_bias_and_bn, ...)."""
    model, ref_model = tiny_net(), tiny_net()
    got = create_optimizer(model, "lamb", 1e-2, 0.05, 0.9, None, False)
    want = timm_optim.create_optimizer_v2(ref_model, "lamb", 1e-2, 0.05, 0.9, None, False)
    assert named_groups(model, got) == named_groups(ref_model, want)


@requires_timm
def test_default_name_and_other_names_are_built_by_timm():
    """Names whose math vitops doesn't implement are timm's, built by timm (timm's default 'sgd' among them)."""
    model, ref_model = tiny_net(), tiny_net()
    cases = [((), dict(lr=0.1)), (("adam",), dict(lr=1e-3)), (("lookahead_nadamw",), dict(weight_decay=0.1))]
    for args, kwargs in cases:
        got = create_optimizer(model, *args, **kwargs)
        want = timm_optim.create_optimizer_v2(ref_model, *args, **kwargs)
        assert type(got) is type(want)
        assert named_groups(model, got) == named_groups(ref_model, want)
    assert type(create_optimizer(model, lr=0.1)) is torch.optim.SGD
    with pytest.raises(ValueError, match="sgdx"):  # timm's own refusal
        create_optimizer(model, "sgdx")


def test_unknown_prefix_is_refused():
    """timm reads 'vitops_lamb' as its own 'lamb'; vitops refuses it rather than guess."""
    with pytest.raises(ValueError, match="only prefix understood is 'lookahead_'.*timm would drop 'vitops'"):
        create_optimizer(tiny_net(), "vitops_lamb")
    with pytest.raises(ValueError, match="lookahead_"):
        create_optimizer(tiny_net(), "lookahead_lookahead_lamb")


def test_fallback_params_are_refused_for_vitops_optimizers():
    with pytest.raises(ValueError, match="fallback_list"):
        create_optimizer(tiny_net(), "lamb", weight_decay=0.05, fallback_list=["head.*"])
    with pytest.raises(ValueError, match="fallback_no_weight_decay"):
        create_optimizer(tiny_net(), "adamp", fallback_no_weight_decay=True)


def test_param_groups_without_timm():
    """timm's grouping, checked by hand: no weight decay for 1-D params, biases and no_weight_decay() names; frozen
    params left out; everything in one group without decay at weight_decay 0."""
    model = tiny_net()
    opt = create_optimizer(model, "lamb", lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, Lamb)
    groups = named_groups(model, opt)
    assert [names for names, _ in groups] == [["pos", "conv.bias", "bn.weight", "bn.bias", "head.bias"],
                                              ["conv.weight", "head.weight"]]  # fmt: skip
    assert [entries["weight_decay"] for _, entries in groups] == [0.0, 0.05]
    no_filter = param_groups_weight_decay(model, 0.05, False, ["pos"])
    assert [len(g["params"]) for g in no_filter] == [1, 6] and no_filter[0]["params"][0] is model.pos
    assert param_groups_weight_decay(model, 0.0) == [{"params": [p for p in model.parameters() if p.requires_grad],
                                                      "weight_decay": 0.0}]  # fmt: skip
    given = [{"params": [model.conv.weight], "lr": 0.5}, {"params": iter([model.head.weight])}]
    opt = create_optimizer(given, "adamp", lr=1e-3, weight_decay=0.05)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 1e-3] and opt.defaults["wd_ratio"] == 0.01
    custom = create_optimizer(model, "lamb", weight_decay=0.1, param_group_fn=lambda m: [{"params": [m.pos]}])
    assert custom.param_groups[0]["weight_decay"] == 0.1  # passed to the optimizer, as timm does


@requires_timm
def test_layer_decay_and_param_group_fn_as_timm():
    model, ref_model = (vitops.create_model("vit_tiny_patch16_224", depth=2) for _ in range(2))
    ref_model.load_state_dict(model.state_dict())
    for kwargs in (dict(layer_decay=0.75, weight_decay=0.05, lr=1e-3, layer_decay_min_scale=0.2),
                   dict(param_group_fn=lambda m: [{"params": list(m.blocks.parameters()), "lr": 1e-4}],
                        weight_decay=0.05)):  # fmt: skip
        got = create_optimizer(model, "lambc", **kwargs)
        want = timm_optim.create_optimizer_v2(ref_model, "lambc", **kwargs)
        assert named_groups(model, got) == named_groups(ref_model, want)
    assert len(got.param_groups) == 1


def test_without_timm(monkeypatch):
    """vitops' own names need no timm; the others, and layer_decay, say that they do."""
    monkeypatch.setitem(sys.modules, "timm.optim", None)
    model = tiny_net()
    assert isinstance(create_optimizer(model, "lookahead_clambw", lr=1e-3), Lookahead)
    with pytest.raises(ImportError, match="'sgd' is not one of vitops' optimizers.*pip install timm"):
        create_optimizer(model)
    with pytest.raises(ImportError, match="layer_decay.*pip install timm"):
        create_optimizer(model, "lamb", layer_decay=0.7)


# --- AdamW: torch's fused CPU kernel is wrong for params whose strides differ from their grads' -----------------


def non_contiguous_params():
    torch.manual_seed(0)
    return [
        nn.Parameter(torch.randn(5, 7).t()),
        nn.Parameter(torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)),
        nn.Parameter(torch.randn(6, 8)[:, ::2]),
        nn.Parameter(torch.randn(9)),
    ]


def adamw_steps(make_optimizer, steps=3):
    params = non_contiguous_params()
    opt = make_optimizer(params)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)  # contiguous grads, unlike three of the params
        opt.step()
    return params, opt


def test_adamw_non_contiguous_params_on_cpu():
    """The regression: after 3 steps at lr 0.1, torch's fused CPU AdamW is ~0.5 off; create_optimizer is exact."""
    want, _ = adamw_steps(lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.05, foreach=False))
    got, opt = adamw_steps(lambda p: create_optimizer(p, "adamw", lr=0.1, weight_decay=0.05))
    assert not opt.defaults["fused"]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if timm_optim is not None:
        timm_params, _ = adamw_steps(lambda p: timm_optim.create_optimizer_v2(p, "adamw", lr=0.1, weight_decay=0.05))
        for a, b in zip(got, timm_params, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    fused, _ = adamw_steps(lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.05, fused=True))
    assert max((a - b).abs().max() for a, b in zip(fused, want, strict=True)) > 0.1  # what the test guards against


def test_adamw_keeps_the_callers_implementation_choice():
    params = [nn.Parameter(torch.randn(3, 3))]
    assert create_optimizer(params, "adamw", fused=True).defaults["fused"]
    assert create_optimizer(params, "adamw", foreach=True).defaults["foreach"]
    with pytest.raises(TypeError, match="iterable"):
        create_optimizer(params[0], "adamw")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adamw_is_fused_on_cuda():
    model = copy.deepcopy(tiny_net()).cuda()
    opt = create_optimizer(model, "adamw", lr=1e-2, weight_decay=0.05)
    assert opt.defaults["fused"]
    ref_model = copy.deepcopy(tiny_net()).cuda()
    ref = torch.optim.AdamW(param_groups_weight_decay(ref_model, 0.05, True, ["pos"]), lr=1e-2, foreach=False)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for m, o in ((model, opt), (ref_model, ref)):
        gen.manual_seed(1)
        for _ in range(3):
            o.zero_grad()
            m(torch.randn(4, 3, 6, 6, device="cuda", generator=gen)).square().mean().backward()
            o.step()
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- register_with_timm ------------------------------------------------------------------------------------------


@pytest.fixture
def timm_registry_restored():
    saved = dict(timm_registry._optimizers)
    yield
    timm_registry._optimizers.clear()
    timm_registry._optimizers.update(saved)


@requires_timm
def test_register_with_timm(timm_registry_restored, caplog):
    names = register_with_timm()
    assert names == ["vitops" + name for name in FUSED_OPTIMIZERS]
    model, ref_model = tiny_net(), tiny_net()
    # as timm's train.py does it: create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    args = Namespace(opt="vitopslambw", lr=1e-2, weight_decay=0.05, momentum=0.9, opt_eps=None, opt_betas=None)
    got = timm_optim.create_optimizer_v2(model, **timm_optim.optimizer_kwargs(cfg=args))
    want = timm_optim.create_optimizer_v2(ref_model, **timm_optim.optimizer_kwargs(cfg=Namespace(**{**vars(args),
                                                                                                 "opt": "lambw"})))
    assert type(got) is Lamb and type(want) is timm_optim.Lamb
    assert named_groups(model, got) == named_groups(ref_model, want)
    wrapped = timm_optim.create_optimizer_v2(model, "lookahead_vitopscadamp", lr=1e-3)
    assert type(wrapped) is timm_optim.Lookahead and type(wrapped._base_optimizer) is AdamP
    assert wrapped.defaults["caution"] and wrapped.defaults["wd_ratio"] == 0.01
    with caplog.at_level(logging.WARNING):
        assert register_with_timm() == names
    assert not caplog.records  # registering again changes nothing
    assert type(timm_optim.create_optimizer_v2(model, "lamb")) is timm_optim.Lamb  # timm's own names untouched


@requires_timm
def test_register_with_timm_replacing_timms_names(timm_registry_restored):
    register_with_timm(prefix="")
    model = tiny_net()
    assert type(timm_optim.create_optimizer_v2(model, "lamb")) is Lamb
    assert timm_optim.create_optimizer_v2(model, "lambc").defaults["trust_clip"]
    with pytest.raises(ValueError, match="must not contain '_'"):
        register_with_timm(prefix="vitops_")
