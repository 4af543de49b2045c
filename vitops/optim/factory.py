"""create_optimizer: timm's create_optimizer_v2 conventions for vitops' optimizers."""
from __future__ import annotations

import fnmatch
from typing import Any, Iterable

import torch
from torch import nn

from vitops.optim.adamp import AdamP
from vitops.optim.lamb import Lamb
from vitops.optim.lookahead import Lookahead

# name -> (class or factory, defaults timm's registry adds)
_OPTIMIZERS = {
    "lamb": (Lamb, {}),
    "adamp": (AdamP, {"wd_ratio": 0.01, "nesterov": True}),
    "adamw": (torch.optim.AdamW, {"fused": True}),
}


def param_groups_weight_decay(
    model: nn.Module, weight_decay: float, no_weight_decay_list: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """timm's split: no weight decay for 1-D params, '.bias' params and names matching no_weight_decay_list
    (fnmatch patterns); params that don't require grad are left out."""
    patterns = tuple(no_weight_decay_list)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim <= 1 or name.endswith(".bias") or any(fnmatch.fnmatch(name, p) for p in patterns)
        (no_decay if skip else decay).append(param)
    groups = []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    return groups


def create_optimizer(
    model_or_params,
    opt: str = "lamb",
    lr: float | None = None,
    weight_decay: float = 0.0,
    filter_bias_and_bn: bool = True,
    **kwargs,
) -> torch.optim.Optimizer:
    """An optimizer by name: 'lamb', 'adamp' (timm's registry defaults wd_ratio=0.01, nesterov=True), 'adamw'
    (torch's fused AdamW), each optionally prefixed 'lookahead_'. Given a module with weight decay, 1-D params,
    biases and the names in `model.no_weight_decay()` get none (timm's convention); given params or groups, they
    are passed through. Extra kwargs go to the optimizer."""
    parts = opt.lower().split("_")
    name = parts[-1]
    lookahead = len(parts) > 1 and parts[0] == "lookahead"
    if name not in _OPTIMIZERS or (len(parts) > 1 and not lookahead) or len(parts) > 2:
        raise ValueError(
            f"vitops.optim.create_optimizer: unknown optimizer {opt!r}; choose lamb, adamp or adamw, optionally "
            "prefixed lookahead_"
        )
    if isinstance(model_or_params, nn.Module):
        if weight_decay and filter_bias_and_bn:
            no_wd = getattr(model_or_params, "no_weight_decay", lambda: set())()
            params = param_groups_weight_decay(model_or_params, weight_decay, no_wd)
            weight_decay = 0.0
        else:
            params = [p for p in model_or_params.parameters() if p.requires_grad]
    else:
        params = model_or_params
    cls, defaults = _OPTIMIZERS[name]
    args: dict[str, Any] = {"weight_decay": weight_decay, **kwargs}
    if lr is not None:
        args["lr"] = lr
    for key, value in defaults.items():
        args.setdefault(key, value)
    optimizer = cls(params, **args)
    return Lookahead(optimizer) if lookahead else optimizer
