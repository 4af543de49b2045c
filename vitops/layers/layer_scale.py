"""LayerScale and LayerScale2d with timm's names (`gamma`), arguments and state_dict keys."""
import torch
from torch import Tensor, nn


class LayerScale(nn.Module):
    """Per-channel scale of (..., C) tokens: `x * gamma`. In a residual block, pass `gamma` to
    vitops.ops.drop_path_add instead of calling this module, to fuse the scale into the residual add."""

    def __init__(self, dim: int, init_values: float = 1e-5, inplace: bool = False, device=None, dtype=None):
        super().__init__()
        self.init_values = init_values
        self.inplace = inplace
        self.gamma = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def broadcast_gamma(self) -> Tensor:
        """gamma shaped to broadcast against this module's inputs, as drop_path_add takes it."""
        return self.gamma

    def forward(self, x: Tensor) -> Tensor:
        gamma = self.broadcast_gamma()
        return x.mul_(gamma) if self.inplace else x * gamma


class LayerScale2d(LayerScale):
    """Per-channel scale of NCHW maps: `x * gamma.view(C, 1, 1)`."""

    def broadcast_gamma(self) -> Tensor:
        return self.gamma.view(-1, 1, 1)
