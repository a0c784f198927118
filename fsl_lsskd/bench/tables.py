"""Result tables: Markdown, CSV and LaTeX (booktabs) of a :class:`ResultSet`.

Every accuracy is in percent. A cell shows the mean over seeds and episodes with two 95% intervals:

- ``± e``: the t-interval over episodes of the seed-averaged per-episode accuracy (RFS; the spread of the
  *episodes* only);
- ``(seeds ± s)``: half the width of the hierarchical bootstrap interval over training seeds and episodes
  (:func:`fsl_lsskd.bench.stats.hierarchical_bootstrap`), which includes the variation between training runs.

Every "better than" mark is based on the seed-aware interval: a column's best value is bold only when its
seed-aware interval does not overlap the next best's (never in a single-entry column), and a paired
difference is marked (▲ better, ▼ worse) only when its seed-aware interval excludes 0.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from ..eval.base import mean_ci
from ..progress import announce
from ..utils import atomic_write_text
from .stats import excludes_zero, hierarchical_bootstrap, hierarchical_bootstrap_stat

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
        """``(mean, episode CI half-width, seed-aware lo, seed-aware hi)`` of ``key``."""
        x = self.stacked(key)
        m, h = mean_ci(x.mean(0))
        lo, hi = hierarchical_bootstrap(x)
        return m, h, lo, hi

    def seed_means(self, key: str = "accuracy") -> Dict[int, float]:
        return {s: float(np.mean(self.per_seed[s][key])) for s in self.seeds}

    def seed_std(self) -> float:
        vals = list(self.seed_means().values())
        return float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan

    def ece(self) -> Tuple[float, float, float]:
        """Pooled ECE (%) over seeds and episodes and its seed-aware 95% interval."""
        from ..eval.calibration import ece_from_bins

        rel = self.stacked("reliability")  # [S, E, bins, 3]
        value = 100.0 * ece_from_bins(rel.sum(axis=(0, 1)))
        lo, hi = hierarchical_bootstrap_stat(rel, lambda r: 100.0 * ece_from_bins(r.sum(0)), n_boot=500)
        return value, lo, hi


@dataclass
class ResultSet:
    cells: Dict[Row, Dict[Column, Series]] = field(default_factory=dict)
    base: Dict[Row, Dict[str, Series]] = field(default_factory=dict)
    curve_points: Dict[Row, Dict[tuple, Series]] = field(default_factory=dict)
    curves: Dict[Row, Dict[str, List[Tuple[int, float]]]] = field(default_factory=dict)
    teacher_rows: Set[Row] = field(default_factory=set)
    variant_of: Dict[str, Tuple[str, Mapping[str, object]]] = field(default_factory=dict)  # row -> (method, settings)
    meta: Dict[str, object] = field(default_factory=dict)
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
    import re

    m = re.match(r"(\d+)w(\d+)s(\d+)q", c[2])
    shape = tuple(int(x) for x in m.groups()) if m else (0, 0, 0)
    return (c[0], c[1], shape, c[3])


@dataclass
class Paired:
    """A method minus a baseline on identical episodes and the seeds both have (points)."""

    mean: float
    ci95: float          # t-interval over episodes of the seed-averaged difference
    lo: float            # seed-aware (hierarchical bootstrap) interval
    hi: float
    p: float             # paired t-test over episodes
    per_seed: Dict[int, float]

    @property
    def verdict(self) -> Optional[int]:
        return excludes_zero(self.lo, self.hi)


def paired(a: Series, b: Series) -> Optional[Paired]:
    """``a - b`` on identical episodes (the first ``min`` episodes of each: image-level readouts score a prefix of
    the published episodes) and the training seeds both have; None when they share no seed."""
    from scipy import stats

    seeds = sorted(set(a.per_seed) & set(b.per_seed))
    if not seeds:
        return None
    x, y = a.stacked(seeds=seeds), b.stacked(seeds=seeds)
    n = min(x.shape[1], y.shape[1])
    diff = x[:, :n] - y[:, :n]
    m, h = mean_ci(diff.mean(0))
    lo, hi = hierarchical_bootstrap(diff)
    d = diff.mean(0)
    if n < 2 or not np.any(d):
        p = 1.0
    elif np.ptp(d) <= 1e-9 * max(1.0, float(np.abs(d).max())):
        p = 0.0
    else:
        p = float(stats.ttest_1samp(d, 0.0).pvalue)
    return Paired(m, h, lo, hi, p, {s: float(diff[i].mean()) for i, s in enumerate(seeds)})


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
    its seed-aware interval is then the bootstrap over episodes alone (``hierarchical_bootstrap`` has no seed
    level to resample), so a ▲/▼ there does not cover seed-to-seed variation. Empty when every difference has
    two or more seeds."""
    if not any(len(d.per_seed) == 1 for cols in effects.values() for d in cols.values()):
        return ""
    return (" A difference listing one seed has no seed level to resample: its interval covers episodes only, "
            "not seed-to-seed variation.")


def _one_seed_cells_note(any_one_seed: bool) -> str:
    """The sentence an accuracy table's caption gains when any of its cells rests on one training seed: such a
    cell shows no "(seeds ± …)" part, and the seed-aware interval its bold decision uses is the bootstrap over
    episodes (or images) alone. Empty otherwise."""
    if not any_one_seed:
        return ""
    return (" A cell without \"(seeds ± …)\" rests on one training seed: its seed-aware interval, which bold uses, "
            "covers episodes (base classes: images) only, not seed-to-seed variation.")


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


def _signed(x: float) -> str:
    """A signed difference in percentage points to 2 decimals. A nonzero value that rounds to ±0.00 keeps one
    significant digit instead (``-0.004``, ``+3e-05``), so an interval bound that excludes 0 never reads as 0."""
    s = f"{x:+.2f}"
    return f"{x:+.1g}" if x != 0 and float(s) == 0 else s


def _interval(d: Paired) -> str:
    """``[lo, hi]`` of a paired difference's seed-aware interval (:func:`_signed` bounds)."""
    return f"[{_signed(d.lo)}, {_signed(d.hi)}]"


def _p_text(p: float) -> str:
    return "p<1e-16" if p < 1e-16 else f"p={p:.2g}"


def col_label(col: Column, fractions: bool = True) -> str:
    data, target, proto, readout = col
    where = data if data.split("@")[0] == target else f"{data}→{target}"
    return f"{where} {proto} {readout}"


def _tex(s: str) -> str:
    return (s.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("&", "\\&")
            .replace("±", "$\\pm$").replace("→", "$\\to$").replace("▲", "$\\blacktriangle$")
            .replace("▼", "$\\blacktriangledown$").replace("–", "--").replace("−", "$-$"))


def _bold_best(values: Dict[Row, Tuple[float, float, float]]) -> Optional[Row]:
    """The row whose mean is best and whose seed-aware interval does not overlap the next best's."""
    if len(values) < 2:
        return None
    ranked = sorted(values.items(), key=lambda kv: -kv[1][0])
    (best, (_, lo, _)), (_, (_, _, hi_next)) = ranked[0], ranked[1]
    return best if lo > hi_next else None


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
    bold = {c: _bold_best({r: (summ[(r, c)][0], summ[(r, c)][2], summ[(r, c)][3]) for r in rows if (r, c) in summ})
            for c in cols}
    pub_cols = sorted({k for m in published.values() for k in m})
    seed_cols = _seed_columns(results, rows, cols)
    seed_counts = {r: "/".join(str(n) for n in sorted(seed_cols.get(r, {}))) for r in rows}
    seed_note = (_seeds_per_row(results, seed_cols)
                 + _one_seed_cells_note(any(1 in by for by in seed_cols.values())))
    md = [caption, "", "Cells: mean accuracy (%) ± 95% CI over episodes (t) and, in parentheses, ± half the 95% "
                       "hierarchical-bootstrap interval over training seeds and episodes. **Bold**: best, with a "
                       "seed-aware interval that does not overlap the next best." + seed_note, ""]
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
                       f"{m:.4f},{h:.4f},{lo:.4f},{hi:.4f},{res.seed_std():.4f},{means}")
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
                 f"95% CI over episodes; [seed-aware 95% interval]; paired t-test p over episodes; each seed's "
                 f"difference. ▲/▼: the seed-aware interval excludes 0.{caveat}")
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
        tex += "\n" + _tex_table(f"Paired difference to {baseline} (points): mean [seed-aware 95% interval]; "
                                 f"triangles: the interval excludes 0.{caveat}",
                                 ["Method", "Backbone"] + [col_label(c) for c in pcols], prow_tex)
    effects = readout_effects(results)
    if effects:
        ecols = [c for c in cols if any(c in effects[r] for r in effects)]
        caveat = _one_seed_caveat(effects)
        md += ["", "Readout effects on the same checkpoints and episodes (points): each readout minus its reference "
                   "(a setting against the same readout without it; finetune against protonet, where its head "
                   "starts); mean ± 95% CI over episodes [seed-aware 95% interval] (each seed's difference). ▲/▼: "
                   "the seed-aware interval excludes 0." + caveat, "",
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
                                  "and episodes; [seed-aware 95% interval]." + caveat,
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
              "[seed-aware 95% interval]; paired t-test p; each seed's difference. ▲/▼: the seed-aware interval "
              "excludes 0." + caveat, "",
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
    tex = _tex_table("Variant effects (points): each variant minus its method on identical episodes; [seed-aware 95% "
                     "interval]; triangles: the interval excludes 0." + caveat, ["Variant", "Backbone"] + [label(c) for c in vcols],
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
    md = ["", "Way and shot curves (published curve episodes): mean accuracy (%) over seeds and episodes (seeds ± "
              "half the seed-aware interval)." + (" A point without (±…) rests on one training seed." if one_seed
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
                           f"{lo:.4f},{hi:.4f}")
            if any(v != "–" for v in vals):
                md.append(f"| {_row_name(results, r)} | {r[1]} | " + " | ".join(vals) + " |")
    return md, csv


def _calibration(results: ResultSet, cols: List[Column]) -> Tuple[List[str], str]:
    ccols = [c for c in cols if any(c in results.cells[r] and results.cells[r][c].has("reliability")
                                    for r in results.cells)]
    if not ccols:
        return [], ""
    md = ["", "Calibration of the few-shot readouts' query probabilities (pooled over seeds and episodes): ECE (%, "
              "15 equal-width bins, top label) [seed-aware 95% interval]; NLL (nats) and Brier score (0..2), mean ± "
              "95% CI over episodes. Lower is better.", "",
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
              "(seeds averaged) (seeds ± half the seed-aware interval); classifier calibration: ECE (%, 15 bins) "
              "[seed-aware interval], NLL, Brier. Methods without a base classifier (episodic) are scored by the "
              "nearest class mean (accuracy only)." + one_seed, "",
          "| method | backbone | " + " | ".join(f"{d} top-1 | {d} ECE | {d} NLL | {d} Brier" for d in labels) + " |",
          "|" + "---|" * (2 + 4 * len(labels))]
    csv = ["", "method,backbone,train_data,base_top1,base_top1_ci95,seed_ci_lo,seed_ci_hi,ece,ece_lo,ece_hi,nll,brier,"
               "seeds"]
    tex_rows = []
    acc_by_label = {d: {r: results.base[r][d].summary() for r in results.base if d in results.base[r]} for d in labels}
    bold = {d: _bold_best({r: (v[0], v[2], v[3]) for r, v in acc_by_label[d].items()}) for d in labels}
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
                csv.append(f"{r[0]},{r[1]},{d},{m:.4f},{h:.4f},{lo:.4f},{hi:.4f},{ece:.4f},{elo:.4f},{ehi:.4f},"
                           f"{nll_v:.4f},{br_v:.4f},{len(res.per_seed)}")
            else:
                vals += ["–", "–", "–"]
                csv.append(f"{r[0]},{r[1]},{d},{m:.4f},{h:.4f},{lo:.4f},{hi:.4f},,,,,,{len(res.per_seed)}")
        md.append(f"| {_row_name(results, r)} | {r[1]} | " + " | ".join(vals) + " |")
        tex_rows.append(" & ".join([_tex(_row_name(results, r)), _tex(r[1])] + [_tex(v.strip('*')) for v in vals])
                        + " \\\\")
    header = ["Method", "Backbone"] + [h for d in labels for h in (f"{d} top-1", "ECE", "NLL", "Brier")]
    return md, _tex_table("Base-class held-out accuracy and calibration." + one_seed, header, tex_rows), csv


def write_tables(results: ResultSet, published: Mapping[str, Mapping[str, str]], caption: str, out_stem: Path,
                 header: str = "", baselines: Sequence[str] = ("ce",)) -> List[Path]:
    """Write ``<stem>.md/.csv/.tex`` and the figures (:mod:`fsl_lsskd.bench.figures`); returns the paths."""
    from .figures import write_figures

    rendered = render(results, published, caption, baselines=baselines)
    paths = []
    for ext, text in rendered.items():
        path = out_stem.with_suffix(f".{ext}")
        atomic_write_text(path, (header + "\n" + text) if ext == "md" and header else text)
        paths.append(path)
    announce(f"figures of {out_stem.name}")
    return paths + write_figures(results, out_stem)
