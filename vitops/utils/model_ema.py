"""Exponential moving average of a model's weights, updated with multi-tensor lerps."""
from __future__ import annotations

from copy import deepcopy
from typing import Optional

import torch
from torch import nn


class ModelEma(nn.Module):
    """An EMA copy of `model` with the semantics of timm.utils.ModelEmaV3 (float32 path): every floating-point
    entry of the state_dict (params and buffers, or params only with exclude_buffers) moves
    ema = lerp(ema, model, 1 - decay); other entries are copied. The update is one multi-tensor lerp per dtype
    (torch._foreach_lerp_) instead of a Python loop over tensors, also when the EMA lives on another device.

    decay at step s (if given): 0 up to update_after_step + 1, then with `warmup`
    clamp(1 - (1 + s' / warmup_gamma) ** -warmup_power, min_decay, decay), s' = s - update_after_step - 1.
    timm's stochastic rounding of bfloat16 EMA weights is not done: keep the EMA in float32 (dtype=torch.float32)
    for a low-precision model.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9998,
        warmup: bool = False,
        device: Optional[torch.device] = None,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        dtype: Optional[torch.dtype] = None,
        exclude_buffers: bool = False,
    ):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"vitops.utils.ModelEma: decay must be in [0, 1], got {decay}")
        self.module = deepcopy(model)
        self.module.eval()
        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_warmup = warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.device = device
        self.dtype = dtype
        self.exclude_buffers = exclude_buffers
        for p in self.module.parameters():
            p.requires_grad_(False)
        if device is not None:
            self.module.to(device=device)
        if dtype is not None:
            self.module.to(dtype=dtype)

    def get_decay(self, step: Optional[int] = None) -> float:
        if step is None:
            return self.decay
        step = max(0, step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_warmup:
            decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
            return max(min(decay, self.decay), self.min_decay)
        return self.decay

    def _pairs(self, model: nn.Module):
        if self.exclude_buffers:
            return list(zip(self.module.parameters(), model.parameters())), list(
                zip(self.module.buffers(), model.buffers())
            )
        return list(zip(self.module.state_dict().values(), model.state_dict().values())), []

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        weight = 1.0 - self.get_decay(step)
        lerp_pairs, copy_pairs = self._pairs(model)
        groups: dict[tuple, tuple[list, list]] = {}
        for ema_v, model_v in lerp_pairs:
            if not ema_v.is_floating_point():
                copy_pairs.append((ema_v, model_v))
                continue
            if model_v.device != ema_v.device:
                model_v = model_v.to(ema_v.device, non_blocking=True)
            key = (ema_v.device, ema_v.dtype, model_v.dtype)
            groups.setdefault(key, ([], []))
            groups[key][0].append(ema_v)
            groups[key][1].append(model_v)
        for (_, ema_dtype, model_dtype), (ema_values, model_values) in groups.items():
            if ema_dtype == model_dtype:
                torch._foreach_lerp_(ema_values, model_values, weight)
            else:  # timm's mixed-dtype path: no cast copies of the model
                torch._foreach_mul_(ema_values, 1.0 - weight)
                torch._foreach_add_(ema_values, model_values, alpha=weight)
        for ema_v, model_v in copy_pairs:
            ema_v.copy_(model_v.to(device=ema_v.device))

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        for ema_v, model_v in zip(self.module.state_dict().values(), model.state_dict().values()):
            ema_v.copy_(model_v.to(device=ema_v.device))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
