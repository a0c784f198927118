"""BYOT, "Be Your Own Teacher": Zhang et al., ICCV 2019 (no official code); as reproduced by open-mmlab/mmrazor
(``configs/distill/mmcls/byot/byot_resnet18_8xb16_cifar100.py``, ``models/architectures/connectors/
byot_connector.py``, ``models/losses/{l2_loss,kl_divergence}.py``); docs/methods.md "BYOT".

A shallow auxiliary classifier after every stage but the last; the deepest classifier (the backbone's own head)
teaches them. Per shallow classifier ``i`` (``F`` = pooled final-width features, ``sg`` = stop-gradient)::

    ce_weight * CE(q_i, y) + kd_weight * tau^2 KL(sg[q_C^tau] || q_i^tau) + feat_weight_i * hint(F_i, sg(F_C))

and the deepest classifier gets ``CE(q_C, y)``. ``hint`` is mmrazor's ``L2Loss(normalize=False, dist=True)``:
``sqrt(sum over batch and dimensions of (F_i - F_C)^2)`` (``feat_loss="dist"``, default) or the mean over the
batch of the squared L2 distance (``"mean_sq"``, this suite's earlier form).

The soft term is a KL divergence (``F.kl_div``, batchmean, as mmrazor's ``KLDivergence``) and is logged as
``kd_kl``; a soft cross-entropy has the same gradients and differs by the teacher's entropy, logged as
``kd_soft_ce`` (= ``kd_kl`` + tau^2 H(q_C^tau)) for comparison with implementations that report that value.

Shallow classifier (``head="connector"``, default): mmrazor's ``BYOTConnector``: an attention gate (a DARTS
separable convolution with stride 2, BN, ReLU, bilinear x2 upsampling, sigmoid) multiplying the stage map,
then one stride-2 separable convolution per halving between the stage and the final map (channels growing
geometrically to the final width), global average pooling and a linear layer. ``head="stages"`` uses a
fresh copy of the remaining backbone stages instead (LSSKD/HSAKD's auxiliary classifiers).
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import stage_indices, stage_info
from ..errors import ConfigError
from ..registry import METHODS
from . import losses as L
from .auxiliary import build_aux_classifiers, final_width, num_stages
from .base import Batch, Method
from .configs import BYOTConfig


class SepConv(nn.Sequential):
    """DARTS separable convolution (mmrazor ``DartsSepConv``): twice ReLU, depthwise conv (the first with
    ``stride``), pointwise conv, BN; the second maps to ``out_chs``."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1) -> None:
        pad = kernel_size // 2
        super().__init__(
            nn.ReLU(), nn.Conv2d(in_chs, in_chs, kernel_size, stride, pad, groups=in_chs, bias=False),
            nn.Conv2d(in_chs, in_chs, 1, bias=False), nn.BatchNorm2d(in_chs),
            nn.ReLU(), nn.Conv2d(in_chs, in_chs, kernel_size, 1, pad, groups=in_chs, bias=False),
            nn.Conv2d(in_chs, out_chs, 1, bias=False), nn.BatchNorm2d(out_chs))


class BYOTConnector(nn.Module):
    """mmrazor's ``BYOTConnector`` (expansion 1) generalised to any stage widths: ``forward(stage map
    [B, C_l, H, W]) -> (logits [B, num_classes], pooled [B, C_final])``.

    ``halvings`` stride-2 separable convolutions take the map to the final map's size, the channels growing
    geometrically from ``in_chs`` to ``out_chs`` (mmrazor: doubling per convolution, ``log2(out/in)`` of
    them); then global average pooling (mmrazor: ``AvgPool2d(4)`` on the 4x4 map) and a linear layer."""

    def __init__(self, in_chs: int, out_chs: int, halvings: int, num_classes: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.attention = nn.Sequential(SepConv(in_chs, in_chs, kernel_size, stride=2), nn.BatchNorm2d(in_chs),
                                       nn.ReLU(), nn.Upsample(scale_factor=2, mode="bilinear"), nn.Sigmoid())
        chans = [int(round(in_chs * (out_chs / in_chs) ** ((i + 1) / halvings))) for i in range(halvings)]
        layers, prev = [], in_chs
        for c in chans:
            layers.append(SepConv(prev, c, kernel_size, stride=2))
            prev = c
        if prev != out_chs:  # no halvings: match the width with a stride-1 separable convolution
            layers.append(SepConv(prev, out_chs, kernel_size, stride=1))
        self.scala = nn.Sequential(*layers)
        self.fc = nn.Linear(out_chs, num_classes)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        gate = self.attention(x)
        if gate.shape[-2:] != x.shape[-2:]:  # odd sizes: the x2 upsampling misses by one
            gate = F.interpolate(gate, size=x.shape[-2:], mode="bilinear", align_corners=False)
        pooled = self.scala(gate * x).mean(dim=(2, 3))
        return self.fc(pooled), pooled


def build_connectors(backbone: nn.Module, num_classes: int, n: int) -> nn.ModuleList:
    """One :class:`BYOTConnector` for each of the first ``n`` stages of ``backbone``."""
    infos = stage_info(backbone)
    idx = stage_indices(backbone)
    last = infos[idx[-1]]
    out = []
    for l in range(n):
        info = infos[idx[l]]
        halvings = max(0, int(round(math.log2(last["reduction"] / info["reduction"]))))
        conn = BYOTConnector(int(info["num_chs"]), int(last["num_chs"]), halvings, num_classes)
        conn.stage = l
        out.append(conn)
    return nn.ModuleList(out)


@METHODS.register("byot")
class BYOT(Method):
    """Be Your Own Teacher (Zhang et al. ICCV 2019), mmrazor's reproduction."""

    config_cls = BYOTConfig
    #: 2: mmrazor's connector heads and dist feature hint (were: stage copies and the mean squared distance)
    training_version = 2

    def __init__(self, backbone, num_classes, num_samples, config=None, teacher=None) -> None:
        super().__init__(backbone, num_classes, num_samples, config, teacher)
        n = num_stages(backbone)
        if len(self.config.feat_weights) != n - 1:
            raise ConfigError(f"byot feat_weights has {len(self.config.feat_weights)} entries but the backbone has "
                              f"{n - 1} shallow classifiers; set feat_weights to {n - 1} values")
        if self.config.head == "connector":
            self.aux_classifiers = build_connectors(backbone, num_classes, n - 1)
        else:
            self.aux_classifiers = build_aux_classifiers(backbone, num_classes, stages=list(range(n - 1)))
        self._final_width = final_width(backbone)

    def training_step(self, batch: Batch, epoch: int) -> Dict[str, torch.Tensor]:
        cfg = self.config
        final, maps = self.backbone.forward_intermediates(batch.images, indices=list(stage_indices(self.backbone)))
        logits = self.backbone.forward_head(final)
        # the hint target: the last stage's pooled map (final width, what the shallow classifiers pool; the trunk's
        # output ``final`` is wider where a timm CNN has a head conv after its last stage, e.g. EfficientNet's 1280)
        f_deep = maps[-1].mean(dim=(2, 3)).detach()
        t_logits = logits.detach()
        ce_deep = F.cross_entropy(logits, batch.labels)
        ce = kd = feat = logits.new_zeros(())
        for aux, w_feat in zip(self.aux_classifiers, cfg.feat_weights):
            q, f = aux(maps[aux.stage])
            ce = ce + F.cross_entropy(q, batch.labels)
            kd = kd + L.kd_kl(q, t_logits, cfg.tau)
            if w_feat:
                hint = L.feature_l2_dist(f, f_deep) if cfg.feat_loss == "dist" else L.feature_l2(f, f_deep)
                feat = feat + w_feat * hint
        loss = cfg.deepest_ce_weight * ce_deep + cfg.ce_weight * ce + cfg.kd_weight * kd + feat
        with torch.no_grad():
            p_t = F.softmax(t_logits.float() / cfg.tau, dim=1)
            teacher_entropy = -(p_t * torch.log(p_t.clamp_min(1e-12))).sum(1).mean() * cfg.tau ** 2
        return {"loss": loss, "ce": ce_deep.detach(), "aux_ce": ce.detach(), "kd_kl": kd.detach(),
                "kd_soft_ce": (kd.detach() + len(self.aux_classifiers) * teacher_entropy),
                "feat_hint": feat.detach()}
