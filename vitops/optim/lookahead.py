"""Lookahead (https://arxiv.org/abs/1907.08610) around any optimizer, as timm.optim.Lookahead, with the slow
weights updated by multi-tensor ops."""
from __future__ import annotations

from collections import OrderedDict, defaultdict

import torch
from torch.optim.optimizer import Optimizer


class Lookahead(Optimizer):
    """Every k steps of `base_optimizer`, the slow weights move alpha of the way to the fast ones, and the fast
    weights are reset to them. State, param groups (lookahead_alpha, lookahead_k, lookahead_step) and
    state_dict are timm's: the slow buffers live in the base optimizer's state as 'lookahead_slow_buff'."""

    def __init__(self, base_optimizer: Optimizer, alpha: float = 0.5, k: int = 6):
        # Optimizer.__init__ is not called on purpose: param groups and state belong to the base optimizer.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"vitops.optim.Lookahead: alpha must be in [0, 1], got {alpha}")
        if not k >= 1:
            raise ValueError(f"vitops.optim.Lookahead: k must be >= 1, got {k}")
        defaults = dict(lookahead_alpha=alpha, lookahead_k=k, lookahead_step=0)
        self._base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.defaults = base_optimizer.defaults
        self.defaults.update(defaults)
        self.state = defaultdict(dict)
        for name, default in defaults.items():
            for group in self._base_optimizer.param_groups:
                group.setdefault(name, default)

    @property
    def base_optimizer(self) -> Optimizer:
        return self._base_optimizer

    @property
    def is_second_order(self):
        return getattr(self._base_optimizer, "is_second_order", False)

    @torch.no_grad()
    def update_slow(self, group) -> None:
        fast, slow = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self._base_optimizer.state[p]
            if "lookahead_slow_buff" not in state:
                state["lookahead_slow_buff"] = p.detach().clone()
            fast.append(p)
            slow.append(state["lookahead_slow_buff"])
        if not fast:
            return
        # slow += alpha * (fast - slow); fast = slow  (timm's arithmetic, as three multi-tensor ops)
        diff = torch._foreach_sub(fast, slow)
        torch._foreach_add_(slow, diff, alpha=group["lookahead_alpha"])
        torch._foreach_copy_(fast, slow)

    def sync_lookahead(self) -> None:
        for group in self._base_optimizer.param_groups:
            self.update_slow(group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._base_optimizer.step(closure)
        for group in self._base_optimizer.param_groups:
            group["lookahead_step"] += 1
            if group["lookahead_step"] % group["lookahead_k"] == 0:
                self.update_slow(group)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self._base_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self._base_optimizer.load_state_dict(state_dict)
        self.param_groups = self._base_optimizer.param_groups
        for name in ("lookahead_alpha", "lookahead_k", "lookahead_step"):
            for group in self.param_groups:
                group.setdefault(name, self.defaults[name])
