"""Prototypical Networks, episodic training (Snell, Swersky & Zemel, "Prototypical Networks for Few-shot
Learning", NeurIPS 2017; reference code jakesnell/prototypical-networks, ``protonets/models/few_shot.py``).

Each episode: embed support and query with the backbone, class prototypes = mean support embedding,
logits = negative *squared* Euclidean distance to each prototype, loss = cross-entropy of the queries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from ..registry import METHODS
from .episodic import EpisodicConfig, EpisodicMethod, split_tasks
from .base import Batch


@dataclass(frozen=True)
class ProtoNetConfig(EpisodicConfig):
    """Defaults from Snell et al. 2017 (§3.2 miniImageNet) and their code's defaults
    (``scripts/train/few_shot/run_train.py``):

    - Adam, lr 1e-3, no weight decay; lr halved every 2000 episodes: with 100 episodes per epoch
      (their ``--data.train_episodes 100``) and 100 epochs that is ``lr_milestones`` at 0.2/0.4/0.6/0.8
      of training with ``lr_gamma`` 0.5 (10 000 episodes; the paper trains to a validation plateau).
    - 15 queries per class; training shot = test shot (5). The paper trains miniImageNet with 20-way
      (5-shot) / 30-way (1-shot) episodes ("higher way helps"); we default to 5-way so the cost per
      episode stays small on CPU -- set ``n_way: 20`` for the paper's setting.
    - No augmentation (``augment=False``) as in the paper.

    CPU profiles shorten ``epochs``/``episodes_per_epoch``; the milestones are fractions, so the schedule
    keeps its shape, but such runs see far fewer episodes than the paper's and are not comparable to its
    numbers.
    """

    epochs: int = 100
    episodes_per_epoch: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_milestones: Tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
    lr_gamma: float = 0.5
    optimizer: str = "adam"
    n_way: int = 5
    n_shot: int = 5
    n_query: int = 15


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
