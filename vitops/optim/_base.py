"""What vitops' fused optimizers share: argument checks, float32 moment buffers, and the choice of backend."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from vitops import _backend
from vitops.optim import _kernels

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def check_nonnegative(cls: str, name: str, value) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"vitops.optim.{cls}: {name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = float(value)
    if not value >= 0.0:  # also rejects nan
        raise ValueError(f"vitops.optim.{cls}: {name} must be >= 0, got {value}")


def check_betas(cls: str, betas) -> None:
    if len(betas) != 2:
        raise ValueError(f"vitops.optim.{cls}: betas must be a pair (beta1, beta2), got {betas}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"vitops.optim.{cls}: betas[{i}] must be in [0, 1), got {beta}")


class FusedOptimizer(torch.optim.Optimizer):
    """torch.optim.Optimizer with the checks and state layout of vitops' fused optimizers."""

    _name = "Optimizer"

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _check_group(self, group) -> None:
        for p in group["params"]:
            if p.is_sparse:
                raise ValueError(f"vitops.optim.{self._name}: sparse params are not supported")
            if p.is_complex():
                raise ValueError(
                    f"vitops.optim.{self._name}: complex params are not supported (got {p.dtype}); optimize "
                    "torch.view_as_real(param) instead"
                )
            if not p.is_floating_point():
                raise ValueError(f"vitops.optim.{self._name}: params must be floating point, got {p.dtype}")
        self._check_hyperparameters(group)

    def _check_hyperparameters(self, group) -> None:
        check_nonnegative(self._name, "lr", group["lr"])
        check_nonnegative(self._name, "eps", group["eps"])
        check_nonnegative(self._name, "weight_decay", group["weight_decay"])
        check_betas(self._name, group["betas"])

    def _grad_of(self, p: Tensor) -> Tensor:
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError(
                f"vitops.optim.{self._name} does not support sparse gradients; use torch.optim.SparseAdam"
            )
        return grad

    def _moments(self, p: Tensor) -> tuple[Tensor, Tensor]:
        state = self.state[p]
        if "exp_avg" not in state:
            # float32 whatever the param dtype (float64 params keep float64)
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        return state["exp_avg"], state["exp_avg_sq"]

    def load_state_dict(self, state_dict):
        # torch casts floating state to the param's dtype; vitops keeps moments in float32 (timm's checkpoints of
        # float16/bfloat16 params hold them in the param dtype: they are upcast here).
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            for key in MOMENT_KEYS:
                value = state.get(key)
                if isinstance(value, Tensor):
                    want = torch.float64 if p.dtype == torch.float64 else torch.float32
                    if value.dtype != want or not value.is_contiguous():
                        state[key] = value.to(want).contiguous()

    @staticmethod
    def _split(params: list[Tensor], grads: list[Tensor]):
        """Yields (device type, kernel-ready, indices) batches: the kernels take contiguous float32/16/bf16
        params on one device; anything else goes down the reference path."""
        batches = defaultdict(list)
        for i, (p, g) in enumerate(zip(params, grads)):
            batches[(p.device, _kernels.kernel_ok(p, g))].append(i)
        for (device, ok), idx in batches.items():
            yield device, ok, idx

    def _backend(self, op: str, device: torch.device, kernel_ok: bool, caution: bool) -> str:
        if caution or not kernel_ok or device.type not in _backend.DEVICE_TYPES:
            return "torch"
        return _backend.backend_for(op, device.type)
