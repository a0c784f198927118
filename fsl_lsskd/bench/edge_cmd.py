"""``fsl-bench edge``: the edge-deployment column of a benchmark. The command parses its options and calls
:func:`fsl_lsskd.bench.edge_column.edge_column`, which finds the cells in the store, measures each
(:mod:`fsl_lsskd.edge`), records and publishes."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..bounds import COUNT
from ..edge.cli import latency_options, latency_settings
from ..options import data_option, renamed_option


@click.command("edge")
@click.argument("benchmark", type=click.Path(dir_okay=False, path_type=Path))
@renamed_option("--results-dir", "out_dir", "--out", type=click.Path(file_okay=False, path_type=Path),
                default=Path("results"), show_default=True,
                help="Directory for <benchmark>_edge.md/.csv and the accuracy-latency figure.")
@click.option("--methods", help="Comma-separated subset of the file's methods (or variants).")
@click.option("--seeds", help="Comma-separated subset of the file's seeds.")
@data_option("Where dataset NAME is on this machine (repeatable): NAME=FILE for its official archive, NAME=DIR "
             "for a directory holding it.")
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
    benchmark's main protocols, paired per episode with PyTorch. Publishes RESULTS_DIR/<name>_edge.md/.csv
    and RESULTS_DIR/<name>_edge_accuracy_latency.png/.pdf and records a child run per cell (metrics, edge.json,
    ONNX files).

    A load guard measures how busy the machine is before and after timing (and during each figure); when it
    trips the command stops with exit code 2 unless --allow-load (figures then marked under_load).

    \b
    Example:
      fsl-bench edge benchmarks/cpu_tiny_imagenet.yaml --data tiny_imagenet=tiny-imagenet-200.zip
      fsl-bench edge benchmarks/smoke.yaml --threads 1 --batch-sizes 1 --runs 200
    """
    from .commands import load_filtered
    from .edge_column import edge_column

    # the options and the benchmark file first, then the store: a mistake is answered before torch is imported
    latency = latency_settings(threads, batch_sizes, runs, warmup, max_seconds)
    readout_names = tuple(r.strip() for r in (readouts or "").split(",") if r.strip())
    bench = load_filtered(benchmark, methods, None, None, seeds, data_paths)
    opts = [Path(benchmark).as_posix()] + [f"--{k} {v}" for k, v in (
        ("methods", methods), ("seeds", seeds), ("threads", threads), ("batch-sizes", batch_sizes), ("runs", runs),
        ("warmup", warmup), ("max-seconds", max_seconds), ("calibration-images", calibration_images),
        ("readouts", readouts)) if v] + (["--allow-load"] if allow_load else [])
    column = edge_column(bench, out_dir, latency, calibration_images, readout_names, allow_load=allow_load,
                         command=" ".join(opts), notify=lambda line: click.echo(line, err=True))
    click.echo(column.markdown.read_text())
    for p in column.paths:
        click.echo(f"wrote {p}")
    click.echo(json.dumps({"under_load": column.under_load, "cells": column.cells}))
