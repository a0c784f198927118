"""ProtoNet (nearest prototype) readout on frozen features, vectorised over all episodes.

Snell et al., "Prototypical Networks for Few-shot Learning", NeurIPS 2017; evaluation as in RFS
(Tian et al. 2020, WangYueFt/rfs ``eval/meta_eval.py``): L2-normalised features, prototype = mean of a
class's (normalised) support features, logits = -squared Euclidean distance / ``temperature``, prediction =
argmax, probabilities = softmax of the logits (Snell et al. eq. 2; ``temperature`` 1 is their form).
"""
from __future__ import annotations


import numpy as np
import torch

from ..registry import READOUTS
from .base import EpisodeInputs, Readout, ReadoutOutput, l2_normalize, support_query_features
from .configs import ProtoNetConfig


@READOUTS.register("protonet")
class ProtoNetReadout(Readout):
    """Nearest prototype on L2-normalised frozen features (Snell et al. 2017; RFS), all episodes at once."""

    config_cls = ProtoNetConfig
    probabilistic = True

    def uses_images(self) -> bool:
        return self.config.n_aug_support > 0

    def predict(self, inputs: EpisodeInputs) -> ReadoutOutput:
        chunk = int(self.options.get("chunk", 500))
        E = inputs.rows.shape[0]
        correct, probs = [], []
        for s in range(0, E, chunk):
            sup, qry = support_query_features(inputs, self.config.n_aug_support, s, min(E, s + chunk))
            sup = l2_normalize(torch.as_tensor(sup, dtype=torch.float64, device=inputs.device))
            qry = l2_normalize(torch.as_tensor(qry, dtype=torch.float64, device=inputs.device))
            protos = sup.mean(2)                                           # [e, W, D]
            q = qry.reshape(qry.shape[0], -1, qry.shape[-1])               # [e, W*Q, D]
            logits = -sq_dist(q, protos) / float(self.config.temperature)
            labels = torch.arange(inputs.n_way, device=q.device).repeat_interleave(inputs.n_query)
            correct.append((logits.argmax(-1) == labels).to(torch.float64).mean(-1).cpu())
            probs.append(torch.softmax(logits, -1).to(torch.float32).cpu())
            inputs.done(qry.shape[0])
        return ReadoutOutput(torch.cat(correct).numpy(), torch.cat(probs).numpy())


def sq_dist(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[..., Nq, Np]`` = |q|^2 - 2 q.p + |p|^2 (float64: no harmful cancellation
    for unit-norm features)."""
    return (q * q).sum(-1, keepdim=True) - 2 * q @ p.transpose(-1, -2) + (p * p).sum(-1).unsqueeze(-2)


def prototype_accuracy(features: np.ndarray, rows: np.ndarray, n_shot: int) -> np.ndarray:
    """Per-episode ProtoNet accuracy (fractions) of ``rows`` on ``features`` (no probabilities): a shortcut for
    training-time validation."""
    out = ProtoNetReadout().predict(EpisodeInputs(rows=rows, n_shot=n_shot, features=features))
    return out.correct
