"""Losses for training the model zoo: DeiT's DistillationLoss, and timm's SoftTargetCrossEntropy and
LabelSmoothingCrossEntropy."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DistillationLoss", "LabelSmoothingCrossEntropy", "SoftTargetCrossEntropy"]


class LabelSmoothingCrossEntropy(nn.Module):
    """Cross entropy with label smoothing: (1 - smoothing) * NLL of the target + smoothing * mean NLL over
    classes, averaged over the batch (timm's LabelSmoothingCrossEntropy)."""

    def __init__(self, smoothing: float = 0.1):
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"vitops LabelSmoothingCrossEntropy: smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing
        self.confidence = 1.0 - smoothing

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        logprobs = F.log_softmax(x, dim=-1)
        nll_loss = -logprobs.gather(dim=-1, index=target.unsqueeze(1)).squeeze(1)
        smooth_loss = -logprobs.mean(dim=-1)
        return (self.confidence * nll_loss + self.smoothing * smooth_loss).mean()


class SoftTargetCrossEntropy(nn.Module):
    """Cross entropy against soft (e.g. mixup / cutmix) targets: mean over the batch of sum(-target * log_softmax)."""

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        if target.shape != x.shape:
            raise ValueError(
                f"vitops SoftTargetCrossEntropy: target shape {tuple(target.shape)} must equal the logits' shape "
                f"{tuple(x.shape)}"
            )
        return torch.sum(-target * F.log_softmax(x, dim=-1), dim=-1).mean()


class DistillationLoss(nn.Module):
    """DeiT's distillation loss (Touvron et al. 2020): `base * (1 - alpha) + kd * alpha`, where base is
    `base_criterion(class_logits, labels)` and kd compares the distillation-token logits with the teacher's:

    - 'soft': `kl_div(log_softmax(s / T), log_softmax(t / T), reduction='sum', log_target=True) * T * T / s.numel()`
    - 'hard': `cross_entropy(s, teacher_logits.argmax(1))`
    - 'none': base only.

    Call as `loss(inputs, outputs, labels)`: outputs is the model's (class, dist) tuple (a single tensor is only
    accepted with 'none'); the teacher runs on `inputs` without gradients.
    """

    def __init__(
        self,
        base_criterion: nn.Module,
        teacher_model: Optional[nn.Module],
        distillation_type: str = "none",
        alpha: float = 0.5,
        tau: float = 1.0,
    ):
        super().__init__()
        if distillation_type not in ("none", "soft", "hard"):
            raise ValueError(
                f"vitops DistillationLoss: distillation_type must be 'none', 'soft' or 'hard', got {distillation_type!r}"
            )
        if distillation_type != "none" and teacher_model is None:
            raise ValueError(f"vitops DistillationLoss: distillation_type={distillation_type!r} needs a teacher_model")
        self.base_criterion = base_criterion
        self.teacher_model = teacher_model
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def forward(self, inputs: Tensor, outputs, labels: Tensor) -> Tensor:
        outputs_kd = None
        if isinstance(outputs, (tuple, list)):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == "none":
            return base_loss
        if outputs_kd is None:
            raise ValueError(
                "vitops DistillationLoss: with distillation the model must return (class_logits, dist_logits); "
                "call model.set_distilled_training(True) on a distilled DeiT and keep it in train mode"
            )
        with torch.no_grad():
            teacher_outputs = self.teacher_model(inputs)
        if isinstance(teacher_outputs, (tuple, list)):
            teacher_outputs = teacher_outputs[0]
        if self.distillation_type == "soft":
            T = self.tau
            distillation_loss = F.kl_div(
                F.log_softmax(outputs_kd / T, dim=1),
                F.log_softmax(teacher_outputs / T, dim=1),
                reduction="sum",
                log_target=True,
            ) * (T * T) / outputs_kd.numel()
        else:
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha
