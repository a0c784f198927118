"""HSAKD student: Yang et al., "Hierarchical Self-supervised Augmented Knowledge Distillation", IJCAI 2021;
winycg/HSAKD train_student_cifar.py (docs/methods.md, "HSAKD")::

    CE(p_s(x^(0)), y) + sum_l tau^2 KL(q_l^t || q_l^s) + tau^2 KL(p^t || p^s)

over the 4 rotated copies (KL batchmean over 4B rows, tau = 3, unit weights). The teacher is an
``hsakd_teacher`` run (same backbone stages, auxiliary heads with 4C outputs)."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..registry import METHODS
from . import losses as L
from .auxiliary import build_aux_classifiers, rotate_expand, run_with_aux_classifiers
from .base import Batch, Method
from .configs import HSAKDConfig


def check_teacher(teacher, num_classes: int, num_aux: int) -> None:
    """Raise :class:`ConfigError` naming the fix unless ``teacher`` has matching auxiliary rotation
    classifiers (an ``hsakd_teacher`` run on the same classes and stages)."""
    aux = getattr(teacher, "aux_classifiers", None)
    if aux is None or not getattr(teacher, "has_rotation_classifiers", False):
        raise ConfigError(f"hsakd needs a teacher with auxiliary rotation classifiers, got {type(teacher).__name__}; "
                          f"train one with `--method hsakd_teacher` and pass its checkpoint as the teacher")
    if getattr(teacher, "num_classes", None) != num_classes:
        raise ConfigError(f"hsakd teacher has {getattr(teacher, 'num_classes', None)} classes, student "
                          f"{num_classes}; train the teacher (hsakd_teacher) on the same dataset/split")
    if len(aux) != num_aux:
        raise ConfigError(f"hsakd teacher has {len(aux)} stages with auxiliary classifiers, the student backbone "
                          f"{num_aux}; use a teacher backbone with {num_aux} stages")


@METHODS.register("hsakd")
class HSAKD(Method):
    """HSAKD student distilled from an ``hsakd_teacher`` (Yang et al. IJCAI 2021)."""

    config_cls = HSAKDConfig
    needs_teacher = True
    #: the teacher ``fsl-bench run`` trains first (HSAKD's joint teacher, option (2))
    default_teacher = "hsakd_teacher"
    has_rotation_classifiers = True

    def __init__(self, backbone, num_classes, num_samples, config=None, teacher=None) -> None:
        super().__init__(backbone, num_classes, num_samples, config, teacher)
        self.aux_classifiers = build_aux_classifiers(backbone, 4 * num_classes)
        # a non-Method teacher is checkpoint.build_method's architecture-only placeholder (evaluation)
        if isinstance(teacher, Method):
            check_teacher(teacher, num_classes, len(self.aux_classifiers))
            for p in teacher.parameters():
                p.requires_grad_(False)

    def training_step(self, batch: Batch, epoch: int) -> Dict[str, torch.Tensor]:
        cfg = self.config
        x, _ = rotate_expand(batch.images, batch.labels)
        logits, aux, _ = run_with_aux_classifiers(self.backbone, self.aux_classifiers, x)
        teacher = self.teacher
        if not isinstance(teacher, Method):
            raise ConfigError("hsakd was built without a real teacher; pass --teacher <hsakd_teacher run>/last.pt")
        teacher.eval()
        with torch.no_grad():
            t_logits, t_aux, _ = run_with_aux_classifiers(teacher.backbone, teacher.aux_classifiers, x)
        ce = F.cross_entropy(logits[0::4], batch.labels)
        aux_kl = sum(L.kd_kl(q, t.detach(), cfg.tau) for q, t in zip(aux, t_aux))
        kl = L.kd_kl(logits, t_logits.detach(), cfg.tau)
        loss = ce + cfg.weight_aux_kl * aux_kl + cfg.weight_kl * kl
        return {"loss": loss, "ce": ce.detach(), "aux_kl": aux_kl.detach(), "kl": kl.detach()}
