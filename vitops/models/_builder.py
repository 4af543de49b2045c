"""Building models from their configs: pretrained weights from local files (no network), checkpoint cleaning,
first-conv adaptation to other input channel counts, position-embedding resampling, features_only."""
from __future__ import annotations

import math
import os
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitops.models._features import make_features_only
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


def load_state_dict(path: str, use_ema: bool = True) -> dict[str, Tensor]:
    """Reads a .pth/.pt/.bin (torch.save) or .safetensors checkpoint on the CPU and returns its cleaned state_dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vitops: checkpoint file {path} does not exist")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise ImportError(f"vitops: reading {path} needs the safetensors package (pip install safetensors)") from error
        return clean_state_dict(load_file(path, device="cpu"))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # an older training checkpoint with pickled non-tensor objects (args, optimizer configs)
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return unwrap_checkpoint(checkpoint, use_ema, path)


def load_checkpoint(model: nn.Module, path: str, strict: bool = True, use_ema: bool = True, filter_fn=None):
    """Loads a checkpoint file (any format load_state_dict reads) into `model`, after `filter_fn(state_dict,
    model)`; for ViT/DeiT models the default filter resamples pos_embed to the model's patch grid."""
    state_dict = load_state_dict(path, use_ema)
    if filter_fn is None and hasattr(model, "pos_embed") and hasattr(model, "patch_embed"):
        from vitops.models.vision_transformer import checkpoint_filter_fn as filter_fn
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
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
    new_size: tuple[int, int],
    old_size: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> Tensor:
    """(1, prefix + H*W, C) position embeddings resampled to a new_size grid; the prefix (class, distillation)
    tokens' embeddings are kept as they are. Same as timm's resample_abs_pos_embed."""
    num_pos = posemb.shape[1]
    num_new = new_size[0] * new_size[1] + num_prefix_tokens
    if num_new == num_pos and (old_size is None or tuple(new_size) == tuple(old_size)):
        return posemb
    if old_size is None:
        hw = int(math.sqrt(num_pos - num_prefix_tokens))
        old_size = (hw, hw)
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    embed_dim = posemb.shape[-1]
    orig_dtype = posemb.dtype
    grid = grid.float().reshape(1, old_size[0], old_size[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_size), mode=interpolation, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, embed_dim).to(orig_dtype)
    return torch.cat([prefix, grid], dim=1) if num_prefix_tokens else grid


# --- pretrained ------------------------------------------------------------------------------------------------


def _candidate_files(model_name: str, cfg: dict) -> list[str]:
    arch, tag = split_model_name_tag(model_name)
    tag = tag or cfg.get("tag") or ""
    directory = os.path.join(vitops_home(), "checkpoints")
    names = [f"{arch}.{tag}", arch] if tag else [arch]
    return [os.path.join(directory, n + ext) for n in names for ext in (".safetensors", ".pth")]


def find_pretrained_file(model_name: str, cfg: dict, checkpoint_path: str | None = None) -> str:
    """The local file pretrained weights are read from: pretrained_cfg['file'], else checkpoint_path, else
    $VITOPS_HOME/checkpoints/<name>.(safetensors|pth). Raises saying where to put it when none exists."""
    if cfg.get("file"):
        if os.path.isfile(cfg["file"]):
            return cfg["file"]
        raise FileNotFoundError(f"vitops: pretrained_cfg['file'] = {cfg['file']} does not exist")
    if checkpoint_path:
        if os.path.isfile(checkpoint_path):
            return checkpoint_path
        raise FileNotFoundError(f"vitops: checkpoint_path {checkpoint_path} does not exist")
    candidates = _candidate_files(model_name, cfg)
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
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    first_conv = pretrained_cfg.get("first_conv")
    if first_conv:
        for name in (first_conv,) if isinstance(first_conv, str) else first_conv:
            key = name + ".weight"
            if key in state_dict and state_dict[key].ndim == 4 and state_dict[key].shape[1] != in_chans:
                state_dict[key] = adapt_input_conv(in_chans, state_dict[key])
    classifiers = pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    dropped = False
    for name in classifiers:
        weight = state_dict.get(name + ".weight")
        if weight is not None and (num_classes == 0 or weight.shape[0] != num_classes):
            state_dict.pop(name + ".weight", None)
            state_dict.pop(name + ".bias", None)
            dropped = True
    result = model.load_state_dict(state_dict, strict=strict and not dropped)
    if dropped:
        missing = [k for k in result.missing_keys if not any(k.startswith(c + ".") for c in classifiers)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"vitops: checkpoint {path} doesn't match the model: missing {missing}, unexpected "
                f"{result.unexpected_keys}"
            )


# --- building --------------------------------------------------------------------------------------------------


def resolve_pretrained_cfg(variant: str, pretrained_cfg_overlay: dict | None = None) -> dict:
    cfg = get_pretrained_cfg(variant)
    if pretrained_cfg_overlay:
        cfg.update(pretrained_cfg_overlay)
    return cfg


def build_model_with_cfg(
    model_cls: Callable[..., nn.Module],
    variant: str,
    pretrained: bool = False,
    pretrained_cfg: dict | None = None,
    pretrained_cfg_overlay: dict | None = None,
    checkpoint_path: str | None = None,
    features_only: bool = False,
    out_indices=None,
    default_out_indices=(0, 1, 2, 3, 4),
    pretrained_filter_fn: Callable | None = None,
    pretrained_strict: bool = True,
    **kwargs,
) -> nn.Module:
    """Builds `model_cls(**kwargs)`, sets its pretrained_cfg, loads pretrained weights from a local file when
    asked, and turns it into a feature extractor when features_only."""
    cfg = dict(pretrained_cfg) if pretrained_cfg is not None else resolve_pretrained_cfg(variant)
    if pretrained_cfg_overlay:
        cfg.update(pretrained_cfg_overlay)
    kwargs.setdefault("num_classes", cfg.get("num_classes", 1000))
    in_chans = kwargs.setdefault("in_chans", 3)
    model = model_cls(**kwargs)
    cfg = dict(cfg)
    if "input_size" in cfg and in_chans != 3:
        cfg["input_size"] = (in_chans,) + tuple(cfg["input_size"][1:])
    model.pretrained_cfg = model.default_cfg = cfg
    if pretrained or checkpoint_path:
        path = find_pretrained_file(variant, cfg if pretrained else {}, checkpoint_path)
        load_pretrained(
            model, path, cfg, model.num_classes, in_chans, pretrained_filter_fn, strict=pretrained_strict
        )
    if features_only:
        model = make_features_only(model, default_out_indices if out_indices is None else out_indices, variant)
    return model
