"""BYOT, "Be Your Own Teacher": Zhang et al., ICCV 2019 (official code not released; unofficial
luanyunteng/pytorch-be-your-own-teacher; weights from open-mmlab/mmrazor
configs/distill/mmcls/byot/byot_logits_resnet18_cifar100_8xb16_in1k.py), method.md §3.3.

A shallow classifier after every stage but the last (feature adaptation = ``branch_tail`` of the backbone,
so it sees a final-width feature, + GAP + FC over C classes); the deepest classifier (the backbone's own
head) teaches them. Per shallow classifier ``i``::

    w_ce * CE(q_i, y) + w_kd * tau^2 KL(sg[q_C^tau] || q_i^tau) + w_feat_i * ||F_i - sg(F_C)||^2

and the deepest classifier gets ``CE(q_C, y)``. ``F`` = globally pooled final-width features."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from ..backbones import stage_indices
from ..errors import ConfigError
from ..registry import METHODS
from . import _losses as L
from ._branches import build_branches, num_stages
from .base import Batch, Method, MethodConfig


@dataclass(frozen=True)
class BYOTConfig(MethodConfig):
    """mmrazor BYOT ResNet-18/CIFAR-100 config: SGD lr 0.1, momentum 0.9, wd 5e-4, batch 128 (8x16),
    250 epochs, lr x0.1 at 80/160/240; CE weight 0.7, soft-CE (KL) weight 0.3 at tau = 3, feature-L2
    weight 0.03 for the first two shallow classifiers and 0 for the third."""

    epochs: int = 250
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    lr_milestones: Tuple[float, ...] = (0.32, 0.64, 0.96)  # epochs 80, 160, 240 of 250
    lr_gamma: float = 0.1
    ce_weight: float = 0.7
    kd_weight: float = 0.3
    tau: float = 3.0
    feat_weights: Tuple[float, ...] = (0.03, 0.03, 0.0)  # one per shallow classifier
    deepest_ce_weight: float = 1.0


@METHODS.register("byot")
class BYOT(Method):
    """Be Your Own Teacher (Zhang et al. ICCV 2019; mmrazor weights)."""

    config_cls = BYOTConfig

    def __init__(self, backbone, num_classes, num_samples, config=None, teacher=None) -> None:
        super().__init__(backbone, num_classes, num_samples, config, teacher)
        n = num_stages(backbone)
        if len(self.config.feat_weights) != n - 1:
            raise ConfigError(f"byot feat_weights has {len(self.config.feat_weights)} entries but the backbone has "
                              f"{n - 1} shallow classifiers; set feat_weights to {n - 1} values")
        self.branches = build_branches(backbone, num_classes, stages=list(range(n - 1)))

    def training_step(self, batch: Batch, epoch: int) -> Dict[str, torch.Tensor]:
        cfg = self.config
        final, maps = self.backbone.forward_intermediates(batch.images, indices=list(stage_indices(self.backbone)))
        logits = self.backbone.forward_head(final)
        f_deep = final.mean(dim=(2, 3)).detach()  # final-width pooled feature, the hint target
        t_logits = logits.detach()
        ce_deep = F.cross_entropy(logits, batch.labels)
        ce = kd = feat = logits.new_zeros(())
        for br, w_feat in zip(self.branches, cfg.feat_weights):
            q, f = br(maps[br.stage])
            ce = ce + F.cross_entropy(q, batch.labels)
            kd = kd + L.kd_kl(q, t_logits, cfg.tau)
            if w_feat:
                feat = feat + w_feat * L.feature_l2(f, f_deep)
        loss = cfg.deepest_ce_weight * ce_deep + cfg.ce_weight * ce + cfg.kd_weight * kd + feat
        return {"loss": loss, "ce": ce_deep.detach(), "aux_ce": ce.detach(), "kl": kd.detach(),
                "feat": feat.detach()}
