"""Result tables: Markdown, CSV and LaTeX (booktabs) of a :class:`ResultSet`.

Every accuracy is in percent. A cell shows the mean over seeds and episodes with two 95% intervals:

- ``± e``: the t-interval over episodes of the seed-averaged per-episode accuracy (RFS; the spread of the
  *episodes* only, holding the trained networks and the test classes fixed);
- ``(seeds ± s)``: half the width of the t-interval over training seeds (df = seeds − 1) of the seeds' mean
  accuracies (:func:`fsl_lsskd.report.stats.t_interval`), which includes the variation between training runs.

Every decision rests on training seeds (``docs/statistics.md``): a column's best value is bold only when the
paired t-interval over seeds of its difference to the next best excludes 0, and a paired difference is marked
(▲ better, ▼ worse) only when its paired t-interval over seeds excludes 0. One seed decides nothing ("1 seed:
not decided"). The headline table (:func:`headline`) adds the test-class interval
(:func:`fsl_lsskd.report.stats.class_interval`): how much the test classes alone move a number.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from ..eval.base import mean_ci
from ..progress import announce
from ..utils import atomic_write_text
from .stats import (NOT_DECIDED, SeedInterval, class_interval, hierarchical_bootstrap_stat, t_interval,
                    verdict)

log = logging.getLogger(__name__)

Row = Tuple[str, str]                # (method or variant, backbone)
Column = Tuple[str, str, str, str]   # (training data label, target dataset, protocol key, readout label)


@dataclass
class Series:
    """Per-seed arrays of one (row, column): ``accuracy`` (% per episode, or per image for base scores) and,
    for probabilistic readouts, ``nll``, ``brier``, ``reliability``."""

    per_seed: Dict[int, Dict[str, np.ndarray]] = field(default_factory=dict)

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
        the seeds' means (:func:`~fsl_lsskd.report.stats.t_interval`; NaN bounds for one seed)."""
        x = self.stacked(key)
        m, h = mean_ci(x.mean(0))
        iv = t_interval(x.mean(1))
        return m, h, iv.lo, iv.hi

    def seed_means(self, key: str = "accuracy") -> Dict[int, float]:
        return {s: float(np.mean(self.per_seed[s][key])) for s in self.seeds}

    def seed_std(self) -> float:
        vals = list(self.seed_means().values())
        return float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan

    def ece(self) -> Tuple[float, float, float]:
        """Pooled ECE (%) over seeds and episodes and its 95% hierarchical-bootstrap interval (seeds, then episodes:
        an interval for reading, not a decision; nothing is marked on it)."""
        from ..eval.calibration import ece_from_bins

        rel = self.stacked("reliability")  # [S, E, bins, 3]
        value = 100.0 * ece_from_bins(rel.sum(axis=(0, 1)))
        lo, hi = hierarchical_bootstrap_stat(rel, lambda r: 100.0 * ece_from_bins(r.sum(0)), n_boot=500)
        return value, lo, hi


@dataclass
class ResultSet:
    """Everything a benchmark's tables and figures show, keyed by row ``(method or variant, backbone)``.

    ``cells[row][column]``: the per-seed per-episode arrays of a column ``(training data label, target dataset,
    protocol key, readout label)``; ``base[row][data label]``: held-out base-class scores (per image);
    ``curve_points[row][(data, target, n_way, n_shot, readout)]``: way/shot curve points; ``curves[row][metric]``:
    training curves ``[(epoch, value)]`` of the first seed; ``episode_classes[(target, protocol key)]``: each
    episode's test-class ids ``[E, n_way]`` (for the test-class interval; absent when the episodes cannot be
    recovered without the data); ``meta``: cells found/expected, episode sources."""

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
        self.cells.setdefault(row, {}).setdefault(col, Series()).per_seed[seed] = dict(arrays)

    def add_base(self, row: Row, data_label: str, seed: int, arrays: Mapping[str, np.ndarray]) -> None:
        self.base.setdefault(row, {}).setdefault(data_label, Series()).per_seed[seed] = dict(arrays)

    def add_curve(self, row: Row, point: tuple, seed: int, arrays: Mapping[str, np.ndarray],
                  curve_episodes: bool = True) -> None:
        """A curve point's per-episode arrays for one seed. A score on the curve's own published episodes
        (``curve_episodes``) always wins over a main-protocol score of the same way/shot, whatever the order they
        arrive in (a main-protocol score only fills a point that has no curve score), so a point never mixes
        two episode sets across seeds."""
        per_seed = self.curve_points.setdefault(row, {}).setdefault(point, Series()).per_seed
        key = (row, point, seed)
        if curve_episodes:
            per_seed[seed] = dict(arrays)
            self._curve_from_main.discard(key)
        elif seed not in per_seed or key in self._curve_from_main:
            per_seed[seed] = dict(arrays)
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


def _one_seed_caveat(effects: Mapping[Row, Mapping[Any, Paired]]) -> str:
    """The sentence a difference table's caption gains when any of its differences rests on one training seed:
    one seed decides nothing, so such a difference shows "1 seed: not decided" and no ▲/▼. Empty when every
    difference has two or more seeds."""
    if not any(len(d.per_seed) == 1 for cols in effects.values() for d in cols.values()):
        return ""
    return (" A difference on one training seed has no interval over seeds: it reads \"1 seed: not decided\", "
            "whatever its episode interval.")


def _one_seed_cells_note(any_one_seed: bool) -> str:
    """The sentence an accuracy table's caption gains when any of its cells rests on one training seed: such a
    cell shows no "(seeds ± …)" part and is never bold (one seed decides nothing). Empty otherwise."""
    if not any_one_seed:
        return ""
    return (" A cell without \"(seeds ± …)\" rests on one training seed: it has no interval over seeds and is "
            "never bold.")


def _seed_columns(results: ResultSet, rows: Sequence[Row],
                  cols: Sequence[Column]) -> Dict[Row, Dict[int, List[Column]]]:
    """Per row with cells: its columns grouped by how many training seeds the cell has."""
    per_row: Dict[Row, Dict[int, List[Column]]] = {}
    for r in rows:
        for c in cols:
            if c in results.cells.get(r, {}):
                per_row.setdefault(r, {}).setdefault(len(results.cells[r][c].per_seed), []).append(c)
    return per_row


def _seeds_per_row(results: ResultSet, per_row: Mapping[Row, Mapping[int, List[Column]]]) -> str:
    """The caption sentence naming how many training seeds each row's cells rest on, and in which columns a row
    has a different count (``lsskd 1 (3 at tiny_imagenet@25% 5w1s15q protonet, ...)``), from
    :func:`_seed_columns`. Empty when every cell of the table has the same number of seeds."""
    if len({n for by in per_row.values() for n in by}) <= 1:
        return ""
    parts = []
    for r, by in per_row.items():
        main = max(by, key=lambda n: (len(by[n]), n))  # the count most of the row's columns have
        rest = "; ".join(f"{n} at {', '.join(map(col_label, c))}" for n, c in sorted(by.items()) if n != main)
        parts.append(f"{_row_name(results, r)} {main}" + (f" ({rest})" if rest else ""))
    return " Training seeds per row: " + "; ".join(parts) + "."


def _num(x: float) -> str:
    """A CSV number to 4 decimals; empty for NaN (an interval over one seed does not exist)."""
    return f"{x:.4f}" if math.isfinite(x) else ""


def _signed(x: float) -> str:
    """A signed difference in percentage points to 2 decimals. A nonzero value that rounds to ±0.00 keeps one
    significant digit instead (``-0.004``, ``+3e-05``), so an interval bound that excludes 0 never reads as 0."""
    s = f"{x:+.2f}"
    return f"{x:+.1g}" if x != 0 and float(s) == 0 else s


def _interval(d: Paired) -> str:
    """``[lo, hi]`` of a paired difference's seed-level t-interval (:func:`_signed` bounds), or
    ``1 seed: not decided``."""
    if not d.seed.decided:
        return f"1 seed: {NOT_DECIDED}"
    return f"[{_signed(d.lo)}, {_signed(d.hi)}]"


def _p_text(p: float) -> str:
    """The seed-level t-test p of a difference (none for one seed)."""
    if not math.isfinite(p):
        return "no p"
    return "p<1e-16" if p < 1e-16 else f"p={p:.2g}"


def col_label(col: Column, fractions: bool = True) -> str:
    data, target, proto, readout = col
    where = data if data.split("@")[0] == target else f"{data}→{target}"
    return f"{where} {proto} {readout}"


def _tex(s: str) -> str:
    return (s.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("&", "\\&")
            .replace("±", "$\\pm$").replace("→", "$\\to$").replace("▲", "$\\blacktriangle$")
            .replace("▼", "$\\blacktriangledown$").replace("–", "--").replace("−", "$-$"))


def _bold_best(series: Mapping[Row, Series]) -> Optional[Row]:
    """The row whose mean is best when its paired difference to the next best, over the training seeds both
    have, has a t-interval above 0 (:func:`paired`); None in a single-entry column or with fewer than two
    shared seeds (one seed decides nothing)."""
    if len(series) < 2:
        return None
    ranked = sorted(series.items(), key=lambda kv: -kv[1].summary()[0])
    (best, a), (_, b) = ranked[0], ranked[1]
    d = paired(a, b)
    return best if d is not None and d.verdict == 1 else None


def _row_name(results: ResultSet, r: Row) -> str:
    return r[0] + (" (teacher)" if r in results.teacher_rows else "")


def render(results: ResultSet, published: Mapping[str, Mapping[str, str]], caption: str,
           baselines: Sequence[str] = ("ce",)) -> Dict[str, str]:
    """``{"md", "csv", "tex"}``: the accuracy table, paired differences against each baseline, calibration and
    base-class tables (when the results have them)."""
    cols, rows = results.columns, results.rows
    summ: Dict[Tuple[Row, Column], Tuple[float, float, float, float]] = {}
    for r in rows:
        for c in cols:
            if c in results.cells.get(r, {}):
                summ[(r, c)] = results.cells[r][c].summary()
    bold = {c: _bold_best({r: results.cells[r][c] for r in rows if (r, c) in summ}) for c in cols}
    pub_cols = sorted({k for m in published.values() for k in m})
    seed_cols = _seed_columns(results, rows, cols)
    seed_counts = {r: "/".join(str(n) for n in sorted(seed_cols.get(r, {}))) for r in rows}
    seed_note = (_seeds_per_row(results, seed_cols)
                 + _one_seed_cells_note(any(1 in by for by in seed_cols.values())))
    md = [caption, "", "Cells: mean accuracy (%) ± 95% CI over episodes (t) and, in parentheses, ± half the 95% "
                       "t-interval over training seeds (df = seeds − 1). **Bold**: best, when the paired t-interval "
                       "over seeds of its difference to the next best excludes 0." + seed_note, ""]
    head = ["method", "backbone", "seeds"] + [col_label(c) for c in cols] + [f"published: {p}" for p in pub_cols]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    csv = ["method,backbone,train_data,target,protocol,readout,seeds,episodes,mean,ci95_episodes,seed_ci_lo,"
           "seed_ci_hi,seed_std,seed_means"]
    tex_rows = []
    for r in [r for r in rows if r in results.cells]:
        cells_md, cells_tex = [], []
        for c in cols:
            if (r, c) not in summ:
                cells_md.append("–")
                cells_tex.append("--")
                continue
            m, h, lo, hi = summ[(r, c)]
            res = results.cells[r][c]
            seeds_part = f" (seeds ±{(hi - lo) / 2:.2f})" if len(res.per_seed) > 1 else ""
            txt = f"{m:.2f} ± {h:.2f}{seeds_part}"
            cells_md.append(f"**{txt}**" if bold[c] == r else txt)
            cells_tex.append(f"\\textbf{{{_tex(txt)}}}" if bold[c] == r else _tex(txt))
            means = ";".join(f"{s}:{v:.4f}" for s, v in res.seed_means().items())
            csv.append(f"{r[0]},{r[1]},{c[0]},{c[1]},{c[2]},{c[3]},{len(res.per_seed)},{res.stacked().shape[1]},"
                       f"{m:.4f},{h:.4f},{_num(lo)},{_num(hi)},{_num(res.seed_std())},{means}")
        pub = [published.get(r[0], {}).get(p, "–") for p in pub_cols]
        md.append("| " + " | ".join([_row_name(results, r), r[1], seed_counts[r]] + cells_md + pub) + " |")
        tex_rows.append(" & ".join([_tex(_row_name(results, r)), _tex(r[1])] + cells_tex + [_tex(p) for p in pub])
                        + " \\\\")
    tex = _tex_table(caption + seed_note, ["Method", "Backbone"] + [col_label(c) for c in cols] + [f"published {p}" for p in pub_cols],
                     tex_rows)
    for baseline in baselines:
        paired = paired_vs(results, baseline)
        if not paired:
            continue
        pcols = [c for c in cols if any(c in paired[r] for r in paired)]
        caveat = _one_seed_caveat(paired)
        title = (f"Paired difference to `{baseline}` on identical episodes and the seeds both have (points): mean ± "
                 f"95% CI over episodes; [95% t-interval over the per-seed differences, df = seeds − 1]; its t-test "
                 f"p; each seed's difference. ▲/▼: the seed-level interval excludes 0.{caveat}")
        md += ["", title, "", "| method | backbone | " + " | ".join(col_label(c) for c in pcols) + " |",
               "|" + "---|" * (len(pcols) + 2)]
        prow_tex = []
        for r in sorted(paired):
            vals, vals_tex = [], []
            for c in pcols:
                if c not in paired[r]:
                    vals.append("–")
                    vals_tex.append("--")
                    continue
                d = paired[r][c]
                mark = {1: " ▲", -1: " ▼"}.get(d.verdict, "")
                seeds = "/".join(f"{v:+.2f}" for v in d.per_seed.values())
                vals.append(f"{d.mean:+.2f} ± {d.ci95:.2f} {_interval(d)}{mark} ({_p_text(d.p)}; "
                            f"seeds {seeds})")
                vals_tex.append(_tex(f"{d.mean:+.2f} {_interval(d)}{mark}"))
            md.append(f"| {_row_name(results, r)} | {r[1]} | " + " | ".join(vals) + " |")
            prow_tex.append(" & ".join([_tex(_row_name(results, r)), _tex(r[1])] + vals_tex) + " \\\\")
        tex += "\n" + _tex_table(f"Paired difference to {baseline} (points): mean [95% t-interval over the "
                                 f"per-seed differences]; triangles: the interval excludes 0.{caveat}",
                                 ["Method", "Backbone"] + [col_label(c) for c in pcols], prow_tex)
    effects = readout_effects(results)
    if effects:
        ecols = [c for c in cols if any(c in effects[r] for r in effects)]
        caveat = _one_seed_caveat(effects)
        md += ["", "Readout effects on the same checkpoints and episodes (points): each readout minus its reference "
                   "(a setting against the same readout without it; finetune against protonet, where its head "
                   "starts); mean ± 95% CI over episodes [95% t-interval over the per-seed differences] (each seed's "
                   "difference). ▲/▼: the seed-level interval excludes 0." + caveat, "",
               "| method | backbone | " + " | ".join(f"{col_label(c)} − {reference_readout(c[3])}" for c in ecols)
               + " |", "|" + "---|" * (len(ecols) + 2)]
        etex = []
        for r in sorted(effects):
            vals = []
            for c in ecols:
                d = effects[r].get(c)
                if d is None:
                    vals.append("–")
                    continue
                mark = {1: " ▲", -1: " ▼"}.get(d.verdict, "")
                seeds = "/".join(f"{v:+.2f}" for v in d.per_seed.values())
                vals.append(f"{d.mean:+.2f} ± {d.ci95:.2f} {_interval(d)}{mark} (seeds {seeds})")
            md.append(f"| {_row_name(results, r)} | {r[1]} | " + " | ".join(vals) + " |")
            etex.append(" & ".join([_tex(_row_name(results, r)), _tex(r[1])] + [_tex(v) for v in vals]) + " \\\\")
        tex += "\n" + _tex_table("Readout effects (points): readout minus its reference on the same checkpoints "
                                  "and episodes; [95% t-interval over the per-seed differences]." + caveat,
                                  ["Method", "Backbone"] + [f"{col_label(c)} - {reference_readout(c[3])}"
                                                            for c in ecols], etex)
    v_md, v_tex = _variant_table(results)
    md += v_md
    tex += v_tex
    curve_md, curve_csv = _curve_table(results)
    md += curve_md
    csv += curve_csv
    cal_md, cal_tex = _calibration(results, cols)
    md += cal_md
    tex += cal_tex
    base_md, base_tex, base_csv = _base_table(results)
    md += base_md
    tex += base_tex
    if pub_cols:
        md += ["", "Published columns are numbers reported in the cited papers under their own full protocol "
                   "(data, resolution, epochs); they are context, not a like-for-like comparison."]
    return {"md": "\n".join(md) + "\n", "csv": "\n".join(csv + base_csv) + "\n", "tex": tex}


def _variant_table(results: ResultSet) -> Tuple[List[str], str]:
    """The variant-effects section (:func:`variant_effects`): Markdown lines and a LaTeX table."""
    effects = variant_effects(results)
    if not effects:
        return [], ""
    few = sorted({c for r in effects.values() for c in r if c[1] != "base"}, key=_column_order)
    base = sorted({c for r in effects.values() for c in r if c[1] == "base"})
    vcols = few + base
    caveat = _one_seed_caveat(effects)

    def label(c: Column) -> str:
        return f"{c[0]} base top-1" if c[1] == "base" else col_label(c)

    md = ["", "Variant effects (ablations) on identical episodes and the seeds both have (points): each variant minus "
              "its method with default settings; mean ± 95% CI over episodes (base top-1: over held-out images) "
              "[95% t-interval over the per-seed differences]; its t-test p; each seed's difference. ▲/▼: the "
              "seed-level interval excludes 0." + caveat, "",
          "| variant | backbone | " + " | ".join(label(c) for c in vcols) + " |", "|" + "---|" * (len(vcols) + 2)]
    rows_tex = []
    for r in sorted(effects):
        method, settings = results.variant_of[r[0]]
        what = ", ".join(f"{k}: {v}" for k, v in sorted(settings.items()))
        name = f"{r[0]} − {method}" + (f" ({what})" if what else "")
        vals, vals_tex = [], []
        for c in vcols:
            d = effects[r].get(c)
            if d is None:
                vals.append("–")
                vals_tex.append("--")
                continue
            mark = {1: " ▲", -1: " ▼"}.get(d.verdict, "")
            seeds = "/".join(f"{v:+.2f}" for v in d.per_seed.values())
            vals.append(f"{d.mean:+.2f} ± {d.ci95:.2f} {_interval(d)}{mark} ({_p_text(d.p)}; seeds {seeds})")
            vals_tex.append(_tex(f"{d.mean:+.2f} {_interval(d)}{mark}"))
        md.append(f"| {name} | {r[1]} | " + " | ".join(vals) + " |")
        rows_tex.append(" & ".join([_tex(name), _tex(r[1])] + vals_tex) + " \\\\")
    tex = _tex_table("Variant effects (points): each variant minus its method on identical episodes; [95% t-interval "
                     "over the per-seed differences]; triangles: the interval excludes 0." + caveat, ["Variant", "Backbone"] + [label(c) for c in vcols],
                     rows_tex)
    return md, tex


def _tex_table(caption: str, header: List[str], rows: List[str]) -> str:
    colspec = "ll" + "c" * (len(header) - 2)
    return "\n".join(["\\begin{table}[t]", "\\centering", "\\small", f"\\caption{{{_tex(caption)}}}",
                      f"\\begin{{tabular}}{{{colspec}}}", "\\toprule", " & ".join(_tex(h) for h in header) + " \\\\",
                      "\\midrule", *rows, "\\bottomrule", "\\end{tabular}", "\\end{table}", ""])


def _curve_table(results: ResultSet) -> Tuple[List[str], List[str]]:
    """Way/shot curve points: per (training data, target, readout, n_way) a table of accuracy against n_shot."""
    if not results.curve_points:
        return [], []
    one_seed = any(len(res.per_seed) == 1 for r in results.curve_points.values() for res in r.values())
    md = ["", "Way and shot curves (published curve episodes): mean accuracy (%) over seeds and episodes (± half "
              "the 95% t-interval over training seeds)." + (" A point without (±…) rests on one training seed." if one_seed
                                                  else "")]
    csv = ["", "method,backbone,train_data,target,n_way,n_shot,readout,seeds,mean,ci95_episodes,seed_ci_lo,"
               "seed_ci_hi"]
    groups = sorted({(p[0], p[1], p[4], p[2]) for r in results.curve_points.values() for p in r})
    for data, target, readout, n_way in groups:
        shots = sorted({p[3] for r in results.curve_points.values() for p in r
                        if (p[0], p[1], p[4], p[2]) == (data, target, readout, n_way)})
        where = data if data.split("@")[0] == target else f"{data}→{target}"
        md += ["", f"{where}, {n_way}-way, {readout}:", "",
               "| method | backbone | " + " | ".join(f"{k}-shot" for k in shots) + " |", "|" + "---|" * (len(shots) + 2)]
        for r in sorted(results.curve_points):
            pts = results.curve_points[r]
            vals = []
            for k in shots:
                res = pts.get((data, target, n_way, k, readout))
                if res is None:
                    vals.append("–")
                    continue
                m, h, lo, hi = res.summary()
                vals.append(f"{m:.2f}" + (f" (±{(hi - lo) / 2:.2f})" if len(res.per_seed) > 1 else ""))
                csv.append(f"{r[0]},{r[1]},{data},{target},{n_way},{k},{readout},{len(res.per_seed)},{m:.4f},{h:.4f},"
                           f"{_num(lo)},{_num(hi)}")
            if any(v != "–" for v in vals):
                md.append(f"| {_row_name(results, r)} | {r[1]} | " + " | ".join(vals) + " |")
    return md, csv


def _calibration(results: ResultSet, cols: List[Column]) -> Tuple[List[str], str]:
    ccols = [c for c in cols if any(c in results.cells[r] and results.cells[r][c].has("reliability")
                                    for r in results.cells)]
    if not ccols:
        return [], ""
    md = ["", "Calibration of the few-shot readouts' query probabilities (pooled over seeds and episodes): ECE (%, "
              "15 equal-width bins, top label) [hierarchical-bootstrap 95% interval over seeds and episodes]; NLL "
              "(nats) and Brier score (0..2), mean ± 95% CI over episodes. Lower is better.", "",
          "| method | backbone | " + " | ".join(col_label(c) for c in ccols) + " |", "|" + "---|" * (len(ccols) + 2)]
    tex_rows = []
    for r in [r for r in results.rows if r in results.cells]:
        vals = []
        for c in ccols:
            res = results.cells[r].get(c)
            if res is None or not res.has("reliability"):
                vals.append("–")
                continue
            ece, lo, hi = res.ece()
            nll_m, nll_h = mean_ci(res.stacked("nll").mean(0))
            br_m, br_h = mean_ci(res.stacked("brier").mean(0))
            vals.append(f"ECE {ece:.2f} [{lo:.2f}, {hi:.2f}]; NLL {nll_m:.3f} ± {nll_h:.3f}; Brier {br_m:.3f} ± "
                        f"{br_h:.3f}")
        md.append(f"| {_row_name(results, r)} | {r[1]} | " + " | ".join(vals) + " |")
        tex_rows.append(" & ".join([_tex(_row_name(results, r)), _tex(r[1])] + [_tex(v) for v in vals]) + " \\\\")
    return md, _tex_table("Calibration of the few-shot readouts (ECE %, NLL, Brier).",
                          ["Method", "Backbone"] + [col_label(c) for c in ccols], tex_rows)


def _base_table(results: ResultSet) -> Tuple[List[str], str, List[str]]:
    if not results.base:
        return [], "", []
    labels = sorted({d for r in results.base.values() for d in r})
    one_seed = _one_seed_cells_note(any(len(res.per_seed) == 1 for by in results.base.values() for res in by.values()))
    md = ["", "Base classes (held-out images of the training classes): top-1 accuracy (%) ± 95% CI over images "
              "(seeds averaged) (seeds ± half the 95% t-interval over training seeds); classifier calibration: ECE "
              "(%, 15 bins) [hierarchical-bootstrap interval over seeds and images], NLL, Brier. Methods without a "
              "base classifier (episodic) are scored by the "
              "nearest class mean (accuracy only)." + one_seed, "",
          "| method | backbone | " + " | ".join(f"{d} top-1 | {d} ECE | {d} NLL | {d} Brier" for d in labels) + " |",
          "|" + "---|" * (2 + 4 * len(labels))]
    csv = ["", "method,backbone,train_data,base_top1,base_top1_ci95,seed_ci_lo,seed_ci_hi,ece,ece_lo,ece_hi,nll,brier,"
               "seeds"]
    tex_rows = []
    acc_by_label = {d: {r: results.base[r][d].summary() for r in results.base if d in results.base[r]} for d in labels}
    bold = {d: _bold_best({r: results.base[r][d] for r in acc_by_label[d]}) for d in labels}
    for r in sorted(results.base):
        vals = []
        for d in labels:
            res = results.base[r].get(d)
            if res is None:
                vals += ["–"] * 4
                continue
            m, h, lo, hi = acc_by_label[d][r]
            seeds_part = f" (seeds ±{(hi - lo) / 2:.2f})" if len(res.per_seed) > 1 else ""
            acc = f"{m:.2f} ± {h:.2f}{seeds_part}"
            vals.append(f"**{acc}**" if bold[d] == r else acc)
            if res.has("reliability"):
                ece, elo, ehi = res.ece()
                nll_v, br_v = float(res.stacked("nll").mean()), float(res.stacked("brier").mean())
                vals += [f"{ece:.2f} [{elo:.2f}, {ehi:.2f}]", f"{nll_v:.3f}", f"{br_v:.3f}"]
                csv.append(f"{r[0]},{r[1]},{d},{m:.4f},{h:.4f},{_num(lo)},{_num(hi)},{ece:.4f},{elo:.4f},{ehi:.4f},"
                           f"{nll_v:.4f},{br_v:.4f},{len(res.per_seed)}")
            else:
                vals += ["–", "–", "–"]
                csv.append(f"{r[0]},{r[1]},{d},{m:.4f},{h:.4f},{_num(lo)},{_num(hi)},,,,,,{len(res.per_seed)}")
        md.append(f"| {_row_name(results, r)} | {r[1]} | " + " | ".join(vals) + " |")
        tex_rows.append(" & ".join([_tex(_row_name(results, r)), _tex(r[1])] + [_tex(v.strip('*')) for v in vals])
                        + " \\\\")
    header = ["Method", "Backbone"] + [h for d in labels for h in (f"{d} top-1", "ECE", "NLL", "Brier")]
    return md, _tex_table("Base-class held-out accuracy and calibration." + one_seed, header, tex_rows), csv


def generated_markers(name: str) -> Tuple[str, str]:
    """The comment lines that enclose a benchmark's generated section in a results README."""
    return (f"<!-- generated by fsl-bench table: {name} headline and verdicts (do not edit) -->",
            f"<!-- end of generated section: {name} -->")


def replace_generated(text: str, name: str, body: str) -> str:
    """``text`` with the section between :func:`generated_markers` replaced by ``body``; ``text`` unchanged when
    it has no such section (the README decides where the verdicts go, by holding the markers)."""
    begin, end = generated_markers(name)
    if begin not in text or end not in text:
        return text
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body.rstrip()}\n{end}{tail}"


def write_tables(results: ResultSet, published: Mapping[str, Mapping[str, str]], caption: str, out_stem: Path,
                 header: str = "", baselines: Sequence[str] = ("ce",)) -> List[Path]:
    """Write the tables and figures (:mod:`fsl_lsskd.report.figures`); returns the paths.

    ``<stem>.md`` / ``<stem>.tex``: the headline (:func:`headline`) and its generated verdicts;
    ``<stem>_headline.csv``: its numbers; ``<stem>_appendix.md`` / ``.tex``: every column (:func:`render`);
    ``<stem>.csv``: every column's numbers. Without an in-domain 5-way ProtoNet column there is no headline and
    ``<stem>.md`` / ``.tex`` hold the full tables. When ``README.md`` beside them holds the benchmark's generated
    section (:func:`generated_markers`), the headline and its verdict sentences replace that section, so no
    verdict there is written by hand."""
    from .figures import write_figures

    rendered = render(results, published, caption, baselines=baselines)
    head = headline(results, caption, baseline=baselines[0] if baselines else "ce")
    name = out_stem.name
    appendix = out_stem.with_name(f"{name}_appendix")
    headline_csv = out_stem.with_name(f"{name}_headline.csv")
    files: Dict[Path, str] = {}
    if head["md"]:
        files[out_stem.with_suffix(".md")] = (
            f"{header}\n# {name}: headline\n\n{head['md']}\n"
            f"Verdicts (generated from the numbers above):\n\n{head['verdicts']}\n"
            f"Every column, paired differences, readout effects, curves, calibration and base classes: "
            f"[{name}_appendix.md]({name}_appendix.md) (LaTeX: {name}_appendix.tex; CSV: {name}.csv).\n")
        files[headline_csv] = head["csv"]
        files[out_stem.with_suffix(".tex")] = head["tex"]
        files[appendix.with_suffix(".md")] = (header + "\n" if header else "") + rendered["md"]
        files[appendix.with_suffix(".tex")] = rendered["tex"]
    else:  # no in-domain ProtoNet column to headline: the full tables are the main file
        files[out_stem.with_suffix(".md")] = (header + "\n" if header else "") + rendered["md"]
        files[out_stem.with_suffix(".tex")] = rendered["tex"]
    files[out_stem.with_suffix(".csv")] = rendered["csv"]
    readme = out_stem.parent / "README.md"
    if head["md"] and readme.is_file():
        text = readme.read_text(encoding="utf-8")
        updated = replace_generated(text, name, f"{head['md']}\nVerdicts (generated from the numbers above):\n\n"
                                                f"{head['verdicts']}")
        if updated != text:
            files[readme] = updated
    for stale in (appendix.with_suffix(".md"), appendix.with_suffix(".tex"), headline_csv):
        if stale not in files and stale.exists():
            stale.unlink()  # a previous run's headline files, for results that no longer have one
    paths = []
    for path, text in files.items():
        atomic_write_text(path, text)
        paths.append(path)
    announce(f"figures of {out_stem.name}")
    return paths + write_figures(results, out_stem, baseline=baselines[0] if baselines else "ce")


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
            cls_iv = class_interval(x, classes) if classes is not None else None
            d_iv = class_interval(diff.episodes, classes) if diff is not None and classes is not None else None
            out.append(HeadlineRow(r, data, shots, t_interval(x.mean(1)), cls_iv, x.shape[1], diff, d_iv,
                                   int(np.unique(classes).size) if classes is not None else 0))
    out.sort(key=lambda h: (h.data, h.shots))
    return out


def _half(iv: Optional[Tuple[float, float]]) -> str:
    return "–" if iv is None else f"±{(iv[1] - iv[0]) / 2:.2f}"


def _acc_text(h: HeadlineRow) -> str:
    a = h.accuracy
    return f"{a.mean:.2f} ± {a.half:.2f}" if a.decided else f"{a.mean:.2f}"


def _diff_text(h: HeadlineRow) -> str:
    if h.diff is None:
        return "–"
    return f"{_signed(h.diff.mean)} {_interval(h.diff)}" if h.diff.seed.decided else f"{_signed(h.diff.mean)}"


def _verdict_text(h: HeadlineRow, baseline: str) -> str:
    if h.row[0] == baseline:
        return "baseline"
    if h.diff is None:
        return "no shared seed"
    return h.diff.word if h.diff.seed.decided else f"1 seed: {NOT_DECIDED}"


def headline(results: ResultSet, caption: str, baseline: str = "ce") -> Dict[str, str]:
    """``{"md", "csv", "tex", "verdicts"}`` of the headline: rows are methods (per training data label), lines
    the in-domain 5-way 1- and 5-shot ProtoNet accuracy with its interval over training seeds and the number of
    seeds, the paired difference to ``baseline`` with its seed-level interval and verdict word, and beside each
    the test-class interval (``docs/statistics.md``). ``verdicts`` is the generated Markdown list of verdict
    sentences. Empty strings when the results have no such column."""
    lines = headline_rows(results, baseline)
    if not lines:
        return {"md": "", "csv": "", "tex": "", "verdicts": ""}
    multi = len({h.data for h in lines}) > 1
    n_ep = max(h.n_episodes for h in lines)
    n_cls = max(h.n_classes for h in lines)

    def name(h: HeadlineRow) -> str:  # a teacher row's name says it is one (hsakd_teacher)
        return h.row[0] + (f" @{h.data.split('@')[1]}" if multi and "@" in h.data else "")

    cls_text = (f"± classes: half the 95% interval when the {n_cls} test classes are resampled (Lafargue et al. "
                f"2024): how much the choice of test classes alone moves the number, for the same trained networks."
                if n_cls else "± classes: not available (episodes generated from data that is not at hand).")
    legend = (f"In-domain 5-way 1- and 5-shot accuracy (%) with the ProtoNet readout on the same {n_ep} "
                  f"episodes for every method. Accuracy: mean over seeds ± half the 95% t-interval over training "
                  f"seeds (df = seeds − 1). Δ: paired difference to `{baseline}` on the same episodes and seeds, "
                  f"[95% t-interval over the per-seed differences]. {cls_text} Verdict: better / worse when the "
                  f"seed-level interval excludes 0, no evidence of a difference when it contains 0; one seed decides "
                  f"nothing. Method: docs/statistics.md.")
    md_caption = f"{caption} {legend}"
    head = ["method", "seeds", "accuracy", "± classes", f"Δ vs {baseline}", "± classes", "verdict"]
    md = [caption]
    csv = ["method,backbone,train_data,n_way,n_shot,readout,seeds,episodes,mean,seed_ci_lo,seed_ci_hi,seed_ci_half,"
           "class_ci_lo,class_ci_hi,class_ci_half,baseline,diff,diff_seed_ci_lo,diff_seed_ci_hi,diff_p,"
           "diff_class_ci_lo,diff_class_ci_hi,diff_class_ci_half,verdict,seed_means,diff_seed_values"]
    block = None
    for h in lines:
        if (h.data, h.shots) != block:
            block = (h.data, h.shots)
            where = f"{h.data}, " if multi else ""
            md += ["", f"**{where}5-way {h.shots}-shot** (ProtoNet)", "", "| " + " | ".join(head) + " |",
                   "|" + "---|" * len(head)]
        md.append("| " + " | ".join([name(h), str(h.accuracy.n), _acc_text(h), _half(h.classes),
                                     _diff_text(h), _half(h.diff_classes), _verdict_text(h, baseline)]) + " |")
        d = h.diff
        means = ";".join(f"{v:.4f}" for v in h.accuracy.values)
        diffs = ";".join(f"{v:.4f}" for v in d.seed.values) if d else ""

        def iv3(iv: Optional[Tuple[float, float]]) -> List[str]:
            return [_num(iv[0]), _num(iv[1]), _num((iv[1] - iv[0]) / 2)] if iv else ["", "", ""]

        csv.append(",".join([h.row[0], h.row[1], h.data, "5", str(h.shots), HEADLINE_READOUT, str(h.accuracy.n),
                             str(h.n_episodes), f"{h.accuracy.mean:.4f}", _num(h.accuracy.lo), _num(h.accuracy.hi),
                             _num(h.accuracy.half), *iv3(h.classes), baseline, f"{d.mean:.4f}" if d else "",
                             _num(d.lo) if d else "", _num(d.hi) if d else "", _num(d.p) if d else "",
                             *iv3(h.diff_classes), _verdict_text(h, baseline), means, diffs]))
    # LaTeX (booktabs): the papers' layout, one column per shot count
    shots = sorted({h.shots for h in lines})
    by_name: Dict[str, Dict[int, HeadlineRow]] = {}
    for h in lines:
        by_name.setdefault(name(h), {})[h.shots] = h
    tex_head = ["Method", "Seeds"] + [x for k in shots for x in (f"{k}-shot", f"$\\Delta$ {k}-shot")]
    tex_rows = []
    for n, by in by_name.items():
        cells = [_tex(n), "/".join(sorted({str(h.accuracy.n) for h in by.values()}))]
        for k in shots:
            h = by.get(k)
            if h is None:
                cells += ["--", "--"]
                continue
            verdict_word = _verdict_text(h, baseline)
            cells += [_tex(_acc_text(h)), _tex(f"{_diff_text(h)} {verdict_word}" if h.diff else "--")]
        tex_rows.append(" & ".join(cells) + " \\\\")
    colspec = "lc" + "cc" * len(shots)
    tex = "\n".join(["\\begin{table}[t]", "\\centering", "\\small", f"\\caption{{{_tex(md_caption)}}}",
                     f"\\begin{{tabular}}{{{colspec}}}", "\\toprule", " & ".join(tex_head) + " \\\\", "\\midrule",
                     *tex_rows, "\\bottomrule", "\\end{tabular}", "\\end{table}", ""])
    md += ["", legend]
    return {"md": "\n".join(md) + "\n", "csv": "\n".join(csv) + "\n", "tex": tex,
            "verdicts": verdict_sentences(results, lines, baseline, name)}


def verdict_sentences(results: ResultSet, lines: Sequence[HeadlineRow], baseline: str,
                      name: Callable[[HeadlineRow], str]) -> str:
    """One generated sentence per compared line of the headline: the difference, its interval over seeds, the
    verdict word, and how far the test classes alone move it. No sentence can say more than its interval."""
    out = []
    for h in lines:
        d = h.diff
        if d is None or h.row[0] == baseline:
            continue
        what = f"**{name(h)} vs {baseline}**, 5-way {h.shots}-shot ProtoNet ({h.data})"
        if not d.seed.decided:
            out.append(f"- {what}: {_signed(d.mean)} points on one training seed: {NOT_DECIDED} (one seed has no "
                       f"interval over seeds).")
            continue
        cls = (f" The test classes alone move it within [{_signed(h.diff_classes[0])}, "
               f"{_signed(h.diff_classes[1])}]." if h.diff_classes else "")
        out.append(f"- {what}: {_signed(d.mean)} points, 95% interval over {d.seed.n} training seeds "
                   f"[{_signed(d.lo)}, {_signed(d.hi)}]: **{d.word}**.{cls}")
    return "\n".join(out) + ("\n" if out else "")
