"""Training utilities."""
from vitops.utils.model_ema import ModelEma

__all__ = ["ModelEma"]
