"""``fsl-bench train`` and ``fsl-bench export``."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("train")
@click.option("--method", default="ce", show_default=True, help="Registered method (see `fsl-bench ls`).")
@click.option("--backbone", default="conv4", show_default=True, help="Backbone (few-shot standard or timm name).")
@click.option("--dataset", default="tiny_imagenet", show_default=True, help="Registered dataset.")
@click.option("--archive", type=click.Path(dir_okay=False, path_type=Path), help="Official dataset archive.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), help="Extracted dataset folder.")
@click.option("--image-size", default=32, show_default=True, type=int, help="Training resolution.")
@click.option("--epochs", type=int, help="Override the method's epochs.")
@click.option("--batch-size", type=int, help="Override the method's batch size.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--fraction", default=1.0, show_default=True, type=float,
              help="Limited-data protocol: fraction of each base class (0.25/0.5/0.75/1.0).")
@click.option("--heldout", default=0.1, show_default=True, type=float,
              help="Stratified fraction of train images held out for base-class accuracy.")
@click.option("--val-episodes", default=200, show_default=True, type=int,
              help="ProtoNet 5-way val episodes per epoch (0 disables).")
@click.option("--teacher", type=click.Path(dir_okay=False, path_type=Path), help="Teacher checkpoint (KD methods).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=int, help="torch.set_num_threads.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run directory (resumes from OUT/last.pt when present).")
@click.option("--experiment", default="fsl-bench", show_default=True, help="MLflow experiment.")
@click.option("--run-name", help="MLflow run name (default: OUT's name).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Method config override (repeatable).")
@click.option("--no-export", is_flag=True, help="Skip exporting the backbone at the end.")
@click.option("--no-mlflow", is_flag=True, help="Do not log to MLflow.")
@click.option("--no-sync-bn", is_flag=True,
              help="Under torchrun: BatchNorm statistics per process instead of over the global batch.")
def train_cmd(method, backbone, dataset, archive, data_root, image_size, epochs, batch_size, seed, fraction, heldout,
              val_episodes, teacher, device, threads, out_dir, experiment, run_name, settings, no_export,
              no_mlflow, no_sync_bn) -> None:
    """Train a method on the base classes of a dataset; checkpoints each epoch, logs to MLflow
    (MLFLOW_TRACKING_URI, default sqlite ./mlflow.db) and exports the backbone to OUT/export.

    Several processes (torchrun, DistributedDataParallel) train one run: --batch-size is the global batch
    (a multiple of the number of processes), rank 0 writes the checkpoint, logs and exports.

    \b
    Example:
      fsl-bench train --method ce --backbone conv4 --dataset tiny_imagenet \\
        --archive ../shared/data/tiny-imagenet-200-sub100.zip --image-size 32 --epochs 3 --seed 0 \\
        --out runs/x --set lr=0.1
      torchrun --standalone --nproc_per_node 2 $(which fsl-bench) train --method pskd \\
        --dataset tiny_imagenet --archive ../shared/data/tiny-imagenet-200-sub100.zip --batch-size 128 \\
        --out runs/pskd-2proc
    """
    from .config import TrainConfig, parse_set_options
    from .engine import train

    cfg = TrainConfig(method=method, backbone=backbone, dataset=dataset, archive=str(archive) if archive else None,
                      data_root=str(data_root) if data_root else None, image_size=image_size, seed=seed,
                      fraction=fraction, epochs=epochs, batch_size=batch_size,
                      method_overrides=parse_set_options(settings), device=device, out_dir=str(out_dir),
                      heldout=heldout, val_episodes=val_episodes, experiment=experiment, run_name=run_name,
                      teacher=str(teacher) if teacher else None, export=not no_export, num_threads=threads,
                      mlflow=not no_mlflow, sync_bn=not no_sync_bn)
    from ..bench.validate import validate_train

    validate_train(cfg)  # names, --out, val split capacity: fail before decoding data or opening a run
    from ..utils import EpochBar

    bar = EpochBar()
    try:
        res = train(cfg, on_epoch=bar)
    finally:
        bar.close()
    if res.rank != 0:  # one report per run, not per process
        return
    for h in res.history[res.resumed_from_epoch:] if res.resumed_from_epoch else res.history:
        click.echo(" ".join([f"epoch {int(h['epoch']) + 1}"] +
                            [f"{k}={v:.4g}" for k, v in h.items() if k != "epoch"]))
    click.echo(f"checkpoint: {res.checkpoint}")
    if res.backbone:
        click.echo(f"backbone:   {res.backbone}")
    if res.run_id:
        click.echo(f"mlflow run: {res.run_id}")


@click.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--latency-runs", default=30, show_default=True, type=int, help="Runs for the median latency.")
def export_cmd(checkpoint: Path, out_dir: Path, latency_runs: int) -> None:
    """Export a checkpoint's backbone (no auxiliary heads, no classifier) in timm's format with a report
    (parameters, FLOPs at batch 1, median CPU latency at batch 1): OUT/backbone.safetensors + backbone.json.

    \b
    Example:
      fsl-bench export runs/x/last.pt --out runs/x/export
      python -c "import timm; timm.create_model('conv4', num_classes=0, checkpoint_path='runs/x/export/backbone.safetensors')"
    """
    from .export import export_checkpoint

    report = export_checkpoint(checkpoint, out_dir, latency_runs=latency_runs)
    click.echo(json.dumps(report, indent=2))
