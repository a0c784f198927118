"""``fsl-bench evaluate`` and ``fsl-bench bench eval`` (heavy imports inside the commands)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import click

from ..errors import ConfigError


def _ints(text: str, what: str) -> List[int]:
    try:
        vals = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--{what} must be comma-separated integers like 1,5 (got {text!r})") from None
    if not vals or min(vals) < 1:
        raise ConfigError(f"--{what} needs positive integers like 1,5 (got {text!r})")
    return vals


def _names(text: str) -> List[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def prepare(backbone: Optional[str], checkpoint: Optional[Path], untrained: bool, dataset: str,
            archive: Optional[Path], root: Optional[Path], split: str, image_size: Optional[int], seed: int = 0,
            protocols: Sequence[Tuple[int, int, int]] = ()):
    """(model, meta, split data, dataset object) for the CLI commands. Each ``(n_way, n_shot, n_query)`` of
    ``protocols`` is checked against the split's per-class counts before anything is decoded or cached."""
    import torch

    from ..data import get_dataset
    from ._checkpoint import load_backbone
    from ._episodes import check_protocol

    if checkpoint is None and not untrained:
        raise ConfigError("pass --checkpoint PATH (exported backbone or training checkpoint) or --untrained")
    if checkpoint is not None and untrained:
        raise ConfigError("--checkpoint and --untrained are exclusive; pass one")
    if untrained:
        if not backbone:
            raise ConfigError("--untrained needs --backbone NAME")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # reproducible random init, global RNG untouched
            model, meta = load_backbone(backbone, None, image_size)
    else:
        model, meta = load_backbone(backbone, checkpoint, image_size)
    ds = get_dataset(dataset, root=root, archive=archive)
    if protocols and hasattr(ds, "split_counts"):
        counts = ds.split_counts(split)
        for n_way, n_shot, n_query in protocols:
            check_protocol(counts, n_way, n_shot, n_query, ds.class_split()[split], where=f"{dataset} {split}")
    data = ds.load_split(split)
    return model, meta, data, ds


def write_outputs(out: Path, results, header: dict) -> None:
    import numpy as np

    from ..utils import atomic_path, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    summary = {**header, "results": [r.summary() for r in results]}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    with atomic_path(out / "accuracies.npz", suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{r.key: r.accuracies for r in results})
    lines = ["episode," + ",".join(r.key for r in results)]
    n = max(r.n_episodes for r in results)
    for i in range(n):
        lines.append(f"{i}," + ",".join(f"{r.accuracies[i]:.6f}" if i < r.n_episodes else "" for r in results))
    atomic_write_text(out / "accuracies.csv", "\n".join(lines) + "\n")


@click.command("evaluate")
@click.option("--backbone", help="Backbone name (resnet12, conv4, resnet18_cifar, any timm CNN). "
              "Default: the checkpoint's meta.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Exported backbone (.safetensors/.pth "
              "+ .json), a {'backbone': state_dict} file, or a training checkpoint.")
@click.option("--untrained", is_flag=True, help="Randomly initialised backbone (seeded by --seed).")
@click.option("--dataset", required=True, help="Registered dataset (cifar_fs, tiny_imagenet, image_folder).")
@click.option("--archive", type=click.Path(path_type=Path), help="Official archive of the dataset.")
@click.option("--root", type=click.Path(path_type=Path), help="Extracted dataset root (instead of --archive).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["val", "test"]))
@click.option("--image-size", type=int, help="Input size of the backbone (default: checkpoint meta, else the "
              "dataset's).")
@click.option("--shots", default="1,5", show_default=True)
@click.option("--way", default=5, show_default=True)
@click.option("--queries", default=15, show_default=True)
@click.option("--episodes", default=2000, show_default=True)
@click.option("--classifiers", default="protonet,logreg_batched", show_default=True,
              help="Comma list of evaluators (fsl-bench ls): protonet, logreg_batched, logreg.")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Init seed for --untrained.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--no-cache", is_flag=True, help="Do not read/write the feature cache.")
@click.option("--out", type=click.Path(path_type=Path), help="Write summary.json, accuracies.npz/.csv here.")
def evaluate(backbone, checkpoint, untrained, dataset, archive, root, split, image_size, shots, way, queries,
             episodes, classifiers, batch_size, seed, device, no_cache, out):
    """Episodic few-shot evaluation of a frozen backbone (RFS protocol) on the standard episodes.

    Prints mean accuracy ± 95% CI (t-distribution over episodes) per shot and classifier.

    \b
    Example:
      fsl-bench evaluate --backbone resnet12 --untrained --dataset tiny_imagenet \\
          --archive tiny-imagenet-200.zip --split test --image-size 32 --shots 1,5 \\
          --classifiers protonet,logreg_batched,logreg --episodes 2000 --out results/eval
      fsl-bench evaluate --checkpoint runs/ce/export/backbone.safetensors --dataset cifar_fs \\
          --archive cifar-100-python.tar.gz
    """
    import time

    from ..bench.validate import check_names
    from ..utils import check_writable_dir
    from ._core import evaluate as run_eval

    shot_list = _ints(shots, "shots")
    names = _names(classifiers)
    check_names(evaluators=names)  # unknown names and an unwritable --out fail before any loading
    if out is not None:
        check_writable_dir(out, "--out")
    t0 = time.perf_counter()
    model, meta, data, ds = prepare(backbone, checkpoint, untrained, dataset, archive, root, split, image_size,
                                    seed, protocols=[(way, k, queries) for k in shot_list])
    size = int(image_size or meta.get("image_size") or data.image_size)
    results = run_eval(model, data, shots=shot_list, n_way=way, n_query=queries, n_episodes=episodes,
                       classifiers=names, mean=ds.mean, std=ds.std, image_size=size, batch_size=batch_size,
                       device=device, cache=not no_cache)
    src = "untrained (seed %d)" % seed if untrained else str(checkpoint)
    click.echo(f"{meta['backbone']} [{src}] on {dataset} {split}: {data.num_classes} classes, {len(data)} images, "
               f"{size}x{size}; episodes: {results[0].episodes_source}")
    for r in results:
        click.echo(f"  {r.n_way}-way {r.n_shot}-shot {r.classifier:<15} {100 * r.mean:6.2f} ± {100 * r.ci95:.2f} %"
                   f"  ({r.n_episodes} episodes, {r.n_query} queries/class, {r.seconds:.1f}s)")
    click.echo(f"total {time.perf_counter() - t0:.1f}s")
    if out is not None:
        write_outputs(Path(out), results, {"backbone": meta["backbone"], "checkpoint": src, "dataset": dataset,
                                           "split": split, "image_size": size})
        click.echo(f"wrote {out}/summary.json, accuracies.npz, accuracies.csv")


@click.command("eval")
@click.option("--backbone", default="conv4", show_default=True)
@click.option("--checkpoint", type=click.Path(path_type=Path))
@click.option("--dataset", default="tiny_imagenet", show_default=True)
@click.option("--archive", type=click.Path(path_type=Path))
@click.option("--root", type=click.Path(path_type=Path))
@click.option("--split", default="test", show_default=True, type=click.Choice(["val", "test"]))
@click.option("--image-size", default=32, show_default=True)
@click.option("--shots", default="1,5", show_default=True)
@click.option("--episodes", default=2000, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Init seed of the untrained backbone.")
@click.option("--threads", type=int, help="torch.set_num_threads (default: torch's).")
@click.option("--out", type=click.Path(path_type=Path), help="Write the report as JSON here.")
def bench_eval(backbone, checkpoint, dataset, archive, root, split, image_size, shots, episodes, seed, threads,
               out):
    """Speed of the evaluator vs the per-episode learn2learn + scikit-learn pipeline, on identical episodes.

    Asserts identical ProtoNet / scikit-learn accuracies, batched logreg within 0.5 pt; prints speed ratios.

    \b
    Example:
      fsl-bench bench eval --backbone conv4 --dataset tiny_imagenet \\
          --archive ../shared/data/tiny-imagenet-200-sub100.zip --split test --image-size 32 --episodes 2000
    """
    import torch

    from ..errors import FslError
    from ._bench import run_benchmark

    if threads:
        torch.set_num_threads(threads)
    model, meta, data, ds = prepare(backbone, checkpoint, checkpoint is None, dataset, archive, root, split,
                                    image_size, seed)
    click.echo(f"bench eval: {meta['backbone']} {'untrained' if checkpoint is None else checkpoint} on {dataset} "
               f"{split} ({len(data)} images, {image_size}x{image_size}), {episodes} episodes, "
               f"torch threads {torch.get_num_threads()}")
    rep = run_benchmark(model, data, ds.mean, ds.std, image_size, _ints(shots, "shots"), episodes)
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
                   f"{r['speedup_logreg_pipeline']:.1f}x; logreg classifier only {r['speedup_logreg_classifier_only']:.1f}x")
        if r["protonet_episodes_differing"] or r["logreg_sklearn_episodes_differing"]:
            failures.append(f"{key}: per-episode accuracies differ between ours and the baseline")
        if abs(r["acc_ours_logreg_batched"] - r["acc_ours_logreg"]) > 0.005:
            failures.append(f"{key}: batched logreg differs from sklearn by more than 0.5 pt")
    if out is not None:
        from ..utils import atomic_write_text

        atomic_write_text(Path(out), json.dumps(rep, indent=2) + "\n")
    if failures:
        raise FslError("; ".join(failures))
