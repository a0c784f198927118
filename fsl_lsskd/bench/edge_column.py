"""The edge-deployment column of a benchmark (``fsl-bench edge``): find its finished cells in the MLflow store,
measure each one's inference backbone (:mod:`fsl_lsskd.edge`), record a child run per cell and publish the edge
tables and figure."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeColumn:
    """What :func:`edge_column` wrote: ``markdown`` (OUT/<name>_edge.md), ``paths`` (every file written, as
    :func:`~fsl_lsskd.report.edge_tables.write_edge_files` returns them), ``cells`` (cells measured) and ``under_load`` (True when any latency figure was taken
    with the load guard tripped, under ``allow_load``)."""

    markdown: Path
    paths: List[Path]
    cells: int
    under_load: bool


def edge_column(bench, out_dir: Path, latency, calibration_images: int, readouts: Sequence[str],
                allow_load: bool = False, command: str = "",
                notify: Optional[Callable[[str], None]] = None) -> EdgeColumn:
    """Measure, record and publish the edge column of benchmark ``bench`` (filtered and with its data paths, as
    ``fsl-bench edge`` loads it).

    For every cell of ``bench`` finished in the MLflow store (``MLFLOW_TRACKING_URI``): its exported backbone as
    ONNX fp32 and int8 (calibrated on ``calibration_images`` seeded training images), checked against PyTorch;
    latency per ``latency`` (a :class:`~fsl_lsskd.edge.latency.LatencySettings`: threads, batch sizes, runs in
    ms); accuracy (%) of every engine with ``readouts`` (empty: the cells' defaults,
    :func:`~fsl_lsskd.bench.measures.edge_readouts`) on the benchmark's main protocols, paired per episode with
    PyTorch. Every cell is measured before anything is recorded; then each gets a child run (metrics,
    edge.json, edge_accuracy.npz, the ONNX files) and ``out_dir``/<name>_edge.md/.csv and
    <name>_edge_accuracy_latency.png/.pdf are written, headed by a comment naming ``command`` (the command line
    that reproduces them, without ``fsl-bench edge``) and the commit. ``notify`` receives one line per cell as
    it starts (default: the log, INFO).

    Checked before torch is imported: ``calibration_images`` >= 1 and the readout names (:class:`ConfigError`,
    :class:`~fsl_lsskd.errors.UnknownNameError`), ``out_dir`` writable, the store present (read only:
    :class:`~fsl_lsskd.record.StoreNotFound`) and in the current layout; no finished cell is a
    :class:`ConfigError`; a busy machine :class:`~fsl_lsskd.edge.guard.MachineBusy` unless ``allow_load``
    (before the first export, and again around every latency block). All are :class:`UserError`: exit code 2."""
    from ..edge.guard import check_quiet
    from ..errors import ConfigError
    from ..record import (KIND_EDGE, TAG_BENCHMARK, TAG_CPU_MODEL, TAG_ROW, TAG_UNDER_LOAD, check_no_legacy,
                          git_commit, open_store)
    from ..registry import check_names
    from ..utils import check_writable_dir

    notify = notify or log.info
    readouts = tuple(readouts)
    if calibration_images < 1:
        raise ConfigError(f"--calibration-images {calibration_images}: need at least 1 (e.g. 512)")
    check_names(readouts=readouts)  # an unknown readout: exit 2 naming the valid ones, before any work
    check_writable_dir(out_dir, "--results-dir")
    store = open_store(create=False)
    check_no_legacy(store)
    from ..edge.report import EdgeSettings, edge_report, jsonable
    from ..eval.specs import ReadoutSpec
    from ..report.collect import match_cells
    from ..report.edge_tables import EdgeCell, edge_metrics, write_edge_files
    from .grid import expand
    from .measures import edge_readouts
    from .runner import DataCache

    for r in readouts:
        ReadoutSpec.parse(r)
    matched = match_cells(bench, store)
    cells = [c for c in expand(bench) if c.key in matched]
    if not cells:
        raise ConfigError(f"benchmark {bench.name!r} has no finished cells in the store (of the selected methods/"
                          f"seeds); run `fsl-bench run {bench.where}` first")
    readouts = readouts or tuple(edge_readouts(bench, cells))
    if not readouts:
        raise ConfigError(f"{bench.where}: no readout of the selected cells runs on frozen features; name some "
                          f"with --readouts (e.g. --readouts protonet)")
    settings = EdgeSettings(latency=latency, calibration_images=int(calibration_images), readouts=readouts)
    if not allow_load:
        check_quiet(settings.latency)  # before minutes of exports and scoring
    data = DataCache(bench)
    protocols = bench.eval.protocols()
    measured: List[EdgeCell] = []
    with tempfile.TemporaryDirectory(prefix="fsl-edge-") as tmp:
        work = []
        for i, cell in enumerate(cells):
            rec = matched[cell.key]
            notify(f"edge {cell.label} ({rec.train_id})")
            export_dir = store.fetch_dir(rec.run_id, "export", Path(tmp) / f"{i}-export")
            ds = data.dataset(cell.dataset)
            cell_dir = Path(tmp) / f"{i}-edge"
            report, arrays = edge_report(export_dir, cell_dir, eval_split=data.split(cell.dataset, bench.eval.split),
                                         train_split=data.split(cell.dataset, "train"), protocols=protocols,
                                         mean=ds.mean, std=ds.std, settings=settings, allow_load=allow_load)
            report["cell"] = {"label": cell.label, "row": cell.row, "method": cell.method, "backbone": cell.backbone,
                              "train_data": cell.data_label, "seed": cell.seed, "train_id": rec.train_id,
                              "training_run_id": rec.run_id, "benchmark": bench.name}
            measured.append(EdgeCell(cell.row, cell.method, cell.backbone, cell.data_label, cell.seed, rec.train_id,
                                     report, arrays))
            work.append((rec, cell_dir))
        # everything measured (and the guard passed, or --allow-load): record, then publish
        for (rec, cell_dir), ec in zip(work, measured):
            tags = {TAG_BENCHMARK: bench.name, TAG_ROW: ec.row, TAG_UNDER_LOAD: str(bool(
                ec.report.get("under_load"))).lower(), TAG_CPU_MODEL: ec.report["machine"]["cpu_model"]}
            params = {"edge": {"latency": settings.latency.to_dict(), "calibration_images": settings.calibration_images,
                               "readouts": list(settings.readouts)}, "machine": ec.report["machine"]}
            onnx_files = [p for p in (cell_dir / "backbone.onnx", cell_dir / "backbone_int8.onnx") if p.is_file()]
            run_id = store.write_child_run(rec, KIND_EDGE, f"edge {ec.row}/{ec.backbone}/{ec.data}/seed{ec.seed}",
                                           tags, params=params, metrics=edge_metrics(ec.report),
                                           documents={"edge.json": jsonable(ec.report)},
                                           arrays={"edge_accuracy.npz": ec.arrays}, artifacts=onnx_files)
            ec.report["edge_run_id"] = run_id
    under = any(c.report.get("under_load") for c in measured)
    machine = measured[0].report["machine"]
    lat = settings.latency
    title = f"{bench.name}: edge deployment"
    caption = (f"{bench.description} Inference backbones (auxiliary classifiers and classifier removed) of "
               f"{len(measured)} finished cell(s), as PyTorch eager fp32, ONNX Runtime fp32 and ONNX Runtime int8 "
               f"(static quantisation, QDQ, per-channel, calibrated on {settings.calibration_images} training images "
               f"per cell). Latency on {machine['cpu_model']} ({machine['cores']} cores; torch {machine['torch']}, "
               f"onnxruntime {machine['onnxruntime']}): a fresh process per figure, {lat.warmup} warm-up runs, up to "
               f"{lat.runs} timed runs capped at {lat.max_seconds:g} s, threads {list(lat.threads)} (inter-op 1), "
               f"batch sizes {list(lat.batch_sizes)}; p99 needs >= 100 runs, p90 >= 10. Accuracy on the "
               f"{bench.eval.split} split, {bench.eval.n_episodes} episodes per protocol ({bench.eval.n_query} queries "
               f"per class), readouts {', '.join(settings.readouts)}. "
               + ("**Figures taken UNDER LOAD (--allow-load): the load guard found the machine busy; latency here "
                  "measures the other processes as much as the model.** " if under else
                  "Load guard: quiet before and after every cell's latency block. "))
    header = (f"<!-- generated by `fsl-bench edge {command}` from the MLflow store at commit {git_commit()} "
              f"-->\n")
    paths = write_edge_files(measured, out_dir / f"{bench.name}_edge", title, caption, header)
    return EdgeColumn(markdown=out_dir / f"{bench.name}_edge.md", paths=list(paths), cells=len(measured),
                      under_load=under)
