"""``fsl-bench export``: the timm-format export, and with ``--onnx``/``--int8``/``--measure`` the edge files and
figures of one backbone (``fsl-bench edge`` does the same for every cell of a benchmark). The command parses its
options and calls :func:`fsl_lsskd.edge.export.export_for_edge`."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..bounds import COUNT, COUNT_OR_ZERO
from ..options import dataset_options, parse_protocol, protocol_options


def latency_options(f):
    """``--threads --batch-sizes --runs --warmup --max-seconds --allow-load`` (shared with ``fsl-bench edge``)."""
    f = click.option("--allow-load", is_flag=True,
                     help="Publish latency figures even when the load guard finds the machine busy (they are "
                          "marked under_load: true); without it the command stops with exit code 2.")(f)
    f = click.option("--max-seconds", default=15.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
                     help="Time cap of the timed runs of one figure (engine, batch, threads).")(f)
    f = click.option("--warmup", default=20, show_default=True, type=COUNT_OR_ZERO, help="Untimed runs before timing.")(f)
    f = click.option("--runs", default=300, show_default=True, type=COUNT,
                     help="Timed runs per figure (fewer when --max-seconds ends them; p99 needs >= 100).")(f)
    f = click.option("--batch-sizes", default="1,64", show_default=True, help="Comma list of batch sizes.")(f)
    f = click.option("--threads", default="1,all", show_default=True,
                     help="Comma list of thread counts ('all' = every core this process may use).")(f)
    return f


def latency_settings(threads: str, batch_sizes: str, runs: int, warmup: int, max_seconds: float):
    from .latency import LatencySettings, parse_batch_sizes, parse_threads

    return LatencySettings(threads=parse_threads(threads), batch_sizes=parse_batch_sizes(batch_sizes),
                           warmup=int(warmup), runs=int(runs), max_seconds=float(max_seconds))


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--onnx", "onnx_", is_flag=True, help="Also write OUT/backbone.onnx (fp32, dynamic batch), checked "
              "against PyTorch on real images of the dataset when one is given.")
@click.option("--int8", is_flag=True, help="Also write OUT/backbone_int8.onnx: ONNX Runtime static quantisation "
              "(QDQ, per-channel) calibrated on training images of the dataset (implies --onnx).")
@click.option("--calibration-images", default=512, show_default=True, type=COUNT,
              help="Training images (seeded sample) that calibrate int8.")
@click.option("--measure", default="", help="Comma list: latency (PyTorch/ONNX fp32/int8, per batch size and "
              "threads, with the load guard), accuracy (few-shot accuracy of every engine on the same episodes). "
              "Writes OUT/edge.json (implies --onnx).")
@dataset_options(default_dataset=None)
@click.option("--split", default="test", show_default=True, type=click.Choice(["val", "test"]),
              help="Split scored by --measure accuracy (and the source of parity/latency images).")
@protocol_options()
@click.option("--readouts", default="protonet,logreg_batched", show_default=True, help="Readouts for accuracy.")
@latency_options
def export_cmd(checkpoint: Path, out_dir: Path, onnx_: bool, int8: bool, calibration_images: int, measure: str,
               dataset, archive, data_root, download, split_file, train_per_class, folder_image_size, split, n_way,
               n_shot, n_query, n_episodes, readouts, threads, batch_sizes, runs, warmup, max_seconds, allow_load) -> None:
    """Export a trained backbone (no auxiliary classifiers, no classifier) in timm's state-dict format with a
    report (parameters, FLOPs at batch 1) and a `load_with` snippet: OUT/backbone.safetensors + backbone.json.
    CHECKPOINT is a model directory (OUT/model of `fsl-bench train`), a training checkpoint (last.pt) or an
    export. --onnx/--int8 add ONNX files; --measure adds latency and accuracy figures (OUT/edge.json).

    The dataset (default: the one the backbone was trained on, from its meta) is needed by --int8 (training
    images calibrate it) and --measure accuracy; say where it is with --data NAME=PATH (and
    --train-per-class etc. as in training).

    \b
    Example:
      fsl-bench export runs/x/model --out runs/x/export
      cd runs/x/export && python -c "$(python -c 'import json; print(json.load(open("backbone.json"))["load_with"])')"
      fsl-bench export runs/x/model --out runs/x/edge --int8 --data tiny_imagenet=tiny-imagenet-200.zip \\
          --train-per-class 100
      fsl-bench export runs/x/model --out runs/x/edge --int8 --measure latency,accuracy \\
          --data tiny_imagenet=tiny-imagenet-200.zip --threads 1 --batch-sizes 1
    """
    from .export import export_for_edge

    wanted = [m.strip() for m in measure.split(",") if m.strip()]
    latency = latency_settings(threads, batch_sizes, runs, warmup, max_seconds)
    protocols = parse_protocol(n_way, n_shot, n_query, n_episodes) if "accuracy" in wanted else []
    result = export_for_edge(
        checkpoint, out_dir, onnx=onnx_, int8=int8, measure=wanted, calibration_images=calibration_images,
        dataset=dataset, archive=archive, data_root=data_root, download=download,
        dataset_options={"split_file": split_file, "train_per_class": train_per_class,
                         "folder_image_size": folder_image_size},
        split=split, protocols=protocols, readouts=[r.strip() for r in readouts.split(",") if r.strip()],
        latency=latency, allow_load=allow_load, on_export=lambda report: click.echo(json.dumps(report, indent=2,
                                                                                               default=str)))
    if result.edge is None:
        return
    for line in summary_lines(result.edge):
        click.echo(line)
    click.echo(f"wrote {out_dir / 'edge.json'}")


def summary_lines(rep) -> list:
    """Human-readable lines of an edge report (files, parity, latency at each setting, accuracy differences)."""
    lines = []
    for key, f in rep["files"].items():
        if f.get("bytes") is not None:
            lines.append(f"{key:<10} {f['path']:<22} {f['bytes'] / 1024:10.1f} KiB")
    p = rep["parity"]
    lines.append(f"parity ONNX fp32 vs PyTorch on {p['n_images']} images ({p['images']}): max |diff| "
                 f"{p['max_abs_diff']:.3g} (relative {p['max_rel_diff']:.3g}; {'ok' if p['ok'] else 'FAILED'})")
    if "int8" in rep:
        c = rep["int8"]["calibration"]
        lines.append(f"int8 calibrated on {c['n_images']} {c['dataset']} {c['split']} images (seed {c['seed']})")
    lat = rep.get("latency")
    if lat:
        m = lat["machine"]
        lines.append(f"latency on {m['cpu_model']} ({m['cores']} cores), torch {m['torch']}, onnxruntime "
                     f"{m['onnxruntime']}; guard before: {_guard(lat['guard']['before'])}; after: "
                     f"{_guard(lat['guard']['after'])}")
        for r in lat["records"]:
            lines.append(f"  {r['label']:<20} batch {r['batch']:>3} threads {r['threads']:>2}: p50 {r['p50_ms']:8.3f} "
                         f"p90 {_ms(r['p90_ms'])} p99 {_ms(r['p99_ms'])} ms ({r['n_runs']} runs), load "
                         f"{r['load_ms']:.1f} ms, peak RSS +{r['rss_delta_mb']:.1f} MB"
                         f"{'  UNDER LOAD' if r['under_load'] else ''}")
    acc = rep.get("accuracy")
    if acc:
        for r in acc["records"]:
            diff = (f"  diff vs PyTorch {r['diff_vs_pytorch']:+.2f} ± {r['diff_ci95']:.2f}"
                    if "diff_vs_pytorch" in r else "")
            lines.append(f"  {r['label']:<20} {r['protocol']:<10} {r['readout_label']:<16} {r['accuracy']:6.2f} ± "
                         f"{r['accuracy_ci95']:.2f} %{diff}")
    return lines + [f"note: {n}" for n in rep.get("notes", [])]


def _ms(x) -> str:
    return "     n/a" if x is None or x != x else f"{x:8.3f}"


def _guard(g) -> str:
    share = "n/a" if g.get("busy_share") is None else f"{100 * g['busy_share']:.0f}%"
    return f"{'UNDER LOAD' if g['under_load'] else 'quiet'} (others {share}, probe {g['probe_spread']:.2f}x)"
