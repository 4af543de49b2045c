"""DropPath, a drop-in for timm.layers.DropPath backed by vitops.ops.drop_path_add."""
from typing import Optional

import torch
import torch.fx
from torch import Tensor, nn
from torch.jit import Final

from vitops.layers.config import use_fused_ops
from vitops.ops import drop_path, drop_path_add, reference

# Leaves of a torch.fx trace (their argument checks can't run on proxies), so models built from these layers
# trace, e.g. for vitops.reparameterize's Conv -> BatchNorm search.
torch.fx.wrap("drop_path")
torch.fx.wrap("drop_path_add")


class DropPath(nn.Module):
    """Stochastic depth per sample, for the main path of residual blocks. Same arguments, state and repr as
    timm's DropPath. Where a block ends in `x + drop_path(branch * gamma)`, call `add(x, branch, gamma)` instead:
    it fuses the residual add (and LayerScale) into one pass over memory (vitops.ops.drop_path_add).

    Built plain (see vitops.layers.config: scriptable/exportable), it computes timm's formulas in stock PyTorch
    ops; the same seed draws the same mask either way."""

    fused: Final[bool]

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = float(drop_prob)
        self.scale_by_keep = scale_by_keep
        self.fused = use_fused_ops()

    def forward(self, x: Tensor) -> Tensor:
        if not self.fused:
            return reference.drop_path(x, self.drop_prob, self.training, self.scale_by_keep)
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    @torch.jit.export
    def add(self, residual: Tensor, branch: Tensor, gamma: Optional[Tensor] = None) -> Tensor:
        """`residual + self(branch * gamma)`; fused unless the layer was built plain. gamma: a LayerScale's
        `broadcast_gamma()`, or None."""
        if not self.fused:
            return residual + reference.drop_path(
                branch if gamma is None else branch * gamma, self.drop_prob, self.training, self.scale_by_keep
            )
        return drop_path_add(residual, branch, self.drop_prob, self.training, gamma, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"
