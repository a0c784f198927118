"""Result tables from the MLflow store: Markdown, CSV and LaTeX, a paired comparison against ``ce`` on
identical episodes, and plots. Cells are mean ± 95% CI (t-distribution over episodes) of the per-episode
accuracy averaged over seeds (all seeds and methods share the published episodes)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from ..eval.base import mean_ci
from ..utils import atomic_write_text

log = logging.getLogger(__name__)

Key = Tuple[str, str]        # (method, backbone)
Column = Tuple[str, int, str]  # (dataset, shot, classifier)


def eval_metric_name(split: str, n_way: int, shot: int, classifier: str) -> str:
    return f"eval.{split}.{n_way}w{shot}s.{classifier}"


def eval_artifact_name(split: str, n_way: int, shot: int, classifier: str) -> str:
    return f"{split}_{n_way}w{shot}s_{classifier}.npy"


@dataclass
class CellResult:
    """Per-seed per-episode accuracies (fractions) of one (method, backbone) x column."""

    per_seed: Dict[int, np.ndarray] = field(default_factory=dict)

    def episode_means(self, seeds=None) -> np.ndarray:
        """Per-episode accuracy averaged over ``seeds`` (default: every seed of the cell)."""
        arrays = [a for s, a in sorted(self.per_seed.items()) if seeds is None or s in seeds]
        n = min(a.size for a in arrays)
        if any(a.size != n for a in arrays):
            log.warning("seeds have different episode counts; using the first %d", n)
        return np.mean([a[:n] for a in arrays], axis=0)

    def summary(self) -> Tuple[float, float]:
        m, h = mean_ci(self.episode_means() * 100)
        return m, h

    def seed_means(self) -> Dict[int, float]:
        """Each seed's mean accuracy (%), for the spread across training seeds."""
        return {s: float(np.mean(a) * 100) for s, a in sorted(self.per_seed.items())}

    def seed_std(self) -> float:
        """Standard deviation (ddof 1) of the per-seed means (%); NaN with one seed."""
        vals = list(self.seed_means().values())
        return float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan


@dataclass
class ResultSet:
    cells: Dict[Key, Dict[Column, CellResult]] = field(default_factory=dict)
    curves: Dict[Key, Dict[str, List[Tuple[int, float]]]] = field(default_factory=dict)
    meta: Dict[str, object] = field(default_factory=dict)

    def add(self, key: Key, col: Column, seed: int, accs: np.ndarray) -> None:
        self.cells.setdefault(key, {}).setdefault(col, CellResult()).per_seed[seed] = np.asarray(accs)

    @property
    def columns(self) -> List[Column]:
        cols = {c for row in self.cells.values() for c in row}
        return sorted(cols)

    @property
    def rows(self) -> List[Key]:
        return sorted(self.cells)


@dataclass
class Paired:
    """A method minus the baseline on identical episodes and the seeds both have (points)."""

    mean: float
    ci95: float  # t-CI over episodes of the seed-averaged difference
    p: float  # paired t-test over episodes
    per_seed: Dict[int, float]  # each shared seed's mean difference: the spread across training runs


def paired_vs(results: ResultSet, baseline: str = "ce") -> Dict[Key, Dict[Column, Paired]]:
    """Per (method, backbone) and column: the difference to ``baseline`` (same backbone) over identical
    episodes, restricted to the training seeds both have, with its 95% CI, paired t-test p-value and the
    per-seed differences (the episode CI does not include seed-to-seed variation; the per-seed values show it)."""
    from scipy import stats

    out: Dict[Key, Dict[Column, Paired]] = {}
    for (method, backbone), row in results.cells.items():
        base = results.cells.get((baseline, backbone))
        if method == baseline or base is None:
            continue
        for col, res in row.items():
            if col not in base:
                continue
            seeds = sorted(set(res.per_seed) & set(base[col].per_seed))
            if not seeds:
                continue
            a, b = res.episode_means(seeds), base[col].episode_means(seeds)
            n = min(a.size, b.size)
            diff = (a[:n] - b[:n]) * 100
            m, h = mean_ci(diff)
            if n < 2 or not np.any(diff):
                p = 1.0
            elif np.ptp(diff) <= 1e-9 * max(1.0, float(np.abs(diff).max())):  # constant non-zero difference
                p = 0.0
            else:
                p = float(stats.ttest_rel(a[:n], b[:n]).pvalue)
            per_seed = {s: float(100 * (res.per_seed[s][:n].mean() - base[col].per_seed[s][:n].mean()))
                        for s in seeds}
            out.setdefault((method, backbone), {})[col] = Paired(m, h, p, per_seed)
    return out


def _p_text(p: float) -> str:
    return "p<1e-16" if p < 1e-16 else f"p={p:.2g}"


def _col_label(col: Column) -> str:
    dataset, shot, clf = col
    return f"{dataset} {shot}-shot {clf}"


def render(results: ResultSet, published: Mapping[str, Mapping[str, str]], caption: str,
           n_way: int = 5, baselines: Sequence[str] = ("ce",)) -> Dict[str, str]:
    """Return ``{"md": ..., "csv": ..., "tex": ...}``; one paired-difference table per method in ``baselines``."""
    cols, rows = results.columns, results.rows
    summaries = {(r, c): results.cells[r][c].summary() for r in rows for c in cols if c in results.cells[r]}
    best = {}
    for c in cols:
        vals = [(summaries[(r, c)][0], r) for r in rows if (r, c) in summaries]
        if vals:
            best[c] = max(vals)[0]
    pub_cols = sorted({k for m in published.values() for k in m})

    def seeds_of(r: Key) -> str:
        ns = {len(results.cells[r][c].per_seed) for c in cols if c in results.cells[r]}
        return "/".join(str(n) for n in sorted(ns))

    # Markdown
    head = ["method", "backbone", "seeds"] + [_col_label(c) for c in cols] + [f"published: {p}" for p in pub_cols]
    md = [f"{caption}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    csv_lines = ["method,backbone,dataset,shot,classifier,seeds,episodes,mean,ci95,seed_std,seed_means"]
    tex_cells = []
    for r in rows:
        cells_md, cells_tex = [], []
        for c in cols:
            if (r, c) not in summaries:
                cells_md.append("–")
                cells_tex.append("--")
                continue
            m, h = summaries[(r, c)]
            txt = f"{m:.2f} ± {h:.2f}"
            is_best = abs(m - best[c]) < 1e-9
            cells_md.append(f"**{txt}**" if is_best else txt)
            cells_tex.append(f"\\textbf{{{m:.2f} $\\pm$ {h:.2f}}}" if is_best else f"{m:.2f} $\\pm$ {h:.2f}")
            res = results.cells[r][c]
            seed_means = ";".join(f"{s}:{v:.4f}" for s, v in res.seed_means().items())
            csv_lines.append(f"{r[0]},{r[1]},{c[0]},{c[1]},{c[2]},{len(res.per_seed)},"
                             f"{res.episode_means().size},{m:.4f},{h:.4f},{res.seed_std():.4f},{seed_means}")
        pub = [published.get(r[0], {}).get(p, "–") for p in pub_cols]
        md.append("| " + " | ".join([r[0], r[1], seeds_of(r)] + cells_md + pub) + " |")
        tex_cells.append(" & ".join([r[0].replace("_", "\\_"), r[1].replace("_", "\\_")] + cells_tex
                                    + [p.replace("±", "$\\pm$") for p in pub]) + " \\\\")
    if any(len(res.per_seed) > 1 for row in results.cells.values() for res in row.values()):
        md += ["", "Spread across training seeds: standard deviation of the per-seed mean accuracies (points); "
                   "the per-seed means are in the CSV.", "",
               "| method | backbone | " + " | ".join(_col_label(c) for c in cols) + " |",
               "|" + "---|" * (len(cols) + 2)]
        for r in rows:
            vals = [f"{results.cells[r][c].seed_std():.2f}"
                    if c in results.cells[r] and len(results.cells[r][c].per_seed) > 1 else "–" for c in cols]
            md.append(f"| {r[0]} | {r[1]} | " + " | ".join(vals) + " |")
    for baseline in baselines:
        paired = paired_vs(results, baseline)
        if not paired:
            continue
        md += ["", f"Paired difference to `{baseline}` on identical episodes and the seeds both have (points): "
                   "mean ± 95% CI over episodes, paired t-test p, and the difference of each seed (the episode CI "
                   "does not include the variation between training runs; the per-seed values show it):", "",
               "| method | backbone | " + " | ".join(_col_label(c) for c in cols) + " |",
               "|" + "---|" * (len(cols) + 2)]
        for r in sorted(paired):
            vals = []
            for c in cols:
                if c in paired[r]:
                    d = paired[r][c]
                    seeds = "/".join(f"{v:+.2f}" for v in d.per_seed.values())
                    vals.append(f"{d.mean:+.2f} ± {d.ci95:.2f} ({_p_text(d.p)}; seeds {seeds})")
                else:
                    vals.append("–")
            md.append(f"| {r[0]} | {r[1]} | " + " | ".join(vals) + " |")
    if pub_cols:
        md += ["", "Published columns are numbers reported in the cited papers under their own full "
                   "protocol (data, resolution, epochs); they are context, not a like-for-like comparison."]
    colspec = "ll" + "c" * (len(cols) + len(pub_cols))
    tex = ["\\begin{table}[t]", "\\centering", f"\\caption{{{_tex_escape(caption)}}}",
           f"\\begin{{tabular}}{{{colspec}}}", "\\toprule",
           " & ".join(["Method", "Backbone"] + [_tex_escape(_col_label(c)) for c in cols]
                      + [_tex_escape(f"published {p}") for p in pub_cols]) + " \\\\",
           "\\midrule", *tex_cells, "\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return {"md": "\n".join(md) + "\n", "csv": "\n".join(csv_lines) + "\n", "tex": "\n".join(tex) + "\n"}


def _tex_escape(s: str) -> str:
    return s.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("&", "\\&") \
        .replace("±", "$\\pm$")


def plot(results: ResultSet, out: Path) -> List[Path]:
    """Accuracy with CIs per method (one panel per column) and training curves; returns written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written = []
    cols, rows = results.columns, results.rows
    if cols:
        fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.2), squeeze=False)
        for ax, c in zip(axes[0], cols):
            names, ms, hs = [], [], []
            for r in rows:
                if c in results.cells[r]:
                    m, h = results.cells[r][c].summary()
                    names.append(f"{r[0]}\n{r[1]}")
                    ms.append(m)
                    hs.append(0 if math.isnan(h) else h)
            ax.errorbar(range(len(ms)), ms, yerr=hs, fmt="o", capsize=3)
            ax.set_xticks(range(len(ms)), names, rotation=60, fontsize=7)
            ax.set_title(_col_label(c), fontsize=8)
            ax.set_ylabel("accuracy (%)")
        fig.tight_layout()
        path = out.with_name(out.name + "_accuracy.png")
        with _atomic_png(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        written.append(path)
    if results.curves:
        metrics = sorted({m for d in results.curves.values() for m in d})
        keys = sorted(results.curves)
        colour = {r: f"C{i % 10}" for i, r in enumerate(keys)}  # one colour per method in every panel
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics) + 1.4, 3.0), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            for r in keys:
                d = results.curves[r]
                if metric in d and d[metric]:
                    xs, ys = zip(*sorted(d[metric]))
                    ax.plot(xs, ys, marker=".", color=colour[r])
            ax.set_title(metric, fontsize=8)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        handles = [plt.Line2D([], [], color=colour[r], marker=".", label=f"{r[0]}/{r[1]}") for r in keys]
        fig.legend(handles=handles, loc="center right", fontsize=7)  # every method, also those absent from a panel
        fig.tight_layout(rect=(0, 0, 1 - 1.4 / (3.6 * len(metrics) + 1.4), 1))
        path = out.with_name(out.name + "_curves.png")
        with _atomic_png(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        written.append(path)
    return written


def _atomic_png(path: Path):
    from ..utils import atomic_path

    return atomic_path(path, suffix=".png")


def write_tables(results: ResultSet, published: Mapping[str, Mapping[str, str]], caption: str,
                 out_stem: Path, header: str = "", baselines: Sequence[str] = ("ce",)) -> List[Path]:
    rendered = render(results, published, caption, baselines=baselines)
    paths = []
    for ext, text in rendered.items():
        path = out_stem.with_suffix(f".{ext}")
        atomic_write_text(path, (header + "\n" + text) if ext == "md" and header else text)
        paths.append(path)
    return paths + plot(results, out_stem)
