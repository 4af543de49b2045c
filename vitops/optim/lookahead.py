"""Lookahead (https://arxiv.org/abs/1907.08610) around any optimizer, as timm.optim.Lookahead, with the slow
weights updated by multi-tensor ops."""

from __future__ import annotations

import numbers
from collections import OrderedDict, defaultdict

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from vitops.optim import _sharding
from vitops.optim._base import LOOKAHEAD_KEY, check_state_dict


class Lookahead(Optimizer):
    """Every k steps of `base_optimizer`, the slow weights move alpha of the way to the fast ones, and the fast
    weights are reset to them. State, param groups (lookahead_alpha, lookahead_k, lookahead_step) and
    state_dict are timm's: the slow buffers live in the base optimizer's state as 'lookahead_slow_buff'.

    A step the base optimizer skips (vitops' skip_nonfinite, counted in its groups' 'skipped_steps') changes nothing
    here either: the sync it falls on leaves the slow and fast weights as they were, decided on the device with no
    host sync. lookahead_step counts it, as the base optimizer's step count does, so the next sync is k steps on."""

    def __init__(self, base_optimizer: Optimizer, alpha: float = 0.5, k: int = 6):
        # Optimizer.__init__ is not called on purpose: param groups and state belong to the base optimizer.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"vitops.optim.Lookahead: alpha must be in [0, 1], got {alpha}")
        if not k >= 1:
            raise ValueError(f"vitops.optim.Lookahead: k must be >= 1, got {k}")
        defaults = {"lookahead_alpha": alpha, "lookahead_k": k, "lookahead_step": 0}
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
    def update_slow(self, group, skipped: Tensor | None = None) -> None:
        """timm's sync of `group`; `skipped` (a 0-d tensor, nonzero when the step was skipped) keeps both weights as
        they were instead."""
        fast, slow = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self._base_optimizer.state[p]
            if LOOKAHEAD_KEY not in state:
                state[LOOKAHEAD_KEY] = p.detach().clone()
            # DTensor params (FSDP2): the shards on this rank (the update is pointwise)
            fast.append(_sharding.local(p))
            slow.append(_sharding.local(state[LOOKAHEAD_KEY]))
        if not fast:
            return
        # slow += alpha * (fast - slow); fast = slow  (timm's arithmetic, as three multi-tensor ops)
        diff = torch._foreach_sub(fast, slow)
        if skipped is None:
            torch._foreach_add_(slow, diff, alpha=group["lookahead_alpha"])
            torch._foreach_copy_(fast, slow)
            return
        synced = torch._foreach_add(slow, diff, alpha=group["lookahead_alpha"])
        keep = skipped != 0
        torch._foreach_copy_(slow, [torch.where(keep.to(s.device), s, new) for s, new in zip(slow, synced)])
        torch._foreach_copy_(fast, [torch.where(keep.to(f.device), f, s) for f, s in zip(fast, slow)])

    def sync_lookahead(self) -> None:
        for group in self._base_optimizer.param_groups:
            self.update_slow(group)

    @torch.no_grad()
    def step(self, closure=None):
        groups = self._base_optimizer.param_groups
        syncs = [(group["lookahead_step"] + 1) % group["lookahead_k"] == 0 for group in groups]
        skipped_before = [_skipped_steps(group) if sync else None for group, sync in zip(groups, syncs)]
        loss = self._base_optimizer.step(closure)
        for group, sync, before in zip(groups, syncs, skipped_before):
            group["lookahead_step"] += 1
            if sync:
                after = _skipped_steps(group)
                self.update_slow(group, after - before if isinstance(after, Tensor) else None)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self._base_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        """The base optimizer's load_state_dict, after checks of what Lookahead keeps (its group options, the slow
        weights' shapes) that leave both as they were when the state_dict does not fit."""
        check_state_dict(self._base_optimizer, state_dict, "Lookahead", tensor_keys=(LOOKAHEAD_KEY,),
                         check_group=_check_options)  # fmt: skip
        self._base_optimizer.load_state_dict(state_dict)
        self.param_groups = self._base_optimizer.param_groups
        for name in ("lookahead_alpha", "lookahead_k", "lookahead_step"):
            for group in self.param_groups:
                group.setdefault(name, self.defaults[name])


def _skipped_steps(group: dict) -> Tensor | float:
    """The group's count of skipped steps: a copy of the base optimizer's device counter, 0 without one."""
    count = group.get("skipped_steps", 0.0)
    return count.clone() if isinstance(count, Tensor) else float(count)


_OPTIONS = {  # Lookahead's group options: what a valid value is
    "lookahead_alpha": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "lookahead_k": (lambda v: v >= 1, ">= 1"),
    "lookahead_step": (lambda v: v >= 0, ">= 0"),
}


def _check_options(group: dict) -> None:
    """Lookahead's options, where a param group of a state_dict being loaded has them."""
    for key, (valid, want) in _OPTIONS.items():
        value = group.get(key)
        if value is not None and not (isinstance(value, numbers.Real) and valid(value)):
            raise ValueError(f"vitops.optim.Lookahead.load_state_dict: {key} must be a number {want}, got {value!r}")
