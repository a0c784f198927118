"""Evaluator contract: a classifier scored on a batch of episodes.

An evaluator registered in :data:`fsl_lsskd.registry.EVALUATORS` implements
``evaluate_episodes(inputs, rows, n_shot, **ctx) -> np.ndarray`` of per-episode accuracies (fractions),
where ``rows`` is int64 ``[E, n_way, n_shot + n_query]`` (split rows, class-major, support first; the
label of ``rows[:, w]`` is ``w``). ``inputs`` are the split's pooled features ``[N, D]`` (float32) when
``needs_images`` is False; otherwise the split's uint8 images ``[N, H, W, 3]`` and ``ctx`` carries
``backbone``, ``mean``, ``std``, ``image_size`` and ``device`` (e.g. a MAML fine-tuning evaluator).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Tuple

import numpy as np


class Evaluator:
    """Base class of registered few-shot classifiers."""

    needs_images: ClassVar[bool] = False
    registry_name: ClassVar[str] = ""

    def evaluate_episodes(self, inputs: Any, rows: np.ndarray, n_shot: int, **ctx: Any) -> np.ndarray:
        raise NotImplementedError


def l2_normalize(x, eps: float = 1e-12):
    """Row-wise L2 normalisation (RFS ``is_norm``); works on numpy arrays and torch tensors."""
    if isinstance(x, np.ndarray):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def episode_tensors(inputs: Any, rows: np.ndarray, device: Any, dtype: Any):
    """``(features, rows)`` for a vectorised evaluator: the pooled features L2-normalised as ``dtype`` on
    ``device`` and the ``[E, n_way, K]`` episode rows as an int64 tensor there (index ``features[rows]``)."""
    import torch

    feats = l2_normalize(torch.as_tensor(np.asarray(inputs)).to(device=device, dtype=dtype))
    return feats, torch.as_tensor(rows, dtype=torch.int64, device=device)


def mean_ci(acc: np.ndarray) -> Tuple[float, float]:
    """Mean and 95% CI half-width with the t-distribution (RFS ``mean_confidence_interval``):
    ``h = sem * t.ppf(0.975, n-1)``, ``sem = std(ddof=1)/sqrt(n)``."""
    from scipy import stats

    acc = np.asarray(acc, dtype=np.float64)
    n = len(acc)
    if n == 0:
        return float("nan"), float("nan")
    if n == 1:
        return float(acc[0]), float("nan")
    sem = acc.std(ddof=1) / math.sqrt(n)
    return float(acc.mean()), float(sem * stats.t.ppf(0.975, n - 1))


@dataclass
class EvalResult:
    """One (classifier, protocol) score: per-episode accuracies (fractions) and their mean ± 95% CI (t)."""

    classifier: str
    n_way: int
    n_shot: int
    n_query: int
    accuracies: np.ndarray
    episodes_source: str = "generated"
    seconds: float = 0.0
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def n_episodes(self) -> int:
        return int(len(self.accuracies))

    @property
    def mean(self) -> float:
        return mean_ci(self.accuracies)[0]

    @property
    def ci95(self) -> float:
        return mean_ci(self.accuracies)[1]

    @property
    def key(self) -> str:
        return f"{self.n_way}w{self.n_shot}s_{self.classifier}"

    def summary(self) -> Dict[str, Any]:
        return {"classifier": self.classifier, "n_way": self.n_way, "n_shot": self.n_shot,
                "n_query": self.n_query, "n_episodes": self.n_episodes, "mean": self.mean, "ci95": self.ci95,
                "mean_pct": 100 * self.mean, "ci95_pct": 100 * self.ci95, "episodes": self.episodes_source,
                "seconds": self.seconds, **self.info}
