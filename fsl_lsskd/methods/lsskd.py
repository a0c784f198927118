"""LSSKD: Dahri et al. 2025, "Layered Self-Supervised Knowledge Distillation" (arXiv 2506.07055), in the
reading documented in docs/methods.md ("LSSKD"): HSAKD's auxiliary classifiers + rotation self-supervised
augmented labels (Yang et al. IJCAI 2021, winycg/HSAKD) made teacher-free with PS-KD targets from the previous
epoch (Kim et al. ICCV 2021, lgcnsai/PS-KD-Pytorch).

Loss (``e`` = 0-based epoch, ``alpha_e = alpha_T * (e + 1) / E``, ``B`` images, ``L`` auxiliary classifiers)::

    ls_final = mean_i CE(p(x_i^(0)), (1-a_e) onehot(y_i) + a_e P_fin[i])
    ls_aux   = r * sum_l mean_{i,k} CE(q_l(x_i^(k)), (1-a_e) onehot(4 y_i + k) + a_e P_aux[l][i,k])
               (r = 1 for aux_rotation_reduction "mean", HSAKD's code; r = 4 for "sum_rotations", the
               written sum over the 4 rotations of the batch mean)
    xlayer_kl (flag, off) = lambda_kl * tau^2 * sum_{l<L} KL(sg[q_L^tau] || q_l^tau)
    feat      (flag, off) = lambda_feat * sum_{l<L} mean_i ||a_l - sg(a_L)||^2

The auxiliary classifiers are training-only: :meth:`export_backbone` returns the plain backbone.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import METHODS
from . import losses as L
from .auxiliary import build_aux_classifiers, rotate_expand, run_with_aux_classifiers
from .stores import PredictionStore, choose_top_k
from .base import Batch, Method
from .configs import LSSKDConfig


@METHODS.register("lsskd")
class LSSKD(Method):
    """Teacher-free layered self-supervised KD (Dahri et al. 2025; the reading of docs/methods.md, "LSSKD")."""

    config_cls = LSSKDConfig
    #: every sample is trained on and stored every epoch (PS-KD's reference keeps the short last batch)
    keeps_last_batch = True
    #: 2: the short last batch is kept; top-k prediction memory beyond a memory budget; aux_rotation_reduction
    training_version = 2

    def __init__(self, backbone, num_classes, num_samples, config=None, teacher=None) -> None:
        super().__init__(backbone, num_classes, num_samples, config, teacher)
        cfg = self.config
        self.aux_classifiers = build_aux_classifiers(backbone, 4 * num_classes)
        n_aux = len(self.aux_classifiers)
        fin_dtype, aux_dtype = getattr(torch, cfg.final_store_dtype), getattr(torch, cfg.aux_store_dtype)
        top_k = choose_top_k(cfg.store_layout, cfg.store_top_k, cfg.store_budget_mb,
                             [(num_samples, (num_classes,), fin_dtype)] +
                             [(num_samples, (4, 4 * num_classes), aux_dtype)] * n_aux)
        self.final_store = PredictionStore(num_samples, (num_classes,), fin_dtype, top_k=top_k)
        self.aux_stores = nn.ModuleList(PredictionStore(num_samples, (4, 4 * num_classes), aux_dtype, top_k=top_k)
                                        for _ in range(n_aux))
        self.alpha = 0.0
        self._pending: Optional[Tuple[torch.Tensor, torch.Tensor, list]] = None

    def on_epoch_start(self, epoch: int) -> None:
        self.alpha = L.alpha_schedule(self.config.alpha_T, epoch, self.config.epochs)

    def training_step(self, batch: Batch, epoch: int) -> Dict[str, torch.Tensor]:
        cfg, C = self.config, self.num_classes
        b = batch.labels.shape[0]
        x, joint = rotate_expand(batch.images, batch.labels)
        logits, aux_logits, aux_feats = run_with_aux_classifiers(self.backbone, self.aux_classifiers, x)
        fin = logits[0::4]
        out: Dict[str, torch.Tensor] = {}
        total = fin.new_zeros(())

        onehot = F.one_hot(batch.labels, C).float()
        prev = self.final_store.get(batch.index, default=onehot).to(fin.device)
        ls_final = L.soft_cross_entropy(fin, L.softened_targets(onehot, prev, self.alpha))
        if cfg.ls_final:
            total = total + ls_final
        out["ls_final"] = ls_final.detach()

        joint_onehot = F.one_hot(joint, 4 * C).float().view(b, 4, 4 * C)
        ls_aux = fin.new_zeros(())
        for l, q in enumerate(aux_logits):
            prev_l = self.aux_stores[l].get(batch.index, default=joint_onehot).to(q.device)
            tgt = L.softened_targets(joint_onehot, prev_l, self.alpha).view(4 * b, 4 * C)
            ls_aux = ls_aux + L.soft_cross_entropy(q, tgt)
        if cfg.aux_rotation_reduction == "sum_rotations":
            ls_aux = 4.0 * ls_aux
        if cfg.ls_aux:
            total = total + ls_aux
        out["ls_aux"] = ls_aux.detach()

        if cfg.xlayer_kl and len(aux_logits) > 1:
            t = aux_logits[-1].detach()
            kl = sum(L.kd_kl(q, t, cfg.tau) for q in aux_logits[:-1])
            total = total + cfg.lambda_kl * kl
            out["xlayer_kl"] = kl.detach()
        if cfg.feat_l2 and len(aux_feats) > 1:
            t = aux_feats[-1].detach()
            feat = sum(L.feature_l2(a, t) for a in aux_feats[:-1])
            total = total + cfg.lambda_feat * feat
            out["feat"] = feat.detach()

        # stored after the optimiser step (on_step_end), as PS-KD main.py does; softmax at T = 1
        self._pending = (batch.index, F.softmax(fin.detach().float(), dim=1),
                         [F.softmax(q.detach().float(), dim=1).view(b, 4, 4 * C) for q in aux_logits])
        out["loss"] = total
        out["alpha"] = torch.tensor(self.alpha)
        return out

    def on_step_end(self, batch: Batch, epoch: int) -> None:
        if self._pending is not None:
            index, p_fin, p_aux = self._pending
            self.final_store.put(index, p_fin)
            for store, p in zip(self.aux_stores, p_aux):
                store.put(index, p)
            self._pending = None
