"""Helpers shared by the re-parameterizable layers: folding a BatchNorm into a kernel, the identity kernel,
and padding a small kernel into the centre of a bigger one (all differentiable); the base class of the blocks of
parallel conv branches."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitops.ops import fuse_conv_bn


def bn_statistics(bn: nn.Module, where: str) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, float]:
    """(running_mean, running_var, weight, bias, eps) of a BatchNorm, the affine pair None when it has none."""
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        raise ValueError(
            f"{where}: can't fold a BatchNorm without running statistics (track_running_stats=False): its "
            "output depends on the batch"
        )
    affine = getattr(bn, "affine", True)
    weight = bn.weight if affine else None
    bias = bn.bias if affine else None
    return bn.running_mean, bn.running_var, weight, bias, float(bn.eps)


def fold_bn(weight: Tensor, bias: Tensor | None, bn: nn.Module, where: str) -> tuple[Tensor, Tensor]:
    """The (weight, bias) of `bn(conv(x))` as a single conv, with bn in inference mode."""
    mean, var, gamma, beta, eps = bn_statistics(bn, where)
    return fuse_conv_bn(weight, bias, mean, var, gamma, beta, eps)


def identity_kernel(channels: int, in_per_group: int, kernel_size: tuple[int, int], like: Tensor) -> Tensor:
    """The kernel of a grouped conv that copies its input: 1 at [i, i % in_per_group, centre row, centre col]."""
    kernel = torch.zeros((channels, in_per_group) + tuple(kernel_size), dtype=like.dtype, device=like.device)
    index = torch.arange(channels, device=like.device)
    kernel[index, index % in_per_group, kernel_size[0] // 2, kernel_size[1] // 2] = 1
    return kernel


def pad_to(kernel: Tensor, kernel_size: tuple[int, int]) -> Tensor:
    """`kernel` zero-padded symmetrically to `kernel_size` (the size differences must be even)."""
    dh = kernel_size[0] - kernel.shape[-2]
    dw = kernel_size[1] - kernel.shape[-1]
    if dh == 0 and dw == 0:
        return kernel
    return F.pad(kernel, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))


def pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def check_odd_kernel(where: str, kernel_size: int) -> None:
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"{where}: kernel_size must be an odd int >= 1 so the branches share a centre, got {kernel_size!r}"
        )


def check_groups(where: str, in_chs: int, out_chs: int, groups: int) -> None:
    if groups < 1 or in_chs % groups or out_chs % groups:
        raise ValueError(f"{where}: groups={groups} must divide in_chs={in_chs} and out_chs={out_chs}")


def in_layout_of(new: Tensor, old: Tensor) -> Tensor:
    """`new` in `old`'s memory format when that is channels_last (fused weights come back contiguous)."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    memory_format = formats.get(old.dim())
    if memory_format is not None and not old.is_contiguous() and old.is_contiguous(memory_format=memory_format):
        return new.contiguous(memory_format=memory_format)
    return new


def new_conv_like(template: nn.Conv2d, weight: Tensor, bias: Tensor, kernel_size, padding) -> nn.Conv2d:
    """A biased Conv2d with `template`'s channels, stride, dilation and groups, holding weight and bias."""
    conv = nn.Conv2d(
        template.in_channels, template.out_channels, kernel_size, stride=template.stride, padding=padding,
        dilation=template.dilation, groups=template.groups, bias=True, device=weight.device, dtype=weight.dtype,
    )  # fmt: skip
    with torch.no_grad():
        conv.weight = nn.Parameter(in_layout_of(weight.detach().clone(), template.weight))
        conv.bias.copy_(bias)
    return conv.train(template.training)


class ReparamConvBlock(nn.Module):
    """A block of parallel conv branches that re-parameterizes into `reparam_conv`, one biased k x k conv (ACBlock,
    RepVGGBlock). This checks the arguments and builds `reparam_conv` directly in inference mode; the block builds
    its branches otherwise (the attributes named in BRANCHES, `conv_kxk` the k x k one) and gives
    get_equivalent_kernel_bias()."""

    BRANCHES = ("conv_kxk",)

    def __init__(
        self, where: str, in_chs: int, out_chs: int, kernel_size: int, stride: int, dilation: int, groups: int,
        inference_mode: bool, factory: dict,
    ):  # fmt: skip
        super().__init__()
        check_odd_kernel(where, kernel_size)
        check_groups(where, in_chs, out_chs, groups)
        self.kernel_size = kernel_size
        self.reparam_conv = None
        for name in self.BRANCHES:
            setattr(self, name, None)
        if inference_mode:
            self.reparam_conv = nn.Conv2d(
                in_chs, out_chs, kernel_size, stride=stride, padding=dilation * (kernel_size // 2), dilation=dilation,
                groups=groups, bias=True, **factory,
            )  # fmt: skip

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Replaces the branches by `reparam_conv`, in place. Uses the BNs' running statistics. Idempotent."""
        if self.reparam_conv is not None:
            return
        weight, bias = self.get_equivalent_kernel_bias()
        template = self.conv_kxk.conv
        self.reparam_conv = new_conv_like(template, weight, bias, template.kernel_size, template.padding)
        for name in self.BRANCHES:
            setattr(self, name, None)
