"""Figures of a :class:`~fsl_lsskd.report.results.ResultSet`, as PNG and PDF (vector), matplotlib Agg.

One colour per method in every figure of every benchmark (:func:`method_colour`); accuracy in percent;
error bars and bands are the 95% t-intervals over training seeds (:mod:`fsl_lsskd.report.stats`; none for one
seed); epochs count from 1.

- ``<stem>_accuracy``: accuracy per method, one panel per readout, one row of panels per (training data,
  target, protocol); panels of a row share the y axis.
- ``<stem>_shots`` / ``<stem>_ways``: accuracy against shots (per way) and against ways (per shot), a line
  per method with its interval as a band.
- ``<stem>_reliability``: reliability diagrams (accuracy against confidence per bin, bar area = share of
  predictions) of the base-class classifiers and the main probabilistic readout.
- ``<stem>_fractions``: base-class top-1 and few-shot accuracy against the share of training data.
- ``<stem>_curves``: training loss relative to epoch 1, validation and held-out accuracy per epoch.
"""
from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..progress import announce
from ..utils import DEFERRED_SIGNALS, atomic_path, signals_deferred, usable_cores
from .results import headline_rows, row_name

# stable colours: the registered methods in a fixed order (tab10), variants a lighter shade of their method
METHOD_ORDER = ("ce", "pskd", "byot", "lsskd", "protonet", "maml", "kd", "hsakd", "hsakd_teacher", "fomaml")


def method_colour(row: str, base_method: Optional[str] = None):
    """The colour of a method (or of a variant: a lighter shade of its ``base_method``'s colour)."""
    import matplotlib.colors as mcolors
    from matplotlib import colormaps

    tab = colormaps["tab10"].colors
    name = row if row in METHOD_ORDER else (base_method or row)
    if name in METHOD_ORDER:
        colour = tab[METHOD_ORDER.index(name) % 10]
    else:
        colour = tab[sum(map(ord, name)) % 10]
    if row != name:
        rgb = np.array(mcolors.to_rgb(colour))
        colour = tuple(rgb + (1 - rgb) * 0.45)
    return colour


def _base_of(row: str) -> Optional[str]:
    for m in METHOD_ORDER:
        if row.startswith(m + "_") or row.startswith(m + "@"):
            return m
    return None


@contextlib.contextmanager
def _figure(stem: Path, suffix: str, written: List[Path], *args, **kwargs) -> Iterator:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig = plt.figure(*args, **kwargs)
    try:
        yield fig
        for ext in ("png", "pdf"):
            path = stem.with_name(f"{stem.name}_{suffix}.{ext}")
            with atomic_path(path, suffix=f".{ext}") as tmp:
                # no creation date in the PDF: the same results give the same bytes (no needless diffs)
                fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight",
                            metadata={"CreationDate": None} if ext == "pdf" else None)
            written.append(path)
    finally:
        plt.close(fig)


@contextlib.contextmanager
def _panel_grid(stem: Path, suffix: str, written: List[Path], n: int, max_cols: int, panel: Tuple[float, float],
                pad: float) -> Iterator:
    """A :func:`_figure` of ``n`` panels in rows of at most ``max_cols``, each ``panel`` (width, height) inches,
    plus ``pad`` inches of height for titles and legends; yields ``(fig, axes)``, the ``n`` axes in reading order
    (the grid's unused cells switched off)."""
    ncols = min(max_cols, n)
    nrows = math.ceil(n / ncols)
    with _figure(stem, suffix, written, figsize=(panel[0] * ncols, panel[1] * nrows + pad)) as fig:
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax in axes.flat[n:]:
            ax.axis("off")
        yield fig, list(axes.flat[:n])


def _interval(series) -> Tuple[float, float, float]:
    """``(mean, lo, hi)``: the 95% t-interval over training seeds; one seed has none (``lo = hi = mean``: a
    point without a bar)."""
    m, _, lo, hi = series.summary()
    return (m, lo, hi) if math.isfinite(lo) else (m, m, m)


def write_figures(results, stem: Path, baseline: str = "ce", workers: int = 1) -> List[Path]:
    """Every figure the results allow; returns the written paths (PNG and PDF), in a fixed order.
    ``workers > 1`` renders them in that many forked processes (:func:`start_figures`)."""
    return start_figures(results, stem, baseline, workers).wait()


#: the figures in their output order
_FIGURES = ("headline", "accuracy", "shot_way_curves", "reliability", "fractions", "training_curves")
#: their relative drawing cost (measured on cpu_tiny_imagenet: seconds of one core), to share them out
_COST = {"accuracy": 4.1, "shot_way_curves": 3.6, "reliability": 3.6, "headline": 1.7, "training_curves": 1.3,
         "fractions": 1.0}

#: what forked workers render: ``(results, stem, baseline)``, set just before the fork
_JOB: Optional[tuple] = None


def _worker_init() -> None:
    """A figure worker leaves interrupts to its parent: Ctrl-C (SIGINT, sent to the whole process group) is
    ignored, and SIGTERM ends it at once, instead of the CLI's handlers it inherited by the fork, which turn both
    into exceptions (a traceback per worker, or, for a signal between the fork and this function, a copy of the
    parent that goes on running the command). The parent forks with both signals blocked
    (:func:`start_figures`, :func:`~fsl_lsskd.utils.signals_deferred`); they are unblocked here, once handled."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {getattr(signal, n) for n in DEFERRED_SIGNALS})


def _render(name: str) -> List[Path]:
    results, stem, baseline = _JOB
    written: List[Path] = []
    if name == "headline":
        _headline(results, stem, written, baseline)
    else:
        globals()[f"_{name}"](results, stem, written)
    return written


def _worker_main(names: List[str], conn) -> None:
    """A figure worker: draws ``names`` in turn and reports each, ``("done", name, paths)``, then ``("end",)``;
    an error is reported as ``("error", exception)`` (its text when the exception does not pickle)."""
    _worker_init()
    try:
        for name in names:
            conn.send(("done", name, _render(name)))
        conn.send(("end",))
    except BaseException as exc:  # reported to the parent, which re-raises it
        try:
            conn.send(("error", exc))
        except Exception:
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
    finally:
        conn.close()


def _share(workers: int) -> List[List[str]]:
    """The figures split into ``workers`` lists of about equal :data:`_COST` (longest first, each to the least
    loaded worker)."""
    shares: List[List[str]] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for name in sorted(_FIGURES, key=lambda n: -_COST[n]):
        i = loads.index(min(loads))
        shares[i].append(name)
        loads[i] += _COST[name]
    return [s for s in shares if s]


def figure_workers() -> int:
    """How many processes :func:`start_figures` may use: the CPUs this process may run on, at most one per
    figure; 1 where processes cannot be forked (then figures render in this process)."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, min(usable_cores(), len(_FIGURES)))


class FigureJob:
    """Figures being rendered (:func:`start_figures`): :meth:`wait` returns the written paths, :meth:`cancel`
    stops the workers (for a caller that fails or is interrupted before waiting)."""

    def __init__(self, procs=(), conns=(), serial: Optional[Callable[[], List[Path]]] = None) -> None:
        self._procs, self._conns, self._serial = list(procs), list(conns), serial

    def wait(self) -> List[Path]:
        """The written paths, in :data:`_FIGURES` order (the same for any number of workers), announcing each
        figure as it is done; re-raises a worker's error. Ctrl-C while waiting kills the workers."""
        if self._serial is not None:
            return self._serial()
        from multiprocessing.connection import wait as ready

        by_name: Dict[str, List[Path]] = {}
        try:
            open_conns = list(self._conns)
            while open_conns:
                for conn in ready(open_conns):
                    try:
                        msg = conn.recv()
                    except EOFError:
                        raise RuntimeError("a figure worker ended without reporting its figures (killed?)") from None
                    if msg[0] == "error":
                        raise msg[1]
                    if msg[0] == "end":
                        open_conns.remove(conn)
                        continue
                    _, name, paths = msg
                    by_name[name] = paths
                    if paths:
                        announce(f"figure {paths[0].stem} drawn ({len(by_name)} of {len(_FIGURES)} done)")
        except BaseException:
            self.cancel()
            raise
        self.cancel()  # all reported: the workers are ending; reap them
        return [p for name in _FIGURES for p in by_name[name]]

    def cancel(self) -> None:
        """Kill the workers that still run and reap them all; safe to call twice, and not interruptible by a
        second Ctrl-C (it is delivered once the workers are gone)."""
        with signals_deferred():
            for proc in self._procs:
                if proc.is_alive():
                    proc.kill()
            for proc in self._procs:
                proc.join()
            for conn in self._conns:
                conn.close()


def start_figures(results, stem: Path, baseline: str = "ce", workers: int = 1) -> FigureJob:
    """Start rendering every figure. With ``workers > 1`` they render in that many forked processes (plain
    processes, each with its share of the figures and a pipe back, so cancelling is killing them) while the
    caller goes on (the tables): a 2-core machine draws two figures at once. The files are the same bytes either
    way (each is written atomically by the process that draws it). With ``workers <= 1`` they render in this
    process when :meth:`FigureJob.wait` is called."""
    global _JOB
    if workers <= 1:
        def serial() -> List[Path]:
            global _JOB
            _JOB = (results, stem, baseline)
            try:
                return [p for name in _FIGURES for p in _render(name)]
            finally:
                _JOB = None
        return FigureJob(serial=serial)
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    procs, conns = [], []
    _JOB = (results, stem, baseline)
    try:
        # fork with Ctrl-C and SIGTERM blocked: a worker must not run the parent's handlers before _worker_init;
        # a signal that arrives meanwhile is delivered when the block ends, and cancels the workers below
        with signals_deferred():
            for names in _share(min(workers, len(_FIGURES))):
                parent_conn, child_conn = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker_main, args=(names, child_conn), daemon=True)
                proc.start()
                child_conn.close()
                procs.append(proc)
                conns.append(parent_conn)
    except BaseException:
        FigureJob(procs, conns).cancel()
        raise
    finally:
        _JOB = None  # the workers have their copy
    return FigureJob(procs, conns)


def _accuracy(results, stem: Path, written: List[Path]) -> None:
    cols = results.columns
    if not cols:
        return
    groups: Dict[Tuple[str, str, str], List[str]] = {}
    for data, target, proto, readout in cols:
        groups.setdefault((data, target, proto), [])
        if readout not in groups[(data, target, proto)]:
            groups[(data, target, proto)].append(readout)
    n_rows = len(groups)
    n_cols = max(len(v) for v in groups.values())
    rows = [r for r in results.rows if r in results.cells]
    with _figure(stem, "accuracy", written, figsize=(2.6 + 2.4 * n_cols, 2.4 * n_rows + 0.6)) as fig:
        axes = fig.subplots(n_rows, n_cols, squeeze=False, sharey="row")
        for i, ((data, target, proto), readouts) in enumerate(groups.items()):
            for j in range(n_cols):
                ax = axes[i][j]
                if j >= len(readouts):
                    ax.axis("off")
                    continue
                col = (data, target, proto, readouts[j])
                xs = []
                for k, r in enumerate(rows):
                    s = results.cells[r].get(col)
                    if s is None:
                        continue
                    m, lo, hi = _interval(s)
                    ax.errorbar([k], [m], yerr=[[m - lo], [hi - m]], fmt="o", capsize=4, elinewidth=1.6,
                                color=method_colour(r[0], _base_of(r[0])), markersize=6)
                    xs.append(k)
                ax.set_xticks(range(len(rows)), [f"{r[0]}" for r in rows], rotation=45, ha="right", fontsize=8)
                ax.set_title(f"{_target_text(data, target)}, {_proto_text(proto)}\n{readouts[j]}", fontsize=8)
                ax.grid(axis="y", alpha=0.3)
                if j == 0:
                    ax.set_ylabel("accuracy (%)")
        fig.suptitle("Few-shot accuracy (mean; bars: 95% t-interval over training seeds; none for one seed)",
                     fontsize=9)
        fig.tight_layout()


#: A row whose mean is further than this (points) from the baseline's is listed off the headline figure's axis,
#: so the differences in question (about a point) stay visible.
HEADLINE_SPAN = 6.0


def _headline(results, stem: Path, written: List[Path], baseline: str) -> None:
    """``<stem>_headline``: the headline's accuracy per method (:func:`~fsl_lsskd.report.results.headline_rows`),
    one panel per (training data, shots): every seed as a point, the mean with its 95% t-interval over seeds.
    The axis spans the methods within :data:`HEADLINE_SPAN` points of the baseline; the others are named in the
    panel with their mean, so a one-point difference is visible."""
    lines = headline_rows(results, baseline)
    if not lines:
        return
    panels: Dict[Tuple[str, int], list] = {}
    for h in lines:
        panels.setdefault((h.data, h.shots), []).append(h)
    keys = sorted(panels, key=lambda k: (k[0], k[1]))
    with _panel_grid(stem, "headline", written, len(keys), 2, (4.6, 3.4), 0.6) as (fig, axes):
        for ax, key in zip(axes, keys):
            hs = panels[key]
            ref = next((h.accuracy.mean for h in hs if h.row[0] == baseline), None)
            shown = [h for h in hs if ref is None or abs(h.accuracy.mean - ref) <= HEADLINE_SPAN]
            off = [h for h in hs if h not in shown]
            for k, h in enumerate(shown):
                colour = method_colour(h.row[0], _base_of(h.row[0]))
                vals = np.asarray(h.accuracy.values)
                jitter = (np.arange(vals.size) - (vals.size - 1) / 2) * 0.06
                ax.plot(k - 0.18 + jitter, vals, "o", color=colour, alpha=0.45, markersize=4, linestyle="none")
                a = h.accuracy
                err = [[a.mean - a.lo], [a.hi - a.mean]] if a.decided else None
                ax.errorbar([k + 0.1], [a.mean], yerr=err, fmt="D", capsize=4, elinewidth=1.6, color=colour,
                            markersize=6)
            ax.set_xticks(range(len(shown)), [f"{row_name(results, h.row)}\n{h.accuracy.n} seed"
                                              f"{'s' if h.accuracy.n != 1 else ''}" for h in shown], fontsize=8)
            if ref is not None:
                ax.axhline(ref, color="grey", linewidth=0.8, linestyle="--")
            data, shots = key
            ax.set_title(f"{data}, 5-way {shots}-shot, protonet", fontsize=9)
            ax.set_ylabel("accuracy (%)")
            ax.grid(axis="y", alpha=0.3)
            if off:
                ax.text(0.01, 0.02, "off axis: " + ", ".join(f"{h.row[0]} {h.accuracy.mean:.1f}" for h in off),
                        transform=ax.transAxes, fontsize=7, color="dimgrey")
        fig.suptitle("Headline accuracy: points are training seeds; diamonds the mean with its 95% t-interval over "
                     "seeds (none for one seed); dashed: the baseline", fontsize=8)
        fig.tight_layout()


def _proto_text(key: str) -> str:
    m = re.match(r"(\d+)w(\d+)s(\d+)q", key)
    return f"{m.group(1)}-way {m.group(2)}-shot" if m else key


def _target_text(data: str, target: str) -> str:
    return data if data.split("@")[0] == target else f"{data} → {target}"


def _shot_way_curves(results, stem: Path, written: List[Path]) -> None:
    points = results.curve_points
    if not points:
        return
    # (data, target, readout) -> way -> shot -> row -> series
    grid: Dict[Tuple[str, str, str], Dict[int, Dict[int, Dict[tuple, object]]]] = {}
    for row, d in points.items():
        for (data, target, n_way, n_shot, readout), s in d.items():
            grid.setdefault((data, target, readout), {}).setdefault(n_way, {}).setdefault(n_shot, {})[row] = s
    for kind in ("shots", "ways"):
        panels = []
        for key, by_way in grid.items():
            if kind == "shots":
                panels += [(key, w, by_way[w]) for w in sorted(by_way) if len(by_way[w]) > 1]
            else:
                shots = sorted({k for w in by_way for k in by_way[w]})
                for k in shots:
                    per = {w: by_way[w][k] for w in sorted(by_way) if k in by_way[w]}
                    if len(per) > 1:
                        panels.append((key, k, per))
        if not panels:
            continue
        with _panel_grid(stem, kind, written, len(panels), 3, (4.2, 3.2), 0.5) as (fig, axes):
            for ax, ((data, target, readout), fixed, per) in zip(axes, panels):
                rows = sorted({r for v in per.values() for r in v})
                for r in rows:
                    xs = [x for x in sorted(per) if r in per[x]]
                    stats = [_interval(per[x][r]) for x in xs]
                    colour = method_colour(r[0], _base_of(r[0]))
                    ax.plot(xs, [s[0] for s in stats], marker="o", color=colour, label=r[0])
                    ax.fill_between(xs, [s[1] for s in stats], [s[2] for s in stats], color=colour, alpha=0.2)
                ax.set_xscale("log", base=2)
                xs_all = sorted(per)
                ax.set_xticks(xs_all, [str(x) for x in xs_all])
                ax.set_xlabel("shots per class (n_shot)" if kind == "shots" else "classes per episode (n_way)")
                ax.set_ylabel("accuracy (%)")
                fixed_txt = f"{fixed}-way" if kind == "shots" else f"{fixed}-shot"
                ax.set_title(f"{_target_text(data, target)}, {fixed_txt}, {readout}", fontsize=9)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
            fig.suptitle(f"Accuracy against {'shots' if kind == 'shots' else 'ways'} (bands: 95% interval over "
                         f"training seeds and episodes)", fontsize=9)
            fig.tight_layout()


def _reliability(results, stem: Path, written: List[Path]) -> None:
    panels = []
    for r, by in sorted(results.base.items()):
        for d, s in by.items():
            if s.has("reliability"):
                panels.append((f"{r[0]}: base classes ({d})", r, s))
    cols = [c for c in results.columns if any(c in results.cells[r] and results.cells[r][c].has("reliability")
                                              for r in results.cells)]
    if cols:
        # one few-shot column for every method: the one most methods have, on the training data (not a
        # cross-domain target), ProtoNet, the first protocol
        def rank(c):
            n = sum(c in results.cells[r] and results.cells[r][c].has("reliability") for r in results.cells)
            return (-n, c[0].split("@")[0] != c[1], c[3] != "protonet", cols.index(c))

        first = min(cols, key=rank)
        where = first[0] if first[0].split("@")[0] == first[1] else f"{first[0]}→{first[1]}"
        for r in sorted(results.cells):
            s = results.cells[r].get(first)
            if s is not None and s.has("reliability"):
                panels.append((f"{r[0]}: {where} {first[2]} {first[3]}", r, s))
    if not panels:
        return
    from ..eval.calibration import N_BINS, ece_from_bins

    with _panel_grid(stem, "reliability", written, len(panels), 4, (3.0, 3.0), 0.4) as (fig, axes):
        for ax, (title, r, s) in zip(axes, panels):
            bins = s.stacked("reliability").sum(axis=(0, 1))  # [n_bins + 1, 3]
            bins[N_BINS - 1] += bins[N_BINS]  # confidence exactly 1 drawn in the last bin
            bins = bins[:N_BINS]
            centres = (np.arange(N_BINS) + 0.5) / N_BINS
            count = bins[:, 0]
            acc = np.divide(bins[:, 2], count, out=np.zeros(N_BINS), where=count > 0)
            import matplotlib.colors as mcolors

            rgb = mcolors.to_rgb(method_colour(r[0], _base_of(r[0])))
            shade = 0.25 + 0.75 * count / max(count.max(), 1)
            ax.bar(centres, acc, width=1 / N_BINS, color=[(*rgb, a) for a in shade], edgecolor="black",
                   linewidth=0.3)
            ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_xlabel("confidence")
            ax.set_ylabel("accuracy")
            ax.set_title(f"{title}\nECE {100 * ece_from_bins(s.stacked('reliability').sum(axis=(0, 1))):.1f}%",
                         fontsize=8)
        fig.suptitle("Reliability diagrams (bar shade: share of predictions in the bin)", fontsize=9)
        fig.tight_layout()


#: The title of the fractions figure's base-class panel (drawn first).
BASE_PANEL = "base-class top-1 (held-out images)"


def _fraction_panel_order(key: Tuple[str, tuple]) -> tuple:
    """The sort key of a fractions panel ``(title, (n_way, n_shot, n_query, readout label))``: the base-class
    panel first, then the few-shot panels by way, shot and query count (numerically) and readout label."""
    title, (way, shot, query, readout) = key
    return (title != BASE_PANEL, way, shot, query, readout)


def _fractions(results, stem: Path, written: List[Path]) -> None:
    """``<stem>_fractions``: accuracy against the share of training data, one panel per base-class score and per
    (protocol, readout) whose rows span more than one fraction. Panels are sorted by
    :func:`_fraction_panel_order`: base-class top-1 first, then by (n_way, n_shot, n_query, readout label), so
    the figure is the same whatever order the results load in; rows within a panel by (method, backbone)."""
    def frac(label: str) -> float:
        m = re.search(r"@([\d.]+)%", label)
        return float(m.group(1)) if m else 100.0

    def shape(proto: str) -> Tuple[int, int, int]:
        m = re.match(r"(\d+)w(\d+)s(\d+)q", proto)
        return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)

    series = {}
    order: Dict[str, tuple] = {BASE_PANEL: (BASE_PANEL, (0, 0, 0, ""))}
    for r, by in results.base.items():
        for d, s in by.items():
            series.setdefault((BASE_PANEL, r), {})[frac(d)] = s
    for r, by in results.cells.items():
        for (data, target, proto, readout), s in by.items():
            title = f"{_proto_text(proto)} {readout}"
            # protocols differing in queries only share a panel (and a title): it sorts by the smallest
            order[title] = min(order.get(title, (title, (*shape(proto), readout))), (title, (*shape(proto), readout)))
            series.setdefault((title, r), {})[frac(data)] = s
    panels: Dict[str, Dict[tuple, Dict[float, object]]] = {}
    for (title, r), pts in series.items():
        panels.setdefault(title, {})[r] = pts
    # a panel is drawn when its rows span more than one fraction; then every row is in it, one trained at a single
    # fraction as a point (HSAKD's student at 25 % beside CE's curve), not dropped
    panels = {t: panels[t] for t in sorted(panels, key=lambda t: _fraction_panel_order(order[t]))
              if len({x for pts in panels[t].values() for x in pts}) > 1}
    if not panels:
        return
    with _panel_grid(stem, "fractions", written, len(panels), 3, (4.2, 3.2), 0.5) as (fig, axes):
        for ax, (title, by_row) in zip(axes, panels.items()):
            grid = sorted({x for pts in by_row.values() for x in pts})  # the fractions any row of the panel has
            for r, pts in sorted(by_row.items()):
                # a fraction this row lacks is a gap (NaN), not a line drawn through it; every point has its bar
                stats = {x: _interval(pts[x]) for x in pts}
                col = [stats.get(x, (math.nan,) * 3) for x in grid]
                colour = method_colour(r[0], _base_of(r[0]))
                counts = sorted({len(pts[x].per_seed) for x in pts})  # a row with fewer seeds says so
                seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
                label = f"{row_name(results, r)}, {seeds} seed{'s' if counts[-1] > 1 else ''}"
                ax.plot(grid, [s[0] for s in col], marker="o", color=colour, label=label)
                ax.fill_between(grid, [s[1] for s in col], [s[2] for s in col], color=colour, alpha=0.2)
                xs = sorted(stats)
                ax.errorbar(xs, [stats[x][0] for x in xs], yerr=[[stats[x][0] - stats[x][1] for x in xs],
                                                                 [stats[x][2] - stats[x][0] for x in xs]],
                            fmt="none", ecolor=colour, capsize=2, alpha=0.7)
            ax.set_xlabel("training images per base class (%)")
            ax.set_ylabel("accuracy (%)")
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle("Limited-data protocol (bands: 95% interval over training seeds and episodes/images)",
                     fontsize=9)
        fig.tight_layout()


def _training_curves(results, stem: Path, written: List[Path]) -> None:
    if not results.curves:
        return
    from matplotlib.ticker import MaxNLocator

    panels = [("train_loss", "training loss / its epoch-1 value", True),
              ("val_fewshot_acc", "validation few-shot accuracy (%)", False),
              ("val_maml_finetune_acc", "validation accuracy, MAML's own readout (%)", False),
              ("heldout_base_acc", "held-out base-class accuracy (%)", False)]
    panels = [p for p in panels if any(p[0] in d for d in results.curves.values())]
    rows = sorted(results.curves)
    with _figure(stem, "curves", written, figsize=(4.0 * len(panels) + 1.6, 3.2)) as fig:
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        max_epoch = 1
        for ax, (metric, label, relative) in zip(axes, panels):
            for r in rows:
                pts = results.curves[r].get(metric)
                if not pts:
                    continue
                xs, ys = zip(*sorted(pts))
                ys = np.asarray(ys, dtype=float)
                if relative and ys[0]:
                    ys = ys / ys[0]
                max_epoch = max(max_epoch, max(xs))
                ax.plot(xs, ys, marker=".", color=method_colour(r[0], _base_of(r[0])))
            ax.set_xlabel("epoch")
            ax.set_ylabel(label, fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(max_epoch, 10)))
            ax.set_xlim(0.8, max_epoch + 0.2)
            ax.grid(alpha=0.3)
        import matplotlib.pyplot as plt

        handles = [plt.Line2D([], [], color=method_colour(r[0], _base_of(r[0])), marker=".", label=f"{r[0]}/{r[1]}")
                   for r in rows]
        fig.legend(handles=handles, loc="center right", fontsize=7)
        fig.suptitle("Training (first seed, full data)", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1 - 1.6 / (4.0 * len(panels) + 1.6), 1))
