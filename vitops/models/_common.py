"""Pieces shared by the model files: global pooling, the classifier head, gradient checkpointing, input checks."""

from typing import List, Optional, Union

import torch
from torch import Tensor, nn

from vitops.models._features import feature_take_indices

CNN_POOL_TYPES = ("", "avg", "max", "avgmax", "catavgmax")


class SelectAdaptivePool2d(nn.Module):
    """Global pooling of NCHW maps to (N, C) (or (N, 2C) for catavgmax); '' keeps the maps. No parameters, as
    timm's SelectAdaptivePool2d with flatten=True."""

    def __init__(self, pool_type: str = "avg", flatten: bool = True):
        super().__init__()
        if pool_type not in CNN_POOL_TYPES:
            raise ValueError(f"vitops: unknown global_pool {pool_type!r}; choose one of {CNN_POOL_TYPES}")
        self.pool_type = pool_type or ""
        self.flatten = flatten

    def is_identity(self) -> bool:
        return not self.pool_type

    def feat_mult(self) -> int:
        return 2 if self.pool_type == "catavgmax" else 1

    def forward(self, x: Tensor) -> Tensor:
        if self.pool_type == "":
            return x
        if self.pool_type == "avg":
            x = x.mean((2, 3), keepdim=True)
        elif self.pool_type == "max":
            x = x.amax((2, 3), keepdim=True)
        elif self.pool_type == "avgmax":
            x = 0.5 * (x.mean((2, 3), keepdim=True) + x.amax((2, 3), keepdim=True))
        else:
            x = torch.cat((x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)), dim=1)
        return x.flatten(1) if self.flatten else x

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type}, flatten={self.flatten}"


class ClassifierHead(nn.Module):
    """timm's ClassifierHead: global_pool, drop, fc, flatten (Identity); `pre_logits=True` skips fc."""

    def __init__(self, in_features: int, num_classes: int, pool_type: str = "avg", drop_rate: float = 0.0):
        super().__init__()
        self.in_features = in_features
        self.global_pool = SelectAdaptivePool2d(pool_type)
        self.drop = nn.Dropout(drop_rate)
        self.fc = self._make_fc(num_classes)
        self.flatten = nn.Identity()

    def _make_fc(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        if self.global_pool.is_identity():
            raise ValueError("vitops: a classifier needs pooled features; set global_pool or num_classes=0")
        return nn.Linear(self.in_features * self.global_pool.feat_mult(), num_classes)

    def reset(self, num_classes: int, pool_type: Optional[str] = None) -> None:
        if pool_type is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type)
        self.fc = self._make_fc(num_classes)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(self.global_pool(x))
        if pre_logits:
            return self.flatten(x)
        return self.flatten(self.fc(x))


def run_blocks(blocks: nn.Module, x: Tensor, checkpointing: bool) -> Tensor:
    """x through a Sequential of blocks; with checkpointing (and grad enabled) each block's activations are
    recomputed in backward instead of kept, as timm's checkpoint_seq."""
    if not (checkpointing and torch.is_grad_enabled()):
        return blocks(x)
    for block in blocks:
        x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    return x


def check_input(x: Tensor, in_chans: int, model: str, min_size: int = 1, fixed_size=None) -> None:
    """Clear errors for inputs a model can't take (skipped under scripting/tracing)."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return
    if isinstance(x, torch.fx.Proxy):  # symbolic tracing (vitops.reparameterize's pair search, timm's features)
        return
    if x.ndim != 4:
        raise ValueError(f"vitops {model}: expected a 4-d (N, C, H, W) image batch, got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"vitops {model}: expected {in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)}); "
            f"create the model with in_chans={x.shape[1]} to take such inputs"
        )
    if fixed_size is not None and tuple(x.shape[2:]) != tuple(fixed_size):
        raise ValueError(
            f"vitops {model}: expected {fixed_size[0]}x{fixed_size[1]} images, got {x.shape[2]}x{x.shape[3]}; "
            f"create the model with img_size={tuple(x.shape[2:])} (pretrained position embeddings are resampled)"
        )
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(f"vitops {model}: images must be at least {min_size}x{min_size}, got {tuple(x.shape[2:])}")


class ConvNet(nn.Module):
    """What the CNNs (ResNet, RepVGG) share: timm's attributes and model API around their stages. No parameter is
    exempt from weight decay; prune_intermediate_layers drops the levels through the model's `_drop_levels_after`."""

    def __init__(self, num_classes: int, in_chans: int, drop_rate: float):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.unused
    def _check_input(self, x: Tensor) -> None:
        check_input(x, self.in_chans, type(self).__name__)

    def _drop_levels_after(self, level: int) -> None:
        raise NotImplementedError

    @torch.jit.ignore
    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drops the feature levels after the last of `indices` (and the head) for feature extraction; returns the
        indices, counted from 0."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        pruned = max_index < len(self.feature_info) - 1
        if pruned:
            self._drop_levels_after(max_index)
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or pruned:
            self.reset_classifier(0, "")
        return take_indices


__all__ = ["ClassifierHead", "ConvNet", "SelectAdaptivePool2d", "check_input", "run_blocks"]
