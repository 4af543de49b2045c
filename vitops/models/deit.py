"""DeiT (Touvron et al. 2020): ViTs trained with distillation, and the distilled variants with a distillation
token and head. Names and outputs as timm 1.0's deit.py."""

from functools import partial
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from vitops.models._registry import pretrained_cfg, register_model, register_pretrained_cfgs
from vitops.models.vision_transformer import VisionTransformer, _create_vision_transformer

__all__ = ["VisionTransformerDistilled"]


class VisionTransformerDistilled(VisionTransformer):
    """ViT with a distillation token (after the class token) and a distillation head `head_dist`. In training
    with `set_distilled_training(True)` forward returns (class logits, distillation logits); otherwise their mean."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("global_pool", "token") not in ("token",):
            raise ValueError("vitops DeiT distilled: the distilled head reads the class and distillation tokens; "
                             "global_pool must be 'token'")
        kwargs["num_extra_tokens"] = 1
        super().__init__(*args, **kwargs)
        self.distilled_training = False

    def _init_extra_tokens(self, embed_dim: int) -> None:
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))

    def _init_heads(self, num_classes: int) -> None:
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        super().init_weights()

    def _prefix_tokens(self, x: Tensor) -> List[Tensor]:
        return [self.cls_token.expand(x.shape[0], -1, -1), self.dist_token.expand(x.shape[0], -1, -1)]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^cls_token|pos_embed|patch_embed|dist_token", blocks=[(r"^blocks\.(\d+)", None),
                                                                             (r"^norm", (99999,))])

    @torch.jit.ignore
    def get_classifier(self):
        return self.head, self.head_dist

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, "", "token"):
            raise ValueError("vitops DeiT distilled: global_pool must be 'token'")
        self.num_classes = num_classes
        self._init_heads(num_classes)

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    def forward_head(self, x: Tensor, pre_logits: bool = False):
        x, x_dist = x[:, 0], x[:, 1]
        x = self.head_drop(x)
        x_dist = self.head_drop(x_dist)
        if pre_logits:
            return (x + x_dist) / 2
        x = self.head(x)
        x_dist = self.head_dist(x_dist)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return x, x_dist
        return (x + x_dist) / 2


_cfg = partial(pretrained_cfg, crop_pct=0.9, fixed_input_size=True, first_conv="patch_embed.proj", classifier="head")


_FB = "https://dl.fbaipublicfiles.com/deit/"
_DIST = dict(classifier=("head", "head_dist"))
_384 = dict(input_size=(3, 384, 384), crop_pct=1.0)
register_pretrained_cfgs({
    "deit_tiny_patch16_224.fb_in1k": _cfg(_FB + "deit_tiny_patch16_224-a1311bcf.pth"),
    "deit_small_patch16_224.fb_in1k": _cfg(_FB + "deit_small_patch16_224-cd65a155.pth"),
    "deit_base_patch16_224.fb_in1k": _cfg(_FB + "deit_base_patch16_224-b5f2ef4d.pth"),
    "deit_base_patch16_384.fb_in1k": _cfg(_FB + "deit_base_patch16_384-8de9b5d1.pth", **_384),
    "deit_tiny_distilled_patch16_224.fb_in1k": _cfg(_FB + "deit_tiny_distilled_patch16_224-b40b3cf7.pth", **_DIST),
    "deit_small_distilled_patch16_224.fb_in1k": _cfg(_FB + "deit_small_distilled_patch16_224-649709d9.pth", **_DIST),
    "deit_base_distilled_patch16_224.fb_in1k": _cfg(_FB + "deit_base_distilled_patch16_224-df68dfff.pth", **_DIST),
    "deit_base_distilled_patch16_384.fb_in1k": _cfg(
        _FB + "deit_base_distilled_patch16_384-d0272ac0.pth", **_384, **_DIST),
})  # fmt: skip


def _create_deit(variant: str, pretrained: bool, distilled: bool, model_args: dict, kwargs: dict):
    model_cls = VisionTransformerDistilled if distilled else VisionTransformer
    return _create_vision_transformer(variant, pretrained, model_cls=model_cls, **dict(model_args, **kwargs))


_TINY = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)


@register_model
def deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create_deit("deit_tiny_patch16_224", pretrained, False, _TINY, kwargs)


@register_model
def deit_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create_deit("deit_small_patch16_224", pretrained, False, _SMALL, kwargs)


@register_model
def deit_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create_deit("deit_base_patch16_224", pretrained, False, _BASE, kwargs)


@register_model
def deit_base_patch16_384(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create_deit("deit_base_patch16_384", pretrained, False, dict(_BASE, img_size=384), kwargs)


@register_model
def deit_tiny_distilled_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformerDistilled:
    return _create_deit("deit_tiny_distilled_patch16_224", pretrained, True, _TINY, kwargs)


@register_model
def deit_small_distilled_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformerDistilled:
    return _create_deit("deit_small_distilled_patch16_224", pretrained, True, _SMALL, kwargs)


@register_model
def deit_base_distilled_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformerDistilled:
    return _create_deit("deit_base_distilled_patch16_224", pretrained, True, _BASE, kwargs)


@register_model
def deit_base_distilled_patch16_384(pretrained: bool = False, **kwargs) -> VisionTransformerDistilled:
    return _create_deit("deit_base_distilled_patch16_384", pretrained, True, dict(_BASE, img_size=384), kwargs)
