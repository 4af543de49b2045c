"""DropPath, a drop-in for timm.layers.DropPath backed by vitops.ops.drop_path."""
from typing import Optional

import torch.fx
from torch import Tensor, nn

from vitops.ops.drop_path import drop_path, drop_path_add

# Leaves of a torch.fx trace (their argument checks can't run on proxies), so models built from these layers
# trace, e.g. for vitops.reparameterize's Conv -> BatchNorm search.
torch.fx.wrap("drop_path")
torch.fx.wrap("drop_path_add")


class DropPath(nn.Module):
    """Stochastic depth per sample, for the main path of residual blocks. Same arguments, state and repr as
    timm's DropPath. Where a block ends in `x + drop_path(branch)`, call `add(x, branch)` instead: it fuses
    the residual add (and LayerScale) into one pass over memory."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def add(self, residual: Tensor, branch: Tensor, gamma: Optional[Tensor] = None) -> Tensor:
        """`residual + self(branch * gamma)`, fused; see vitops.ops.drop_path_add."""
        return drop_path_add(residual, branch, self.drop_prob, self.training, gamma, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"
