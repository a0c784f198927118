"""Uncertainty over episodes *and* training seeds.

The per-episode t-interval (RFS) treats one trained network as fixed; a second training seed of the same
method can move the mean by more than that interval. :func:`hierarchical_bootstrap` resamples both levels
(seeds with replacement, then episodes with replacement within every drawn seed; Davison & Hinkley 1997,
§3.8; Field & Welsh 2007), so its percentile interval includes the variation between training runs. With one
seed it reduces to the episode bootstrap. All intervals are 95%.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

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
