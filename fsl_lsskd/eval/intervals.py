"""The test-class interval of a mean over episodes: how much the test classes alone move a number
(``docs/statistics.md``). It lives in the evaluation layer so that ``fsl-bench evaluate`` shows it beside the
episode interval; the tables (:mod:`fsl_lsskd.report.stats`) re-export it."""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np

#: fewer test classes than this draw a warning from :func:`fsl_lsskd.eval.scoring.evaluate`: the standard few-shot
#: test splits have 20 (CIFAR-FS, FC100, miniImageNet) or more, and an episode interval over fewer classes says
#: little about new classes (Lafargue et al. 2024)
FEW_TEST_CLASSES = 20


def class_interval(values: np.ndarray, classes: np.ndarray, level: float = 0.95) -> Tuple[float, float]:
    """The interval of the mean episode value over the *test classes*: how far another draw of test classes from
    the same distribution would move it, the uncertainty that episode intervals leave out (Lafargue et al. 2024,
    "Oops, I Sampled it Again: Reinterpreting Confidence Intervals in Few-Shot Learning", TMLR). 2,000 episodes
    drawn from 40 classes are not 2,000 independent draws.

    ``values [E]`` (or ``[S, E]``, averaged over seeds first): one number per episode (accuracy in %, or a paired
    difference in points); ``classes [E, n_way]``: each episode's class ids. The episodes are fixed (published),
    so the classes enter through a random-effects model of the episode value,
    ``y_e = (1/n_way) * sum_{c in e} beta_c + r_e``: ``beta_c`` is class ``c``'s level, fitted by least squares.
    The variance that resampling the ``C`` classes gives the mean is estimated in closed form: the spread of the
    ``beta`` less the part of it that is estimation noise (``s^2 (X'X)^-1``, method of moments), over ``C``, plus
    the episode term ``var(y)/E``. The interval is ``mean ± t_{(1+level)/2, C-1} * sqrt(V)``: t with ``C - 1``
    degrees of freedom, since ``C`` classes are the sample (a percentile class bootstrap over 24-40 classes covers
    90-92% at the 95% level in our simulations; this covers 92-95%, ``tests/test_statistics.py``). When no class
    occurs in two episodes (Omniglot's 20 runs, each with its own characters) the episodes are the class clusters
    and this is the t-interval over them. When the episodes cannot tell the classes apart (every episode holds
    the same ``n_way`` classes, or any design whose ``X'X`` is singular) the classes' spread is not estimable
    from these scores and the interval is ``(nan, nan)``, not the narrower episode interval. Deterministic.
    Returns ``(lo, hi)``. Raises ValueError when shapes disagree."""
    from scipy import stats

    y = np.asarray(values, dtype=np.float64)
    if y.ndim == 2:
        y = y.mean(0)
    cls = np.asarray(classes, dtype=np.int64)
    if cls.ndim != 2 or cls.shape[0] < y.shape[0]:
        raise ValueError(f"classes {cls.shape} do not cover {y.shape[0]} episodes")
    cls = cls[:y.shape[0]]
    n_ep, n_way = cls.shape
    if n_ep < 2:
        raise ValueError("class_interval needs at least two episodes")
    uniq, inv = np.unique(cls, return_inverse=True)
    inv = inv.reshape(cls.shape)
    q = (1 + level) / 2
    m = float(y.mean())
    if np.bincount(inv.ravel()).max() <= 1 or n_ep <= uniq.size:  # no class level to estimate: episodes = clusters
        h = float(stats.t.ppf(q, n_ep - 1)) * float(np.std(y, ddof=1)) / math.sqrt(n_ep)
        return m - h, m + h
    n_cls = uniq.size
    # normal equations of the sparse design X [E, C] (X[e, c] = 1/n_way for the classes of e), built from the
    # class indices: X'X counts the episodes two classes share, X'y sums each class's episodes
    xtx = np.zeros((n_cls, n_cls))
    for i in range(n_way):
        for j in range(n_way):
            np.add.at(xtx, (inv[:, i], inv[:, j]), 1.0)
    xtx /= n_way ** 2
    xty = np.bincount(inv.ravel(), weights=np.repeat(y, n_way), minlength=n_cls) / n_way
    if np.linalg.matrix_rank(xtx) < n_cls:  # class levels confounded: their spread cannot be estimated
        return math.nan, math.nan
    xtx_inv = np.linalg.pinv(xtx)
    beta = xtx_inv @ xty
    resid = y - beta[inv].mean(1)
    s2 = float(resid @ resid) / max(n_ep - n_cls, 1)
    cov = s2 * xtx_inv
    noise = float(np.trace(cov) / n_cls - cov.mean())  # variance of (beta_c - mean beta) due to estimation
    between = max(float(np.var(beta, ddof=1)) - noise, 0.0)  # the classes' own spread
    var = between / n_cls + float(np.var(y, ddof=1)) / n_ep
    h = float(stats.t.ppf(q, n_cls - 1)) * math.sqrt(var)
    return m - h, m + h


def few_classes_warning(results) -> str:
    """The warning for scores whose episodes draw on fewer than :data:`FEW_TEST_CLASSES` classes, or on classes
    whose spread cannot be estimated; ``""`` when there is nothing to warn about, or when this process already
    warned about the same split (validation scores the same split every epoch). ``results``: episodic
    :class:`~fsl_lsskd.eval.base.ScoreResult` values of one split."""
    few = [r for r in results if r.classes is not None and r.n_classes < FEW_TEST_CLASSES]
    if not few:
        return ""
    n = min(r.n_classes for r in few)
    info = few[0].info
    key = (info.get("dataset"), info.get("split"), info.get("fingerprint"), n)
    if key in _WARNED:
        return ""
    _WARNED.add(key)
    parts = []
    for r in few:
        cls = f"±{r.class_ci95:.2f} over classes" if math.isfinite(r.class_ci95) else "not estimable over classes"
        parts.append(f"{r.protocol.key} {r.label}: ±{r.ci95:.2f} over episodes, {cls}")
    where = f"{info.get('dataset', '')} {info.get('split', '')}".strip()
    return (f"{where} has only {n} classes: an interval over episodes describes these {n} classes only, not "
            f"new classes. Another draw of {n} classes moves the mean by the class interval (95% half-widths; "
            f"Lafargue et al. 2024, docs/statistics.md): {'; '.join(parts)}. A split with at least "
            f"{FEW_TEST_CLASSES} classes (the standard few-shot test splits have 20 or more) is needed for a "
            f"conclusion about new classes.")


#: the splits :func:`few_classes_warning` has warned about in this process
_WARNED: set = set()
