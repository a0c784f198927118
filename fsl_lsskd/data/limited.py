"""Which training images a run uses: the held-out base images (:func:`heldout_split`) and the limited-data
protocol's fraction of every class (:func:`stratified_fraction`).

Limited data: keep a fraction (25/50/75/100 %) of the training images of every class.

HSAKD's few-shot scenario (winycg/HSAKD ``train_student_few_shot.py``): a stratified shuffle split of the
training set with ``test_size = 1 - fraction`` and a fixed ``random_state`` (0), i.e. scikit-learn's
``StratifiedShuffleSplit(n_splits=1, test_size=1 - r, random_state=0)``; the kept rows are its train side.
The subset does not depend on the training seed (the reference uses the same subset for every run).
E.g. 10 classes x 10 images at ``r = 0.25`` keep 25 images (2 or 3 per class).
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError

def heldout_split(labels: np.ndarray, heldout: float, seed: int):
    """``(train rows, held-out rows)``: a stratified share ``heldout`` of every class with at least 2 images,
    drawn from the run ``seed``'s ``heldout`` stream (:mod:`fsl_lsskd.seeding`) (each class keeps at least one training
    image). The held-out images measure base-class accuracy (the seed papers' metric) and calibration."""
    from ..seeding import numpy_generator

    labels = np.asarray(labels)
    if heldout <= 0:
        return np.arange(len(labels)), np.zeros(0, dtype=np.int64)
    rng = numpy_generator("heldout", seed)
    held = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) < 2:
            continue
        k = min(len(rows) - 1, max(1, int(round(heldout * len(rows)))))
        held.append(rng.permutation(rows)[:k])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


#: names the subset rule in training identities
SAMPLER = "sklearn-StratifiedShuffleSplit-rs0"
RANDOM_STATE = 0


def stratified_fraction(labels: np.ndarray, fraction: float, random_state: int = RANDOM_STATE) -> np.ndarray:
    """Sorted indices of the rows kept at ``fraction`` of ``labels`` (``fraction = 1`` keeps every row).

    Raises :class:`ConfigError` for a fraction outside (0, 1] or one that leaves a class without an image."""
    labels = np.asarray(labels)
    if not (0.0 < float(fraction) <= 1.0):
        raise ConfigError(f"data fraction {fraction} must be in (0, 1], e.g. 0.25, 0.5, 0.75 or 1.0")
    if float(fraction) == 1.0:
        return np.arange(len(labels))
    from sklearn.model_selection import StratifiedShuffleSplit

    try:
        sss = StratifiedShuffleSplit(n_splits=1, test_size=1.0 - float(fraction), random_state=random_state)
        keep, _ = next(sss.split(np.zeros(len(labels)), labels))
    except ValueError as exc:
        raise ConfigError(f"data fraction {fraction} cannot be drawn from {len(labels)} images of "
                          f"{len(np.unique(labels))} classes ({exc}); use a larger fraction") from None
    kept_classes = np.unique(labels[keep])
    if len(kept_classes) < len(np.unique(labels)):
        raise ConfigError(f"data fraction {fraction} leaves {len(np.unique(labels)) - len(kept_classes)} classes "
                          f"without a training image; use a larger fraction")
    return np.sort(keep)
