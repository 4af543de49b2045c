"""RepVGG (Ding et al. 2021): VGG-style nets of RepVGG blocks (3x3 conv+BN, 1x1 conv+BN and an identity BN while
training), re-parameterized into plain 3x3 convs for inference with `model.reparameterize()`. Stage layout and
widths, module names and parameter shapes as timm's repvgg_a0..b1 (byobnet: stem, stages.N.M, head.fc), so timm
RepVGG checkpoints load strict=True."""

from functools import partial
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitops.layers import RepVGGBlock
from vitops.models._builder import build_model_with_cfg
from vitops.models._common import ClassifierHead, PlainDropPath, check_input
from vitops.models._features import forward_intermediates
from vitops.models._registry import pretrained_cfg, register_model, register_pretrained_cfgs

__all__ = ["RepVGG", "RepVGGBlock"]


class _ConvBn(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


def _fold_bn(weight: Tensor, bn: nn.BatchNorm2d) -> Tuple[Tensor, Tensor]:
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    return weight * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class _RepVGGBlock(nn.Module):
    """A RepVGG block in plain PyTorch with vitops.layers.RepVGGBlock's signature and state_dict, for
    torch.jit.script and ONNX export.
    `act(bn(conv_kxk(x)) + bn(conv_1x1(x)) + bn(x))`, `reparameterize()` folds it into `reparam_conv`."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        act_layer: Optional[type] = nn.ReLU,
        use_identity: bool = True,
        drop_path: float = 0.0,
        inference_mode: bool = False,
    ):
        super().__init__()
        self.in_chs, self.out_chs, self.kernel_size, self.stride, self.groups = in_chs, out_chs, kernel_size, stride, groups
        self.reparam_conv: Optional[nn.Conv2d] = None
        self.conv_kxk: Optional[nn.Module] = None
        self.conv_1x1: Optional[nn.Module] = None
        self.identity: Optional[nn.Module] = None
        if inference_mode:
            self.reparam_conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups)
        else:
            self.conv_kxk = _ConvBn(in_chs, out_chs, kernel_size, stride, groups)
            self.conv_1x1 = _ConvBn(in_chs, out_chs, 1, stride, groups) if kernel_size > 1 else None
            if use_identity and in_chs == out_chs and stride == 1:
                self.identity = nn.BatchNorm2d(out_chs)
        self.drop_path = PlainDropPath(drop_path) if self.identity is not None else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam_conv is not None:
            return self.act(self.reparam_conv(x))
        shortcut: Optional[Tensor] = self.identity(x) if self.identity is not None else None
        out = self.conv_kxk(x)
        if self.conv_1x1 is not None:
            out = out + self.conv_1x1(x)
        if shortcut is not None:
            out = self.drop_path(out) + shortcut
        return self.act(out)

    @torch.no_grad()
    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        weight, bias = _fold_bn(self.conv_kxk.conv.weight, self.conv_kxk.bn)
        k = self.kernel_size
        if self.conv_1x1 is not None:
            w1, b1 = _fold_bn(self.conv_1x1.conv.weight, self.conv_1x1.bn)
            weight = weight + F.pad(w1, [k // 2] * 4)
            bias = bias + b1
        if self.identity is not None:
            in_per_group = self.in_chs // self.groups
            ident = torch.zeros_like(self.conv_kxk.conv.weight)
            for i in range(self.out_chs):
                ident[i, i % in_per_group, k // 2, k // 2] = 1.0
            wi, bi = _fold_bn(ident, self.identity)
            weight, bias = weight + wi, bias + bi
        return weight, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        weight, bias = self.get_equivalent_kernel_bias()
        conv = self.conv_kxk.conv
        self.reparam_conv = nn.Conv2d(
            self.in_chs, self.out_chs, self.kernel_size, conv.stride, conv.padding, conv.dilation, self.groups,
            bias=True, device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        self.reparam_conv.weight.copy_(weight)
        self.reparam_conv.bias.copy_(bias)
        self.conv_kxk = self.conv_1x1 = self.identity = None
        self.drop_path = nn.Identity()


class RepVGG(nn.Module):
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
        scriptable: bool = False,
        exportable: bool = False,
    ):
        super().__init__()
        block = _RepVGGBlock if (scriptable or exportable) else RepVGGBlock
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.stem = block(in_chans, stem_chs, 3, stride=2, inference_mode=inference_mode)
        self._feature_levels = [dict(num_chs=stem_chs, reduction=2, module="stem")]
        stages = []
        in_chs, reduction = stem_chs, 2
        # timm's spacing: linear over the stages' blocks, the stem excluded
        rates = [r.tolist() for r in torch.linspace(0, drop_path_rate, sum(layers), device="cpu").split(list(layers))]
        for i, (depth, width) in enumerate(zip(layers, widths)):
            reduction *= 2
            blocks = []
            for j in range(depth):
                blocks.append(block(in_chs, width, 3, stride=2 if j == 0 else 1, drop_path=rates[i][j],
                                    inference_mode=inference_mode))  # fmt: skip
                in_chs = width
            stages.append(nn.Sequential(*blocks))
            self._feature_levels.append(dict(num_chs=width, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.final_conv = nn.Identity()
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
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def feature_levels(self) -> List[dict]:
        return [dict(f) for f in self._feature_levels]

    @torch.jit.unused
    def _check_input(self, x: Tensor) -> None:
        check_input(x, self.in_chans, type(self).__name__)

    def forward_features(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            self._check_input(x)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
            for stage in self.stages:
                for blk in stage:
                    x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        else:
            x = self.stages(x)
        return self.final_conv(x)

    @torch.jit.ignore
    def forward_feature_maps(self, x: Tensor, indices: List[int]) -> List[Tensor]:
        """Feature maps of the 5 levels (stem, stages.0..3) at `indices`; stops after the last one asked."""
        return self._levels(x, indices, stop_early=True)[0]

    @torch.jit.ignore
    def _levels(self, x: Tensor, indices: List[int], stop_early: bool):
        self._check_input(x)
        wanted = set(indices)
        last = max(indices) if stop_early else len(self.stages)
        outs = {}
        x = self.stem(x)
        if 0 in wanted:
            outs[0] = x
        for i, stage in enumerate(self.stages, start=1):
            if i > last:
                break
            if self.grad_checkpointing and torch.is_grad_enabled():
                for blk in stage:
                    x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = stage(x)
            if i == len(self.stages):
                x = self.final_conv(x)
            if i in wanted:
                outs[i] = x
        return [outs[i] for i in indices], x

    @torch.jit.ignore
    def forward_intermediates(self, x: Tensor, indices=None, stop_early: bool = False,
                              intermediates_only: bool = False):
        """timm's API: (final features, [feature maps at indices]) or, with intermediates_only, the list.
        indices: None for all 5 levels, n for the last n, or a sequence of level indices."""
        return forward_intermediates(self, x, indices, stop_early, intermediates_only)

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
    return build_model_with_cfg(
        RepVGG, variant, pretrained, default_out_indices=(0, 1, 2, 3, 4), **dict(model_args, **kwargs)
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
