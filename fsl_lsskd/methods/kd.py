"""Knowledge distillation: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015.
``(1 - alpha) CE(s, y) + alpha tau^2 KL(softmax(t/tau) || softmax(s/tau))``; tau = 4 as RFS-distill
(WangYueFt/rfs train_distillation.py ``--kd_T 4``), alpha = 0.9 as HobbitLong/RepDistiller's KD command
(``-r 0.1 -a 0.9``). The teacher is a trained :class:`Method` (frozen, eval mode, its final logits)."""
from __future__ import annotations

from typing import Dict

import torch

from ..errors import ConfigError
from ..registry import METHODS
from . import losses as L
from .base import Batch, Method
from .configs import KDConfig


@METHODS.register("kd")
class KD(Method):
    """Hinton KD from a frozen teacher method's final logits."""

    config_cls = KDConfig
    needs_teacher = True
    #: the teacher ``fsl-bench run`` trains first unless the benchmark names one (RFS-distill: the CE model)
    default_teacher = "ce"

    def __init__(self, backbone, num_classes, num_samples, config=None, teacher=None) -> None:
        super().__init__(backbone, num_classes, num_samples, config, teacher)
        # a non-Method teacher is checkpoint.build_method's architecture-only placeholder (evaluation)
        if isinstance(teacher, Method):
            if teacher.num_classes != num_classes:
                raise ConfigError(f"kd teacher has {teacher.num_classes} classes, student {num_classes}; use a "
                                  f"teacher trained on the same dataset/split")
            for p in teacher.parameters():
                p.requires_grad_(False)

    def training_step(self, batch: Batch, epoch: int) -> Dict[str, torch.Tensor]:
        logits = self.backbone(batch.images)
        teacher = self.teacher
        if not isinstance(teacher, Method):
            raise ConfigError("kd was built without a real teacher; pass --teacher <teacher run>/last.pt")
        teacher.eval()
        with torch.no_grad():
            t_logits = teacher.backbone(batch.images)
        loss, ce, kl = L.hinton_kd(logits, t_logits.detach(), batch.labels, self.config.alpha, self.config.tau)
        return {"loss": loss, "ce": ce.detach(), "kl": kl.detach()}
