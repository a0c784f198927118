"""Logistic-regression readout, scikit-learn reference (one fit per episode).

RFS (Tian et al., ECCV 2020; WangYueFt/rfs ``eval/meta_eval.py``): L2-normalised pooled features,
``LogisticRegression(penalty='l2', C=1.0, solver='lbfgs', max_iter=1000, random_state=0)`` fitted on the
support set (the deprecated ``multi_class='multinomial'`` is the lbfgs default and is dropped);
probabilities from ``predict_proba``. ``logreg_batched`` solves the same objective for all episodes at once.
"""
from __future__ import annotations

import warnings

import numpy as np

from ..registry import READOUTS
from .base import EpisodeInputs, Readout, ReadoutOutput, l2_normalize, support_query_features
from .configs import LogRegConfig


def fit_predict_sklearn(xs: np.ndarray, ys: np.ndarray, xq: np.ndarray, C: float = 1.0) -> np.ndarray:
    """One RFS logistic regression: fit on (normalised) support features, return the query probabilities
    ``[n_query_total, n_classes]``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    # penalty='l2' is the default (passing it is deprecated since scikit-learn 1.8); same objective.
    clf = LogisticRegression(C=C, solver="lbfgs", max_iter=1000, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(xs, ys)
    return clf.predict_proba(xq)


@READOUTS.register("logreg")
class LogRegReadout(Readout):
    """RFS logistic regression on frozen features: scikit-learn LogisticRegression per episode (the reference; slow)."""

    config_cls = LogRegConfig
    probabilistic = True

    def uses_images(self) -> bool:
        return self.config.n_aug_support > 0

    def predict(self, inputs: EpisodeInputs) -> ReadoutOutput:
        E, W, Q = inputs.rows.shape[0], inputs.n_way, inputs.n_query
        yq = np.repeat(np.arange(W), Q)
        correct = np.empty(E, dtype=np.float64)
        probs = np.empty((E, W * Q, W), dtype=np.float32)
        for e in range(E):
            sup, qry = support_query_features(inputs, self.config.n_aug_support, e, e + 1)
            S = sup.shape[2]
            xs = l2_normalize(sup[0].reshape(W * S, -1).astype(np.float64))
            xq = l2_normalize(qry[0].reshape(W * Q, -1).astype(np.float64))
            p = fit_predict_sklearn(xs, np.repeat(np.arange(W), S), xq, float(self.config.C))
            probs[e] = p
            correct[e] = float(np.mean(p.argmax(1) == yq))
            inputs.done(1)
        return ReadoutOutput(correct, probs)
