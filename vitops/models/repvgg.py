"""RepVGG (Ding et al. 2021): VGG-style nets of RepVGG blocks (3x3 conv+BN, 1x1 conv+BN and an identity BN while
training), re-parameterized into plain 3x3 convs for inference with `model.reparameterize()`. Stage layout and
widths, module names and parameter shapes as timm's repvgg_a0..b1 (byobnet: stem, stages.N.M, head.fc), so timm
RepVGG checkpoints load strict=True."""

from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from vitops.layers import RepVGGBlock
from vitops.models._builder import build_model_with_cfg
from vitops.models._common import ClassifierHead, ConvNet, run_blocks
from vitops.models._features import nchw_take_indices
from vitops.models._registry import pretrained_cfg, register_model, register_pretrained_cfgs

__all__ = ["RepVGG", "RepVGGBlock"]


class RepVGG(ConvNet):
    """RepVGG: stem (a stride-2 RepVGG block), stages.0..3 (the first block of each with stride 2), final_conv
    (Identity), head (global_pool, drop, fc, flatten as timm's ClassifierHead).

    Args:
        layers: blocks per stage. widths: channels per stage. stem_chs. num_classes, in_chans, global_pool,
        drop_rate (before fc), drop_path_rate (stochastic depth of the conv branches, as timm), inference_mode
        (build re-parameterized, to load deploy checkpoints).
    """

    def __init__(
        self,
        layers: Tuple[int, ...] = (2, 4, 14, 1),
        widths: Tuple[int, ...] = (48, 96, 192, 1280),
        stem_chs: int = 48,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        inference_mode: bool = False,
    ):
        super().__init__(num_classes, in_chans, drop_rate)
        self.stem = RepVGGBlock(in_chans, stem_chs, 3, stride=2, inference_mode=inference_mode)
        self.feature_info = [dict(num_chs=stem_chs, reduction=2, module="stem", stage=0)]
        stages = []
        in_chs, reduction = stem_chs, 2
        # timm's spacing: linear over the stages' blocks, the stem excluded
        rates = [r.tolist() for r in torch.linspace(0, drop_path_rate, sum(layers), device="cpu").split(list(layers))]
        for i, (depth, width) in enumerate(zip(layers, widths)):
            reduction *= 2
            blocks = []
            for j in range(depth):
                blocks.append(RepVGGBlock(in_chs, width, 3, stride=2 if j == 0 else 1, drop_path=rates[i][j],
                                          inference_mode=inference_mode))  # fmt: skip
                in_chs = width
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"stages.{i}", stage=i + 1))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.final_conv = nn.Identity()
        # as timm: the last level is read after final_conv
        self.feature_info[-1] = dict(num_chs=in_chs, reduction=reduction, module="final_conv", stage=len(layers))
        self.head = ClassifierHead(in_chs, num_classes, global_pool, drop_rate)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @torch.no_grad()
    def reparameterize(self) -> "RepVGG":
        """Folds every block into one 3x3 conv (in place); outputs in eval mode are unchanged."""
        for module in list(self.modules()):
            if module is not self and hasattr(module, "reparameterize"):
                module.reparameterize()
        return self

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise lr decay (timm's optimizer factory): the stem, then each block."""
        stage = r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)"
        return dict(stem=r"^stem", blocks=[(stage, None), (r"^final_conv", (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False) -> None:
        """As timm's; `reset_other` is accepted for timm's sake (this head has nothing else to reset)."""
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_features(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            self._check_input(x)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for stage in self.stages:
                x = run_blocks(stage, x, checkpointing=True)
        else:
            x = self.stages(x)
        return self.final_conv(x)

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        exclude_final_conv: bool = False,
    ):
        """timm's API: (final features, [feature maps at indices]) or, with intermediates_only, the list.
        indices: None for all 5 levels (stem, stages.0..2, final_conv), n for the last n, or a sequence of level
        indices. norm is accepted and unused (no final norm), as in timm; output_fmt must be 'NCHW'.
        exclude_final_conv: the last level is read before final_conv."""
        take_indices, max_index = nchw_take_indices("vitops RepVGG", len(self.feature_info), indices, output_fmt)
        self._check_input(x)
        intermediates = []
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        level, last = 0, len(self.stages)
        for stage in self.stages[:max_index] if stop_early else self.stages:
            level += 1
            x = run_blocks(stage, x, self.grad_checkpointing)
            if level == last and not exclude_final_conv:
                x = self.final_conv(x)
            if level in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if exclude_final_conv and level == last:
            x = self.final_conv(x)
        return x, intermediates

    def _drop_levels_after(self, level: int) -> None:
        """Drops the stages after feature level `level`, and final_conv (the last level)."""
        self.stages = self.stages[:level]
        self.final_conv = nn.Identity()

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


_cfg = partial(
    pretrained_cfg, pool_size=(7, 7), interpolation="bilinear", first_conv=("stem.conv_kxk.conv", "stem.conv_1x1.conv"),
    classifier="head.fc",
)


_REL = "https://github.com/huggingface/pytorch-image-models/releases/download/v0.1-tpu-weights/"
register_pretrained_cfgs({
    "repvgg_a0.rvgg_in1k": _cfg(),
    "repvgg_a1.rvgg_in1k": _cfg(),
    "repvgg_a2.rvgg_in1k": _cfg(_REL + "repvgg_a2-c1ee6d2b.pth"),
    "repvgg_b0.rvgg_in1k": _cfg(_REL + "repvgg_b0-80ac3f1b.pth"),
    "repvgg_b1.rvgg_in1k": _cfg(_REL + "repvgg_b1-77ca2989.pth"),
})


def _widths(wf: Tuple[float, ...]) -> Tuple[int, ...]:
    return tuple(int(c * f) for c, f in zip((64, 128, 256, 512), wf))


def _create_repvgg(variant: str, pretrained: bool, model_args: dict, kwargs: dict) -> RepVGG:
    # timm's default for RepVGG: the 'list' extractor, the stages flattened into stages_0..stages_3
    return build_model_with_cfg(
        RepVGG, variant, pretrained, feature_cfg=dict(flatten_sequential=True), **dict(model_args, **kwargs)
    )


@register_model
def repvgg_a0(pretrained: bool = False, **kwargs) -> RepVGG:
    args = dict(layers=(2, 4, 14, 1), widths=_widths((0.75, 0.75, 0.75, 2.5)), stem_chs=48)
    return _create_repvgg("repvgg_a0", pretrained, args, kwargs)


@register_model
def repvgg_a1(pretrained: bool = False, **kwargs) -> RepVGG:
    args = dict(layers=(2, 4, 14, 1), widths=_widths((1, 1, 1, 2.5)), stem_chs=64)
    return _create_repvgg("repvgg_a1", pretrained, args, kwargs)


@register_model
def repvgg_a2(pretrained: bool = False, **kwargs) -> RepVGG:
    args = dict(layers=(2, 4, 14, 1), widths=_widths((1.5, 1.5, 1.5, 2.75)), stem_chs=64)
    return _create_repvgg("repvgg_a2", pretrained, args, kwargs)


@register_model
def repvgg_b0(pretrained: bool = False, **kwargs) -> RepVGG:
    args = dict(layers=(4, 6, 16, 1), widths=_widths((1, 1, 1, 2.5)), stem_chs=64)
    return _create_repvgg("repvgg_b0", pretrained, args, kwargs)


@register_model
def repvgg_b1(pretrained: bool = False, **kwargs) -> RepVGG:
    args = dict(layers=(4, 6, 16, 1), widths=_widths((2, 2, 2, 4)), stem_chs=64)
    return _create_repvgg("repvgg_b1", pretrained, args, kwargs)
