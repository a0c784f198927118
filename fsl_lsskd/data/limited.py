"""Limited-data protocol: keep 25/50/75/100 % of the training images of every class.

Follows HSAKD's few-shot scenario (winycg/HSAKD:train_student_few_shot.py, a stratified subset per class with
a fixed seed); here each class keeps ``round(fraction * n_c)`` images (at least 1) chosen by a seeded
``numpy.random.default_rng(seed)`` permutation, so the subset is reproducible and exactly stratified."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError


def stratified_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a per-class ``fraction`` of ``labels`` (``fraction=1.0`` returns every index)."""
    labels = np.asarray(labels)
    if not (0.0 < float(fraction) <= 1.0):
        raise ConfigError(f"data fraction {fraction} must be in (0, 1], e.g. 0.25, 0.5, 0.75 or 1.0")
    if float(fraction) == 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, int(round(fraction * len(idx))))
        keep.append(idx[np.sort(rng.permutation(len(idx))[:k])])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
