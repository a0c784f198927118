"""Prototypical Networks, episodic training (Snell, Swersky & Zemel, "Prototypical Networks for Few-shot
Learning", NeurIPS 2017; reference code jakesnell/prototypical-networks, ``protonets/models/few_shot.py``).

Each episode: embed support and query with the backbone, class prototypes = mean support embedding,
logits = negative *squared* Euclidean distance to each prototype, loss = cross-entropy of the queries.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from ..registry import METHODS
from .episodic import EpisodicMethod, split_tasks
from .base import Batch
from .configs import ProtoNetConfig


def prototype_logits(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
                     n_way: int) -> torch.Tensor:
    """``-||q - c_k||^2`` for every query ``q`` and prototype ``c_k`` = mean of class ``k``'s support
    features (Snell et al. eq. 1-2). Returns ``[n_query_total, n_way]``."""
    onehot = F.one_hot(support_labels, n_way).to(support.dtype)  # [S, n_way]
    protos = onehot.t() @ support / onehot.sum(0).unsqueeze(1)  # [n_way, D]
    diff = query.unsqueeze(1) - protos.unsqueeze(0)
    return -(diff * diff).sum(-1)


@METHODS.register("protonet")
class ProtoNet(EpisodicMethod):
    """Episodic ProtoNet training of the backbone. ``training_step`` takes one episode in the layout of
    :mod:`fsl_lsskd.methods.episodic` and returns ``loss`` (query cross-entropy) and ``query_acc``."""

    config_cls = ProtoNetConfig
    tasks_per_batch = 1

    def training_step(self, batch: Batch, epoch: int) -> Dict[str, torch.Tensor]:
        cfg: ProtoNetConfig = self.config
        feats = self.backbone(batch.images)
        feats = feats.flatten(1)
        losses, accs = [], []
        for sf, sy, qf, qy in split_tasks(feats, batch.labels, cfg.n_way, cfg.n_shot, cfg.n_query):
            logits = prototype_logits(sf, sy, qf, cfg.n_way)
            losses.append(F.cross_entropy(logits, qy))
            accs.append((logits.argmax(1) == qy).float().mean())
        loss = torch.stack(losses).mean()
        return {"loss": loss, "proto_loss": loss.detach(), "query_acc": torch.stack(accs).mean().detach()}
