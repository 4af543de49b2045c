"""Feature extraction (features_only=True): which levels a model returns, and what each level is."""
from __future__ import annotations

from typing import Sequence

from torch import nn


class FeatureInfo:
    """Describes the feature levels a features_only model returns, as timm's FeatureInfo: one dict per level with
    num_chs, reduction and module; `channels()`, `reduction()`, `module_name()` take an optional index."""

    def __init__(self, feature_info: list[dict], out_indices: Sequence[int]):
        self.info = [dict(f) for f in feature_info]
        self.out_indices = tuple(out_indices)

    def _get(self, key: str, idx=None):
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[self.out_indices[i]][key] for i in idx]
        return self.info[self.out_indices[idx]][key]

    def channels(self, idx=None):
        return self._get("num_chs", idx)

    def reduction(self, idx=None):
        return self._get("reduction", idx)

    def module_name(self, idx=None):
        return self._get("module", idx)

    def get_dicts(self, keys=None, idx=None) -> list[dict]:
        indices = self.out_indices if idx is None else [self.out_indices[i] for i in idx]
        return [{k: self.info[i][k] for k in (keys or self.info[i])} for i in indices]

    def __getitem__(self, item):
        return self.info[self.out_indices[item]]

    def __len__(self) -> int:
        return len(self.out_indices)

    def __repr__(self) -> str:
        return f"FeatureInfo({self.get_dicts()})"


def resolve_out_indices(out_indices, num_levels: int, model_name: str = "model") -> tuple[int, ...]:
    """Normalises `out_indices` (an int n meaning the last n levels, or a sequence of indices, negative allowed)
    to sorted non-negative level indices; raises a clear error for an index out of range."""
    if isinstance(out_indices, int):
        if not 0 < out_indices <= num_levels:
            raise ValueError(
                f"vitops: out_indices={out_indices} asks for the last {out_indices} feature levels but {model_name} "
                f"has {num_levels} (valid: 1..{num_levels})"
            )
        return tuple(range(num_levels - out_indices, num_levels))
    resolved = []
    for i in out_indices:
        if not -num_levels <= i < num_levels:
            raise IndexError(
                f"vitops: out_indices contains {i}, out of range for {model_name}, which has {num_levels} feature "
                f"levels (valid indices: 0..{num_levels - 1}, or -{num_levels}..-1)"
            )
        resolved.append(i % num_levels)
    if not resolved:
        raise ValueError("vitops: out_indices is empty")
    return tuple(resolved)


def forward_intermediates(model: nn.Module, x, indices, stop_early: bool, intermediates_only: bool, **level_args):
    """timm's forward_intermediates over a model's `_levels(x, indices, stop_early, **level_args)`, which returns
    (the feature maps at indices, the final features): that pair, or with intermediates_only the list. indices:
    None for every level, n for the last n, or a sequence of level indices."""
    n = len(model.feature_levels())
    indices = list(resolve_out_indices(n if indices is None else indices, n, type(model).__name__))
    intermediates, x = model._levels(x, indices, stop_early=stop_early or intermediates_only, **level_args)
    return intermediates if intermediates_only else (x, intermediates)


class FeatureListMixin:
    """Mixed into a model's class by `make_features_only`: forward returns the list of feature maps at
    `self.out_indices`, computed by the model's `forward_feature_maps(x, indices)`. Parameter names are unchanged,
    so checkpoints of the classification model load into it (minus the classifier)."""

    def forward(self, x):  # type: ignore[override]
        return self.forward_feature_maps(x, list(self.feature_info.out_indices))


def _features_class(cls: type) -> type:
    """`cls` with FeatureListMixin's forward, created once and kept in this module so the model pickles."""
    name = f"{cls.__name__}Features"
    existing = globals().get(name)
    if existing is None or existing.__mro__[2] is not cls:
        existing = type(name, (FeatureListMixin, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = existing
    return existing


def make_features_only(model: nn.Module, out_indices, model_name: str = "model") -> nn.Module:
    """Turns `model` into a feature extractor in place: drops its head and makes forward return feature maps."""
    levels = model.feature_levels()
    indices = resolve_out_indices(out_indices, len(levels), model_name)
    model.reset_classifier(0, "")
    model.__class__ = _features_class(type(model))
    model.feature_info = FeatureInfo(levels, indices)
    model.features_only = True
    return model
