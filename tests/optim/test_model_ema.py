"""vitops.utils.ModelEma called as timm users call timm.utils.ModelEmaV3 (its argument order, names and defaults),
compared with ModelEmaV3 step by step, bit for bit."""
import inspect

import pytest
import torch
from torch import nn

from tests.optim.test_factory import TinyNet
from vitops.utils import ModelEma

try:
    from timm.utils import ModelEmaV3
except ImportError:
    ModelEmaV3 = None

requires_timm = pytest.mark.skipif(ModelEmaV3 is None, reason="timm is not installed")


def train_with_emas(emas, steps=8, dtype=torch.float32, step_offset=0):
    """Trains a TinyNet of `dtype` with SGD, updating each EMA (made from the model by a factory) after every step."""
    torch.manual_seed(0)
    model = TinyNet().to(dtype)
    emas = [make(model) for make in emas]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        opt.zero_grad()
        model(torch.randn(2, 3, 6, 6, generator=gen).to(dtype)).float().sum().backward()
        opt.step()
        for ema in emas:
            ema.update(model, step=step + step_offset)
    return model, emas


def test_signature_is_timms():
    # `warmup`, keyword-only, is the deprecated name of use_warmup
    ours = [p for p in inspect.signature(ModelEma).parameters.values() if p.name != "warmup"]
    if ModelEmaV3 is not None:
        theirs = list(inspect.signature(ModelEmaV3).parameters.values())
        assert [(p.name, p.default, p.kind) for p in ours] == [(p.name, p.default, p.kind) for p in theirs]
    assert [p.name for p in ours[:5]] == ["model", "decay", "min_decay", "update_after_step", "use_warmup"]
    assert ours[1].default == 0.9999


CONFIGS = {
    "defaults": dict(),
    "positional": (0.99, 0.5, 2, True, 1.5, 0.75),  # decay, min_decay, update_after_step, use_warmup, gamma, power
    "warmup": dict(decay=0.99, use_warmup=True),
    "warmup_min_decay": dict(decay=0.999, use_warmup=True, min_decay=0.9, update_after_step=3, warmup_power=0.75),
    "exclude_buffers": dict(decay=0.9, exclude_buffers=True),
    "per_tensor": dict(decay=0.9, foreach=False),
    "device_string": dict(decay=0.9, device="cpu"),  # timm then updates tensor by tensor
    "bfloat16_ema": dict(decay=0.99, dtype=torch.bfloat16),  # stochastic rounding, mixed dtypes
    "bfloat16_ema_per_tensor": dict(decay=0.99, dtype=torch.bfloat16, foreach=False, stochastic_rounding_seed=3),
    "bfloat16_ema_nearest": dict(decay=0.99, dtype=torch.bfloat16, stochastic_rounding=False),
    "float32_ema": dict(decay=0.99, dtype=torch.float32),  # of a bfloat16 model below
    "float32_ema_per_tensor": dict(decay=0.99, dtype=torch.float32, foreach=False),  # lerp, not multiply-add
}


@requires_timm
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_timm_model_ema_v3(config):
    args = CONFIGS[config]
    call = (lambda cls: lambda m: cls(m, *args)) if isinstance(args, tuple) else (lambda cls: lambda m: cls(m, **args))
    model_dtype = torch.float32
    if config in ("float32_ema", "float32_ema_per_tensor", "bfloat16_ema_nearest"):
        model_dtype = torch.bfloat16
    model, (ours, theirs) = train_with_emas([call(ModelEma), call(ModelEmaV3)], dtype=model_dtype)
    for attribute in ("decay", "min_decay", "update_after_step", "use_warmup", "warmup_gamma", "warmup_power",
                      "foreach", "device", "dtype", "stochastic_rounding", "exclude_buffers"):  # fmt: skip
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    for step in (None, 0, 1, 2, 5, 100, 10**6):
        assert ours.get_decay(step) == theirs.get_decay(step)
    state, want = ours.module.state_dict(), theirs.module.state_dict()
    for key, value in want.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    assert not torch.equal(state["conv.weight"].float(), model.conv.weight.float())
    assert torch.equal(state["bn.num_batches_tracked"], model.bn.num_batches_tracked)
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_ema_without_timm():
    """The formula by hand: the decay schedule, a lerp per step, buffers copied, and set()."""
    decay = 0.9
    _, (ema,) = train_with_emas([lambda m: ModelEma(m, decay)], steps=1, step_offset=5)
    torch.manual_seed(0)
    start = TinyNet()
    model, _ = train_with_emas([], steps=1)
    want = start.conv.weight + (model.conv.weight - start.conv.weight) * (1 - decay)
    torch.testing.assert_close(ema.module.conv.weight, want)
    assert not ema.module.conv.weight.requires_grad
    warm = ModelEma(model, decay=0.99, use_warmup=True, update_after_step=2, min_decay=0.1)
    assert [warm.get_decay(s) for s in (None, 0, 3)] == [0.99, 0.0, 0.0]
    assert warm.get_decay(4) == max(1 - 2 ** (-2 / 3), 0.1) and warm.get_decay(10**9) == 0.99
    ema.set(model)
    assert torch.equal(ema.module.conv.weight, model.conv.weight)
    with pytest.raises(ValueError, match="decay"):
        ModelEma(model, decay=1.5)
    with pytest.raises(ValueError, match="the model has 2 state_dict entries and the EMA 11"):
        ema.update(nn.Linear(2, 2))


def test_bfloat16_ema_keeps_updates_below_its_resolution():
    """An EMA moving by far less than a bfloat16 ulp per step: stochastic rounding tracks the float32 EMA, round to
    nearest stays where it started."""
    torch.manual_seed(0)
    start, target = nn.Linear(64, 64), nn.Linear(64, 64)
    with torch.no_grad():
        start.weight.uniform_(4, 6)  # bfloat16 spacing 1/32 here; each step moves the EMA by ~1/1000
        target.weight.copy_(start.weight + 1.0)
    emas = {
        "rounded": ModelEma(start, decay=0.999, dtype=torch.bfloat16),
        "nearest": ModelEma(start, decay=0.999, dtype=torch.bfloat16, stochastic_rounding=False),
        "float32": ModelEma(start, decay=0.999),
    }
    for _ in range(200):
        for ema in emas.values():
            ema.update(target)
    moved = {name: (ema.module.weight.float() - start.weight.to(torch.bfloat16).float()).mean().item()
             for name, ema in emas.items()}  # fmt: skip
    assert abs(moved["float32"] - (1 - 0.999**200)) < 1e-3  # ~0.181
    assert abs(moved["rounded"] - moved["float32"]) < 0.01
    assert moved["nearest"] == 0.0


def test_deprecated_warmup_keyword_still_works():
    model = nn.Linear(3, 2)
    with pytest.warns(DeprecationWarning, match="use_warmup"):
        ema = ModelEma(model, warmup=True)
    assert ema.use_warmup
