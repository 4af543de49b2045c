"""Model registry: names -> entrypoint functions and their pretrained configs, with timm's lookup functions."""
from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Callable, Iterable

_model_entrypoints: dict[str, Callable] = {}
_model_to_module: dict[str, str] = {}
_model_default_cfgs: dict[str, dict] = {}  # arch name -> default pretrained cfg (with 'tag')


def pretrained_cfg(url: str = "", **kwargs) -> dict:
    """A pretrained config with timm's keys; each model family fixes its own values with functools.partial."""
    return {
        "url": url,
        "hf_hub_id": "timm/",
        "file": None,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "fixed_input_size": False,
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        **kwargs,
    }


def register_pretrained_cfgs(cfgs: dict[str, dict]) -> None:
    """Records pretrained configs keyed 'arch.tag' (or 'arch'); the first given for an arch is its default."""
    for full_name, cfg in cfgs.items():
        arch, _, tag = full_name.partition(".")
        if arch in _model_default_cfgs:
            continue
        cfg = dict(cfg)
        cfg.setdefault("tag", tag)
        cfg.setdefault("architecture", arch)
        _model_default_cfgs[arch] = cfg


def register_model(fn: Callable) -> Callable:
    """Decorator: registers `fn` under its function name as a model entrypoint `fn(pretrained=False, **kwargs)`."""
    name = fn.__name__
    if name in _model_entrypoints:
        raise ValueError(f"vitops.models: a model named {name!r} is already registered")
    _model_entrypoints[name] = fn
    _model_to_module[name] = fn.__module__.split(".")[-1]
    return fn


def split_model_name_tag(model_name: str) -> tuple[str, str]:
    arch, _, tag = model_name.partition(".")
    return arch, tag


def _natural_key(name: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name.lower())]


def _has_pretrained(arch: str) -> bool:
    cfg = _model_default_cfgs.get(arch, {})
    return bool(cfg.get("url") or cfg.get("hf_hub_id") or cfg.get("file"))


def list_models(
    filter: str | Iterable[str] = "",
    pretrained: bool = False,
    exclude_filters: str | Iterable[str] = (),
    module: str = "",
) -> list[str]:
    """Registered model names matching any fnmatch pattern in `filter` (all if empty), minus those matching any of
    `exclude_filters`; with `pretrained`, only those with pretrained weights (names then carry their tag, as timm)."""
    names = [n for n in _model_entrypoints if not module or _model_to_module[n] == module]
    if pretrained:
        names = [n for n in names if _has_pretrained(n)]

    def full_name(n: str) -> str:
        tag = _model_default_cfgs.get(n, {}).get("tag")
        return f"{n}.{tag}" if pretrained and tag else n

    def matches(n: str, patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(full_name(n), p) for p in patterns)

    if filter:
        names = [n for n in names if matches(n, [filter] if isinstance(filter, str) else list(filter))]
    if exclude_filters:
        excludes = [exclude_filters] if isinstance(exclude_filters, str) else list(exclude_filters)
        names = [n for n in names if not matches(n, excludes)]
    return sorted((full_name(n) for n in names), key=_natural_key)


def is_model(model_name: str) -> bool:
    return split_model_name_tag(model_name)[0] in _model_entrypoints


def close_matches(model_name: str, n: int = 5) -> list[str]:
    return difflib.get_close_matches(split_model_name_tag(model_name)[0], list(_model_entrypoints), n=n, cutoff=0.6)


def unknown_model_error(model_name: str) -> RuntimeError:
    suggestions = close_matches(model_name)
    hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
    return RuntimeError(
        f"vitops: unknown model {model_name!r}.{hint} See vitops.list_models() for the {len(_model_entrypoints)} "
        "registered models."
    )


def model_entrypoint(model_name: str) -> Callable:
    """The entrypoint function registered for `model_name` ('arch' or 'arch.tag')."""
    arch = split_model_name_tag(model_name)[0]
    if arch not in _model_entrypoints:
        raise unknown_model_error(model_name)
    return _model_entrypoints[arch]


def get_pretrained_cfg(model_name: str) -> dict:
    """A copy of the default pretrained config of `model_name`'s architecture."""
    arch, tag = split_model_name_tag(model_name)
    if arch not in _model_entrypoints:
        raise unknown_model_error(model_name)
    cfg = dict(_model_default_cfgs.get(arch, {}))
    if tag:
        cfg["tag"] = tag
    return cfg
