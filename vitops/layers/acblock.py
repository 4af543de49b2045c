"""ACBlock: asymmetric convolution block (Ding et al., "ACNet", 2019): a k x k, a 1 x k and a k x 1 conv, each
with its own BatchNorm, summed while training and re-parameterized into one k x k conv for inference."""
from __future__ import annotations

from torch import Tensor, nn

from vitops.layers._fusion import ReparamConvBlock, pad_to
from vitops.layers.conv_norm_act import ConvNormAct


class ACBlock(ReparamConvBlock):
    """`act(bn(conv_kxk(x)) + bn(conv_1xk(x)) + bn(conv_kx1(x)))`, a drop-in for a k x k conv + BN.
    `reparameterize()` folds each BN into its branch, adds the 1 x k kernel into the centre row and the k x 1
    kernel into the centre column of the k x k one, sums the biases and keeps the single `reparam_conv`.

    Args:
        in_chs, out_chs: channels.
        kernel_size: odd int. stride, dilation, groups: as nn.Conv2d; padding keeps the size at stride 1.
        act_layer: the activation's class, or None (default) for none.
        inference_mode: build the re-parameterized form directly, to load a deploy checkpoint.
    """

    BRANCHES = ("conv_kxk", "conv_1xk", "conv_kx1")

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        act_layer: type[nn.Module] | None = None,
        inference_mode: bool = False,
        device=None,
        dtype=None,
    ):
        factory = dict(device=device, dtype=dtype)
        super().__init__(
            "vitops.layers.ACBlock", in_chs, out_chs, kernel_size, stride, dilation, groups, inference_mode, factory
        )
        if not inference_mode:
            k, p = kernel_size, dilation * (kernel_size // 2)

            def branch(kernel, padding):
                return ConvNormAct(
                    in_chs, out_chs, kernel, stride, padding, dilation, groups, apply_act=False, **factory
                )

            self.conv_kxk = branch((k, k), (p, p))
            self.conv_1xk = branch((1, k), (0, p))
            self.conv_kx1 = branch((k, 1), (p, 0))
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam_conv is not None:
            return self.act(self.reparam_conv(x))
        return self.act(self.conv_kxk(x) + self.conv_1xk(x) + self.conv_kx1(x))

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The (weight, bias) of the single conv equal to the three branches, BNs in inference mode;
        differentiable."""
        if self.reparam_conv is not None:
            return self.reparam_conv.weight, self.reparam_conv.bias
        k = (self.kernel_size, self.kernel_size)
        weight, bias = self.conv_kxk.fused_weight_bias()
        w_row, b_row = self.conv_1xk.fused_weight_bias()
        w_col, b_col = self.conv_kx1.fused_weight_bias()
        return weight + pad_to(w_row, k) + pad_to(w_col, k), bias + b_row + b_col
