"""Uncertainty at the unit that decides (``docs/statistics.md``).

- :func:`t_interval` / :func:`verdict`: the t-interval over training seeds (df = seeds - 1) that every decision
  uses (better / worse / no evidence of a difference / not decided), for a seed mean or a paired difference;
- :func:`class_interval` (from :mod:`fsl_lsskd.eval.intervals`): how far another draw of test classes would move a
  mean over episodes (Lafargue et al. 2024), shown beside it, never a decision;
- :func:`hierarchical_bootstrap_sum`: a bootstrap over seeds, then episodes (Davison & Hinkley 1997, §3.8), for
  statistics of sums with no closed form (the calibration tables' ECE interval: for reading, nothing is marked on it);
  :func:`hierarchical_bootstrap` is its mean, the interval the tables used to decide on and that
  ``tests/test_statistics.py`` shows too narrow for few seeds.

All intervals are 95%.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, Tuple

import numpy as np

from ..eval.intervals import class_interval  # noqa: F401  (re-exported: the tables' class interval)

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


#: the draws of a shape are kept (:func:`_bootstrap_counts`) when they take at most this many bytes
COUNTS_CACHE_BYTES = 64 * 2 ** 20


def _iter_bootstrap_counts(S: int, E: int, n_boot: int, seed: int, chunk: int) -> Iterator[np.ndarray]:
    """The draws of :func:`hierarchical_bootstrap_sum` as item counts, one ``[b, S * E]`` array per chunk of
    ``b <= chunk`` draws."""
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if S * E < 2 ** 16 else np.uint32
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        picked = np.empty((b, S, E), dtype=np.int64)  # indices into the S * E items, per draw
        for k in range(b):
            seeds = rng.integers(0, S, size=S)
            picked[k] = seeds[:, None] * E + rng.integers(0, E, size=(S, E))
        counts = np.bincount((picked.reshape(b, -1) + (np.arange(b) * S * E)[:, None]).ravel(),
                             minlength=b * S * E).reshape(b, S * E)
        yield counts.astype(dtype)


@functools.lru_cache(maxsize=4)
def _cached_bootstrap_counts(S: int, E: int, n_boot: int, seed: int, chunk: int) -> Tuple[np.ndarray, ...]:
    out = tuple(_iter_bootstrap_counts(S, E, n_boot, seed, chunk))
    for c in out:
        c.setflags(write=False)
    return out


def _bootstrap_counts(S: int, E: int, n_boot: int, seed: int, chunk: int):
    """The item counts of the draws, chunk by chunk. They depend on the shape and the seed only, not on the data,
    so the calibration tables' many cells of one shape draw them once (drawing and counting were 80% of a
    table's time) when they fit :data:`COUNTS_CACHE_BYTES`; the values are exactly those drawn without the
    cache."""
    if n_boot * S * E * (2 if S * E < 2 ** 16 else 4) <= COUNTS_CACHE_BYTES:
        return _cached_bootstrap_counts(S, E, n_boot, seed, chunk)
    return _iter_bootstrap_counts(S, E, n_boot, seed, chunk)


def hierarchical_bootstrap_sum(x: np.ndarray, stat: Callable[[np.ndarray], np.ndarray], n_boot: int = N_BOOT,
                               seed: int = SEED, chunk: int = 100) -> Tuple[float, float]:
    """95% percentile interval of a statistic of the *sum* of ``x [n_seeds, n_items, ...]`` over its seeds and items,
    resampling seeds, then items within each drawn seed (e.g. ECE from summed reliability bins ``[S, E, bins, 3]``):
    ``stat`` maps the resampled sums ``[b, ...]`` (one per bootstrap draw) to ``[b]`` values. Deterministic
    (``seed``): each bootstrap sample draws ``rng.integers(0, S, size=S)`` then ``rng.integers(0, E, size=(S, E))``
    from ``rng = np.random.default_rng(seed)``. Vectorised: a resampled sum is the draw's item counts times ``x``,
    one matrix product per ``chunk`` of draws, instead of copying ``S * E`` items per draw. Raises ValueError for
    an ``x`` with fewer than two axes or no item."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"hierarchical_bootstrap_sum needs x [n_seeds, n_items, ...], got {x.shape}")
    S, E = x.shape[:2]
    flat_x = x.reshape(S * E, -1)
    vals = [np.asarray(stat((counts @ flat_x).reshape((counts.shape[0],) + x.shape[2:])), dtype=np.float64)
            for counts in _bootstrap_counts(S, E, n_boot, seed, chunk)]
    v = np.concatenate(vals)
    return float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))


# --- Inference at the unit that decides: training seeds (t, df = seeds - 1) and test classes (random effects) ---

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
