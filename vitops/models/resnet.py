"""ResNet (He et al. 2015) and ResNet-D (He et al. 2018), with timm 1.0's module names, parameter shapes and
forward: timm checkpoints load strict=True and give the same outputs. Each block ends in a fused
`act(shortcut + drop_path(branch))` (vitops.ops.drop_path_add)."""

import math
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitops.layers import DropPath
from vitops.models._builder import build_model_with_cfg
from vitops.models._common import ConvNet, SelectAdaptivePool2d, run_blocks
from vitops.models._features import nchw_take_indices
from vitops.models._registry import pretrained_cfg, register_model, register_pretrained_cfgs

__all__ = ["ResNet", "BasicBlock", "Bottleneck"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        drop_path: float = 0.0,
    ):
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.drop_block = nn.Identity()
        self.act1 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv2 = nn.Conv2d(planes, outplanes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outplanes)
        self.se = None
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.act1(self.drop_block(self.bn1(self.conv1(x))))
        x = self.bn2(self.conv2(self.aa(x)))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x = self.drop_path.add(shortcut, x)
        return self.act2(x)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        drop_path: float = 0.0,
    ):
        super().__init__()
        width = planes
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.drop_block = nn.Identity()
        self.act2 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv3 = nn.Conv2d(width, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.se = None
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.drop_block(self.bn2(self.conv2(x))))
        x = self.bn3(self.conv3(self.aa(x)))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x = self.drop_path.add(shortcut, x)
        return self.act3(x)


def _downsample(inplanes: int, outplanes: int, stride: int, avg_down: bool) -> nn.Module:
    if avg_down:
        pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride != 1 else nn.Identity()
        return nn.Sequential(pool, nn.Conv2d(inplanes, outplanes, 1, bias=False), nn.BatchNorm2d(outplanes))
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False), nn.BatchNorm2d(outplanes))


class ResNet(ConvNet):
    """ResNet with timm's names: conv1 (a 3-conv Sequential for the 'deep' stem), bn1, act1, maxpool,
    layer1..layer4, global_pool, fc.

    Args:
        block: BasicBlock or Bottleneck. layers: blocks per stage.
        num_classes, in_chans, global_pool ('avg', 'max', 'avgmax', 'catavgmax', ''), drop_rate (before fc),
        drop_path_rate (stochastic depth, rate * block_idx / (num_blocks - 1)), stem_width, stem_type ('' or
        'deep'), avg_down (ResNet-D shortcut), zero_init_last.
    """

    def __init__(
        self,
        block: Type[nn.Module] = Bottleneck,
        layers: Tuple[int, ...] = (3, 4, 6, 3),
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        stem_width: int = 64,
        stem_type: str = "",
        avg_down: bool = False,
        zero_init_last: bool = True,
    ):
        super().__init__(num_classes, in_chans, drop_rate)
        deep_stem = "deep" in stem_type
        inplanes = stem_width * 2 if deep_stem else 64
        if deep_stem:
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_chans, stem_width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, stem_width, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, inplanes, 3, stride=1, padding=1, bias=False),
            )
        else:
            self.conv1 = nn.Conv2d(in_chans, inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=inplanes, reduction=2, module="act1")]

        net_num_blocks = sum(layers)
        net_block_idx = 0
        reduction = 4
        for stage_idx, (planes, num_blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = []
            for block_idx in range(num_blocks):
                block_stride = stride if block_idx == 0 else 1
                downsample = None
                if block_idx == 0 and (stride != 1 or inplanes != planes * block.expansion):
                    downsample = _downsample(inplanes, planes * block.expansion, stride, avg_down)
                dpr = drop_path_rate * net_block_idx / (net_num_blocks - 1) if net_num_blocks > 1 else 0.0
                blocks.append(block(inplanes, planes, block_stride, downsample, drop_path=dpr))
                inplanes = planes * block.expansion
                net_block_idx += 1
            setattr(self, f"layer{stage_idx + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=inplanes, reduction=reduction, module=f"layer{stage_idx + 1}"))

        self.num_features = self.head_hidden_size = inplanes
        self.global_pool = SelectAdaptivePool2d(global_pool)
        self.fc = self._make_fc(num_classes)
        self.init_weights(zero_init_last)

    def _make_fc(self, num_classes: int) -> nn.Module:
        in_features = self.num_features * self.global_pool.feat_mult()
        if num_classes <= 0:
            return nn.Identity()
        if self.global_pool.is_identity():
            raise ValueError("vitops ResNet: a classifier needs pooled features; set global_pool or num_classes=0")
        return nn.Linear(in_features, num_classes)

    def init_weights(self, zero_init_last: bool = True) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if isinstance(self.fc, nn.Linear):
            bound = 1 / math.sqrt(self.fc.in_features)
            nn.init.uniform_(self.fc.weight, -bound, bound)
            nn.init.uniform_(self.fc.bias, -bound, bound)
        if zero_init_last:
            for module in self.modules():
                if isinstance(module, (BasicBlock, Bottleneck)):
                    module.zero_init_last()

    # --- model API ---------------------------------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise lr decay (timm's optimizer factory): the stem, then each block."""
        return dict(stem=r"^conv1|bn1|maxpool", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(global_pool)
        self.fc = self._make_fc(num_classes)

    def _stages(self) -> List[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward_stem(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            self._check_input(x)
        return self.act1(self.bn1(self.conv1(x)))

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.forward_stem(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for stage in self._stages():
                x = run_blocks(stage, x, checkpointing=True)
        else:
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            x = self.layer4(x)
        return x

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's API: (final features, [feature maps at indices]) or, with intermediates_only, the list.
        indices: None for all 5 levels (act1, layer1..4), n for the last n, or a sequence of level indices.
        norm is accepted and unused (ResNet has no final norm), as in timm; output_fmt must be 'NCHW'."""
        take_indices, max_index = nchw_take_indices("vitops ResNet", len(self.feature_info), indices, output_fmt)
        intermediates = []
        x = self.forward_stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        stages = self._stages()
        for i, stage in enumerate(stages[:max_index] if stop_early else stages, start=1):
            x = run_blocks(stage, x, self.grad_checkpointing)
            if i in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def _drop_levels_after(self, level: int) -> None:
        """Empties the stages after feature level `level` (and the maxpool before them all for level 0)."""
        for name in ("layer1", "layer2", "layer3", "layer4")[level:]:
            setattr(self, name, nn.Sequential())
        if level == 0:
            self.maxpool = nn.Identity()

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


_cfg = partial(
    pretrained_cfg, pool_size=(7, 7), crop_pct=0.95, first_conv="conv1", classifier="fc",
    test_input_size=(3, 288, 288), test_crop_pct=1.0,
)


_RSB = "https://github.com/huggingface/pytorch-image-models/releases/download/v0.1-rsb-weights/"
register_pretrained_cfgs({
    "resnet18.a1_in1k": _cfg(_RSB + "resnet18_a1_0-d63eafa0.pth"),
    "resnet34.a1_in1k": _cfg(_RSB + "resnet34_a1_0-46f8f793.pth"),
    "resnet50.a1_in1k": _cfg(_RSB + "resnet50_a1_0-14fe96d1.pth"),
    "resnet101.a1h_in1k": _cfg(_RSB + "resnet101_a1h-36d3f2aa.pth"),
    "resnet152.a1h_in1k": _cfg(_RSB + "resnet152_a1h-dc400468.pth"),
    "resnet50d.ra2_in1k": _cfg(
        "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/resnet50d_ra2-464e36ba.pth",
        first_conv="conv1.0", crop_pct=0.875, test_crop_pct=0.95),
})


def _create_resnet(variant: str, pretrained: bool, model_args: dict, kwargs: dict) -> ResNet:
    return build_model_with_cfg(ResNet, variant, pretrained, **dict(model_args, **kwargs))


@register_model
def resnet18(pretrained: bool = False, **kwargs) -> ResNet:
    return _create_resnet("resnet18", pretrained, dict(block=BasicBlock, layers=(2, 2, 2, 2)), kwargs)


@register_model
def resnet34(pretrained: bool = False, **kwargs) -> ResNet:
    return _create_resnet("resnet34", pretrained, dict(block=BasicBlock, layers=(3, 4, 6, 3)), kwargs)


@register_model
def resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    return _create_resnet("resnet50", pretrained, dict(block=Bottleneck, layers=(3, 4, 6, 3)), kwargs)


@register_model
def resnet101(pretrained: bool = False, **kwargs) -> ResNet:
    return _create_resnet("resnet101", pretrained, dict(block=Bottleneck, layers=(3, 4, 23, 3)), kwargs)


@register_model
def resnet152(pretrained: bool = False, **kwargs) -> ResNet:
    return _create_resnet("resnet152", pretrained, dict(block=Bottleneck, layers=(3, 8, 36, 3)), kwargs)


@register_model
def resnet50d(pretrained: bool = False, **kwargs) -> ResNet:
    args = dict(block=Bottleneck, layers=(3, 4, 6, 3), stem_width=32, stem_type="deep", avg_down=True)
    return _create_resnet("resnet50d", pretrained, args, kwargs)
