"""The data model that tables and figures show: a benchmark's per-seed, per-episode scores (:class:`ResultSet`)
and the comparisons computed from them, once, before any rendering: paired differences (:func:`paired`,
:func:`paired_vs`), readout and variant effects, and the headline's lines (:func:`headline_rows`).

Every accuracy is in percent, every difference in percentage points; every decision rests on the t-interval over
training seeds (:mod:`fsl_lsskd.report.stats`, ``docs/statistics.md``).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from ..eval.base import mean_ci
from .stats import SeedInterval, class_interval, hierarchical_bootstrap_sum, t_interval, verdict

log = logging.getLogger(__name__)

Row = Tuple[str, str]                # (method or variant, backbone)
Column = Tuple[str, str, str, str]   # (training data label, target dataset, protocol key, readout label)


@dataclass
class Series:
    """Per-seed arrays of one (row, column): ``accuracy`` (% per episode, or per image for base scores) and,
    for probabilistic readouts, ``nll``, ``brier``, ``reliability``.

    Fill ``per_seed`` through :meth:`put` (as :class:`ResultSet` does): :meth:`summary` and :meth:`ece` are
    computed once per series and key and kept until the next :meth:`put`, so every table and figure reads the
    same numbers without recomputing them."""

    per_seed: Dict[int, Dict[str, np.ndarray]] = field(default_factory=dict)
    _memo: Dict[tuple, Any] = field(default_factory=dict, repr=False, compare=False)

    def put(self, seed: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Set one seed's arrays (a copy of the mapping) and forget the statistics computed so far."""
        self.per_seed[seed] = dict(arrays)
        self._memo.clear()

    @property
    def seeds(self) -> List[int]:
        return sorted(self.per_seed)

    def stacked(self, key: str = "accuracy", seeds: Optional[Sequence[int]] = None) -> np.ndarray:
        """``[n_seeds, n_episodes]`` of ``key`` (shortest length when seeds differ)."""
        seeds = self.seeds if seeds is None else [s for s in self.seeds if s in seeds]
        arrays = [np.asarray(self.per_seed[s][key]) for s in seeds]
        n = min(a.shape[0] for a in arrays)
        if any(a.shape[0] != n for a in arrays):
            log.warning("seeds have different episode counts; using the first %d", n)
        return np.stack([a[:n] for a in arrays])

    def has(self, key: str) -> bool:
        return all(key in d for d in self.per_seed.values())

    def summary(self, key: str = "accuracy") -> Tuple[float, float, float, float]:
        """``(mean, episode CI half-width, seed lo, seed hi)`` of ``key``: the seed interval is the t-interval over
        the seeds' means (:func:`~fsl_lsskd.report.stats.t_interval`; NaN bounds for one seed). Computed once
        (until the next :meth:`put`)."""
        memo = ("summary", key)
        if memo not in self._memo:
            x = self.stacked(key)
            m, h = mean_ci(x.mean(0))
            iv = t_interval(x.mean(1))
            self._memo[memo] = (m, h, iv.lo, iv.hi)
        return self._memo[memo]

    def seed_means(self, key: str = "accuracy") -> Dict[int, float]:
        return {s: float(np.mean(self.per_seed[s][key])) for s in self.seeds}

    def seed_std(self) -> float:
        vals = list(self.seed_means().values())
        return float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan

    def ece(self) -> Tuple[float, float, float]:
        """Pooled ECE (%) over seeds and episodes and its 95% hierarchical-bootstrap interval (seeds, then episodes:
        an interval for reading, not a decision; nothing is marked on it). Computed once (until the next
        :meth:`put`)."""
        from ..eval.calibration import ece_from_bins

        if ("ece",) not in self._memo:
            rel = self.stacked("reliability")  # [S, E, bins, 3]: count, sum of confidences, number correct
            value = 100.0 * ece_from_bins(rel.sum(axis=(0, 1)))
            # ECE = sum over bins of |correct - confidence| / predictions (ece_from_bins) depends on the resampled
            # sums only through each bin's correct - confidence and the total count: bootstrap those bins + 1
            # columns, not all 3 per bin
            gaps = np.concatenate([rel[..., 2] - rel[..., 1], rel[..., 0].sum(-1, keepdims=True)], axis=-1)

            def ece_of_sums(sums: np.ndarray) -> np.ndarray:  # [b, bins + 1] -> [b] (%)
                n = sums[:, -1]
                return 100.0 * np.divide(np.abs(sums[:, :-1]).sum(-1), n, out=np.full(n.shape, np.nan),
                                         where=n != 0)

            lo, hi = hierarchical_bootstrap_sum(gaps, ece_of_sums, n_boot=500)
            self._memo[("ece",)] = (value, lo, hi)
        return self._memo[("ece",)]


@dataclass
class ResultSet:
    """Everything a benchmark's tables and figures show (built by :func:`fsl_lsskd.report.collect.collect` from a
    store, or by :func:`fsl_lsskd.report.publish.collect_published` from a published directory).

    Keys: a *row* (:data:`Row`) is ``(method or variant name, backbone)``, e.g. ``("lsskd", "conv4")``; a
    *column* (:data:`Column`) is ``(training data label, target dataset, protocol key, readout label)``, e.g.
    ``("tiny_imagenet@25%", "tiny_imagenet", "5w1s15q", "protonet")``: the training data label is the dataset
    name with ``@<percent>%`` when trained on a fraction of it, the protocol key is
    :attr:`fsl_lsskd.protocol.EpisodeProtocol.key` (``<way>w<shot>s<query>q``), the readout label is
    :attr:`fsl_lsskd.eval.scoring.ReadoutSpec.label` (``logreg_batched(n_aug_support=5)``). A :class:`Series`
    holds one array dict per training seed: ``"accuracy"`` in % (``[E]``, one value per episode, or ``[N]``,
    one 0/100 value per held-out image for base scores) and, for probabilistic readouts, ``"nll"`` (nats,
    ``[E]``), ``"brier"`` (0..2, ``[E]``) and ``"reliability"`` (``[E, n_bins + 1, 3]``: per confidence bin the
    count, the sum of confidences and the number correct, :func:`fsl_lsskd.eval.calibration.bin_stats`).

    Fields:

    - ``cells[row][column]``: the few-shot scores of the benchmark's main protocols (every target, readout).
    - ``base[row][training data label]``: held-out base-class scores (per image) of the cell's own classifier,
      or of the nearest class mean for episodic methods.
    - ``curve_points[row][(training data label, target, n_way, n_shot, readout label)]``: way/shot curve
      points; a score on the curve's own episodes wins over a main-protocol score of the same way/shot
      (:meth:`add_curve`).
    - ``curves[row][metric]``: training curves ``[(epoch, value)]`` of the first seed at the largest fraction;
      metrics ``train_loss`` (the loss), ``val_fewshot_acc`` and ``heldout_base_acc`` (%).
    - ``teacher_rows``: the rows that are teachers trained for a student (shown as ``name (teacher)``).
    - ``variant_of[variant name]``: ``(method name, {setting: value})`` of a variant row (an ablation).
    - ``meta``: ``cells_found`` and ``cells_expected`` (int: training cells matched in the store / in the
      grid), ``episodes_source`` (set of str: where the episodes came from, ``published`` or ``generated``).
    - ``episode_classes[(target, protocol key)]``: each episode's test-class ids ``[E, n_way]`` (int), for the
      test-class interval; absent when the episodes cannot be recovered without the data."""

    cells: Dict[Row, Dict[Column, Series]] = field(default_factory=dict)
    base: Dict[Row, Dict[str, Series]] = field(default_factory=dict)
    curve_points: Dict[Row, Dict[tuple, Series]] = field(default_factory=dict)
    curves: Dict[Row, Dict[str, List[Tuple[int, float]]]] = field(default_factory=dict)
    teacher_rows: Set[Row] = field(default_factory=set)
    variant_of: Dict[str, Tuple[str, Mapping[str, object]]] = field(default_factory=dict)  # row -> (method, settings)
    meta: Dict[str, object] = field(default_factory=dict)
    episode_classes: Dict[Tuple[str, str], np.ndarray] = field(default_factory=dict)
    _curve_from_main: Set[tuple] = field(default_factory=set, repr=False)  # curve points filled by main scores

    def add(self, row: Row, col: Column, seed: int, arrays: Mapping[str, np.ndarray]) -> None:
        self.cells.setdefault(row, {}).setdefault(col, Series()).put(seed, arrays)

    def add_base(self, row: Row, data_label: str, seed: int, arrays: Mapping[str, np.ndarray]) -> None:
        self.base.setdefault(row, {}).setdefault(data_label, Series()).put(seed, arrays)

    def add_curve(self, row: Row, point: tuple, seed: int, arrays: Mapping[str, np.ndarray],
                  curve_episodes: bool = True) -> None:
        """A curve point's per-episode arrays for one seed. A score on the curve's own published episodes
        (``curve_episodes``) always wins over a main-protocol score of the same way/shot, whatever the order they
        arrive in (a main-protocol score only fills a point that has no curve score), so a point never mixes
        two episode sets across seeds."""
        series = self.curve_points.setdefault(row, {}).setdefault(point, Series())
        key = (row, point, seed)
        if curve_episodes:
            series.put(seed, arrays)
            self._curve_from_main.discard(key)
        elif seed not in series.per_seed or key in self._curve_from_main:
            series.put(seed, arrays)
            self._curve_from_main.add(key)

    @property
    def columns(self) -> List[Column]:
        return sorted({c for row in self.cells.values() for c in row}, key=_column_order)

    @property
    def rows(self) -> List[Row]:
        return sorted(set(self.cells) | set(self.base))


def _column_order(c: Column):
    m = re.match(r"(\d+)w(\d+)s(\d+)q", c[2])
    shape = tuple(int(x) for x in m.groups()) if m else (0, 0, 0)
    return (c[0], c[1], shape, c[3])


@dataclass
class Paired:
    """A method minus a baseline on identical episodes and the seeds both have (points).

    ``seed`` is the paired t-interval over the per-seed differences (df = seeds − 1): every decision uses it.
    ``lo``/``hi``/``p`` are its bounds and its t-test p (NaN for one seed); ``ci95`` the t-interval over episodes
    of the seed-averaged difference (episode noise only); ``episodes [E]`` the seed-averaged per-episode
    difference (for the test-class interval)."""

    mean: float
    ci95: float
    seed: SeedInterval
    per_seed: Dict[int, float]
    episodes: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    @property
    def lo(self) -> float:
        return self.seed.lo

    @property
    def hi(self) -> float:
        return self.seed.hi

    @property
    def p(self) -> float:
        return self.seed.p

    @property
    def word(self) -> str:
        """better / worse / no evidence of a difference / not decided (:func:`~fsl_lsskd.report.stats.verdict`)."""
        return verdict(self.seed)

    @property
    def verdict(self) -> Optional[int]:
        """+1 (▲) / −1 (▼) when the seed-level interval excludes 0, else None (one seed: None)."""
        return {"better": 1, "worse": -1}.get(self.word)


def paired(a: Series, b: Series) -> Optional[Paired]:
    """``a - b`` on identical episodes (the first ``min`` episodes of each: image-level readouts score a prefix of
    the published episodes) and the training seeds both have; None when they share no seed."""
    seeds = sorted(set(a.per_seed) & set(b.per_seed))
    if not seeds:
        return None
    x, y = a.stacked(seeds=seeds), b.stacked(seeds=seeds)
    n = min(x.shape[1], y.shape[1])
    diff = x[:, :n] - y[:, :n]
    m, h = mean_ci(diff.mean(0))
    per_seed = diff.mean(1)
    return Paired(m, h, t_interval(per_seed), {s: float(per_seed[i]) for i, s in enumerate(seeds)}, diff.mean(0))


def _paired_rows(table: Mapping[Row, Mapping[Any, Series]], reference: Callable[[Row], Optional[Row]],
                 key: Callable[[Any], Column] = lambda col: col) -> Dict[Row, Dict[Column, Paired]]:
    """Per row of ``table`` whose ``reference(row)`` is also a row: the paired difference on every column both
    have (:func:`paired`), keyed by ``key(column)``."""
    out: Dict[Row, Dict[Column, Paired]] = {}
    for row, cols in table.items():
        ref = reference(row)
        if ref is None or ref not in table:
            continue
        for col, res in cols.items():
            if col in table[ref]:
                d = paired(res, table[ref][col])
                if d is not None:
                    out.setdefault(row, {})[key(col)] = d
    return out


def paired_vs(results: ResultSet, baseline: str = "ce") -> Dict[Row, Dict[Column, Paired]]:
    """Per row and column, the difference to ``baseline`` (same backbone) over identical episodes, restricted to
    the training seeds both have."""
    return _paired_rows(results.cells, lambda row: None if row[0] == baseline else (baseline, row[1]))


def reference_readout(label: str) -> Optional[str]:
    """The readout a readout is compared with on the same checkpoint: a setting's effect against the same readout
    without settings (``logreg_batched(n_aug_support=5)`` vs ``logreg_batched``); ``finetune`` against
    ``protonet`` (its head starts as the prototypes: the difference is what fine-tuning adds)."""
    name = label.split("(", 1)[0]
    if name == "finetune":
        return "protonet"
    return name if "(" in label else None


def readout_effects(results: ResultSet) -> Dict[Row, Dict[Column, Paired]]:
    """Per row, every column whose readout has a reference (:func:`reference_readout`) in the same training
    data, target and protocol: the paired difference readout minus reference."""
    out: Dict[Row, Dict[Column, Paired]] = {}
    for row, cols in results.cells.items():
        for col, res in cols.items():
            ref = reference_readout(col[3])
            if ref is None or (col[0], col[1], col[2], ref) not in cols:
                continue
            d = paired(res, cols[(col[0], col[1], col[2], ref)])
            if d is not None:
                out.setdefault(row, {})[col] = d
    return out


def variant_effects(results: ResultSet) -> Dict[Row, Dict[Column, Paired]]:
    """Per variant row (an ablation: a method with settings, e.g. ``pskd_topk`` = ``pskd`` with
    ``store_layout: topk``) whose method is a row of the same backbone: the paired difference variant minus method
    on every column both have, and on base-class top-1 (column ``(data, "base", "top-1", "")``, paired over the
    same held-out images)."""
    def method_row(row: Row) -> Optional[Row]:
        if row[0] not in results.variant_of or row in results.teacher_rows:
            return None
        return (results.variant_of[row[0]][0], row[1])

    out = _paired_rows(results.cells, method_row)
    for row, cols in _paired_rows(results.base, method_row, key=lambda data: (data, "base", "top-1", "")).items():
        out.setdefault(row, {}).update(cols)
    return out


def row_name(results: ResultSet, r: Row) -> str:
    """A row's name in tables and figures: the method or variant, ``(teacher)`` after a teacher row's."""
    return r[0] + (" (teacher)" if r in results.teacher_rows else "")



# --- The headline: one small table a reader scans in a minute, and the verdict sentences generated from it ---

HEADLINE_READOUT = "protonet"
HEADLINE_SHOTS = (1, 5)


@dataclass
class HeadlineRow:
    """One (row, training data, shots) line of the headline table.

    ``accuracy``: the t-interval over training seeds of the seeds' mean accuracy (%); ``classes``: the 95%
    test-class interval of the seed-averaged accuracy (None when the episodes' classes are not known);
    ``diff``: the paired difference to the baseline (None for the baseline itself or when it has no shared seed);
    ``diff_classes``: the difference's test-class interval."""

    row: Row
    data: str
    shots: int
    accuracy: SeedInterval
    classes: Optional[Tuple[float, float]]
    n_episodes: int
    diff: Optional[Paired] = None
    diff_classes: Optional[Tuple[float, float]] = None
    n_classes: int = 0


def _headline_columns(results: ResultSet) -> List[Column]:
    """The in-domain 5-way 1- and 5-shot ProtoNet columns (the papers' convention), per training data label."""
    out = []
    for c in results.columns:
        data, target, proto, readout = c
        m = re.match(r"5w(\d+)s\d+q$", proto)
        if data.split("@")[0] == target and readout == HEADLINE_READOUT and m and int(m.group(1)) in HEADLINE_SHOTS:
            out.append(c)
    return out


def _estimable(iv: Tuple[float, float]) -> Optional[Tuple[float, float]]:
    """A test-class interval, or None where the episodes cannot estimate it (``(nan, nan)``: every episode holds
    the same classes), shown as "–" like an unknown one."""
    return iv if all(math.isfinite(v) for v in iv) else None


def headline_rows(results: ResultSet, baseline: str = "ce") -> List[HeadlineRow]:
    """The headline's lines, baseline first within each training data label and shot count."""
    out = []
    for col in _headline_columns(results):
        data, target, proto, _ = col
        shots = int(re.match(r"5w(\d+)s", proto).group(1))
        classes = results.episode_classes.get((target, proto))
        rows = [r for r in results.rows if col in results.cells.get(r, {})]
        rows.sort(key=lambda r: (r[0] != baseline, r in results.teacher_rows, r))
        for r in rows:
            s = results.cells[r][col]
            x = s.stacked()
            ref = (baseline, r[1])
            diff = paired(s, results.cells[ref][col]) if r != ref and col in results.cells.get(ref, {}) else None
            cls_iv = _estimable(class_interval(x, classes)) if classes is not None else None
            d_iv = (_estimable(class_interval(diff.episodes, classes)) if diff is not None and classes is not None
                    else None)
            out.append(HeadlineRow(r, data, shots, t_interval(x.mean(1)), cls_iv, x.shape[1], diff, d_iv,
                                   int(np.unique(classes).size) if classes is not None else 0))
    out.sort(key=lambda h: (h.data, h.shots))
    return out
