"""Feature extraction as timm does it. Every model describes its feature levels in `model.feature_info`, a list
of dicts (num_chs, reduction, module); `features_only=True` wraps the model in one of timm's five extractors,
chosen by `feature_cls`, with timm's arguments, outputs and state_dict keys:

  'list' / 'dict'  the model's top-level modules run in order (nn.Sequential children flattened into
                   `stages_0`-style names with flatten_sequential), modules past the last level dropped;
  'hook'           forward hooks on the level modules (the model kept whole under `body`, or rewritten as above);
  'getter'         the model's own `forward_intermediates`, after `prune_intermediate_layers`;
  'fx'             a torch.fx graph cut at the level modules (needs torchvision).
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

Indices = Union[int, Sequence[int], None]


def feature_take_indices(num_features: int, indices: Indices = None) -> Tuple[List[int], int]:
    """(level indices counted from 0, the largest of them), as timm's feature_take_indices: `indices` None for
    every level, an int n for the last n, or a sequence of indices (negative ones count from the end)."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise IndexError(
                f"vitops: indices={indices} asks for the last {indices} feature levels, but there are "
                f"{num_features} (valid: 1..{num_features})"
            )
        take = list(range(num_features - indices, num_features))
    else:
        take = []
        for i in indices:
            if not -num_features <= i < num_features:
                raise IndexError(
                    f"vitops: feature index {i} is out of range for {num_features} feature levels (valid indices: "
                    f"0..{num_features - 1}, or -{num_features}..-1)"
                )
            take.append(i % num_features)
        if not take:
            raise ValueError("vitops: no feature index given (indices / out_indices is empty)")
    return take, max(take)


def nchw_take_indices(where: str, num_features: int, indices: Indices, output_fmt: str) -> Tuple[List[int], int]:
    """feature_take_indices for the forward_intermediates of a model whose feature maps are NCHW only (the CNNs);
    any other output_fmt is refused, naming the model `where`."""
    if output_fmt != "NCHW":
        raise ValueError(f"{where}: output_fmt must be 'NCHW', got {output_fmt!r}")
    return feature_take_indices(num_features, indices)


class FeatureInfo:
    """timm's FeatureInfo: the level dicts of a model (`info`) and the levels an extractor returns
    (`out_indices`; an int n means the last n). Accessors with idx=None answer for the returned levels; an int or
    a list idx indexes the levels directly, as in timm."""

    def __init__(self, feature_info: List[dict], out_indices: Union[int, Sequence[int]]):
        self.out_indices = tuple(range(-out_indices, 0)) if isinstance(out_indices, int) else tuple(out_indices)
        self.info = [dict(f, index=f.get("index", i)) for i, f in enumerate(feature_info)]
        feature_take_indices(len(self.info), self.out_indices)  # a clear error for an index out of range

    def from_other(self, out_indices: Union[int, Sequence[int]]) -> "FeatureInfo":
        return FeatureInfo(self.info, out_indices)

    def get(self, key: str, idx: Union[int, Sequence[int], None] = None):
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys: Optional[List[str]] = None, idx: Union[int, Sequence[int], None] = None):
        def pick(i: int) -> dict:
            return self.info[i] if keys is None else {k: self.info[i][k] for k in keys}

        if idx is None:
            return [pick(i) for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [pick(i) for i in idx]
        return pick(idx)

    def channels(self, idx: Union[int, Sequence[int], None] = None):
        return self.get("num_chs", idx)

    def reduction(self, idx: Union[int, Sequence[int], None] = None):
        return self.get("reduction", idx)

    def module_name(self, idx: Union[int, Sequence[int], None] = None):
        return self.get("module", idx)

    def __getitem__(self, item: int) -> dict:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo(out_indices={self.out_indices}, info={self.info})"


def _feature_info(model: nn.Module, out_indices) -> FeatureInfo:
    info = getattr(model, "feature_info", None)
    if isinstance(info, FeatureInfo):
        return info.from_other(out_indices)
    if not isinstance(info, (list, tuple)):
        raise TypeError(f"vitops: {type(model).__name__} has no feature_info list, so it can't extract features")
    return FeatureInfo(list(info), out_indices)


def _output_ids(feature_info: FeatureInfo, out_map: Optional[Sequence]) -> Dict[str, str]:
    """Level module name -> the id its output is returned under (its index, or out_map's entry)."""
    names = feature_info.module_name()
    if out_map is not None and len(out_map) != len(names):
        raise ValueError(f"vitops: out_map has {len(out_map)} entries for {len(names)} feature levels")
    ids = out_map if out_map is not None else feature_info.out_indices
    return {name: str(ids[i]) for i, name in enumerate(names)}


def _top_level_modules(model: nn.Module, flatten_sequential: bool) -> List[Tuple[str, str, nn.Module]]:
    """(new name, name in model, module) of the model's children in order; with flatten_sequential, the children
    of a top-level nn.Sequential take its place, named `seq_i` (new) and `seq.i` (in model)."""
    out = []
    for name, module in model.named_children():
        if flatten_sequential and isinstance(module, nn.Sequential):
            out += [(f"{name}_{child}", f"{name}.{child}", m) for child, m in module.named_children()]
        else:
            out.append((name, name, module))
    return out


def _run_in_order(modules: nn.ModuleDict, x: Tensor, grad_checkpointing: bool, tap) -> Tensor:
    """Runs the modules one after the other, calling tap(name, output) after each. With grad_checkpointing every
    module but the first, the last and in-place ones is recomputed in backward."""
    last = len(modules) - 1
    for i, (name, module) in enumerate(modules.items()):
        if grad_checkpointing and 0 < i < last and getattr(module, "inplace", False) is not True:
            x = torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False)
        else:
            x = module(x)
        tap(name, x)
    return x


class FeatureDictNet(nn.ModuleDict):
    """The model's top-level modules up to the last feature level, run in order; returns {id: features}."""

    def __init__(
        self,
        model: nn.Module,
        out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3, 4),
        out_map: Optional[Sequence] = None,
        output_fmt: str = "NCHW",
        feature_concat: bool = False,
        flatten_sequential: bool = False,
    ):
        super().__init__()
        self.feature_info = _feature_info(model, out_indices)
        self.output_fmt = output_fmt
        self.concat = feature_concat
        self.grad_checkpointing = False
        wanted = _output_ids(self.feature_info, out_map)
        self.return_layers: Dict[str, str] = {}
        layers = OrderedDict()
        for new_name, old_name, module in _top_level_modules(model, flatten_sequential):
            if not wanted:
                break
            layers[new_name] = module
            if old_name in wanted:
                self.return_layers[new_name] = wanted.pop(old_name)
        if wanted:
            raise ValueError(
                f"vitops: feature levels {sorted(wanted)} are not top-level modules of {type(model).__name__} "
                "(nor children of a top-level nn.Sequential with flatten_sequential=True); use feature_cls='hook' "
                "or 'getter'"
            )
        self.update(layers)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _collect(self, x: Tensor) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = OrderedDict()

        def tap(name: str, y) -> None:
            if name in self.return_layers:
                if isinstance(y, (tuple, list)):
                    y = torch.cat(y, 1) if self.concat else y[0]
                out[self.return_layers[name]] = y

        _run_in_order(self, x, self.grad_checkpointing, tap)
        return out

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        return self._collect(x)


class FeatureListNet(FeatureDictNet):
    """FeatureDictNet returning the list of features (timm's default extractor)."""

    def __init__(
        self,
        model: nn.Module,
        out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3, 4),
        output_fmt: str = "NCHW",
        feature_concat: bool = False,
        flatten_sequential: bool = False,
    ):
        super().__init__(
            model, out_indices, output_fmt=output_fmt, feature_concat=feature_concat,
            flatten_sequential=flatten_sequential,
        )  # fmt: skip

    def forward(self, x: Tensor) -> List[Tensor]:
        return list(self._collect(x).values())


class FeatureHookNet(nn.ModuleDict):
    """Features taken by forward (or forward_pre) hooks on the level modules. With no_rewrite (the default unless
    flatten_sequential) the model is kept whole under `body`, its classifier removed; otherwise its top-level
    modules are taken as in FeatureDictNet."""

    def __init__(
        self,
        model: nn.Module,
        out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3, 4),
        out_map: Optional[Sequence] = None,
        return_dict: bool = False,
        output_fmt: str = "NCHW",
        no_rewrite: Optional[bool] = None,
        flatten_sequential: bool = False,
        default_hook_type: str = "forward",
    ):
        super().__init__()
        self.feature_info = _feature_info(model, out_indices)
        self.return_dict = return_dict
        self.output_fmt = output_fmt
        self.grad_checkpointing = False
        if no_rewrite is None:
            no_rewrite = not flatten_sequential
        if no_rewrite and flatten_sequential:
            raise ValueError("vitops: FeatureHookNet can't flatten_sequential with no_rewrite=True")
        hooks = [(f["module"], f.get("hook_type", default_hook_type)) for f in self.feature_info.get_dicts()]
        if no_rewrite:
            if hasattr(model, "reset_classifier"):
                model.reset_classifier(0)
            self.update({"body": model})
        else:
            remaining = {name for name, _ in hooks}
            layers = OrderedDict()
            for new_name, old_name, module in _top_level_modules(model, flatten_sequential):
                layers[new_name] = module
                remaining -= {name for name, _ in module.named_modules(prefix=old_name)}
                if not remaining:
                    break
            if remaining:
                raise ValueError(
                    f"vitops: feature levels {sorted(remaining)} are not modules of {type(model).__name__}"
                )
            self.update(layers)
        self._hook_ids = [str(out_map[i]) if out_map is not None else name for i, (name, _) in enumerate(hooks)]
        self._outputs: Dict[torch.device, Dict[str, Tensor]] = {}  # per device, for nn.DataParallel replicas
        modules = dict(model.named_modules())
        for (name, hook_type), hook_id in zip(hooks, self._hook_ids):
            keep = functools.partial(self._keep, hook_id)
            if hook_type == "forward_pre":
                modules[name].register_forward_pre_hook(keep)
            elif hook_type == "forward":
                modules[name].register_forward_hook(keep)
            else:
                raise ValueError(f"vitops: unknown hook_type {hook_type!r} for {name} (forward or forward_pre)")

    def _keep(self, hook_id: str, *args) -> None:
        x = args[-1]  # the output for a forward hook, the input tuple for a forward_pre hook
        if isinstance(x, tuple):
            x = x[0]
        self._outputs.setdefault(x.device, {})[hook_id] = x

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, x: Tensor):
        x = _run_in_order(self, x, self.grad_checkpointing, lambda name, y: None)
        kept = self._outputs.pop(x.device, {})
        out = OrderedDict((k, kept[k]) for k in self._hook_ids if k in kept)
        return out if self.return_dict else list(out.values())


class FeatureGetterNet(nn.ModuleDict):
    """Features from the model's own `forward_intermediates`; layers past the last level are pruned first."""

    def __init__(
        self,
        model: nn.Module,
        out_indices: Union[int, Sequence[int]] = 4,
        out_map: Optional[Sequence] = None,
        return_dict: bool = False,
        output_fmt: str = "NCHW",
        norm: bool = False,
        prune: bool = True,
    ):
        super().__init__()
        if prune and hasattr(model, "prune_intermediate_layers"):
            out_indices = model.prune_intermediate_layers(out_indices, prune_norm=not norm)
        self.feature_info = _feature_info(model, out_indices)
        self.model = model
        self.out_indices = out_indices
        self.out_map = out_map
        self.return_dict = return_dict
        self.output_fmt = output_fmt
        self.norm = norm

    def forward(self, x: Tensor) -> List[Tensor]:
        return self.model.forward_intermediates(
            x, indices=self.out_indices, norm=self.norm, output_fmt=self.output_fmt, intermediates_only=True
        )


class FeatureGraphNet(nn.Module):
    """Features from a torch.fx graph of the model cut at the level modules (torchvision's
    create_feature_extractor; vitops' ops are fx leaves, so vitops models trace as they are)."""

    def __init__(
        self,
        model: nn.Module,
        out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3, 4),
        out_map: Optional[Sequence] = None,
        output_fmt: str = "NCHW",
        return_dict: bool = False,
    ):
        super().__init__()
        try:
            from torchvision.models.feature_extraction import create_feature_extractor
        except ImportError as error:
            raise ImportError("vitops: feature_cls='fx' needs torchvision (pip install torchvision)") from error
        self.feature_info = _feature_info(model, out_indices)
        self.output_fmt = output_fmt
        self.return_dict = return_dict
        self.graph_module = create_feature_extractor(model, _output_ids(self.feature_info, out_map))

    def forward(self, x: Tensor):
        out = self.graph_module(x)
        return out if self.return_dict else list(out.values())


FEATURE_CLASSES = {
    "list": FeatureListNet,
    "dict": FeatureDictNet,
    "hook": FeatureHookNet,
    "getter": FeatureGetterNet,
    "fx": FeatureGraphNet,
}


def features_only(model: nn.Module, feature_cls="list", **feature_cfg) -> nn.Module:
    """`model` wrapped in the feature extractor `feature_cls` (a name in FEATURE_CLASSES, or a class taking the
    model first), given the arguments in feature_cfg that it takes, as timm's build_model_with_cfg does."""
    cls = feature_cls
    if isinstance(cls, str):
        cls = FEATURE_CLASSES.get("hook" if "hook" in cls.lower() else cls.lower())
        if cls is None:
            raise ValueError(f"vitops: unknown feature_cls {feature_cls!r}; choose one of {sorted(FEATURE_CLASSES)}")
    if not (isinstance(cls, type) and issubclass(cls, (FeatureDictNet, FeatureHookNet))):
        feature_cfg.pop("flatten_sequential", None)
    if not (isinstance(cls, type) and issubclass(cls, FeatureHookNet)):
        feature_cfg.pop("no_rewrite", None)
    return cls(model, **feature_cfg)
