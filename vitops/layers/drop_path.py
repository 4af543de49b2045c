"""DropPath, a drop-in for timm.layers.DropPath backed by vitops.ops.drop_path_add."""
from typing import List, Optional

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


def _scripted_drop_path_add(
    residual: Optional[Tensor],
    branch: Tensor,
    gamma: Optional[Tensor],
    drop_prob: float,
    training: bool,
    scale_by_keep: bool,
) -> Tensor:
    """TorchScript's way to the fused op (vitops.ops.drop_path_add is Python that TorchScript can't compile):
    the mask drawn by the reference as the eager path draws it, and the op's operands in the dtypes it takes."""
    out_dtype = branch.dtype if gamma is None else torch.promote_types(branch.dtype, gamma.dtype)
    if residual is not None:
        out_dtype = torch.promote_types(residual.dtype, out_dtype)
        residual = residual.to(out_dtype)
    branch = branch.to(out_dtype)
    acc = reference.accumulate_dtype(out_dtype)
    sample_scale: Optional[Tensor] = None
    if training and drop_prob > 0.0:
        sample_scale = reference.sample_scale(
            branch.shape[0], drop_prob, scale_by_keep, dtype=out_dtype, device=branch.device
        ).to(acc)
    elif gamma is None:
        return branch if residual is None else residual + branch
    if gamma is not None:
        gamma = gamma.to(acc)
    return torch.ops.vitops.drop_path_add(residual, branch, gamma, sample_scale)


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

    def _plain(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        scale = reference.sample_scale(
            x.shape[0], self.drop_prob, self.scale_by_keep, dtype=x.dtype, device=x.device
        )
        shape: List[int] = [-1] + [1] * (x.ndim - 1)
        return x * scale.view(shape)

    def forward(self, x: Tensor) -> Tensor:
        if not self.fused:
            return self._plain(x)
        if torch.jit.is_scripting():
            return _scripted_drop_path_add(None, x, None, self.drop_prob, self.training, self.scale_by_keep)
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    @torch.jit.export
    def add(self, residual: Tensor, branch: Tensor, gamma: Optional[Tensor] = None) -> Tensor:
        """`residual + self(branch * gamma)`; fused unless the layer was built plain. gamma: a LayerScale's
        `broadcast_gamma()`, or None."""
        if not self.fused:
            return residual + self._plain(branch if gamma is None else branch * gamma)
        if torch.jit.is_scripting():
            return _scripted_drop_path_add(
                residual, branch, gamma, self.drop_prob, self.training, self.scale_by_keep
            )
        return drop_path_add(residual, branch, self.drop_prob, self.training, gamma, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"
