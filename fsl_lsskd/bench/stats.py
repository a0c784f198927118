"""Uncertainty over episodes *and* training seeds.

The per-episode t-interval (RFS) treats one trained network as fixed; a second training seed of the same
method can move the mean by more than that interval. :func:`hierarchical_bootstrap` resamples both levels
(seeds with replacement, then episodes with replacement within every drawn seed; Davison & Hinkley 1997,
§3.8; Field & Welsh 2007), so its percentile interval includes the variation between training runs. With one
seed it reduces to the episode bootstrap. All intervals are 95%.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

N_BOOT = 2000
SEED = 0


def _draws(n_seeds: int, n_items: int, n_boot: int, rng: np.random.Generator, chunk: int):
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        seeds = rng.integers(0, n_seeds, size=(b, n_seeds))
        items = rng.integers(0, n_items, size=(b, n_seeds, n_items))
        yield seeds, items


def hierarchical_bootstrap(x: np.ndarray, n_boot: int = N_BOOT, seed: int = SEED,
                           chunk: int = 100) -> Tuple[float, float]:
    """95% percentile interval of the mean of ``x [n_seeds, n_episodes]`` (per-seed, per-episode values on the
    same episodes), resampling seeds then episodes. Deterministic (``seed``)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    rng = np.random.default_rng(seed)
    stats = []
    for seeds, items in _draws(x.shape[0], x.shape[1], n_boot, rng, chunk):
        picked = x[seeds[..., None], items]  # [b, S, E]
        stats.append(picked.mean(axis=(1, 2)))
    s = np.concatenate(stats)
    return float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))


def hierarchical_bootstrap_stat(x: np.ndarray, stat: Callable[[np.ndarray], float], n_boot: int = N_BOOT,
                                seed: int = SEED) -> Tuple[float, float]:
    """As :func:`hierarchical_bootstrap` for any statistic of the resampled ``x [n_seeds, n_items, ...]``
    (e.g. ECE from summed reliability bins): ``stat`` receives ``[n_seeds * n_items, ...]``."""
    x = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    S, E = x.shape[:2]
    vals = np.empty(n_boot)
    for b in range(n_boot):
        s = rng.integers(0, S, size=S)
        i = rng.integers(0, E, size=(S, E))
        vals[b] = stat(x[s[:, None], i].reshape((S * E,) + x.shape[2:]))
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def excludes_zero(lo: float, hi: float) -> Optional[int]:
    """+1 when an interval lies above 0, -1 below, None when it contains 0."""
    if lo > 0:
        return 1
    if hi < 0:
        return -1
    return None


# --- Inference at the unit that decides: training seeds (t, df = seeds - 1) and test classes (cluster bootstrap) ---

#: Bounds within this many points of 0 count as 0: a difference that is zero up to float error decides nothing.
ZERO_TOL = 1e-9

#: The verdict words, one per outcome of :func:`verdict`.
BETTER, WORSE, NO_EVIDENCE, NOT_DECIDED = "better", "worse", "no evidence of a difference", "not decided"


@dataclass(frozen=True)
class SeedInterval:
    """A mean over training seeds with its 95% t-interval (df = ``n - 1``).

    ``values``: one number per training seed (a seed's mean accuracy over the episodes, in %, or a method's
    per-seed difference to a baseline, in points), in seed order. ``lo``/``hi``/``sd``/``p`` are NaN for one seed:
    one seed decides nothing. ``p`` is the two-sided one-sample t-test of mean 0 (meaningful for differences)."""

    mean: float
    lo: float
    hi: float
    n: int
    sd: float
    p: float
    values: Tuple[float, ...]

    @property
    def half(self) -> float:
        """Half the interval's width (NaN for one seed)."""
        return (self.hi - self.lo) / 2

    @property
    def decided(self) -> bool:
        return self.n >= 2 and math.isfinite(self.lo)


def t_interval(values: Sequence[float], level: float = 0.95) -> SeedInterval:
    """The t-interval of the mean of ``values`` (one per training seed): ``mean ± t_{(1+level)/2, n-1} · s/√n``
    with the unbiased ``s`` (Student 1908; for per-seed differences this is the paired t-interval of
    Bouthillier et al. 2021, "Accounting for variance in machine learning benchmarks", and of Dror et al. 2018).
    Each seed's value already averages its episodes, so the interval covers training variation *and* the
    episode noise of every seed; it is exact for normal per-seed values and conservative-to-right for few
    seeds, where a bootstrap over 3 values is far too narrow (it resamples 3 numbers and uses normal quantiles;
    ``docs/statistics.md``). Raises ValueError for no values."""
    from scipy import stats

    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise ValueError("t_interval needs at least one value")
    m = float(x.mean())
    if x.size < 2:
        return SeedInterval(m, math.nan, math.nan, 1, math.nan, math.nan, tuple(map(float, x)))
    sd = float(x.std(ddof=1))
    h = float(stats.t.ppf((1 + level) / 2, x.size - 1)) * sd / math.sqrt(x.size)
    if sd <= ZERO_TOL * max(1.0, abs(m)):
        p = 1.0 if abs(m) <= ZERO_TOL else 0.0
    else:
        p = float(stats.ttest_1samp(x, 0.0).pvalue)
    return SeedInterval(m, m - h, m + h, int(x.size), sd, p, tuple(map(float, x)))


def verdict(interval: SeedInterval) -> str:
    """The verdict word of a difference (method minus baseline) from its seed-level interval: ``better`` /
    ``worse`` when the 95% interval excludes 0 (beyond :data:`ZERO_TOL`), ``no evidence of a difference`` when
    it contains 0, ``not decided`` with one seed."""
    if not interval.decided:
        return NOT_DECIDED
    if interval.lo > ZERO_TOL:
        return BETTER
    if interval.hi < -ZERO_TOL:
        return WORSE
    return NO_EVIDENCE


def class_bootstrap(values: np.ndarray, classes: np.ndarray, n_boot: int = N_BOOT, seed: int = SEED,
                    level: float = 0.95) -> Tuple[float, float]:
    """Percentile interval of the mean episode value when the *test classes* are resampled: the test-set
    uncertainty that episode intervals leave out (Lafargue et al. 2024, "Oops, I Sampled it Again:
    Reinterpreting Confidence Intervals in Few-Shot Learning", TMLR). 2,000 episodes drawn from 40 classes are
    not 2,000 independent draws: a new set of 40 classes from the same distribution moves the mean far more than
    the episode interval says.

    ``values [E]`` (or ``[S, E]``, averaged over seeds first): one number per episode (accuracy in %, or a paired
    difference in points); ``classes [E, n_way]``: each episode's class ids. The episodes are fixed (published),
    so the classes are resampled through an additive model of the episode value,
    ``y_e = (1/n_way) * sum_{c in e} beta_c + r_e`` (least squares): ``beta_c`` is class ``c``'s level. Each
    replicate draws the ``C`` classes with replacement and takes the mean of their ``beta``, plus the mean of
    ``E`` residuals drawn with replacement (the episodes' own noise). The ``beta`` are shrunk towards their mean
    by the share of their spread that is estimation noise (``s^2 (X'X)^-1``), so the interval covers the class
    distribution, not the noise of estimating each class (a method-of-moments correction). When no class occurs
    in two episodes (Omniglot's 20 runs, each with its own characters) the model has no class level to estimate
    and the episodes themselves (the clusters of classes) are resampled. Deterministic (``seed``); the tests
    check 95% coverage on simulated classes. Returns ``(lo, hi)``. Raises ValueError when shapes disagree."""
    y = np.asarray(values, dtype=np.float64)
    if y.ndim == 2:
        y = y.mean(0)
    cls = np.asarray(classes, dtype=np.int64)
    if cls.ndim != 2 or cls.shape[0] < y.shape[0]:
        raise ValueError(f"classes {cls.shape} do not cover {y.shape[0]} episodes")
    cls = cls[:y.shape[0]]
    n_ep, n_way = cls.shape
    uniq, inv = np.unique(cls, return_inverse=True)
    inv = inv.reshape(cls.shape)
    rng = np.random.default_rng(seed)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    if np.bincount(inv.ravel()).max() <= 1 or n_ep <= uniq.size:  # no class level to estimate: resample episodes
        idx = rng.integers(0, n_ep, size=(n_boot, n_ep))
        return tuple(float(x) for x in np.percentile(y[idx].mean(1), q))
    n_cls = uniq.size
    x = np.zeros((n_ep, n_cls))
    np.add.at(x, (np.repeat(np.arange(n_ep), n_way), inv.ravel()), 1.0 / n_way)
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ beta
    s2 = float(resid @ resid) / max(n_ep - n_cls, 1)
    cov = s2 * np.linalg.pinv(x.T @ x)
    noise = float(np.trace(cov) / n_cls - cov.mean())  # variance of (beta_c - mean beta) due to estimation
    spread = float(np.var(beta, ddof=1))
    shrink = math.sqrt(max(0.0, 1.0 - noise / spread)) if spread > 0 else 0.0
    beta = beta.mean() + shrink * (beta - beta.mean())
    picks = rng.integers(0, n_cls, size=(n_boot, n_cls))
    stat = beta[picks].mean(1)
    for start in range(0, n_boot, 256):  # residual means in chunks: [256, E] at a time
        b = slice(start, min(start + 256, n_boot))
        stat[b] += resid[rng.integers(0, n_ep, size=(stat[b].shape[0], n_ep))].mean(1)
    return tuple(float(v) for v in np.percentile(stat, q))
