"""ConvNormAct: Conv2d -> BatchNorm2d -> activation, with fuse() to fold the BatchNorm into the conv."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from vitops.layers._fusion import fold_bn, in_layout_of, pair


def same_padding(kernel_size, stride=1, dilation=1) -> tuple[int, int]:
    """Symmetric padding that keeps the size at stride 1 (and gives ceil(size / stride) for odd kernels)."""
    k, s, d = pair(kernel_size), pair(stride), pair(dilation)
    return tuple(((s[i] - 1) + d[i] * (k[i] - 1)) // 2 for i in range(2))


class ConvNormAct(nn.Module):
    """`act(bn(conv(x)))`. After `fuse()` (or with `inference_mode=True`) it is `act(conv(x))` with a biased conv,
    the BatchNorm folded in; its state_dict then holds conv.weight and conv.bias only.

    Args:
        in_chs, out_chs, kernel_size, stride, dilation, groups: as nn.Conv2d (ints or pairs).
        padding: as nn.Conv2d; None (default) pads symmetrically to keep the size at stride 1.
        bias: give the conv a bias before the BatchNorm (folded too).
        apply_act: False for no activation.
        act_layer: the activation's class, called with no arguments.
        inference_mode: build the fused form directly, to load a fused (deploy) checkpoint.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size=1,
        stride=1,
        padding=None,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        apply_act: bool = True,
        act_layer: type[nn.Module] | None = nn.ReLU,
        inference_mode: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if padding is None:
            padding = same_padding(kernel_size, stride, dilation)
        self.conv = nn.Conv2d(
            in_chs, out_chs, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
            bias=bias or inference_mode, device=device, dtype=dtype,
        )  # fmt: skip
        self.bn = nn.Identity() if inference_mode else nn.BatchNorm2d(out_chs, device=device, dtype=dtype)
        self.act = act_layer() if apply_act and act_layer is not None else nn.Identity()
        self.inference_mode = inference_mode

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))

    def fused_weight_bias(self) -> tuple[Tensor, Tensor]:
        """The (weight, bias) of conv + BatchNorm as one conv, BatchNorm in inference mode; differentiable."""
        if self.inference_mode:
            bias = self.conv.bias if self.conv.bias is not None else torch.zeros_like(self.conv.weight[:, 0, 0, 0])
            return self.conv.weight, bias
        return fold_bn(self.conv.weight, self.conv.bias, self.bn, "vitops.layers.ConvNormAct")

    @torch.no_grad()
    def fuse(self) -> None:
        """Folds the BatchNorm's running statistics and affine into the conv, in place. Idempotent."""
        if self.inference_mode:
            return
        weight, bias = self.fused_weight_bias()
        old = self.conv.weight
        self.conv.weight = nn.Parameter(in_layout_of(weight.detach().clone(), old), requires_grad=old.requires_grad)
        self.conv.bias = nn.Parameter(bias.detach().clone())
        self.bn = nn.Identity().train(self.training)
        self.inference_mode = True

    def reparameterize(self) -> None:
        """Same as fuse(): the name vitops.reparameterize and timm look for."""
        self.fuse()
