"""``fsl-bench export``: the timm-format export, and with ``--onnx``/``--int8``/``--measure`` the edge files and
figures of one backbone (``fsl-bench edge`` does the same for every cell of a benchmark)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..bounds import COUNT, COUNT_OR_ZERO
from ..options import dataset_kwargs, dataset_options, parse_protocol, protocol_options


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
    images calibrate it) and --measure accuracy; pass its --archive or --data-root (and --train-per-class etc.
    as in training).

    \b
    Example:
      fsl-bench export runs/x/model --out runs/x/export
      cd runs/x/export && python -c "$(python -c 'import json; print(json.load(open("backbone.json"))["load_with"])')"
      fsl-bench export runs/x/model --out runs/x/edge --int8 --archive tiny-imagenet-200.zip --train-per-class 100
      fsl-bench export runs/x/model --out runs/x/edge --int8 --measure latency,accuracy \\
          --archive tiny-imagenet-200.zip --threads 1 --batch-sizes 1
    """
    from ..errors import CheckpointError, ConfigError
    from ..utils import check_writable_dir
    from .report import MEASURES

    wanted = [m.strip() for m in measure.split(",") if m.strip()]
    bad = sorted(set(wanted) - set(MEASURES))
    if bad:
        raise ConfigError(f"--measure {measure!r}: unknown {', '.join(bad)}; choose from {', '.join(MEASURES)}")
    latency = latency_settings(threads, batch_sizes, runs, warmup, max_seconds)
    protocols = parse_protocol(n_way, n_shot, n_query, n_episodes) if "accuracy" in wanted else []
    if calibration_images < 1:
        raise ConfigError(f"--calibration-images {calibration_images}: need at least 1 (e.g. 512)")
    if not Path(checkpoint).exists():  # before torch is imported (seconds)
        raise CheckpointError(f"checkpoint {checkpoint} does not exist; pass a model directory (OUT/model of "
                              f"`fsl-bench train`), a training checkpoint (last.pt) or an export")
    check_writable_dir(out_dir, "--out")
    if "latency" in wanted and not allow_load:
        check_quiet(latency)  # fail fast, before minutes of export and scoring
    from ..checkpoint import export_backbone, load_backbone
    from .report import EdgeSettings, edge_report

    settings = EdgeSettings(latency=latency, calibration_images=int(calibration_images),
                            readouts=tuple(r.strip() for r in readouts.split(",") if r.strip()))
    net, meta = load_backbone(checkpoint)
    edge = onnx_ or int8 or bool(wanted)
    needs_data = int8 or "accuracy" in wanted
    train_split = eval_split = None
    ds = None
    if edge and (needs_data or archive is not None or data_root is not None or download):
        name = dataset or meta.get("dataset")
        if not name:
            raise ConfigError("the checkpoint's meta names no dataset: pass --dataset NAME with --archive/--data-root")
        if archive is None and data_root is None and not download:
            why = "--int8 calibrates on its training images" if int8 else "--measure accuracy scores its episodes"
            raise ConfigError(f"{why}: pass the {name} data with --archive FILE or --data-root DIR (and "
                              f"--train-per-class N when the backbone was trained on a subset)")
        from ..data import get_dataset
        from ..data.base import split_counts
        from ..protocol import check_capacity

        ds = get_dataset(name, archive=archive, root=data_root, download=download,
                         **dataset_kwargs(name, split_file, train_per_class, folder_image_size))
        counts = split_counts(ds, split)
        for p in protocols:  # before anything is decoded
            check_capacity(counts, p, ds.class_split()[split], where=f"{name} {split}",
                           fix=f"lower --n-way/--n-shot/--n-query (at most {int(min(counts))} images per class)")
        eval_split = ds.load_split(split)
        if int8:
            train_split = ds.load_split("train")
    extra = {k: meta[k] for k in ("method", "train_id", "dataset", "mean", "std") if k in meta}
    report = export_backbone(net, meta["backbone"], int(meta["image_size"]), out_dir, extra=extra)
    click.echo(json.dumps(report, indent=2, default=str))
    if not edge:
        return
    mean = meta.get("mean") or (ds.mean if ds is not None else None)
    std = meta.get("std") or (ds.std if ds is not None else None)
    rep, _ = edge_report(out_dir, out_dir, eval_split=eval_split, train_split=train_split, protocols=protocols,
                         mean=mean, std=std, settings=settings, measure=wanted, allow_load=allow_load)
    for line in summary_lines(rep):
        click.echo(line)
    click.echo(f"wrote {out_dir / 'edge.json'}")


def check_quiet(settings) -> None:
    """Raise :class:`~fsl_lsskd.edge.guard.MachineBusy` (exit 2 naming --allow-load) when the load guard trips now."""
    from .guard import MachineBusy, busy_message, read_load

    reading = read_load(window_s=settings.window_s, busy_max=settings.busy_max, spread_max=settings.spread_max)
    if reading.under_load:
        raise MachineBusy(busy_message(reading))


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
