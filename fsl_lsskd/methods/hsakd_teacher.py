"""HSAKD teacher stage: Yang et al., "Hierarchical Self-supervised Augmented Knowledge Distillation",
IJCAI 2021; winycg/HSAKD train_teacher_cifar.py, joint training from scratch (option (2), "Teacher*",
docs/methods.md, "HSAKD"): ``CE(final(x^(0)), y) + sum_l CE(q_l(x^(k)), 4y+k)``."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from ..registry import METHODS
from .auxiliary import build_aux_classifiers, rotate_expand, run_with_aux_classifiers
from .base import Batch, Method
from .configs import HSAKDTeacherConfig


@METHODS.register("hsakd_teacher")
class HSAKDTeacher(Method):
    """HSAKD's teacher: the backbone with a rotation-augmented auxiliary classifier (4C outputs) on every stage, used by ``hsakd``.

    The auxiliary classifiers are ``self.aux_classifiers``."""

    config_cls = HSAKDTeacherConfig
    has_rotation_classifiers = True

    def __init__(self, backbone, num_classes, num_samples, config=None, teacher=None) -> None:
        super().__init__(backbone, num_classes, num_samples, config, teacher)
        self.aux_classifiers = build_aux_classifiers(backbone, 4 * num_classes)

    def forward_all(self, images: torch.Tensor, labels: torch.Tensor):
        """Rotation-expanded pass: ``(final_logits [4B,C], [aux_logits [4B,4C]], joint_labels [4B])``."""
        x, joint = rotate_expand(images, labels)
        logits, aux, _ = run_with_aux_classifiers(self.backbone, self.aux_classifiers, x)
        return logits, aux, joint

    def training_step(self, batch: Batch, epoch: int) -> Dict[str, torch.Tensor]:
        logits, aux, joint = self.forward_all(batch.images, batch.labels)
        ce = F.cross_entropy(logits[0::4], batch.labels)
        aux_ce = sum(F.cross_entropy(q, joint) for q in aux)
        return {"loss": ce + aux_ce, "ce": ce.detach(), "aux_ce": aux_ce.detach()}
