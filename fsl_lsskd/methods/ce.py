"""Cross-entropy baseline ("RFS-simple"): Tian et al., "Rethinking Few-Shot Image Classification: a Good
Embedding Is All You Need?", ECCV 2020; WangYueFt/rfs train_supervised.py (SGD lr 0.05, momentum 0.9,
wd 5e-4, batch 64, 100 epochs, lr x0.1 at epochs 60 and 80)."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import METHODS
from .base import Batch, Method
from .configs import CEConfig


class CELoss(nn.Module):
    """Mean cross-entropy of logits against hard labels (``nn.CrossEntropyLoss`` in rfs)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


@METHODS.register("ce")
class CE(Method):
    """Cross-entropy on the base classes (RFS-simple; Tian et al. ECCV 2020, WangYueFt/rfs)."""

    config_cls = CEConfig

    def __init__(self, backbone, num_classes, num_samples, config=None, teacher=None) -> None:
        super().__init__(backbone, num_classes, num_samples, config, teacher)
        self.criterion = CELoss(getattr(self.config, "label_smoothing", 0.0))

    def training_step(self, batch: Batch, epoch: int) -> Dict[str, torch.Tensor]:
        logits = self.backbone(batch.images)
        loss = self.criterion(logits, batch.labels)
        return {"loss": loss, "ce": loss.detach()}
