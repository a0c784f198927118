"""Result tables: Markdown, CSV and LaTeX (booktabs) of a :class:`~fsl_lsskd.report.results.ResultSet`.

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

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..eval.base import mean_ci
from .results import (HEADLINE_READOUT, Column, HeadlineRow, Paired, ResultSet, Row, Series, _column_order,
                      headline_rows, paired, paired_vs, readout_effects, reference_readout, row_name,
                      variant_effects)
from .stats import NOT_DECIDED


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
        parts.append(f"{row_name(results, r)} {main}" + (f" ({rest})" if rest else ""))
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



@dataclass
class Table:
    """One table of a report, with what each writer needs: :func:`to_markdown`, :func:`to_latex`, :func:`to_csv`.

    - ``intro`` / ``notes``: Markdown lines before / after the table (captions, legends, blank lines included).
    - ``header`` / ``rows``: the Markdown table's header and rows of cells (text, Markdown emphasis allowed);
      no ``header``: the table is text only in Markdown (a section's caption, a legend).
    - ``tex_caption``, ``tex_header``, ``tex_rows``: the LaTeX (booktabs) table: a plain-text caption (escaped by
      the writer), header and rows of cells already in LaTeX; ``tex_rows`` None: not in the LaTeX file.
      ``tex_colspec``: the column alignment (default ``ll`` and ``c`` for the other columns);
      ``tex_gap``: a blank line before it in the LaTeX file.
    - ``csv``: the lines this table adds to the CSV file (its header line first, when it opens a block).

    Markdown and LaTeX show the same rows, LaTeX often with shorter cells; the CSV has the numbers in long form
    (one line per row and column) and is not the same table."""

    intro: List[str] = field(default_factory=list)
    header: List[str] = field(default_factory=list)
    rows: List[List[str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    tex_caption: str = ""
    tex_header: List[str] = field(default_factory=list)
    tex_rows: Optional[List[List[str]]] = None
    tex_colspec: str = ""
    tex_gap: bool = False
    csv: List[str] = field(default_factory=list)


def to_markdown(tables: Sequence[Table]) -> str:
    """The tables as Markdown (pipe tables), lines joined by newlines, no final newline."""
    lines: List[str] = []
    for t in tables:
        lines += t.intro
        if t.header:
            lines += ["| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
            lines += ["| " + " | ".join(r) + " |" for r in t.rows]
        lines += t.notes
    return "\n".join(lines)


def to_latex(tables: Sequence[Table]) -> str:
    """The tables that have LaTeX rows, each a booktabs ``table`` environment ending in a newline."""
    out = []
    for t in tables:
        if t.tex_rows is None:
            continue
        colspec = t.tex_colspec or "ll" + "c" * (len(t.tex_header) - 2)
        out.append(("\n" if t.tex_gap else "") + "\n".join(
            ["\\begin{table}[t]", "\\centering", "\\small", f"\\caption{{{_tex(t.tex_caption)}}}",
             f"\\begin{{tabular}}{{{colspec}}}", "\\toprule", " & ".join(t.tex_header) + " \\\\", "\\midrule",
             *(" & ".join(r) + " \\\\" for r in t.tex_rows), "\\bottomrule", "\\end{tabular}", "\\end{table}", ""]))
    return "".join(out)


def to_csv(tables: Sequence[Table]) -> str:
    """The tables' CSV lines joined by newlines, no final newline."""
    return "\n".join(line for t in tables for line in t.csv)


def _tex_cells(cells: Sequence[str]) -> List[str]:
    return [_tex(c) for c in cells]


def render(results: ResultSet, published: Mapping[str, Mapping[str, str]], caption: str,
           baselines: Sequence[str] = ("ce",)) -> Dict[str, str]:
    """``{"md", "csv", "tex"}`` of :func:`appendix_tables` (with the note on published columns in Markdown)."""
    tables = appendix_tables(results, published, caption, baselines)
    md = to_markdown(tables)
    if any(m for m in published.values()):
        md += ("\n\nPublished columns are numbers reported in the cited papers under their own full protocol "
               "(data, resolution, epochs); they are context, not a like-for-like comparison.")
    return {"md": md + "\n", "csv": to_csv(tables) + "\n", "tex": to_latex(tables)}


def appendix_tables(results: ResultSet, published: Mapping[str, Mapping[str, str]], caption: str,
                    baselines: Sequence[str] = ("ce",)) -> List[Table]:
    """Every table of the appendix, in order: the accuracy table (every column, published numbers beside),
    paired differences against each baseline, readout effects, variant effects, way/shot curves, calibration and
    base classes (each when the results have it)."""
    cols = results.columns
    tables = [_accuracy_table(results, published, caption, cols)]
    for baseline in baselines:
        tables += _paired_table(results, baseline, cols)
    tables += _effects_table(results, cols)
    tables += _variant_table(results)
    tables += _curve_tables(results)
    tables += _calibration(results, cols)
    tables += _base_table(results)
    return tables


def _accuracy_table(results: ResultSet, published: Mapping[str, Mapping[str, str]], caption: str,
                    cols: List[Column]) -> Table:
    rows = results.rows
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
    table = Table(
        intro=[caption, "", "Cells: mean accuracy (%) ± 95% CI over episodes (t) and, in parentheses, ± half the 95% "
                            "t-interval over training seeds (df = seeds − 1). **Bold**: best, when the paired "
                            "t-interval over seeds of its difference to the next best excludes 0." + seed_note, ""],
        header=["method", "backbone", "seeds"] + [col_label(c) for c in cols] + [f"published: {p}" for p in pub_cols],
        tex_caption=caption + seed_note, tex_rows=[],
        tex_header=_tex_cells(["Method", "Backbone"] + [col_label(c) for c in cols]
                              + [f"published {p}" for p in pub_cols]),
        csv=["method,backbone,train_data,target,protocol,readout,seeds,episodes,mean,ci95_episodes,seed_ci_lo,"
             "seed_ci_hi,seed_std,seed_means"])
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
            table.csv.append(f"{r[0]},{r[1]},{c[0]},{c[1]},{c[2]},{c[3]},{len(res.per_seed)},"
                             f"{res.stacked().shape[1]},{m:.4f},{h:.4f},{_num(lo)},{_num(hi)},{_num(res.seed_std())},"
                             f"{means}")
        pub = [published.get(r[0], {}).get(p, "–") for p in pub_cols]
        table.rows.append([row_name(results, r), r[1], seed_counts[r]] + cells_md + pub)
        table.tex_rows.append(_tex_cells([row_name(results, r), r[1]]) + cells_tex + _tex_cells(pub))
    return table


def _paired_table(results: ResultSet, baseline: str, cols: List[Column]) -> List[Table]:
    """The paired differences to ``baseline`` (:func:`paired_vs`); none when no row has one."""
    diffs = paired_vs(results, baseline)
    if not diffs:
        return []
    pcols = [c for c in cols if any(c in diffs[r] for r in diffs)]
    caveat = _one_seed_caveat(diffs)
    table = Table(
        intro=["", f"Paired difference to `{baseline}` on identical episodes and the seeds both have (points): mean "
                   f"± 95% CI over episodes; [95% t-interval over the per-seed differences, df = seeds − 1]; its "
                   f"t-test p; each seed's difference. ▲/▼: the seed-level interval excludes 0.{caveat}", ""],
        header=["method", "backbone"] + [col_label(c) for c in pcols],
        tex_caption=f"Paired difference to {baseline} (points): mean [95% t-interval over the per-seed "
                    f"differences]; triangles: the interval excludes 0.{caveat}",
        tex_header=_tex_cells(["Method", "Backbone"] + [col_label(c) for c in pcols]), tex_rows=[], tex_gap=True)
    for r in sorted(diffs):
        vals, vals_tex = [], []
        for c in pcols:
            if c not in diffs[r]:
                vals.append("–")
                vals_tex.append("--")
                continue
            d = diffs[r][c]
            mark = {1: " ▲", -1: " ▼"}.get(d.verdict, "")
            seeds = "/".join(f"{v:+.2f}" for v in d.per_seed.values())
            vals.append(f"{d.mean:+.2f} ± {d.ci95:.2f} {_interval(d)}{mark} ({_p_text(d.p)}; seeds {seeds})")
            vals_tex.append(_tex(f"{d.mean:+.2f} {_interval(d)}{mark}"))
        table.rows.append([row_name(results, r), r[1]] + vals)
        table.tex_rows.append(_tex_cells([row_name(results, r), r[1]]) + vals_tex)
    return [table]


def _effects_table(results: ResultSet, cols: List[Column]) -> List[Table]:
    """The readout effects (:func:`readout_effects`); none when no readout has a reference."""
    effects = readout_effects(results)
    if not effects:
        return []
    ecols = [c for c in cols if any(c in effects[r] for r in effects)]
    caveat = _one_seed_caveat(effects)
    table = Table(
        intro=["", "Readout effects on the same checkpoints and episodes (points): each readout minus its reference "
                   "(a setting against the same readout without it; finetune against protonet, where its head "
                   "starts); mean ± 95% CI over episodes [95% t-interval over the per-seed differences] (each seed's "
                   "difference). ▲/▼: the seed-level interval excludes 0." + caveat, ""],
        header=["method", "backbone"] + [f"{col_label(c)} − {reference_readout(c[3])}" for c in ecols],
        tex_caption="Readout effects (points): readout minus its reference on the same checkpoints and episodes; "
                    "[95% t-interval over the per-seed differences]." + caveat,
        tex_header=_tex_cells(["Method", "Backbone"] + [f"{col_label(c)} - {reference_readout(c[3])}"
                                                        for c in ecols]), tex_rows=[], tex_gap=True)
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
        table.rows.append([row_name(results, r), r[1]] + vals)
        table.tex_rows.append(_tex_cells([row_name(results, r), r[1]] + vals))
    return [table]


def _variant_table(results: ResultSet) -> List[Table]:
    """The variant effects (:func:`variant_effects`); none without a variant row."""
    effects = variant_effects(results)
    if not effects:
        return []
    few = sorted({c for r in effects.values() for c in r if c[1] != "base"}, key=_column_order)
    base = sorted({c for r in effects.values() for c in r if c[1] == "base"})
    vcols = few + base
    caveat = _one_seed_caveat(effects)

    def label(c: Column) -> str:
        return f"{c[0]} base top-1" if c[1] == "base" else col_label(c)

    table = Table(
        intro=["", "Variant effects (ablations) on identical episodes and the seeds both have (points): each variant "
                   "minus its method with default settings; mean ± 95% CI over episodes (base top-1: over held-out "
                   "images) [95% t-interval over the per-seed differences]; its t-test p; each seed's difference. "
                   "▲/▼: the seed-level interval excludes 0." + caveat, ""],
        header=["variant", "backbone"] + [label(c) for c in vcols],
        tex_caption="Variant effects (points): each variant minus its method on identical episodes; [95% t-interval "
                    "over the per-seed differences]; triangles: the interval excludes 0." + caveat,
        tex_header=_tex_cells(["Variant", "Backbone"] + [label(c) for c in vcols]), tex_rows=[])
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
        table.rows.append([name, r[1]] + vals)
        table.tex_rows.append(_tex_cells([name, r[1]]) + vals_tex)
    return [table]


def _curve_tables(results: ResultSet) -> List[Table]:
    """Way/shot curve points: the section's caption, then per (training data, target, readout, n_way) a table
    of accuracy against n_shot (Markdown and CSV only)."""
    if not results.curve_points:
        return []
    one_seed = any(len(res.per_seed) == 1 for r in results.curve_points.values() for res in r.values())
    tables = [Table(intro=["", "Way and shot curves (published curve episodes): mean accuracy (%) over seeds and "
                               "episodes (± half the 95% t-interval over training seeds)."
                           + (" A point without (±…) rests on one training seed." if one_seed else "")],
                    csv=["", "method,backbone,train_data,target,n_way,n_shot,readout,seeds,mean,ci95_episodes,"
                             "seed_ci_lo,seed_ci_hi"])]
    groups = sorted({(p[0], p[1], p[4], p[2]) for r in results.curve_points.values() for p in r})
    for data, target, readout, n_way in groups:
        shots = sorted({p[3] for r in results.curve_points.values() for p in r
                        if (p[0], p[1], p[4], p[2]) == (data, target, readout, n_way)})
        where = data if data.split("@")[0] == target else f"{data}→{target}"
        table = Table(intro=["", f"{where}, {n_way}-way, {readout}:", ""],
                      header=["method", "backbone"] + [f"{k}-shot" for k in shots])
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
                table.csv.append(f"{r[0]},{r[1]},{data},{target},{n_way},{k},{readout},{len(res.per_seed)},{m:.4f},"
                                 f"{h:.4f},{_num(lo)},{_num(hi)}")
            if any(v != "–" for v in vals):
                table.rows.append([row_name(results, r), r[1]] + vals)
        tables.append(table)
    return tables


def _calibration(results: ResultSet, cols: List[Column]) -> List[Table]:
    """The few-shot readouts' calibration (ECE, NLL, Brier) per column with probabilities; none without."""
    ccols = [c for c in cols if any(c in results.cells[r] and results.cells[r][c].has("reliability")
                                    for r in results.cells)]
    if not ccols:
        return []
    table = Table(
        intro=["", "Calibration of the few-shot readouts' query probabilities (pooled over seeds and episodes): ECE "
                   "(%, 15 equal-width bins, top label) [hierarchical-bootstrap 95% interval over seeds and "
                   "episodes]; NLL (nats) and Brier score (0..2), mean ± 95% CI over episodes. Lower is better.", ""],
        header=["method", "backbone"] + [col_label(c) for c in ccols],
        tex_caption="Calibration of the few-shot readouts (ECE %, NLL, Brier).",
        tex_header=_tex_cells(["Method", "Backbone"] + [col_label(c) for c in ccols]), tex_rows=[])
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
        table.rows.append([row_name(results, r), r[1]] + vals)
        table.tex_rows.append(_tex_cells([row_name(results, r), r[1]] + vals))
    return [table]


def _base_table(results: ResultSet) -> List[Table]:
    """Base-class held-out accuracy and calibration per training data label; none without base scores."""
    if not results.base:
        return []
    labels = sorted({d for r in results.base.values() for d in r})
    one_seed = _one_seed_cells_note(any(len(res.per_seed) == 1 for by in results.base.values() for res in by.values()))
    table = Table(
        intro=["", "Base classes (held-out images of the training classes): top-1 accuracy (%) ± 95% CI over images "
                   "(seeds averaged) (seeds ± half the 95% t-interval over training seeds); classifier calibration: "
                   "ECE (%, 15 bins) [hierarchical-bootstrap interval over seeds and images], NLL, Brier. Methods "
                   "without a base classifier (episodic) are scored by the nearest class mean (accuracy only)."
               + one_seed, ""],
        header=["method", "backbone"] + [h for d in labels for h in (f"{d} top-1", f"{d} ECE", f"{d} NLL", f"{d} Brier")],
        tex_caption="Base-class held-out accuracy and calibration." + one_seed,
        tex_header=_tex_cells(["Method", "Backbone"] + [h for d in labels for h in (f"{d} top-1", "ECE", "NLL",
                                                                                    "Brier")]),
        tex_rows=[],
        csv=["", "method,backbone,train_data,base_top1,base_top1_ci95,seed_ci_lo,seed_ci_hi,ece,ece_lo,ece_hi,nll,"
                 "brier,seeds"])
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
                table.csv.append(f"{r[0]},{r[1]},{d},{m:.4f},{h:.4f},{_num(lo)},{_num(hi)},{ece:.4f},{elo:.4f},"
                                 f"{ehi:.4f},{nll_v:.4f},{br_v:.4f},{len(res.per_seed)}")
            else:
                vals += ["–", "–", "–"]
                table.csv.append(f"{r[0]},{r[1]},{d},{m:.4f},{h:.4f},{_num(lo)},{_num(hi)},,,,,,{len(res.per_seed)}")
        table.rows.append([row_name(results, r), r[1]] + vals)
        table.tex_rows.append(_tex_cells([row_name(results, r), r[1]] + [v.strip("*") for v in vals]))
    return [table]


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
    """``{"md", "csv", "tex", "verdicts"}`` of :func:`headline_tables`; ``verdicts`` is the generated Markdown
    list of verdict sentences (:func:`verdict_sentences`). Empty strings when the results have no headline
    column."""
    lines = headline_rows(results, baseline)
    if not lines:
        return {"md": "", "csv": "", "tex": "", "verdicts": ""}
    tables = headline_tables(lines, caption, baseline)
    return {"md": to_markdown(tables) + "\n", "csv": to_csv(tables) + "\n", "tex": to_latex(tables),
            "verdicts": verdict_sentences(results, lines, baseline, _headline_namer(lines))}


def _headline_namer(lines: Sequence[HeadlineRow]) -> Callable[[HeadlineRow], str]:
    """A headline line's method name, with ``@<fraction>`` when the headline has several training data labels
    (a teacher row's name says it is one: ``hsakd_teacher``)."""
    multi = len({h.data for h in lines}) > 1
    return lambda h: h.row[0] + (f" @{h.data.split('@')[1]}" if multi and "@" in h.data else "")


def headline_tables(lines: Sequence[HeadlineRow], caption: str, baseline: str = "ce") -> List[Table]:
    """The headline (:func:`~fsl_lsskd.report.results.headline_rows`, not empty) as tables: in Markdown one table
    per (training data, shots), rows are methods: the in-domain 5-way ProtoNet accuracy with its interval over
    training seeds and the number of seeds, the paired difference to ``baseline`` with its seed-level interval and
    verdict word, and beside each the test-class interval (``docs/statistics.md``); the legend after them. In
    LaTeX one table in the papers' layout, one column pair per shot count. The CSV has every number."""
    multi = len({h.data for h in lines}) > 1
    n_ep = max(h.n_episodes for h in lines)
    n_cls = max(h.n_classes for h in lines)
    name = _headline_namer(lines)
    cls_text = (f"± classes: half the 95% interval when the {n_cls} test classes are resampled (Lafargue et al. "
                f"2024): how much the choice of test classes alone moves the number, for the same trained networks."
                if n_cls else "± classes: not available (episodes generated from data that is not at hand).")
    legend = (f"In-domain 5-way 1- and 5-shot accuracy (%) with the ProtoNet readout on the same {n_ep} "
              f"episodes for every method. Accuracy: mean over seeds ± half the 95% t-interval over training "
              f"seeds (df = seeds − 1). Δ: paired difference to `{baseline}` on the same episodes and seeds, "
              f"[95% t-interval over the per-seed differences]. {cls_text} Verdict: better / worse when the "
              f"seed-level interval excludes 0, no evidence of a difference when it contains 0; one seed decides "
              f"nothing. Method: docs/statistics.md.")
    head = ["method", "seeds", "accuracy", "± classes", f"Δ vs {baseline}", "± classes", "verdict"]
    tables = [Table(intro=[caption], csv=[
        "method,backbone,train_data,n_way,n_shot,readout,seeds,episodes,mean,seed_ci_lo,seed_ci_hi,seed_ci_half,"
        "class_ci_lo,class_ci_hi,class_ci_half,baseline,diff,diff_seed_ci_lo,diff_seed_ci_hi,diff_p,"
        "diff_class_ci_lo,diff_class_ci_hi,diff_class_ci_half,verdict,seed_means,diff_seed_values"])]

    def iv3(iv: Optional[Tuple[float, float]]) -> List[str]:
        return [_num(iv[0]), _num(iv[1]), _num((iv[1] - iv[0]) / 2)] if iv else ["", "", ""]

    block = None
    for h in lines:
        if (h.data, h.shots) != block:
            block = (h.data, h.shots)
            where = f"{h.data}, " if multi else ""
            tables.append(Table(intro=["", f"**{where}5-way {h.shots}-shot** (ProtoNet)", ""], header=head))
        table = tables[-1]
        table.rows.append([name(h), str(h.accuracy.n), _acc_text(h), _half(h.classes), _diff_text(h),
                           _half(h.diff_classes), _verdict_text(h, baseline)])
        d = h.diff
        means = ";".join(f"{v:.4f}" for v in h.accuracy.values)
        diffs = ";".join(f"{v:.4f}" for v in d.seed.values) if d else ""
        table.csv.append(",".join([h.row[0], h.row[1], h.data, "5", str(h.shots), HEADLINE_READOUT, str(h.accuracy.n),
                                   str(h.n_episodes), f"{h.accuracy.mean:.4f}", _num(h.accuracy.lo),
                                   _num(h.accuracy.hi), _num(h.accuracy.half), *iv3(h.classes), baseline,
                                   f"{d.mean:.4f}" if d else "", _num(d.lo) if d else "", _num(d.hi) if d else "",
                                   _num(d.p) if d else "", *iv3(h.diff_classes), _verdict_text(h, baseline), means,
                                   diffs]))
    tables[-1].notes = ["", legend]
    # LaTeX (booktabs): the papers' layout, one column per shot count
    shots = sorted({h.shots for h in lines})
    by_name: Dict[str, Dict[int, HeadlineRow]] = {}
    for h in lines:
        by_name.setdefault(name(h), {})[h.shots] = h
    tex = Table(tex_caption=f"{caption} {legend}", tex_colspec="lc" + "cc" * len(shots), tex_rows=[],
                tex_header=["Method", "Seeds"] + [x for k in shots for x in (f"{k}-shot", f"$\\Delta$ {k}-shot")])
    for n, by in by_name.items():
        cells = [_tex(n), "/".join(sorted({str(h.accuracy.n) for h in by.values()}))]
        for k in shots:
            h = by.get(k)
            if h is None:
                cells += ["--", "--"]
                continue
            cells += [_tex(_acc_text(h)), _tex(f"{_diff_text(h)} {_verdict_text(h, baseline)}" if h.diff else "--")]
        tex.tex_rows.append(cells)
    return tables + [tex]


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
