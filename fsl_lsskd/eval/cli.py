"""``fsl-bench evaluate`` and ``fsl-bench bench eval`` (heavy imports inside the commands)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import click

from ..bounds import COUNT, SEED, SIZE
from ..errors import ConfigError
from ..options import dataset_kwargs, dataset_options, int_list, parse_protocol, protocol_options


def _names(text: str):
    return [s.strip() for s in text.split(",") if s.strip()]


def prepare(backbone: Optional[str], checkpoint: Optional[Path], untrained: bool, dataset: str, data: dict,
            split: str, image_size: Optional[int], seed: int = 0, protocols: Sequence = ()):
    """(model, meta, split data, dataset object) for the CLI commands. The options, the checkpoint's path, the
    data's location and every protocol against the split's per-class counts are checked before torch is imported
    and before anything is decoded or cached."""
    from ..data import get_dataset
    from ..data.base import split_counts
    from ..protocol import check_capacity

    if checkpoint is None and not untrained:
        raise ConfigError("pass --checkpoint PATH (exported backbone, model directory or training checkpoint) or "
                          "--untrained")
    if checkpoint is not None and untrained:
        raise ConfigError("--checkpoint and --untrained are exclusive; pass one")
    if untrained and not backbone:
        raise ConfigError("--untrained needs --backbone NAME")
    if checkpoint is not None and not Path(checkpoint).exists():
        raise ConfigError(f"--checkpoint {checkpoint} does not exist; pass an exported backbone, a model directory "
                          f"or a training checkpoint, or use --untrained")
    ds = get_dataset(dataset, **data)
    counts = split_counts(ds, split)
    for p in protocols:
        check_capacity(counts, p, ds.class_split()[split], where=f"{dataset} {split}",
                       fix=f"lower --n-way/--n-shot/--n-query (at most {int(min(counts))} images per class in all)")
    import torch

    from ..backbones import check_image_size
    from ..checkpoint import load_backbone

    if untrained:
        check_image_size(backbone, int(image_size or ds.image_size))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # reproducible random init, global RNG untouched
            model, meta = load_backbone(None, backbone, image_size)
    else:
        model, meta = load_backbone(checkpoint, backbone, image_size)
        if image_size:  # a size other than the one it was trained at: the backbone must take it
            check_image_size(meta["backbone"], int(image_size))
    return model, meta, ds.load_split(split), ds


def write_outputs(out: Path, results, header: dict) -> None:
    import numpy as np

    from ..utils import atomic_path, atomic_write_text, make_dir

    make_dir(out)
    summary = {**header, "results": [r.summary() for r in results]}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    with atomic_path(out / "accuracies.npz", suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{r.key: r.accuracy for r in results})
    lines = ["episode," + ",".join(r.key for r in results)]
    n = max(r.n_episodes for r in results)
    for i in range(n):
        lines.append(f"{i}," + ",".join(f"{r.accuracy[i]:.4f}" if i < r.n_episodes else "" for r in results))
    atomic_write_text(out / "accuracies.csv", "\n".join(lines) + "\n")


@click.command("evaluate")
@click.option("--backbone", help="Backbone name (resnet12, conv4, any timm CNN). Default: the checkpoint's meta.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="An exported backbone (backbone.safetensors "
              "or its directory), a model directory (fsl-bench train's OUT/model), a training checkpoint (last.pt) "
              "or a state dict (.pth/.safetensors).")
@click.option("--untrained", is_flag=True, help="Randomly initialised backbone (seeded by --seed).")
@dataset_options(default_dataset=None, required=True)
@click.option("--split", default="test", show_default=True, type=click.Choice(["val", "test"]))
@click.option("--image-size", type=SIZE, help="Input size of the backbone (default: checkpoint meta, else the "
              "dataset's).")
@protocol_options()
@click.option("--readouts", default="protonet,logreg_batched", show_default=True,
              help="Comma list of readouts (`fsl-bench ls`): protonet, logreg_batched, logreg, maml_finetune, ...")
@click.option("--batch-size", default=256, show_default=True, type=COUNT, help="Images per forward pass.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Init seed for --untrained.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--no-cache", is_flag=True, help="Do not read/write the feature cache.")
@click.option("--out", type=click.Path(path_type=Path), help="Write summary.json, accuracies.npz/.csv here.")
def evaluate(backbone, checkpoint, untrained, dataset, archive, data_root, download, split_file,
             train_per_class, folder_image_size, split, image_size, n_way, n_shot, n_query, n_episodes, readouts,
             batch_size, seed, device, no_cache, out):
    """Few-shot evaluation of a backbone (RFS protocol) on the published episodes: mean accuracy ± 95% CI
    (t-distribution over episodes) per protocol and readout, with calibration (ECE, NLL, Brier) for
    probabilistic readouts.

    \b
    Example:
      fsl-bench evaluate --backbone resnet12 --untrained --dataset tiny_imagenet \\
          --archive tiny-imagenet-200.zip --image-size 32 --n-shot 1,5 --readouts protonet,logreg --out eval
      fsl-bench evaluate --checkpoint runs/ce/export --dataset cifar_fs --archive cifar-100-python.tar.gz
      fsl-bench evaluate --checkpoint runs/mine/export --dataset image_folder --data-root my_images \\
          --split-file split.json
    """
    import time

    from ..registry import check_names
    from ..utils import check_writable_dir
    from .episodes import check_episode_memory

    protocols = parse_protocol(n_way, n_shot, n_query, n_episodes)
    check_names(readouts=_names(readouts), datasets=[dataset])  # a typo fails at once, nothing imported
    # probabilities counted for every readout (conservative): knowing which readouts are probabilistic would
    # import them, and this check runs before any heavy import
    check_episode_memory(protocols, "--n-episodes", probabilities=True)
    if out is not None:
        check_writable_dir(out, "--out")
    data = {"archive": archive, "root": data_root, "download": download,
            **dataset_kwargs(dataset, split_file, train_per_class, folder_image_size)}
    t0 = time.perf_counter()
    model, meta, split_data, ds = prepare(backbone, checkpoint, untrained, dataset, data, split, image_size, seed,
                                          protocols)
    from ..inputs import InputSpec
    from .scoring import ReadoutSpec, evaluate as run_eval, needs_method

    specs = [ReadoutSpec.parse(r) for r in _names(readouts)]
    if meta.get("dataset") == dataset:  # trained on this dataset: a WARNING when scored images are training images
        from ..data.duplicates import check_leakage

        check_leakage(ds, split, "train", decode=False)  # when both splits are cached (nothing decoded for it)
    # the backbone's input contract: its own metadata, else the dataset's statistics at the split's size
    spec = InputSpec.from_meta(meta, InputSpec(ds.mean, ds.std, split_data.image_size), image_size=image_size)
    size = int(spec.image_size)
    method = None
    whole = [s.name for s in specs if needs_method(s.name)]
    if checkpoint is not None and whole:
        def method():
            return _load_whole_method(checkpoint, device, whole)
    results = run_eval(model, split_data, protocols=protocols, readouts=specs, mean=spec.mean, std=spec.std,
                       image_size=size, batch_size=batch_size, device=device, cache=not no_cache, method=method)
    src = f"untrained (seed {seed})" if untrained else str(checkpoint)
    click.echo(f"{meta['backbone']} [{src}] on {dataset} {split}: {split_data.num_classes} classes, {len(split_data)} "
               f"images, {size}x{size}; episodes: {', '.join(sorted({r.episodes_source for r in results}))}")
    for r in results:
        cal = f"  ECE {r.ece:.2f}% NLL {r.nll.mean():.3f} Brier {r.brier.mean():.3f}" if r.nll is not None else ""
        click.echo(f"  {r.protocol.label:<14} {r.label:<28} {r.mean:6.2f} ± {r.ci95:.2f} %  ({r.n_episodes} episodes, "
                   f"{r.protocol.n_query} queries/class, {r.seconds:.1f}s){cal}")
    click.echo(f"total {time.perf_counter() - t0:.1f}s")
    if out is not None:
        write_outputs(Path(out), results, {"backbone": meta["backbone"], "checkpoint": src, "dataset": dataset,
                                           "split": split, "image_size": size})
        click.echo(f"wrote {out}/summary.json, accuracies.npz, accuracies.csv")


def _load_whole_method(checkpoint: Path, device: str, readouts: Sequence[str]):
    """The trained method behind ``checkpoint`` (a model directory or ``last.pt``) for readouts that need more
    than the backbone; an exported backbone raises :class:`ConfigError` naming the file to pass instead."""
    from ..checkpoint import load_method
    from ..errors import CheckpointError, UnsafeCheckpointError

    try:
        return load_method(checkpoint, device)
    except UnsafeCheckpointError:
        raise  # its own message: why the file was refused and what is safe to open
    except CheckpointError as exc:
        beside = checkpoint.with_suffix(".model") if checkpoint.suffix == ".safetensors" else None
        hint = (f"pass --checkpoint {beside} (the model directory published beside it)" if beside is not None
                and beside.is_dir() else "pass the cell's model directory (RUN/model, or <stem>.model in a "
                "published results/weights/<benchmark>/)")
        raise ConfigError(f"{', '.join(readouts)} needs the whole trained method (backbone and head), not an "
                          f"exported backbone: {hint}") from exc


@click.command("eval")
@click.option("--backbone", default="conv4", show_default=True)
@click.option("--checkpoint", type=click.Path(path_type=Path))
@dataset_options(default_dataset="tiny_imagenet")
@click.option("--split", default="test", show_default=True, type=click.Choice(["val", "test"]))
@click.option("--image-size", default=32, show_default=True, type=SIZE)
@click.option("--n-shot", default="1,5", show_default=True)
@click.option("--n-episodes", default=2000, show_default=True, type=COUNT)
@click.option("--seed", default=0, show_default=True, type=SEED, help="Init seed of the untrained backbone.")
@click.option("--threads", type=COUNT, help="torch.set_num_threads (default: torch's).")
@click.option("--out", type=click.Path(path_type=Path), help="Write the report as JSON here.")
def bench_eval(backbone, checkpoint, dataset, archive, data_root, download, split_file, train_per_class,
               folder_image_size, split, image_size, n_shot, n_episodes, seed, threads, out):
    """Speed of the evaluation against the per-episode learn2learn + scikit-learn pipeline, on identical
    episodes. Checks identical ProtoNet / scikit-learn accuracies and batched logreg within 0.5 pt; prints the
    speed ratios.

    \b
    Example:
      fsl-bench bench eval --backbone conv4 --dataset tiny_imagenet \\
          --archive tiny-imagenet-200-sub100.zip --split test --image-size 32 --n-episodes 2000
    """
    import torch

    from ..errors import FslError
    from .bench import run_benchmark

    from ..protocol import protocol_grid
    from .episodes import check_episode_memory

    check_episode_memory(protocol_grid(5, int_list(n_shot, "--n-shot"), 15, n_episodes), "--n-episodes")
    if threads:
        torch.set_num_threads(threads)
    data = {"archive": archive, "root": data_root, "download": download,
            **dataset_kwargs(dataset, split_file, train_per_class, folder_image_size)}
    model, meta, split_data, ds = prepare(backbone, checkpoint, checkpoint is None, dataset, data, split,
                                          image_size, seed)
    click.echo(f"bench eval: {meta['backbone']} {'untrained' if checkpoint is None else checkpoint} on {dataset} "
               f"{split} ({len(split_data)} images, {image_size}x{image_size}), {n_episodes} episodes, "
               f"torch threads {torch.get_num_threads()}")
    rep = run_benchmark(model, split_data, ds.mean, ds.std, image_size, int_list(n_shot, "--n-shot"), n_episodes)
    click.echo(f"ours: feature extraction {rep['extract']['seconds']:.2f}s for {int(rep['extract']['images'])} images")
    failures = []
    for key, r in rep.items():
        if key == "extract":
            continue
        click.echo(f"[{key}, {int(r['episodes'])} episodes]")
        click.echo(f"  baseline: load+forward {r['base_load_forward_s']:.2f}s, protonet {r['base_protonet_s']:.2f}s, "
                   f"sklearn logreg {r['base_logreg_sklearn_s']:.2f}s")
        click.echo(f"  ours:     protonet {r['ours_protonet_s']:.3f}s, logreg_batched {r['ours_logreg_batched_s']:.3f}s "
                   f"(sklearn loop on cached features {r['ours_logreg_sklearn_loop_s']:.2f}s)")
        click.echo(f"  acc protonet ours {100 * r['acc_ours_protonet']:.3f} / baseline {100 * r['acc_base_protonet']:.3f} "
                   f"(episodes differing: {int(r['protonet_episodes_differing'])})")
        click.echo(f"  acc logreg sklearn ours-loop {100 * r['acc_ours_logreg']:.3f} / baseline "
                   f"{100 * r['acc_base_logreg']:.3f} (differing: {int(r['logreg_sklearn_episodes_differing'])}); "
                   f"batched {100 * r['acc_ours_logreg_batched']:.3f}")
        click.echo(f"  SPEEDUP protonet pipeline {r['speedup_protonet_pipeline']:.1f}x; logreg pipeline "
                   f"{r['speedup_logreg_pipeline']:.1f}x; logreg readout only {r['speedup_logreg_readout_only']:.1f}x")
        if r["protonet_episodes_differing"] or r["logreg_sklearn_episodes_differing"]:
            failures.append(f"{key}: per-episode accuracies differ between ours and the baseline")
        if abs(r["acc_ours_logreg_batched"] - r["acc_ours_logreg"]) > 0.005:
            failures.append(f"{key}: batched logreg differs from sklearn by more than 0.5 pt")
    if out is not None:
        from ..utils import atomic_write_text

        atomic_write_text(Path(out), json.dumps(rep, indent=2) + "\n")
    if failures:
        raise FslError("; ".join(failures))
