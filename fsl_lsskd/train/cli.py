"""``fsl-bench train``."""
from __future__ import annotations

from pathlib import Path

import click

from ..bounds import COUNT, SEED, SIZE
from ..options import dataset_kwargs, dataset_options, parse_protocol, protocol_options


@click.command("train")
@click.option("--method", default="ce", show_default=True, help="Registered method (see `fsl-bench ls`).")
@click.option("--backbone", default="conv4", show_default=True, help="Backbone (few-shot standard or timm name).")
@dataset_options(default_dataset="tiny_imagenet")
@click.option("--image-size", default=32, show_default=True, type=SIZE, help="Training resolution.")
@click.option("--epochs", type=COUNT, help="Override the method's epochs.")
@click.option("--batch-size", type=COUNT, help="Override the method's batch size.")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--fraction", default=1.0, show_default=True, type=float,
              help="Limited-data protocol: share of every base class (0.25/0.5/0.75/1.0).")
@click.option("--heldout", default=0.1, show_default=True, type=float,
              help="Stratified share of the train images held out for base-class accuracy.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Autocast precision (fp16 uses a gradient scaler).")
@protocol_options(prefix="val", default_shot="5", default_episodes=200,
                  help_episodes="Validation episodes (ProtoNet on the val split) per epoch; 0 disables.",
                  zero_disables=True)
@click.option("--teacher", type=click.Path(path_type=Path), help="Teacher model directory (KD methods): "
              "<teacher out>/model.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=COUNT, help="torch.set_num_threads.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run directory: resume state while training (resumes from OUT/last.pt), then OUT/model and "
                   "OUT/export.")
@click.option("--experiment", default="fsl-bench/train", show_default=True, help="MLflow experiment.")
@click.option("--run-name", help="MLflow run name (default: OUT's name).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Method config override (repeatable).")
@click.option("--no-export", is_flag=True, help="Skip exporting the backbone at the end.")
@click.option("--no-mlflow", is_flag=True, help="Do not log to MLflow.")
@click.option("--no-sync-bn", is_flag=True,
              help="Under torchrun: BatchNorm statistics per process instead of over the global batch.")
def train_cmd(method, backbone, dataset, archive, data_root, download, split_file, train_per_class,
              folder_image_size, image_size, epochs, batch_size, seed, fraction, heldout, precision, val_n_way,
              val_n_shot, val_n_query, val_n_episodes, teacher, device, threads, out_dir, experiment, run_name,
              settings, no_export, no_mlflow, no_sync_bn) -> None:
    """Train a method on the base classes of a dataset; writes the resume state each epoch, logs to MLflow
    (MLFLOW_TRACKING_URI, default sqlite ./mlflow.db) and, when finished, OUT/model (the trained method) and
    OUT/export (the inference backbone).

    Several processes (torchrun, DistributedDataParallel) train one run: --batch-size is the global batch
    (a multiple of the number of processes), rank 0 writes the files, logs and exports.

    \b
    Example:
      fsl-bench train --method ce --backbone conv4 --data tiny_imagenet=tiny-imagenet-200.zip \\
        --image-size 32 --epochs 3 --seed 0 --out runs/x --set lr=0.1
      fsl-bench train --method ce --data image_folder=my_images --split-file split.json \\
        --out runs/mine
      torchrun --standalone --nproc_per_node 2 $(which fsl-bench) train --method pskd \\
        --data tiny_imagenet=tiny-imagenet-200.zip --batch-size 128 --out runs/pskd-2proc
    """
    from .checks import check_train_config
    from .config import TrainConfig, parse_set_options

    validation = parse_protocol(val_n_way, val_n_shot, val_n_query, val_n_episodes, "val", allow_zero=True)
    options = dataset_kwargs(dataset, split_file, train_per_class, folder_image_size)
    cfg = TrainConfig(method=method, backbone=backbone, dataset=dataset, image_size=image_size, seed=seed,
                      fraction=fraction, heldout=heldout, epochs=epochs, batch_size=batch_size,
                      method_overrides=parse_set_options(settings), precision=precision,
                      teacher=str(teacher) if teacher else None, dataset_options=options,
                      archive=str(archive) if archive else None, data_root=str(data_root) if data_root else None,
                      download=download, device=device, out_dir=str(out_dir),
                      validation=validation[0] if validation else None,
                      experiment=experiment, run_name=run_name, export=not no_export, num_threads=threads,
                      mlflow=not no_mlflow, sync_bn=not no_sync_bn)
    check_train_config(cfg)  # names, data, sizes, --out, val split capacity: before decoding data or opening a run
    from .engine import train  # torch: after the checks, which answer a typo or a missing archive at once

    res = train(cfg)  # shows the epochs and batches (bars on a terminal, timestamped lines in a log)
    if res.rank != 0:  # one report per run, not per process
        return
    if res.already_finished:
        click.echo(f"{out_dir} already holds this finished run (training id {res.train_id}); nothing to train")
    for h in res.history[res.resumed_from_epoch:] if not res.already_finished else []:
        click.echo(" ".join([f"epoch {int(h['epoch'])}"] + [f"{k}={v:.4g}" for k, v in h.items() if k != "epoch"]))
    click.echo(f"training id: {res.train_id}")
    if res.model_dir:
        click.echo(f"model:       {res.model_dir}")
    if res.export_dir:
        click.echo(f"backbone:    {res.export_dir / 'backbone.safetensors'}")
    if res.run_id:
        click.echo(f"mlflow run:  {res.run_id}")
