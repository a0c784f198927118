"""Calibration of predicted probabilities: top-label ECE (15 equal-width bins), NLL and Brier score, with the
per-bin statistics behind reliability diagrams.

Definitions (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017; Brier 1950):

- confidence = the largest class probability, correct = (its class is the label);
- ECE = sum over bins b of (n_b / n) * |acc_b - conf_b|, bins ``[0, 1/15), ..., [14/15, 1)`` and a last
  one for confidence exactly 1, as torchmetrics' ``multiclass_calibration_error(n_bins=15, norm="l1")``
  (``torch.bucketize(right=True)``), which computes the reported pooled ECE (:func:`pooled_ece`); the
  per-bin sums (:func:`bin_stats`) give the same number for any subset of episodes or seeds, which the
  bootstrap CIs need;
- NLL = mean of ``-log p(label)``; Brier = mean of ``sum_c (p_c - onehot_c)^2`` (0..2).

All probabilities are float arrays ``[..., n, C]``; labels int ``[..., n]``.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

N_BINS = 15
_EPS = float(np.finfo(np.float64).eps)  # as sklearn.metrics.log_loss


def bin_stats(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Per-bin (count, sum of confidences, sum of correct) ``[..., n_bins + 1, 3]`` of the top-label
    predictions of ``probs [..., n, C]`` (the extra last bin holds confidence exactly 1, as torchmetrics);
    the leading dimensions (episodes) are kept."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(-1)
    correct = (probs.argmax(-1) == np.asarray(labels)).astype(np.float64)
    # torchmetrics: bucketize(conf, linspace(0, 1, n_bins + 1), right=True) - 1
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins)
    n_bins = n_bins + 1
    lead = conf.shape[:-1]
    out = np.zeros(lead + (n_bins, 3), dtype=np.float64)
    flat_idx = idx.reshape(-1, conf.shape[-1])
    flat_conf = conf.reshape(-1, conf.shape[-1])
    flat_cor = correct.reshape(-1, conf.shape[-1])
    flat_out = out.reshape(-1, n_bins, 3)
    for e in range(flat_idx.shape[0]):
        flat_out[e, :, 0] = np.bincount(flat_idx[e], minlength=n_bins)
        flat_out[e, :, 1] = np.bincount(flat_idx[e], weights=flat_conf[e], minlength=n_bins)
        flat_out[e, :, 2] = np.bincount(flat_idx[e], weights=flat_cor[e], minlength=n_bins)
    return out


def ece_from_bins(stats: np.ndarray) -> float:
    """ECE (fraction) from summed per-bin statistics ``[bins, 3]`` (:func:`bin_stats`)."""
    stats = np.asarray(stats, dtype=np.float64)
    n = stats[:, 0].sum()
    if n == 0:
        return float("nan")
    return float(np.abs(stats[:, 2] - stats[:, 1]).sum() / n)


def pooled_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """Top-label ECE (fraction) of all predictions pooled, by torchmetrics
    (``torchmetrics.functional.classification.multiclass_calibration_error``, ``norm="l1"``)."""
    import torch
    from torchmetrics.functional.classification import multiclass_calibration_error

    p = torch.as_tensor(np.asarray(probs, dtype=np.float32)).reshape(-1, np.asarray(probs).shape[-1])
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64)).reshape(-1)
    return float(multiclass_calibration_error(p, y, num_classes=p.shape[-1], n_bins=n_bins, norm="l1"))


def nll(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean negative log-likelihood (nats) over the last-but-one axis: ``[..., n, C] -> [...]``."""
    probs = np.asarray(probs, dtype=np.float64)
    p_true = np.take_along_axis(probs, np.asarray(labels)[..., None], axis=-1)[..., 0]
    return -np.log(np.clip(p_true, _EPS, 1.0 - _EPS)).mean(-1)


def brier(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Multiclass Brier score ``mean_n sum_c (p_c - onehot_c)^2`` (0..2): ``[..., n, C] -> [...]``."""
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(probs.shape[-1])[np.asarray(labels)]
    return ((probs - onehot) ** 2).sum(-1).mean(-1)


def summarise(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> Dict[str, float]:
    """Pooled top-1 accuracy, ECE (torchmetrics), NLL and Brier (percent for accuracy and ECE)."""
    probs = np.asarray(probs)
    flat_p = probs.reshape(-1, probs.shape[-1])
    flat_y = np.asarray(labels).reshape(-1)
    return {"accuracy": 100.0 * float((flat_p.argmax(-1) == flat_y).mean()),
            "ece": 100.0 * pooled_ece(flat_p, flat_y, n_bins), "nll": float(nll(flat_p, flat_y)),
            "brier": float(brier(flat_p, flat_y))}
