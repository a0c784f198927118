"""Logistic-regression linear probe, scikit-learn reference (one fit per episode).

RFS (Tian et al., ECCV 2020; WangYueFt/rfs ``eval/meta_eval.py``): L2-normalised pooled features,
``LogisticRegression(penalty='l2', C=1.0, solver='lbfgs', max_iter=1000, random_state=0)`` fitted on the
support set (the deprecated ``multi_class='multinomial'`` is the lbfgs default and is dropped).
"""
from __future__ import annotations

import warnings

import numpy as np

from ..registry import EVALUATORS
from .base import Evaluator, l2_normalize


def fit_predict_sklearn(xs: np.ndarray, ys: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """One RFS linear probe: fit on (normalised) support, predict queries."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    # penalty='l2' is the default (passing it is deprecated since scikit-learn 1.8); same objective.
    clf = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(xs, ys)
    return clf.predict(xq)


@EVALUATORS.register("logreg")
class LogRegEvaluator(Evaluator):
    """RFS linear probe: scikit-learn LogisticRegression per episode (reference)."""

    def evaluate_episodes(self, inputs, rows: np.ndarray, n_shot: int, **ctx) -> np.ndarray:
        feats = l2_normalize(np.asarray(inputs, dtype=np.float64))
        E, W, K = rows.shape
        ys = np.repeat(np.arange(W), n_shot)
        yq = np.repeat(np.arange(W), K - n_shot)
        acc = np.empty(E, dtype=np.float64)
        for e in range(E):
            xs = feats[rows[e, :, :n_shot].reshape(-1)]
            xq = feats[rows[e, :, n_shot:].reshape(-1)]
            acc[e] = float(np.mean(fit_predict_sklearn(xs, ys, xq) == yq))
        return acc
