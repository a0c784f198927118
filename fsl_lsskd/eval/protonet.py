"""ProtoNet (nearest centroid) classifier on frozen features, vectorised over all episodes.

Snell et al., "Prototypical Networks for Few-shot Learning", NeurIPS 2017; evaluation as in RFS
(Tian et al. 2020, WangYueFt/rfs ``eval/meta_eval.py``): L2-normalised features, prototype = mean of a
class's support features, logits = -squared Euclidean distance, prediction = argmax.
"""
from __future__ import annotations

import numpy as np
import torch

from ..registry import EVALUATORS
from .base import Evaluator, episode_tensors


@EVALUATORS.register("protonet")
class ProtoNetEvaluator(Evaluator):
    """Nearest prototype (RFS / Snell et al. 2017), all episodes at once."""

    def __init__(self, chunk: int = 500, dtype: torch.dtype = torch.float64) -> None:
        self.chunk = chunk
        self.dtype = dtype

    def evaluate_episodes(self, inputs, rows: np.ndarray, n_shot: int, device="cpu", **ctx) -> np.ndarray:
        feats, rows_t = episode_tensors(inputs, rows, device, self.dtype)
        E, W, K = rows_t.shape
        labels = torch.arange(W, device=device).repeat_interleave(K - n_shot)
        out = []
        for s in range(0, E, self.chunk):
            x = feats[rows_t[s:s + self.chunk]]                       # [e, W, K, D]
            protos = x[:, :, :n_shot].mean(2)                          # [e, W, D]
            q = x[:, :, n_shot:].reshape(x.shape[0], -1, x.shape[-1])  # [e, W*Q, D]
            logits = -sq_dist(q, protos)
            out.append((logits.argmax(-1) == labels).to(torch.float64).mean(-1))
        return torch.cat(out).cpu().numpy()


def sq_dist(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[..., Nq, Np]`` = |q|^2 - 2 q.p + |p|^2 (float64: no harmful cancellation
    for unit-norm features)."""
    return (q * q).sum(-1, keepdim=True) - 2 * q @ p.transpose(-1, -2) + (p * p).sum(-1).unsqueeze(-2)
