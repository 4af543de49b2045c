"""RepVGGBlock: a k x k conv + BN, a 1 x 1 conv + BN and an identity BN summed while training, re-parameterized
into one k x k conv for inference (Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", 2021)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from vitops.layers._fusion import ReparamConvBlock, fold_bn, identity_kernel, pad_to
from vitops.layers.conv_norm_act import ConvNormAct
from vitops.layers.drop_path import DropPath


class RepVGGBlock(ReparamConvBlock):
    """`act(bn(conv_kxk(x)) + bn(conv_1x1(x)) + bn(x))`, the identity branch present when in_chs == out_chs,
    stride == 1 and `use_identity`. With `drop_path` > 0 the conv branches are dropped per sample while training,
    as in timm's RepVggBlock, fused into the identity add (vitops.ops.drop_path_add).
    `reparameterize()` replaces the branches by `reparam_conv`, one biased k x k conv computing the same function
    with the BatchNorms in inference mode:
    `K = K_kxk + pad(K_1x1) + K_id` with the identity kernel 1 at [i, i % (in_chs / groups), k // 2, k // 2],
    each BN folded into its branch first, and the biases summed.

    Args:
        in_chs, out_chs: channels.
        kernel_size: odd int. stride, dilation, groups: as nn.Conv2d; padding keeps the size at stride 1.
        act_layer: the activation's class (None for none).
        use_identity: add the identity BN branch where shapes allow.
        drop_path: stochastic depth rate of the conv branches (blocks with an identity branch only).
        inference_mode: build the re-parameterized form directly, to load a deploy checkpoint.
    """

    BRANCHES = ("conv_kxk", "conv_1x1", "identity", "drop_path")

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        act_layer: type[nn.Module] | None = nn.ReLU,
        use_identity: bool = True,
        drop_path: float = 0.0,
        inference_mode: bool = False,
        device=None,
        dtype=None,
    ):
        factory = dict(device=device, dtype=dtype)
        super().__init__(
            "vitops.layers.RepVGGBlock", in_chs, out_chs, kernel_size, stride, dilation, groups, inference_mode,
            factory,
        )  # fmt: skip
        self.in_chs, self.out_chs, self.groups = in_chs, out_chs, groups
        # the branches registered in timm's order, so parameters() and the state_dict list them as timm's RepVggBlock
        if not inference_mode:
            padding = dilation * (kernel_size // 2)
            if use_identity and in_chs == out_chs and stride == 1:
                self.identity = nn.BatchNorm2d(out_chs, **factory)
            self.conv_kxk = ConvNormAct(
                in_chs, out_chs, kernel_size, stride, padding, dilation, groups, apply_act=False, **factory
            )
            if kernel_size > 1:
                self.conv_1x1 = ConvNormAct(in_chs, out_chs, 1, stride, 0, 1, groups, apply_act=False, **factory)
        self.drop_path = DropPath(drop_path) if drop_path > 0 and self.identity is not None else None
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam_conv is not None:
            return self.act(self.reparam_conv(x))
        # the branches run in timm's order, so fx graphs of the two list their modules alike
        shortcut: Optional[Tensor] = None
        if self.identity is not None:
            shortcut = self.identity(x)
        if self.conv_1x1 is not None:
            out = self.conv_1x1(x) + self.conv_kxk(x)
        else:
            out = self.conv_kxk(x)
        if shortcut is not None:
            out = self.drop_path.add(shortcut, out) if self.drop_path is not None else out + shortcut
        return self.act(out)

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The (weight, bias) of the single conv equal to the branches with their BNs in inference mode.
        Differentiable, so it can stand in for the branches while training (e.g. for a weight penalty)."""
        if self.reparam_conv is not None:
            return self.reparam_conv.weight, self.reparam_conv.bias
        k = (self.kernel_size, self.kernel_size)
        weight, bias = self.conv_kxk.fused_weight_bias()
        if self.conv_1x1 is not None:
            w1, b1 = self.conv_1x1.fused_weight_bias()
            weight = weight + pad_to(w1, k)
            bias = bias + b1
        if self.identity is not None:
            kernel = identity_kernel(self.out_chs, self.in_chs // self.groups, k, weight)
            wi, bi = fold_bn(kernel, None, self.identity, "vitops.layers.RepVGGBlock")
            weight = weight + wi
            bias = bias + bi
        return weight, bias
