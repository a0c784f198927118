"""``fsl-bench export`` and ``fsl-bench edge``."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
def export_cmd(checkpoint: Path, out_dir: Path) -> None:
    """Export a trained backbone (no auxiliary classifiers, no classifier) in timm's state-dict format with a
    report (parameters, FLOPs at batch 1) and a `load_with` snippet: OUT/backbone.safetensors + backbone.json.
    CHECKPOINT is a model directory (OUT/model of `fsl-bench train`), a training checkpoint (last.pt) or an
    export.

    \b
    Example:
      fsl-bench export runs/x/model --out runs/x/export
      cd runs/x/export && python -c "$(python -c 'import json; print(json.load(open("backbone.json"))["load_with"])')"
    """
    from ..checkpoint import export_backbone, load_backbone

    net, meta = load_backbone(checkpoint)
    extra = {k: meta[k] for k in ("method", "train_id", "dataset", "mean", "std") if k in meta}
    report = export_backbone(net, meta["backbone"], int(meta["image_size"]), out_dir, extra=extra)
    click.echo(json.dumps(report, indent=2, default=str))
