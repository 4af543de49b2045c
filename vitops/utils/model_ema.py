"""Exponential moving average of a model's weights: timm's ModelEmaV3, updated with multi-tensor ops."""
from __future__ import annotations

import warnings
from copy import deepcopy

import torch
from torch import Tensor, nn

# Values stochastically rounded to bfloat16 together, at most (timm's chunk): bounds the float32 copies.
_ROUNDING_CHUNK_NUMEL = 2**22


class ModelEma(nn.Module):
    """timm.utils.ModelEmaV3: same arguments (order, names, defaults), attributes and results, bit for bit.

    Every floating-point entry of the state_dict (the params only with exclude_buffers; the buffers are then copied)
    moves ema = lerp(ema, model, 1 - decay); other entries are copied. With `step`, the decay is 0 up to
    update_after_step + 1, then `decay`, or with use_warmup
    clamp(1 - (1 + s / warmup_gamma) ** -warmup_power, min_decay, decay) at s = step - update_after_step - 1.
    `device` and `dtype` keep the EMA elsewhere (e.g. "cpu", or float32 for a low-precision model). bfloat16 EMA
    values are rounded stochastically (stochastic_rounding, from a private generator seeded with
    stochastic_rounding_seed, so every rank rounds alike): a plain update far below bfloat16's resolution would round
    away.

    The update is multi-tensor (torch._foreach_*). Where timm updates tensor by tensor (foreach=False, or the EMA on
    another device than the model), the model's values are first moved to the EMA's device and dtype, then lerped
    in one multi-tensor call: timm's per-tensor results, without its loop. Unlike timm's, the EMA's params don't
    require grad.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        stochastic_rounding: bool = True,
        stochastic_rounding_seed: int = 0,
        foreach: bool = True,
        exclude_buffers: bool = False,
        *,
        warmup: bool | None = None,
    ):
        super().__init__()
        if warmup is not None:
            warnings.warn(
                "vitops.utils.ModelEma: `warmup` is deprecated, use timm's name `use_warmup`",
                DeprecationWarning,
                stacklevel=2,
            )
            use_warmup = warmup
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"vitops.utils.ModelEma: decay must be in [0, 1], got {decay}")
        if not 0.0 <= min_decay <= 1.0:
            raise ValueError(f"vitops.utils.ModelEma: min_decay must be in [0, 1], got {min_decay}")
        self.module = deepcopy(model)
        self.module.eval()
        self.decay, self.min_decay, self.update_after_step = decay, min_decay, update_after_step
        self.use_warmup, self.warmup_gamma, self.warmup_power = use_warmup, warmup_gamma, warmup_power
        self.device, self.dtype, self.foreach, self.exclude_buffers = device, dtype, foreach, exclude_buffers
        self.stochastic_rounding, self.stochastic_rounding_seed = stochastic_rounding, stochastic_rounding_seed
        for p in self.module.parameters():
            p.requires_grad_(False)
        if device is not None and device != next(model.parameters()).device:
            self.foreach = False  # timm's per-tensor path, whose results this keeps
            self.module.to(device=device)
        if dtype is not None:
            self.module.to(dtype=dtype)
        self._rounding_generator = torch.Generator(device=next(self.module.parameters()).device)
        self._rounding_generator.manual_seed(stochastic_rounding_seed)

    def get_decay(self, step: int | None = None) -> float:
        if step is None:
            return self.decay
        step = max(0, step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_warmup:
            decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
            return max(min(decay, self.decay), self.min_decay)
        return self.decay

    def _pairs(self, model: nn.Module) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]:
        """(EMA value, model value) pairs to lerp, and to copy."""
        if self.exclude_buffers:
            return (
                _matched("params", self.module.parameters(), model.parameters()),
                _matched("buffers", self.module.buffers(), model.buffers()),
            )
        lerps, copies = [], []
        for ema_v, model_v in _matched("state_dict entries", self.module.state_dict().values(),
                                       model.state_dict().values()):  # fmt: skip
            (lerps if ema_v.is_floating_point() else copies).append((ema_v, model_v))
        return lerps, copies

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        weight = 1.0 - self.get_decay(step)
        lerps, copies = self._pairs(model)
        for ema_v, model_v in copies:
            ema_v.copy_(model_v)
        rounded = [pair for pair in lerps if self.stochastic_rounding and pair[0].dtype == torch.bfloat16]
        plain = [pair for pair in lerps if not (self.stochastic_rounding and pair[0].dtype == torch.bfloat16)]
        if self.foreach:
            if rounded:
                self._lerp_rounded(rounded, weight)
            if plain:
                _foreach_lerp_mixed_(plain, weight)
            return
        # timm's per-tensor path: each model value moved to the EMA's device (synchronously: a device-to-host copy
        # that doesn't wait could be read before it lands), cast to its dtype for a plain lerp, rounded tensor by
        # tensor (which sets the order of the random draws).
        for ema_v, model_v in rounded:
            self._lerp_rounded([(ema_v, model_v.to(device=ema_v.device))], weight)
        if plain:
            ema_values = [ema_v for ema_v, _ in plain]
            model_values = [model_v.to(device=e.device, dtype=e.dtype) for e, model_v in plain]
            torch._foreach_lerp_(ema_values, model_values, weight)

    def _lerp_rounded(self, pairs: list[tuple[Tensor, Tensor]], weight: float) -> None:
        """ema = lerp(ema, model, weight) for bfloat16 EMA values: in float32, then rounded to bfloat16 up with the
        probability of the discarded fraction (16 random bits added below the kept mantissa, then cut off). The
        values go in chunks of at most _ROUNDING_CHUNK_NUMEL elements (a larger tensor alone), one draw per element."""
        chunk, numel = [], 0
        for ema_v, model_v in pairs:
            if numel and numel + ema_v.numel() > _ROUNDING_CHUNK_NUMEL:
                self._round_chunk(chunk, weight)
                chunk, numel = [], 0
            chunk.append((ema_v, model_v))
            numel += ema_v.numel()
        if chunk:
            self._round_chunk(chunk, weight)

    def _round_chunk(self, chunk: list[tuple[Tensor, Tensor]], weight: float) -> None:
        ema_values = [ema_v for ema_v, _ in chunk]
        x = torch.cat([ema_v.reshape(-1) for ema_v in ema_values]).float()
        x.mul_(1.0 - weight).add_(torch.cat([model_v.reshape(-1) for _, model_v in chunk]), alpha=weight)
        bits = x.view(torch.int32)
        noise = torch.randint(
            0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=self._rounding_generator
        )
        bits.add_(noise).bitwise_and_(-(1 << 16))  # x is now exactly a bfloat16 value
        pieces = x.split([ema_v.numel() for ema_v in ema_values])
        torch._foreach_copy_(ema_values, [piece.view(ema_v.shape) for piece, ema_v in zip(pieces, ema_values)])

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        for ema_v, model_v in _matched("state_dict entries", self.module.state_dict().values(),
                                       model.state_dict().values()):  # fmt: skip
            ema_v.copy_(model_v)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _matched(what: str, ema_values, model_values) -> list[tuple[Tensor, Tensor]]:
    """The EMA's values beside the model's, in order (as timm pairs them), which must be as many."""
    ema_values, model_values = list(ema_values), list(model_values)
    if len(ema_values) != len(model_values):
        raise ValueError(
            f"vitops.utils.ModelEma: the model has {len(model_values)} {what} and the EMA {len(ema_values)}: "
            "update it with the model it was made from"
        )
    return list(zip(ema_values, model_values, strict=True))


def _foreach_lerp_mixed_(pairs: list[tuple[Tensor, Tensor]], weight: float) -> None:
    """timm's multi-tensor lerp: one lerp when every pair has one dtype, else ema * (1 - weight) + model * weight,
    whose add promotes in the kernel (no cast copies of the model)."""
    ema_values = [ema_v for ema_v, _ in pairs]
    model_values = [model_v for _, model_v in pairs]
    if all(ema_v.dtype == model_v.dtype for ema_v, model_v in pairs):
        torch._foreach_lerp_(ema_values, model_values, weight)
    else:
        torch._foreach_mul_(ema_values, 1.0 - weight)
        torch._foreach_add_(ema_values, model_values, alpha=weight)
