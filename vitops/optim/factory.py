"""create_optimizer: timm's create_optimizer_v2 (its arguments, defaults, names and param groups) that builds vitops'
Lamb and AdamP for every timm name whose math they implement, and leaves the other names to timm; and
register_with_timm, which puts those optimizers into timm's own registry."""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch import nn

from vitops.optim.adamp import AdamP
from vitops.optim.lamb import Lamb
from vitops.optim.lookahead import Lookahead

# timm 1.0's registry names whose math vitops implements, with timm's registry defaults for each. All of them take
# betas and eps and no momentum (timm's has_betas=True, has_eps=True, has_momentum=False). The caution variants run
# vitops' reference path, not the fused kernels.
FUSED_OPTIMIZERS: dict[str, tuple[type, dict[str, Any]]] = {
    "lamb": (Lamb, {}),
    "lambc": (Lamb, {"trust_clip": True}),
    "lambw": (Lamb, {"decoupled_decay": True}),
    "lambcw": (Lamb, {"trust_clip": True, "decoupled_decay": True}),
    "lambcd": (Lamb, {"decoupled_decay": True, "corrected_weight_decay": True}),
    "clamb": (Lamb, {"caution": True}),
    "clambw": (Lamb, {"caution": True, "decoupled_decay": True}),
    "adamp": (AdamP, {"wd_ratio": 0.01, "nesterov": True}),
    "cadamp": (AdamP, {"wd_ratio": 0.01, "nesterov": True, "caution": True}),
}


def param_groups_weight_decay(
    model: nn.Module,
    weight_decay: float = 1e-5,
    weight_decay_exclude_1d: bool = True,
    no_weight_decay_list: Collection[str] = (),
) -> list[dict[str, Any]]:
    """timm.optim.param_groups_weight_decay: the params that require grad, split into a group without weight decay
    (1-D and '.bias' params with weight_decay_exclude_1d, names matching a no_weight_decay_list fnmatch pattern, and
    all of them when weight_decay is 0) and one with it, in that order; an empty group is left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        excluded_1d = weight_decay_exclude_1d and (param.ndim <= 1 or name.endswith(".bias"))
        listed = any(fnmatch.fnmatch(name, pattern) for pattern in no_weight_decay_list)
        (no_decay if not weight_decay or excluded_1d or listed else decay).append(param)
    groups = []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    return groups


def create_optimizer(
    model_or_params,
    opt: str = "sgd",
    lr: float | None = None,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    foreach: bool | None = None,
    filter_bias_and_bn: bool = True,
    fallback_list: Collection[str] = (),
    fallback_no_weight_decay: bool = False,
    layer_decay: float | None = None,
    layer_decay_min_scale: float = 0.0,
    layer_decay_no_opt_scale: float | None = None,
    param_group_fn: Callable[[nn.Module], Iterable] | None = None,
    **kwargs,
) -> torch.optim.Optimizer:
    """timm.optim.create_optimizer_v2, with the same arguments, defaults and param groups, building vitops' fused
    optimizers for the names in FUSED_OPTIMIZERS ('lamb', 'lambc', 'lambw', 'lambcw', 'lambcd', 'clamb', 'clambw',
    'adamp', 'cadamp', with timm's registry defaults) and torch's AdamW for 'adamw' (fused when every param is on a
    CUDA device); any of them may be prefixed 'lookahead_'. Every other name is timm's: timm builds it (timm must be
    installed).

    Given a module, params are grouped as timm does: by param_group_fn if given, by timm's layer-wise decay if
    layer_decay is given (that needs timm), else into a group without weight decay (1-D params and biases with
    filter_bias_and_bn, the names in `model.no_weight_decay()`) and one with it. Given params or groups, they are
    passed through. Extra kwargs go to the optimizer; `momentum` is for the optimizers that take one (none here).

    Unlike timm, a name with another prefix than 'lookahead_' is refused: timm ignores it ('vitops_lamb' is timm's
    'lamb'). fallback_list and fallback_no_weight_decay (params for the fallback of timm's hybrid optimizers such as
    muon) go to timm with its names, and are refused for vitops' optimizers, which have no fallback.
    """
    name, lookahead = _parse_name(opt)
    if name not in FUSED_OPTIMIZERS and name != "adamw":
        return _create_with_timm(
            model_or_params, opt, lr=lr, weight_decay=weight_decay, momentum=momentum, foreach=foreach,
            filter_bias_and_bn=filter_bias_and_bn, fallback_list=fallback_list,
            fallback_no_weight_decay=fallback_no_weight_decay, layer_decay=layer_decay,
            layer_decay_min_scale=layer_decay_min_scale, layer_decay_no_opt_scale=layer_decay_no_opt_scale,
            param_group_fn=param_group_fn, **kwargs,
        )  # fmt: skip
    if fallback_list or fallback_no_weight_decay:
        raise ValueError(
            f"vitops.optim.create_optimizer: fallback_list and fallback_no_weight_decay pick params for the fallback "
            f"optimizer of timm's hybrid optimizers (such as muon); {opt!r} has none"
        )
    if isinstance(model_or_params, nn.Module):
        params = _param_groups(
            model_or_params, weight_decay, filter_bias_and_bn, layer_decay, layer_decay_min_scale,
            layer_decay_no_opt_scale, param_group_fn,
        )  # fmt: skip
        if param_group_fn is None:
            weight_decay = 0.0  # in the groups
    else:
        params = model_or_params
    args: dict[str, Any] = {"weight_decay": weight_decay, **kwargs}
    if lr is not None:
        args["lr"] = lr
    if name == "adamw":
        optimizer = _adamw(params, args, foreach)
    else:
        cls, defaults = FUSED_OPTIMIZERS[name]
        for key, value in defaults.items():
            args.setdefault(key, value)
        if foreach is not None:
            args.setdefault("foreach", foreach)
        optimizer = cls(params, **args)
    return Lookahead(optimizer) if lookahead else optimizer


def register_with_timm(prefix: str = "vitops") -> list[str]:
    """Registers vitops' fused optimizers in timm's optimizer registry as `prefix` + timm's name ('vitopslamb',
    'vitopslambc', 'vitopslambw', 'vitopslambcw', 'vitopslambcd', 'vitopsclamb', 'vitopsclambw', 'vitopsadamp',
    'vitopscadamp'), each with timm's defaults for that name, and returns the names. timm's own factory then builds
    them: `timm.optim.create_optimizer_v2(model, "vitopslamb")`, `"lookahead_vitopslamb"`, and timm's train.py with
    `--opt vitopslamb`. prefix="" replaces timm's entries instead, so that `--opt lamb` builds vitops' Lamb.

    timm reads a name as '[lookahead_]<registered name>' and drops any other part before an '_' (`--opt vitops_lamb`
    would build timm's own Lamb), so the prefix can't hold one. timm has no plugin entry point for optimizers; the
    swap-in is one line in timm's train.py, anywhere before it creates the optimizer:

        import vitops.optim; vitops.optim.register_with_timm()

    or, leaving train.py untouched, a launcher beside it that registers first and then runs it with the same
    arguments (`python train_vitops.py --opt vitopslamb ...`, or under torchrun):

        # train_vitops.py
        import runpy
        import vitops.optim
        vitops.optim.register_with_timm()
        runpy.run_path("train.py", run_name="__main__")
    """
    if "_" in prefix:
        raise ValueError(
            f"vitops.optim.register_with_timm: prefix must not contain '_' (timm drops every part of an optimizer "
            f"name before the last '_'), got {prefix!r}"
        )
    from timm.optim import OptimInfo, get_optimizer_info
    from timm.optim._optim_factory import default_registry  # the registry create_optimizer_v2 reads

    names = []
    for name, (cls, defaults) in FUSED_OPTIMIZERS.items():
        info = OptimInfo(
            name=prefix + name,
            opt_class=cls,
            description=f"vitops' fused {cls.__name__}, as timm's {name!r}",
            has_betas=True,
            defaults=dict(defaults) or None,
        )
        try:
            registered = get_optimizer_info(info.name) == info
        except ValueError:  # not registered yet
            registered = False
        if not registered:
            default_registry.register(info)
        names.append(info.name)
    return names


def _parse_name(opt: str) -> tuple[str, bool]:
    parts = opt.lower().split("_")
    lookahead = len(parts) == 2 and parts[0] == "lookahead"
    if len(parts) > 2 or (len(parts) == 2 and not lookahead):
        raise ValueError(
            f"vitops.optim.create_optimizer: {opt!r}: the only prefix understood is 'lookahead_' (timm would drop "
            f"{'_'.join(parts[:-1])!r} and build its own {parts[-1]!r}); vitops' optimizers are "
            f"{', '.join(FUSED_OPTIMIZERS)} and adamw"
        )
    return parts[-1], lookahead


def _create_with_timm(model_or_params, opt: str, **arguments) -> torch.optim.Optimizer:
    try:
        from timm.optim import create_optimizer_v2
    except ImportError:
        raise ImportError(
            f"vitops.optim.create_optimizer: {opt!r} is not one of vitops' optimizers ({', '.join(FUSED_OPTIMIZERS)}, "
            "adamw, optionally prefixed 'lookahead_'); timm builds the others: pip install timm"
        ) from None
    return create_optimizer_v2(model_or_params, opt, **arguments)


def _param_groups(
    model: nn.Module,
    weight_decay: float,
    filter_bias_and_bn: bool,
    layer_decay: float | None,
    layer_decay_min_scale: float,
    layer_decay_no_opt_scale: float | None,
    param_group_fn: Callable[[nn.Module], Iterable] | None,
):
    """timm's create_optimizer_v2 grouping, in its order of precedence."""
    if param_group_fn is not None:
        return param_group_fn(model)
    no_weight_decay = getattr(model, "no_weight_decay", lambda: set())()
    if layer_decay is None:
        return param_groups_weight_decay(model, weight_decay, filter_bias_and_bn, no_weight_decay)
    try:
        from timm.optim import param_groups_layer_decay
    except ImportError:
        raise ImportError(
            "vitops.optim.create_optimizer: layer_decay groups params by layer with timm's group_matcher machinery: "
            "pip install timm"
        ) from None
    return param_groups_layer_decay(
        model,
        weight_decay=weight_decay,
        no_weight_decay_list=no_weight_decay,
        weight_decay_exclude_1d=filter_bias_and_bn,
        layer_decay=layer_decay,
        min_scale=layer_decay_min_scale,
        no_opt_scale=layer_decay_no_opt_scale,
    )


def _adamw(params, args: dict[str, Any], foreach: bool | None) -> torch.optim.AdamW:
    """torch's AdamW, fused when every param is on a CUDA device (whose fused kernel refuses params and grads of
    different layouts). torch's fused CPU kernel silently computes wrong updates when a param's strides differ from
    its grad's (a transposed or sliced param, hand-set grads, a channels_last conversion after the first step), so
    CPU params keep torch's default implementation, as timm's 'adamw' does."""
    if foreach is not None:
        args.setdefault("foreach", foreach)
    groups = _listed_groups(params)
    if "fused" not in args and "foreach" not in args and all(p.is_cuda for g in groups for p in g["params"]):
        args["fused"] = True
    return torch.optim.AdamW(groups, **args)


def _listed_groups(params) -> list[dict[str, Any]]:
    """params (an iterable of tensors or of param groups) as torch.optim makes them, groups holding lists of tensors,
    to be looked at before the optimizer takes them (an iterator can be read once)."""
    if isinstance(params, torch.Tensor):
        raise TypeError(f"params must be an iterable of tensors or of param groups, got a {torch.typename(params)}")
    params = list(params)
    if not params or not isinstance(params[0], dict):
        params = [{"params": params}]
    return [
        dict(group, params=[group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"]))
        for group in params
    ]
