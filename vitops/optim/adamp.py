"""AdamP with timm's numerics, on fused multi-tensor kernels."""
from __future__ import annotations

import torch

from vitops.optim import _kernels, reference
from vitops.optim._base import FusedOptimizer, check_nonnegative


class AdamP(FusedOptimizer):
    """AdamP (https://arxiv.org/abs/2006.08217) as timm.optim.AdamP: same arguments, defaults, math and
    state_dict (`state['step']` a Python int per param), on fused kernels.

    For params of 2 or more dims, the Adam direction loses its component along p when the gradient is nearly
    orthogonal to p: per output channel if every channel's |cos(g, p)| < delta / sqrt(channel size), else for
    the whole layer if |cos| < delta / sqrt(numel); weight decay is then scaled by wd_ratio. The cosines and
    projections are sums computed inside the fused kernels. Moment buffers are float32 for float16/bfloat16
    params. `caution` runs the reference path.
    """

    _name = "AdamP"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
        caution: bool = False,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            delta=delta,
            wd_ratio=wd_ratio,
            nesterov=nesterov,
            caution=caution,
        )
        super().__init__(params, defaults)

    def _check_hyperparameters(self, group) -> None:
        super()._check_hyperparameters(group)
        check_nonnegative("AdamP", "delta", group["delta"])
        check_nonnegative("AdamP", "wd_ratio", group["wd_ratio"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [self._grad_of(p) for p in params]
            beta1, beta2 = group["betas"]
            bc1, bc2, moments = [], [], []
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                moments.append(self._moments(p))
                state["step"] += 1
                bc1.append(1 - beta1 ** state["step"])
                bc2.append(1 - beta2 ** state["step"])
            caution = bool(group.get("caution", False))
            for device, ok, idx in self._split(params, grads):
                args = (
                    [params[i] for i in idx], [grads[i] for i in idx],
                    [moments[i][0] for i in idx], [moments[i][1] for i in idx],
                    [bc1[i] for i in idx], [bc2[i] for i in idx],
                    float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"], group["delta"],
                    group["wd_ratio"], bool(group["nesterov"]),
                )  # fmt: skip
                backend = self._backend("adamp_step", device, ok, caution)
                if backend == "torch":
                    reference.adamp_step(*args, caution=caution)
                else:
                    _kernels.adamp_step(backend, *args)
        return loss
