"""LAMB with timm's numerics, on fused multi-tensor kernels."""
from __future__ import annotations

from typing import Optional

import torch

from vitops import _backend
from vitops.optim import _kernels, reference
from vitops.optim._base import FusedOptimizer, check_nonnegative


class Lamb(FusedOptimizer):
    """LAMB (https://arxiv.org/abs/1904.00962) in the NVLAMB form of timm.optim.Lamb: same arguments, defaults,
    math, `group['step']` and state_dict, on fused kernels (multi-tensor CUDA, Triton, parallel vectorized C++).

    Per step: grads are divided by max(1, ||all grads|| / max_grad_norm), the global norm over every param group
    (from the constructor's max_grad_norm, as timm); m = lerp(m, g, 1 - beta1) (or beta1 m + g without
    grad_averaging); v = beta2 v + (1 - beta2) g^2; u = m_hat / (sqrt(v_hat) + eps); weight decay is added to u
    (or applied to p first with decoupled_decay); with weight decay (or always_adapt) u is scaled by the trust
    ratio ||p|| / ||u|| (1 if either is 0, capped at 1 with trust_clip); p -= lr u.

    Moment buffers are float32 for float16/bfloat16 params (timm keeps them in the param dtype), and the
    update is computed in float32. `caution` runs the reference path. `foreach` is accepted for timm
    compatibility and ignored.
    """

    _name = "Lamb"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        grad_averaging: bool = True,
        max_grad_norm: Optional[float] = 1.0,
        trust_clip: bool = False,
        always_adapt: bool = False,
        caution: bool = False,
        decoupled_decay: bool = False,
        corrected_weight_decay: bool = False,
        foreach: Optional[bool] = None,
    ):
        check_nonnegative("Lamb", "lr", lr)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"vitops.optim.Lamb: max_grad_norm must be > 0 or None, got {max_grad_norm}")
        if corrected_weight_decay and not float(lr) > 0:
            raise ValueError(f"vitops.optim.Lamb: corrected_weight_decay needs the peak lr (> 0), got {lr}")
        defaults = dict(
            lr=lr,
            bias_correction=bias_correction,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            grad_averaging=grad_averaging,
            max_grad_norm=max_grad_norm,
            trust_clip=trust_clip,
            always_adapt=always_adapt,
            caution=caution,
            decoupled_decay=decoupled_decay,
            corrected_weight_decay=corrected_weight_decay,
            max_lr_snapshot=float(lr),
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.defaults.setdefault("max_lr_snapshot", float(self.defaults["lr"]))
        for group in self.param_groups:
            group.setdefault("caution", False)
            group.setdefault("decoupled_decay", False)
            group.setdefault("corrected_weight_decay", False)
            group.setdefault("max_lr_snapshot", self.defaults["max_lr_snapshot"])
            group.setdefault("foreach", None)
            if "step" in group and not torch.is_tensor(group["step"]):
                group["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)

    def _clip_coefs(self) -> dict[torch.device, torch.Tensor] | None:
        """The global clip coefficient, one copy per device holding params."""
        max_grad_norm = self.defaults["max_grad_norm"]
        grads = [self._grad_of(p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if max_grad_norm is None or not grads:
            return None
        devices = {g.device for g in grads}
        backend = "torch"  # float64 params, or params on several devices: all of it on the reference path
        device_type = next(iter(devices)).type if len(devices) == 1 else None
        if device_type in _backend.DEVICE_TYPES and all(g.dtype in _kernels.KERNEL_DTYPES for g in grads):
            backend = _backend.backend_for("lamb_step", device_type)
        coef = _kernels.lamb_clip_coef(backend, grads, max_grad_norm)
        return {device: coef.to(device) for device in devices}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clip_coefs = self._clip_coefs()
        for group in self.param_groups:
            if "step" not in group:
                group["step"] = torch.tensor(0.0, dtype=torch.float32)
            group["step"].add_(1)
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [self._grad_of(p) for p in params]
            step = group["step"].item()
            beta1, beta2 = group["betas"]
            beta3 = 1 - beta1 if group["grad_averaging"] else 1.0
            if group["bias_correction"]:
                bc1, bc2 = 1 - beta1**step, 1 - beta2**step
            else:
                bc1, bc2 = 1.0, 1.0
            lr = float(group["lr"])
            weight_decay = group["weight_decay"]
            decoupled = bool(group.get("decoupled_decay", False))
            decay_scale = lr
            if decoupled and group.get("corrected_weight_decay", False):
                decay_scale = lr**2 / group["max_lr_snapshot"]
            adapt = weight_decay != 0 or bool(group["always_adapt"])
            caution = bool(group.get("caution", False))
            moments = [self._moments(p) for p in params]
            for device, ok, idx in self._split(params, grads):
                clip = clip_coefs[device] if clip_coefs is not None else None
                args = (
                    [params[i] for i in idx], [grads[i] for i in idx],
                    [moments[i][0] for i in idx], [moments[i][1] for i in idx],
                    clip, lr, beta1, beta2, beta3, bc1, bc2, group["eps"], weight_decay, decay_scale,
                    decoupled, adapt, bool(group["trust_clip"]),
                )  # fmt: skip
                backend = self._backend("lamb_step", device, ok, caution)
                if backend == "torch":
                    reference.lamb_step(*args, caution=caution)
                else:
                    _kernels.lamb_step(backend, *args)
        return loss
