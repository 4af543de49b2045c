"""Fused optimizers with timm's numerics: Lamb, AdamP, Lookahead; create_optimizer (timm's create_optimizer_v2) and
register_with_timm (vitops' optimizers in timm's own factory)."""
from vitops.optim import _kernels  # noqa: F401  (registers the optimizer-step ops)
from vitops.optim.adamp import AdamP
from vitops.optim.factory import create_optimizer, param_groups_weight_decay, register_with_timm
from vitops.optim.lamb import Lamb
from vitops.optim.lookahead import Lookahead

__all__ = ["AdamP", "Lamb", "Lookahead", "create_optimizer", "param_groups_weight_decay", "register_with_timm"]
