"""The edge column of a benchmark as published files: ``<name>_edge.md``, ``<name>_edge.csv`` and the
accuracy-against-latency figure ``<name>_edge_accuracy_latency.{png,pdf}``.

Input: one :class:`EdgeCell` per measured training cell (its edge report, :mod:`fsl_lsskd.edge.report`, and
per-episode accuracies). Rows of the Markdown tables are methods (table rows of the benchmark) aggregated over
training seeds: latency figures are the median over seeds of each seed's percentile, with the range over seeds
when there are several; accuracy differences are the mean over seeds and episodes with a 95% interval (t-interval
over episodes, :func:`fsl_lsskd.eval.base.mean_ci`, for one seed; the t-interval over the seeds' means,
:func:`fsl_lsskd.report.stats.t_interval`, for several). The CSV keeps every figure of every seed, every batch size
and thread count, with its machine.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..utils import atomic_write_text

ENGINE_ORDER = ("pytorch_fp32", "ort_fp32", "ort_int8")
MARKERS = {"pytorch_fp32": "o", "ort_fp32": "s", "ort_int8": "^"}
CSV_COLUMNS = ["kind", "method", "backbone", "train_data", "seed", "train_id", "engine", "precision", "batch",
               "threads", "protocol", "readout", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "n_runs",
               "load_ms", "first_run_ms", "peak_rss_mb", "rss_delta_mb", "images_per_s", "cpu_per_wall",
               "others_busy_share", "under_load", "file_bytes", "params", "flops", "accuracy", "accuracy_ci95",
               "diff_vs_pytorch", "diff_ci95", "n_episodes", "episodes", "cpu_model", "cores", "torch",
               "onnxruntime"]


@dataclass
class EdgeCell:
    """One measured training cell: table row (``row``, the benchmark's method or variant, with ``method`` its
    registered method), backbone, training data label, seed, training id, the edge ``report`` and the
    per-episode accuracy ``arrays`` (``<engine>/<protocol>/<readout>`` -> ``[E]`` %)."""

    row: str
    method: str
    backbone: str
    data: str
    seed: int
    train_id: str
    report: Dict[str, Any]
    arrays: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def group(self) -> Tuple[str, str, str]:
        return (self.row, self.backbone, self.data)


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def headline_setting(cells: Sequence[EdgeCell]) -> Tuple[int, int]:
    """(batch, threads) of the headline latency: batch 1 with 1 thread when measured, else the smallest."""
    settings = {(r["batch"], r["threads"]) for c in cells for r in c.report.get("latency", {}).get("records", [])}
    if (1, 1) in settings or not settings:
        return (1, 1)
    return min(settings)


def _latency(cell: EdgeCell, engine: str, batch: int, threads: int) -> Optional[Dict[str, Any]]:
    for r in cell.report.get("latency", {}).get("records", []):
        if (r["engine"], r["batch"], r["threads"]) == (engine, batch, threads):
            return r
    return None


def _median_range(values: Sequence[Optional[float]], digits: int = 3) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "n/a"
    med = float(np.median(vals))
    if len(vals) == 1:
        return _f(med, digits)
    return f"{_f(med, digits)} ({_f(min(vals), digits)}–{_f(max(vals), digits)})"


def interval(x: np.ndarray) -> Tuple[float, float, float]:
    """(mean, low, high) of per-seed, per-episode values ``x [S, E]``: t-interval over episodes for one seed,
    t-interval over the seeds' means (df = seeds − 1, :func:`~fsl_lsskd.report.stats.t_interval`) for several."""
    from ..eval.base import mean_ci
    from .stats import t_interval

    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    m = float(x.mean())
    if x.shape[0] == 1:
        _, h = mean_ci(x[0])
        return m, m - h, m + h
    iv = t_interval(x.mean(1))
    return m, iv.lo, iv.hi


def _groups(cells: Sequence[EdgeCell]) -> Dict[Tuple[str, str, str], List[EdgeCell]]:
    out: Dict[Tuple[str, str, str], List[EdgeCell]] = {}
    for c in sorted(cells, key=lambda c: c.seed):
        out.setdefault(c.group, []).append(c)
    return out


def _accuracy_columns(cells: Sequence[EdgeCell]) -> List[Tuple[str, str]]:
    """(protocol, readout label) in report order."""
    seen: List[Tuple[str, str]] = []
    for c in cells:
        for r in c.report.get("accuracy", {}).get("records", []):
            key = (r["protocol"], r["readout_label"])
            if key not in seen:
                seen.append(key)
    return seen


def _stack(cells: Sequence[EdgeCell], key: str) -> Optional[np.ndarray]:
    arrs = [c.arrays.get(key) for c in cells]
    if any(a is None for a in arrs) or len({len(a) for a in arrs}) != 1:
        return None
    return np.stack(arrs)


def render_markdown(cells: Sequence[EdgeCell], title: str, caption: str, header: str = "") -> str:
    """The Markdown report (module docstring)."""
    groups = _groups(cells)
    batch, threads = headline_setting(cells)
    out = [header.rstrip("\n"), f"# {title}", "", caption, ""] if header else [f"# {title}", "", caption, ""]
    # -- files
    out += ["## Model files", "",
            "| method | backbone | train data | seeds | params | MFLOPs | PyTorch KiB | ONNX fp32 KiB | "
            "ONNX int8 KiB | ONNX fp32 vs PyTorch max abs diff (relative) | int8 calibration |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (row, bb, data), cs in groups.items():
        r0 = cs[0].report
        files = r0["files"]
        kib = {k: (f"{files[k]['bytes'] / 1024:.1f}" if k in files and files[k].get("bytes") else "n/a")
               for k in ("pytorch", "onnx_fp32", "onnx_int8")}
        worst = max((c.report["parity"] for c in cs), key=lambda p: p["max_rel_diff"])
        par = f"{worst['max_abs_diff']:.2g} ({worst['max_rel_diff']:.2g}){'' if worst['ok'] else ' FAILED'}"
        cal = r0.get("int8", {}).get("calibration")
        cal_text = f"{cal['n_images']} {cal['split']} images" if cal else "n/a"
        out.append(f"| {row} | {bb} | {data} | {', '.join(str(c.seed) for c in cs)} | {r0['model']['params']:,} | "
                   f"{r0['model']['flops'] / 1e6:.1f} | {kib['pytorch']} | {kib['onnx_fp32']} | {kib['onnx_int8']} | "
                   f"{par} | {cal_text} |")
    # -- latency
    if any("latency" in c.report for c in cells):
        out += ["", f"## Latency at batch {batch}, {threads} thread{'s' if threads > 1 else ''} (ms)", "",
                "Median over seeds of each seed's percentile (range over seeds in brackets). Other batch sizes and "
                "thread counts: the CSV.", "",
                "| method | backbone | train data | engine | p50 | p90 | p99 | runs | load ms | peak RSS +MB | "
                "under load |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for (row, bb, data), cs in groups.items():
            for engine in ENGINE_ORDER:
                recs = [r for r in (_latency(c, engine, batch, threads) for c in cs) if r is not None]
                if not recs:
                    continue
                under = "yes" if any(r["under_load"] for r in recs) else "no"
                pct = " | ".join(_median_range([r[k] for r in recs]) for k in ("p50_ms", "p90_ms", "p99_ms"))
                out.append(f"| {row} | {bb} | {data} | {recs[0]['label']} | {pct} | {min(r['n_runs'] for r in recs)} | "
                           f"{_median_range([r['load_ms'] for r in recs], 1)} | "
                           f"{_median_range([r['rss_delta_mb'] for r in recs], 1)} | {under} |")
    # -- accuracy
    cols = _accuracy_columns(cells)
    if cols:
        out += ["", "## Few-shot accuracy: exported models against PyTorch fp32 on the same episodes", "",
                "Accuracy in %; Δ = exported minus PyTorch fp32, paired per episode, in points, with its 95% interval "
                "(t-interval over episodes for one seed, t-interval over the seeds' means for several); "
                "per-seed Δ range in the last column when there are several seeds.", "",
                "| method | backbone | train data | protocol | readout | PyTorch fp32 | ONNX fp32 Δ | ONNX int8 | "
                "ONNX int8 Δ | int8 Δ per seed |", "|---|---|---|---|---|---|---|---|---|---|"]
        for (row, bb, data), cs in groups.items():
            for proto, label in cols:
                ref = _stack(cs, f"pytorch_fp32/{proto}/{label}")
                if ref is None:
                    continue
                cells_txt = []
                m, lo, hi = interval(ref)
                cells_txt.append(f"{m:.2f} [{lo:.2f}, {hi:.2f}]")
                per_seed = ""
                for engine in ("ort_fp32", "ort_int8"):
                    arr = _stack(cs, f"{engine}/{proto}/{label}")
                    if arr is None:
                        cells_txt += ["n/a"] if engine == "ort_fp32" else ["n/a", "n/a"]
                        continue
                    d = arr - ref
                    dm, dlo, dhi = interval(d)
                    diff = f"{dm:+.2f} [{dlo:+.2f}, {dhi:+.2f}]"
                    if engine == "ort_int8":
                        am, alo, ahi = interval(arr)
                        cells_txt += [f"{am:.2f} [{alo:.2f}, {ahi:.2f}]", diff]
                        if len(cs) > 1:
                            seeds = d.mean(axis=1)
                            per_seed = f"{seeds.min():+.2f} … {seeds.max():+.2f}"
                    else:
                        cells_txt.append(diff)
                out.append(f"| {row} | {bb} | {data} | {proto} | {label} | " + " | ".join(cells_txt)
                           + f" | {per_seed or '—'} |")
    notes = sorted({n for c in cells for n in c.report.get("notes", [])})
    if notes:
        out += [""] + [f"Note: {n}" for n in notes]
    return "\n".join(out) + "\n"


def csv_rows(cells: Sequence[EdgeCell]) -> List[Dict[str, Any]]:
    """One row per latency figure (every engine, batch size, thread count) and per accuracy figure of every cell."""
    rows: List[Dict[str, Any]] = []
    for c in sorted(cells, key=lambda c: (c.group, c.seed)):
        rep = c.report
        base = {"method": c.row, "backbone": c.backbone, "train_data": c.data, "seed": c.seed, "train_id": c.train_id}
        machine = rep.get("machine", {})
        mach = {k: machine.get(k) for k in ("cpu_model", "cores", "torch", "onnxruntime")}
        sizes = {"pytorch_fp32": rep["files"].get("pytorch", {}).get("bytes"),
                 "ort_fp32": rep["files"].get("onnx_fp32", {}).get("bytes"),
                 "ort_int8": rep["files"].get("onnx_int8", {}).get("bytes")}
        for r in rep.get("latency", {}).get("records", []):
            rows.append({**base, "kind": "latency", **{k: r.get(k) for k in CSV_COLUMNS if k in r},
                         "file_bytes": sizes.get(r["engine"]), "params": rep["model"]["params"],
                         "flops": rep["model"]["flops"], **{k: r["machine"].get(k) for k in mach}})
        for r in rep.get("accuracy", {}).get("records", []):
            rows.append({**base, "kind": "accuracy", "engine": r["engine"], "precision": r["precision"],
                         "protocol": r["protocol"], "readout": r["readout_label"], "accuracy": r["accuracy"],
                         "accuracy_ci95": r["accuracy_ci95"], "diff_vs_pytorch": r.get("diff_vs_pytorch"),
                         "diff_ci95": r.get("diff_ci95"), "n_episodes": r["n_episodes"], "episodes": r["episodes"],
                         **mach})
    return rows


def render_csv(cells: Sequence[EdgeCell]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in csv_rows(cells):
        w.writerow({k: _csv_value(row.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    return v


def write_figure(cells: Sequence[EdgeCell], stem: Path) -> List[Path]:
    """``<stem>_accuracy_latency.{png,pdf}``: accuracy (first readout) against the headline p50 latency, one
    panel per protocol, one point per method and engine (colour = method, marker = engine); vertical bars: the
    accuracy's 95% interval; horizontal bars: p50 to p90 latency."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from .figures import _base_of, _figure, method_colour

    written: List[Path] = []
    cols = _accuracy_columns(cells)
    if not cols or not any("latency" in c.report for c in cells):
        return written
    first_readout = cols[0][1]
    protos = [p for p, label in cols if label == first_readout]
    batch, threads = headline_setting(cells)
    groups = _groups(cells)
    under = any(c.report.get("under_load") for c in cells)
    with _figure(stem, "accuracy_latency", written, figsize=(1.0 + 3.6 * len(protos), 3.4)) as fig:
        axes = fig.subplots(1, len(protos), squeeze=False)[0]
        for ax, proto in zip(axes, protos):
            for (row, bb, data), cs in groups.items():
                for engine in ENGINE_ORDER:
                    arr = _stack(cs, f"{engine}/{proto}/{first_readout}")
                    recs = [r for r in (_latency(c, engine, batch, threads) for c in cs) if r is not None]
                    if arr is None or not recs:
                        continue
                    m, lo, hi = interval(arr)
                    p50 = float(np.median([r["p50_ms"] for r in recs]))
                    p90s = [r["p90_ms"] for r in recs if r["p90_ms"] is not None and math.isfinite(r["p90_ms"])]
                    xerr = [[0.0], [max(0.0, float(np.median(p90s)) - p50) if p90s else 0.0]]
                    ax.errorbar([p50], [m], yerr=[[m - lo], [hi - m]], xerr=xerr, fmt=MARKERS[engine],
                                color=method_colour(row, _base_of(row)), capsize=3, markersize=6, elinewidth=1.2,
                                label=f"{row} ({bb}) {recs[0]['label']}")
            ax.set_xscale("log")
            # plain numbers at 1-2-5 steps: the default labels of a sub-decade log axis overlap (3x10^-1 4x10^-1)
            ax.xaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(f"p50 latency, batch {batch}, {threads} thread{'s' if threads > 1 else ''} (ms; bar to p90)")
            ax.set_title(f"{proto} {first_readout}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("accuracy (%)")
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
        machine = cells[0].report.get("machine", {})
        loaded = sorted({c.row for c in cells if c.report.get("under_load")})
        load_note = ("" if not under else " — UNDER LOAD" if len(loaded) == len({c.row for c in cells})
                     else f" — {', '.join(loaded)}: figures taken under load")
        fig.suptitle(f"Accuracy against latency on {machine.get('cpu_model', '?')} ({machine.get('cores', '?')} cores)"
                     + load_note, fontsize=9)
        fig.tight_layout()
    return written


def write_edge_files(cells: Sequence[EdgeCell], stem: Path, title: str, caption: str, header: str = "") -> List[Path]:
    """Write ``<stem>.md``, ``<stem>.csv`` and the figure; returns the paths."""
    md, csv_text = render_markdown(cells, title, caption, header), render_csv(cells)
    paths = []
    for suffix, text in ((".md", md), (".csv", csv_text)):
        path = stem.with_name(stem.name + suffix)
        atomic_write_text(path, text)
        paths.append(path)
    return paths + write_figure(cells, stem)


def edge_metrics(report: Mapping[str, Any]) -> Dict[str, float]:
    """Flat MLflow metrics of an edge report: file sizes, parity, latency per engine/batch/threads, accuracy and
    the difference to PyTorch per engine/protocol/readout (finite values only)."""
    import re

    def clean(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")

    out: Dict[str, float] = {}
    for k, f in report.get("files", {}).items():
        if f.get("bytes") is not None:
            out[f"size_{k}_bytes"] = float(f["bytes"])
    out["parity_max_abs_diff"] = report["parity"]["max_abs_diff"]
    out["parity_max_rel_diff"] = report["parity"]["max_rel_diff"]
    for r in report.get("latency", {}).get("records", []):
        key = f"{r['engine']}_b{r['batch']}_t{r['threads']}"
        for m in ("p50_ms", "p90_ms", "p99_ms", "load_ms", "rss_delta_mb", "others_busy_share"):
            out[f"latency_{key}_{m}"] = r.get(m)
        out[f"latency_{key}_under_load"] = float(bool(r["under_load"]))
    for r in report.get("accuracy", {}).get("records", []):
        key = clean(f"{r['engine']}_{r['protocol']}_{r['readout_label']}")
        out[f"accuracy_{key}"] = r["accuracy"]
        if "diff_vs_pytorch" in r:
            out[f"diff_{key}"] = r["diff_vs_pytorch"]
            out[f"diff_ci95_{key}"] = r["diff_ci95"]
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}
