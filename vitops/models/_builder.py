"""Building models from their configs: pretrained weights from local files (no network), checkpoint cleaning,
first-conv adaptation to other input channel counts, position-embedding resampling, features_only, and the
scriptable / exportable layer flags."""
from __future__ import annotations

import argparse
import math
import os
import pickle
from typing import Any, Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitops.layers.config import set_layer_config
from vitops.models._features import features_only as make_feature_extractor
from vitops.models._registry import get_pretrained_cfg, split_model_name_tag

_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "ema", "state_dict", "model", "module", "net")
_PREFIXES = ("module.", "_orig_mod.")


def vitops_home() -> str:
    return os.environ.get("VITOPS_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "vitops")


# --- reading and cleaning checkpoints --------------------------------------------------------------------------


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def clean_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strips the `module.` (DataParallel/DDP, timm's ModelEma) and `_orig_mod.` (torch.compile) prefixes."""
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if k.startswith(prefix):
                    k = k[len(prefix):]
                    changed = True
            k = k.replace("._orig_mod.", ".")
        out[k] = v
    return out


def unwrap_checkpoint(checkpoint: Any, use_ema: bool = True, path: str = "checkpoint") -> dict[str, Tensor]:
    """The model state_dict in a checkpoint: a bare state_dict, or a training checkpoint holding it under
    'state_dict' / 'model' (or an EMA copy under 'state_dict_ema' / 'model_ema' / 'ema', preferred when use_ema)."""
    if _is_state_dict(checkpoint):
        return clean_state_dict(checkpoint)
    if isinstance(checkpoint, dict):
        keys = _WRAPPER_KEYS if use_ema else tuple(k for k in _WRAPPER_KEYS if "ema" not in k)
        for key in keys:
            inner = checkpoint.get(key)
            if isinstance(inner, nn.Module):
                inner = inner.state_dict()
            if isinstance(inner, dict) and inner:
                if _is_state_dict(inner):
                    return clean_state_dict(inner)
                # an EMA wrapper's own state, e.g. {'module': ...} or nested {'state_dict': ...}
                try:
                    return unwrap_checkpoint(inner, use_ema, path)
                except ValueError:
                    continue
    if isinstance(checkpoint, nn.Module):
        return clean_state_dict(checkpoint.state_dict())
    found = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
    raise ValueError(
        f"vitops: no model state_dict found in {path}: expected a dict of tensors, or one under any of "
        f"{', '.join(repr(k) for k in _WRAPPER_KEYS)}; found {found}"
    )


def _read_safetensors(path: str) -> dict[str, Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as error:
        raise ImportError(f"vitops: reading {path} needs the safetensors package (pip install safetensors)") from error
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"vitops: checkpoint {path} is not a readable safetensors file (truncated or corrupted?): "
                         f"{error}") from error


def _complaint(error: Exception) -> str:
    """The first sentence of what torch.load found wrong (its weights-only and zip errors run to a paragraph)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            lines = [rest] if rest else lines[i + 1 : i + 2]
            break
    return lines[0].split(". ")[0].rstrip(".") if lines else type(error).__name__


def _read_torch(path: str, weights_only: bool) -> Any:
    try:
        # timm's training checkpoints keep their arguments as an argparse.Namespace: safe to allow
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as error:
        complaint = _complaint(error)
        if weights_only and complaint.startswith("Unsupported global"):
            raise ValueError(
                f"vitops: checkpoint {path} holds pickled objects other than tensors ({complaint}), which are not "
                "loaded unless asked for, since unpickling them can run code. If you trust the file, load it with "
                "vitops.models.load_checkpoint(model, path, weights_only=False)."
            ) from error
        raise ValueError(
            f"vitops: checkpoint {path} is not a readable torch.save file (corrupted?): {complaint}"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"vitops: checkpoint {path} is not a readable torch.save file (truncated or corrupted?): "
                         f"{_complaint(error)}") from error


def load_state_dict(path: str, use_ema: bool = True, weights_only: bool = True) -> dict[str, Tensor]:
    """Reads a .pth/.pt/.bin (torch.save) or .safetensors checkpoint on the CPU and returns its cleaned state_dict.
    A file that can't be read raises a ValueError naming it. As in timm, pickled objects other than tensors (and
    argparse.Namespace) are refused unless weights_only=False."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vitops: checkpoint file {path} does not exist")
    if path.endswith(".safetensors"):
        return clean_state_dict(_read_safetensors(path))
    return unwrap_checkpoint(_read_torch(path, weights_only), use_ema, path)


def check_state_dict_fits(model: nn.Module, state_dict: dict[str, Tensor], path: str, strict: bool = True,
                          may_miss: tuple[str, ...] = ()) -> None:
    """Raises a RuntimeError naming `path` unless every tensor of `state_dict` has a parameter or buffer of the same
    shape in `model` and, when strict, the model has nothing else (but the modules named in may_miss). Called before
    load_state_dict, so that a checkpoint that doesn't fit changes nothing (torch's load_state_dict copies the
    tensors that fit before it reports the ones that don't)."""
    expected = model.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} (the model's is {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = []
    if mismatched:
        problems.append(f"different shapes: {', '.join(mismatched[:5])}" + (" ..." if len(mismatched) > 5 else ""))
    if strict:
        missing = [k for k in expected if k not in state_dict and not any(k.startswith(m + ".") for m in may_miss)]
        unexpected = [k for k in state_dict if k not in expected]
        for what, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                problems.append(f"{len(keys)} {what} keys ({', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''})")
    if problems:
        raise RuntimeError(
            f"vitops: checkpoint {path} does not fit {type(model).__name__} (a checkpoint of another architecture or "
            f"size?): {'; '.join(problems)}. The model was left unchanged."
        )


def load_checkpoint(model: nn.Module, path: str, strict: bool = True, use_ema: bool = True, filter_fn=None,
                    weights_only: bool = True):
    """Loads a checkpoint file (any format load_state_dict reads) into `model`, after `filter_fn(state_dict,
    model)`; for ViT/DeiT models the default filter resamples pos_embed to the model's patch grid. A checkpoint
    that doesn't fit raises (naming the file) and leaves the model unchanged."""
    state_dict = load_state_dict(path, use_ema, weights_only)
    if filter_fn is None and hasattr(model, "pos_embed") and hasattr(model, "patch_embed"):
        from vitops.models.vision_transformer import checkpoint_filter_fn as filter_fn
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    check_state_dict_fits(model, state_dict, path, strict)
    return model.load_state_dict(state_dict, strict=strict)


# --- adapting weights ------------------------------------------------------------------------------------------


def adapt_input_conv(in_chans: int, conv_weight: Tensor) -> Tensor:
    """A first-conv weight (O, 3, kh, kw) made for `in_chans` inputs as timm does: summed over the RGB channels
    for 1 channel, else the RGB filters repeated and scaled by 3 / in_chans."""
    dtype = conv_weight.dtype
    weight = conv_weight.float()
    O, I, J, K = weight.shape
    if in_chans == I:
        return conv_weight
    if in_chans == 1:
        if I > 3:
            assert I % 3 == 0
            weight = weight.reshape(O, I // 3, 3, J, K).sum(dim=2, keepdim=False)
        else:
            weight = weight.sum(dim=1, keepdim=True)
    else:
        if I != 3:
            raise NotImplementedError(f"vitops: can't adapt a first conv of {I} input channels to {in_chans}")
        repeat = int(math.ceil(in_chans / 3))
        weight = weight.repeat(1, repeat, 1, 1)[:, :in_chans, :, :]
        weight *= 3 / float(in_chans)
    return weight.to(dtype)


def resample_abs_pos_embed(
    posemb: Tensor,
    new_size: List[int],
    old_size: Optional[List[int]] = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> Tensor:
    """(1, prefix + H*W, C) position embeddings resampled to a new_size (H, W) grid; the prefix (class,
    distillation) tokens' embeddings are kept as they are. Same as timm's resample_abs_pos_embed. TorchScript
    compiles it (a dynamic_img_size ViT resamples in forward)."""
    num_pos = posemb.shape[1]
    num_new = new_size[0] * new_size[1] + num_prefix_tokens
    if num_new == num_pos and (old_size is None or (new_size[0] == old_size[0] and new_size[1] == old_size[1])):
        return posemb
    if old_size is None:
        hw = int(math.sqrt(num_pos - num_prefix_tokens))
        old_size = [hw, hw]
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    embed_dim = posemb.shape[-1]
    orig_dtype = posemb.dtype
    grid = grid.float().reshape(1, old_size[0], old_size[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=[new_size[0], new_size[1]], mode=interpolation, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, embed_dim).to(orig_dtype)
    if num_prefix_tokens:
        return torch.cat([prefix, grid], dim=1)
    return grid


# --- pretrained ------------------------------------------------------------------------------------------------


def _candidate_files(model_name: str, cfg: dict, cache_dir: str | None = None) -> list[str]:
    arch, tag = split_model_name_tag(model_name)
    tag = tag or cfg.get("tag") or ""
    directory = cache_dir or os.path.join(vitops_home(), "checkpoints")
    names = [f"{arch}.{tag}", arch] if tag else [arch]
    return [os.path.join(directory, n + ext) for n in names for ext in (".safetensors", ".pth")]


def find_pretrained_file(
    model_name: str, cfg: dict, checkpoint_path: str | None = None, cache_dir: str | None = None
) -> str:
    """The local file pretrained weights are read from: pretrained_cfg['file'], else checkpoint_path, else
    <cache_dir or $VITOPS_HOME/checkpoints>/<name>.(safetensors|pth). Raises saying where to put it when none
    exists."""
    if cfg.get("file"):
        if os.path.isfile(cfg["file"]):
            return cfg["file"]
        raise FileNotFoundError(f"vitops: pretrained_cfg['file'] = {cfg['file']} does not exist")
    if checkpoint_path:
        if os.path.isfile(checkpoint_path):
            return checkpoint_path
        raise FileNotFoundError(f"vitops: checkpoint_path {checkpoint_path} does not exist")
    candidates = _candidate_files(model_name, cfg, cache_dir)
    for path in candidates:
        if os.path.isfile(path):
            return path
    arch = cfg.get("architecture") or split_model_name_tag(model_name)[0]
    sources = []
    if cfg.get("hf_hub_id"):
        hub = cfg["hf_hub_id"]
        if hub.endswith("/"):
            hub += f"{arch}.{cfg['tag']}" if cfg.get("tag") else arch
        sources.append(f"model.safetensors from https://huggingface.co/{hub}")
    if cfg.get("url"):
        sources.append(f"the upstream release {cfg['url']}" + (" (convert it with timm first)" if cfg["url"].endswith(".npz") else ""))
    raise FileNotFoundError(
        f"vitops: no pretrained weights for {model_name!r} on this machine, and vitops never downloads. Download "
        f"{' or '.join(sources) or 'them'} and save the file as one of: {', '.join(candidates)} "
        f"(VITOPS_HOME={vitops_home()}), or pass checkpoint_path=... or pretrained_cfg_overlay=dict(file=...)."
    )


def load_pretrained(
    model: nn.Module,
    path: str,
    pretrained_cfg: dict,
    num_classes: int,
    in_chans: int,
    filter_fn: Callable | None = None,
    strict: bool = True,
) -> None:
    """Loads weights from `path` into `model`: the model's filter_fn (e.g. pos_embed resampling), the first conv
    adapted to in_chans, and the classifier dropped when its class count differs from num_classes."""
    state_dict = load_state_dict(path)
    try:
        if filter_fn is not None:
            state_dict = filter_fn(state_dict, model)
        first_conv = pretrained_cfg.get("first_conv")
        for name in (first_conv,) if isinstance(first_conv, str) else (first_conv or ()):
            key = name + ".weight"
            if key in state_dict and state_dict[key].ndim == 4 and state_dict[key].shape[1] != in_chans:
                state_dict[key] = adapt_input_conv(in_chans, state_dict[key])
    except (ValueError, RuntimeError, NotImplementedError) as error:
        raise RuntimeError(f"vitops: checkpoint {path} does not fit {type(model).__name__}: {error}") from error
    classifiers = pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    dropped = []
    for name in classifiers:
        weight = state_dict.get(name + ".weight")
        if weight is not None and (num_classes == 0 or weight.shape[0] != num_classes):
            state_dict.pop(name + ".weight", None)
            state_dict.pop(name + ".bias", None)
            dropped.append(name)
    check_state_dict_fits(model, state_dict, path, strict, may_miss=tuple(dropped))
    model.load_state_dict(state_dict, strict=strict and not dropped)


# --- building --------------------------------------------------------------------------------------------------


def resolve_pretrained_cfg(variant: str, pretrained_cfg_overlay: dict | None = None) -> dict:
    cfg = get_pretrained_cfg(variant)
    if pretrained_cfg_overlay:
        cfg.update(pretrained_cfg_overlay)
    return cfg


def _pretrained_cfg_for_features(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("num_classes", "classifier", "global_pool")}


def build_model_with_cfg(
    model_cls: Callable[..., nn.Module],
    variant: str,
    pretrained: bool = False,
    pretrained_cfg: dict | None = None,
    pretrained_cfg_overlay: dict | None = None,
    checkpoint_path: str | None = None,
    feature_cfg: dict | None = None,
    pretrained_filter_fn: Callable | None = None,
    pretrained_strict: bool = True,
    cache_dir: str | None = None,
    scriptable: bool | None = None,
    exportable: bool | None = None,
    no_jit: bool | None = None,
    **kwargs,
) -> nn.Module:
    """Builds `model_cls(**kwargs)` as timm's build_model_with_cfg does: sets its pretrained_cfg, loads pretrained
    weights from a local file when asked, and with `features_only=True` wraps it in a feature extractor
    (`feature_cls`, `out_indices` and any `feature_cfg` entries override the family's `feature_cfg` defaults).
    `scriptable` / `exportable` (or timm's set_layer_config) build the layers plain: see vitops.layers.config.
    `no_jit` is accepted for timm's sake and changes nothing (vitops layers use no jit-compiled functions)."""
    del no_jit
    cfg = dict(pretrained_cfg) if pretrained_cfg is not None else resolve_pretrained_cfg(variant)
    if pretrained_cfg_overlay:
        cfg.update(pretrained_cfg_overlay)
    feature_cfg = dict(feature_cfg or {}, **(kwargs.pop("feature_cfg", None) or {}))
    features = kwargs.pop("features_only", False)
    feature_cfg.setdefault("out_indices", (0, 1, 2, 3, 4))
    for key in ("out_indices", "feature_cls"):
        value = kwargs.pop(key, None)
        if value is not None:
            feature_cfg[key] = value
    kwargs.setdefault("num_classes", cfg.get("num_classes", 1000))
    in_chans = kwargs.setdefault("in_chans", 3)
    with set_layer_config(scriptable=scriptable, exportable=exportable):
        model = model_cls(**kwargs)
    if "input_size" in cfg and in_chans != 3:
        cfg["input_size"] = (in_chans,) + tuple(cfg["input_size"][1:])
    model.pretrained_cfg = model.default_cfg = cfg
    if pretrained or checkpoint_path:
        path = find_pretrained_file(variant, cfg if pretrained else {}, checkpoint_path, cache_dir)
        load_pretrained(
            model, path, cfg, model.num_classes, in_chans, pretrained_filter_fn, strict=pretrained_strict
        )
    if features:
        model = make_feature_extractor(model, **feature_cfg)
        model.in_chans = in_chans
        model.pretrained_cfg = model.default_cfg = _pretrained_cfg_for_features(cfg)
    return model
