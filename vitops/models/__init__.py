"""Model zoo: timm-compatible ResNet, ViT, DeiT and RepVGG built from vitops layers, with a registry and
create_model / list_models as timm's.

    import vitops
    vitops.list_models("deit_*distilled*")
    model = vitops.create_model("vit_small_patch16_224", num_classes=10, drop_path_rate=0.1)
    model.load_state_dict(timm_model.state_dict())          # resnet*, vit_*, deit_*: timm's names and shapes
    model = vitops.create_model("resnet50", pretrained=True)  # $VITOPS_HOME/checkpoints/resnet50.a1_in1k.pth
    backbone = vitops.create_model("resnet50", features_only=True, out_indices=(2, 3, 4))
    backbone.feature_info.channels()                          # [512, 1024, 2048]

ResNet and ViT blocks end in the fused `residual + drop_path(branch * gamma)` (vitops.layers.DropPath.add); ViT/DeiT
use vitops.layers.Attention; RepVGG uses vitops.layers.RepVGGBlock. Every model has timm's model API:
forward_features / forward_head, forward_intermediates, prune_intermediate_layers, feature_info,
features_only with each of timm's feature_cls, group_matcher, reset_classifier, set_grad_checkpointing.

TorchScript and export: default-built models run torch.jit.script, torch.export and torch.compile with vitops' ops
in the graph (a program loading the scripted or exported model must `import vitops`). Built with scriptable=True
or exportable=True (or under timm's set_layer_config / set_scriptable / set_exportable), the layers compute the
same functions in stock PyTorch ops, so the scripted or exported graph (ONNX included) needs no vitops.
"""
from __future__ import annotations

from typing import Any, Optional

from vitops.models import deit, repvgg, resnet, vision_transformer  # noqa: F401  (registers the models)
from vitops.models._builder import (
    adapt_input_conv,
    clean_state_dict,
    load_checkpoint,
    load_state_dict,
    resample_abs_pos_embed,
)
from vitops.models._features import FeatureInfo
from vitops.models._registry import (
    get_pretrained_cfg,
    is_model,
    list_models,
    model_entrypoint,
    register_model,
    split_model_name_tag,
)
from vitops.models.deit import VisionTransformerDistilled
from vitops.models.repvgg import RepVGG
from vitops.models.resnet import ResNet
from vitops.models.vision_transformer import VisionTransformer


def create_model(
    model_name: str,
    pretrained: bool = False,
    pretrained_cfg: Optional[dict] = None,
    pretrained_cfg_overlay: Optional[dict] = None,
    checkpoint_path: Optional[str] = None,
    cache_dir: Optional[str] = None,
    scriptable: Optional[bool] = None,
    exportable: Optional[bool] = None,
    no_jit: Optional[bool] = None,
    **kwargs: Any,
):
    """Creates a registered model by name, with timm.create_model's signature.

    Args:
        model_name: 'arch' or 'arch.tag', e.g. 'resnet50' or 'vit_small_patch16_224.augreg_in21k_ft_in1k'.
        pretrained: load weights from a local file: pretrained_cfg['file'], checkpoint_path, or
            <cache_dir or $VITOPS_HOME/checkpoints>/<name>.(safetensors|pth). vitops never downloads.
        pretrained_cfg: a pretrained config replacing the registered one; pretrained_cfg_overlay: entries
            replacing some of it (e.g. file=...).
        checkpoint_path: a checkpoint to load (adapted as pretrained weights: pos_embed resampled, first conv
            adapted to in_chans, classifier dropped when the class count differs). A file that can't be read or
            doesn't fit the model raises, naming the file, and loads nothing.
        scriptable, exportable: build plain PyTorch layers instead of vitops' fused ones, for a TorchScript or
            exported graph free of vitops ops (timm's `set_layer_config` / `set_scriptable` do the same; see
            vitops.layers.config). Default-built models script and export too, with vitops' ops in the graph.
        no_jit: accepted for timm's sake; changes nothing.
        **kwargs: model arguments: num_classes, in_chans, global_pool, drop_rate, drop_path_rate, img_size,
            features_only, out_indices, feature_cls ('list', 'dict', 'hook', 'getter', 'fx'), feature_cfg, ...
            Arguments given as None are ignored.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    given = dict(
        pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay, checkpoint_path=checkpoint_path,
        cache_dir=cache_dir, scriptable=scriptable, exportable=exportable, no_jit=no_jit,
    )  # fmt: skip
    kwargs.update({k: v for k, v in given.items() if v is not None})
    entrypoint = model_entrypoint(model_name)
    arch, tag = split_model_name_tag(model_name)
    if tag:
        overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
        overlay.setdefault("tag", tag)
        kwargs["pretrained_cfg_overlay"] = overlay
    return entrypoint(pretrained=pretrained, **kwargs)


__all__ = [
    "FeatureInfo",
    "RepVGG",
    "ResNet",
    "VisionTransformer",
    "VisionTransformerDistilled",
    "adapt_input_conv",
    "clean_state_dict",
    "create_model",
    "get_pretrained_cfg",
    "is_model",
    "list_models",
    "load_checkpoint",
    "load_state_dict",
    "model_entrypoint",
    "register_model",
    "resample_abs_pos_embed",
]
