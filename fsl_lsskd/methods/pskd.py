"""Progressive Self-Knowledge Distillation (PS-KD): Kim et al., "Self-Knowledge Distillation with
Progressive Refinement of Targets", ICCV 2021; lgcnsai/PS-KD-Pytorch (main.py, loss/pskd_loss.py).

Targets ``(1 - a_t) * onehot(y) + a_t * P_{t-1}(x)`` with ``a_t = a_T * (t + 1) / E`` (``a_T = 0.8``);
``P_{t-1}`` is the sample's softmax from the previous epoch, kept in a per-sample prediction memory initialised to the
one-hot label on first visit and written (detached) after each optimiser step."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import METHODS
from .stores import PredictionStore, choose_top_k
from .base import Batch, Method
from .configs import PSKDConfig


def pskd_alpha(alpha_T: float, epoch: int, epochs: int) -> float:
    """``a_t = a_T * (t + 1) / E`` for 0-based epoch ``t`` (PS-KD main.py), clipped at 0."""
    return max(0.0, float(alpha_T) * (epoch + 1) / float(epochs))


def pskd_targets(labels: torch.Tensor, previous: torch.Tensor, alpha: float, num_classes: int) -> torch.Tensor:
    """``(1 - alpha) * onehot(labels) + alpha * previous``."""
    onehot = F.one_hot(labels, num_classes).to(previous.dtype)
    return (1.0 - alpha) * onehot + alpha * previous


class SoftTargetCrossEntropy(nn.Module):
    """``mean_b sum_c -target[b,c] * log_softmax(logits)[b,c]`` (PS-KD loss/pskd_loss.py)."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()


@METHODS.register("pskd")
class PSKD(Method):
    """PS-KD: progressive self-distillation from the previous epoch's predictions (Kim et al. ICCV 2021)."""

    config_cls = PSKDConfig
    #: every sample is trained on and stored every epoch (the reference keeps the short last batch)
    keeps_last_batch = True
    #: 2: the short last batch is kept; top-k prediction memory beyond a memory budget
    training_version = 2

    def __init__(self, backbone, num_classes, num_samples, config=None, teacher=None) -> None:
        super().__init__(backbone, num_classes, num_samples, config, teacher)
        cfg = self.config
        dtype = getattr(torch, cfg.store_dtype)
        top_k = choose_top_k(cfg.store_layout, cfg.store_top_k, cfg.store_budget_mb,
                             [(num_samples, (num_classes,), dtype)])
        self.store = PredictionStore(num_samples, (num_classes,), dtype=dtype, top_k=top_k)
        self.criterion = SoftTargetCrossEntropy()
        self.alpha = 0.0
        self._pending: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def on_epoch_start(self, epoch: int) -> None:
        self.alpha = pskd_alpha(self.config.alpha_T, epoch, self.config.epochs)

    def training_step(self, batch: Batch, epoch: int) -> Dict[str, torch.Tensor]:
        logits = self.backbone(batch.images)
        onehot = F.one_hot(batch.labels, self.num_classes).float()
        previous = self.store.get(batch.index, default=onehot).to(logits.device)
        targets = pskd_targets(batch.labels, previous, self.alpha, self.num_classes)
        loss = self.criterion(logits, targets)
        # written after the optimiser step (on_step_end), as PS-KD main.py does
        self._pending = (batch.index, F.softmax(logits.detach().float(), dim=1))
        return {"loss": loss, "pskd_ce": loss.detach(), "alpha": torch.tensor(self.alpha)}

    def on_step_end(self, batch: Batch, epoch: int) -> None:
        if self._pending is not None:
            self.store.put(*self._pending)
            self._pending = None
