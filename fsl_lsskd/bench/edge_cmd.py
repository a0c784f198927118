"""``fsl-bench edge``: the edge-deployment column of a benchmark (the measuring is :mod:`fsl_lsskd.edge`; this
module finds the cells in the store, runs it per cell, records and publishes)."""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import List

import click

from ..bounds import COUNT
from ..edge.cli import check_quiet, latency_options, latency_settings

log = logging.getLogger(__name__)


@click.command("edge")
@click.argument("benchmark", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True, help="Directory for <benchmark>_edge.md/.csv and the accuracy-latency figure.")
@click.option("--methods", help="Comma-separated subset of the file's methods (or variants).")
@click.option("--seeds", help="Comma-separated subset of the file's seeds.")
@click.option("--data", "data_paths", multiple=True, metavar="NAME=PATH",
              help="Where dataset NAME's archive or folder is on this machine (repeatable).")
@click.option("--calibration-images", default=512, show_default=True, type=COUNT,
              help="Training images (seeded sample of the cell's training split) that calibrate int8.")
@click.option("--readouts", default=None,
              help="Readouts scored on the benchmark's main protocols for every engine (comma-separated names) "
                   "[default: the cells' main readouts on their training data that run on frozen features, "
                   "e.g. protonet,logreg_batched].")
@latency_options
def edge(benchmark: Path, out_dir: Path, methods, seeds, data_paths, calibration_images: int, readouts: str,
         threads: str, batch_sizes: str, runs: int, warmup: int, max_seconds: float, allow_load: bool) -> None:
    """The edge column of a benchmark: for every finished cell in the MLflow store, the inference backbone
    (auxiliary classifiers and classifier removed) as ONNX fp32 and int8 (ONNX Runtime static quantisation
    calibrated on training images), checked against PyTorch; latency (p50/p90/p99), load time and peak memory of
    PyTorch eager, ONNX Runtime fp32 and int8 per batch size and thread count; few-shot accuracy of each on the
    benchmark's main protocols, paired per episode with PyTorch. Publishes OUT/<name>_edge.md/.csv and
    OUT/<name>_edge_accuracy_latency.png/.pdf and records a child run per cell (metrics, edge.json, ONNX files).

    A load guard measures how busy the machine is before and after timing (and during each figure); when it
    trips the command stops with exit code 2 unless --allow-load (figures then marked under_load).

    \b
    Example:
      fsl-bench edge benchmarks/cpu_tiny_imagenet.yaml --data tiny_imagenet=tiny-imagenet-200.zip
      fsl-bench edge benchmarks/smoke.yaml --threads 1 --batch-sizes 1 --runs 200
    """
    from ..errors import ConfigError
    from ..record import (KIND_EDGE, TAG_BENCHMARK, TAG_CPU_MODEL, TAG_ROW, TAG_UNDER_LOAD, check_no_legacy,
                          git_commit, open_store)
    from ..registry import check_names
    from ..utils import check_writable_dir
    from .commands import load_filtered

    # the options, the benchmark file and the store first: a mistake is answered before torch is imported
    latency = latency_settings(threads, batch_sizes, runs, warmup, max_seconds)
    if calibration_images < 1:
        raise ConfigError(f"--calibration-images {calibration_images}: need at least 1 (e.g. 512)")
    readout_names = tuple(r.strip() for r in (readouts or "").split(",") if r.strip())
    check_names(readouts=readout_names)  # an unknown readout: exit 2 naming the valid ones, before any work
    bench = load_filtered(benchmark, methods, None, None, seeds, data_paths)
    check_writable_dir(out_dir, "--out")
    store = open_store(create=False)
    check_no_legacy(store)
    from ..edge.report import EdgeSettings, edge_report, jsonable
    from ..eval.scoring import ReadoutSpec
    from .collect import match_cells
    from .edge_tables import EdgeCell, edge_metrics, write_edge_files
    from .grid import expand
    from .measures import edge_readouts
    from .runner import DataCache

    for r in readout_names:
        ReadoutSpec.parse(r)
    matched = match_cells(bench, store)
    cells = [c for c in expand(bench) if c.key in matched]
    if not cells:
        raise ConfigError(f"benchmark {bench.name!r} has no finished cells in the store (of the selected methods/"
                          f"seeds); run `fsl-bench run {bench.where}` first")
    readout_names = readout_names or edge_readouts(bench, cells)
    if not readout_names:
        raise ConfigError(f"{bench.where}: no readout of the selected cells runs on frozen features; name some "
                          f"with --readouts (e.g. --readouts protonet)")
    settings = EdgeSettings(latency=latency, calibration_images=int(calibration_images), readouts=readout_names)
    if not allow_load:
        check_quiet(settings.latency)  # before minutes of exports and scoring
    data = DataCache(bench)
    protocols = bench.eval.protocols()
    measured: List[EdgeCell] = []
    with tempfile.TemporaryDirectory(prefix="fsl-edge-") as tmp:
        work = []
        for i, cell in enumerate(cells):
            rec = matched[cell.key]
            click.echo(f"edge {cell.label} ({rec.train_id})", err=True)
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
    opts = [Path(benchmark).as_posix()] + [f"--{k} {v}" for k, v in (
        ("methods", methods), ("seeds", seeds), ("threads", threads), ("batch-sizes", batch_sizes), ("runs", runs),
        ("warmup", warmup), ("max-seconds", max_seconds), ("calibration-images", calibration_images),
        ("readouts", readouts)) if v] + (["--allow-load"] if allow_load else [])
    header = (f"<!-- generated by `fsl-bench edge {' '.join(opts)}` from the MLflow store at commit {git_commit()} "
              f"-->\n")
    paths = write_edge_files(measured, out_dir / f"{bench.name}_edge", title, caption, header)
    click.echo((out_dir / f"{bench.name}_edge.md").read_text())
    for p in paths:
        click.echo(f"wrote {p}")
    click.echo(json.dumps({"under_load": under, "cells": len(measured)}))
