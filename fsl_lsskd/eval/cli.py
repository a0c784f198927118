"""``fsl-bench evaluate`` and ``fsl-bench perf eval`` (heavy imports inside the commands)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import click

from ..bounds import COUNT, SEED, SIZE
from ..errors import ConfigError
from ..options import dataset_kwargs, dataset_options, dataset_protocols, int_list, protocol_options


def _names(text: str):
    return [s.strip() for s in text.split(",") if s.strip()]


def prepare(backbone: Optional[str], checkpoint: Optional[Path], untrained: bool, dataset: str, data: dict,
            split: str, image_size: Optional[int], seed: int = 0, protocols: Sequence = ()):
    """(model, meta, split data, dataset object) for the CLI commands. The options, the checkpoint's path, the
    data's location and every protocol against the split's per-class counts are checked before torch is imported
    and before anything is decoded or cached."""
    from ..data import get_dataset
    from ..data.base import scored_split_counts
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
    counts = scored_split_counts(ds, dataset, split)
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
    summary = {**header, "results": [_with_classes(r) for r in results]}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    with atomic_path(out / "accuracies.npz", suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{r.key: r.accuracy for r in results})
    lines = ["episode," + ",".join(r.key for r in results)]
    n = max(r.n_episodes for r in results)
    for i in range(n):
        lines.append(f"{i}," + ",".join(f"{r.accuracy[i]:.4f}" if i < r.n_episodes else "" for r in results))
    atomic_write_text(out / "accuracies.csv", "\n".join(lines) + "\n")


def _with_classes(r) -> dict:
    """A score's summary plus its test-class interval (``accuracy_class_ci95``: half-width in points, None where
    not estimable) and ``n_test_classes``."""
    out = r.summary()
    if r.classes is not None:
        half = r.class_ci95
        out.update(accuracy_class_ci95=half if math.isfinite(half) else None, n_test_classes=r.n_classes)
    return out


@click.command("evaluate")
@click.option("--backbone", help="Backbone name (resnet12, conv4, any timm CNN). Default: the checkpoint's meta.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="An exported backbone (backbone.safetensors "
              "or its directory), a model directory (fsl-bench train's OUT/model), a training checkpoint (last.pt) "
              "or a state dict (.pth/.safetensors).")
@click.option("--untrained", is_flag=True, help="Randomly initialised backbone (seeded by --seed).")
@click.option("--method", "untrained_method", help="With --untrained: the weights training method NAME starts from "
              "with --seed (backbone and heads, as `fsl-bench train --seed` draws them), e.g. maml for the "
              "maml_finetune readout of an untrained model.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="With --untrained --method: method config setting (as `fsl-bench train --set`; the keys: "
                   "docs/methods.md), e.g. the maml_untrained row of benchmarks/cpu_tiny_imagenet.yaml: --set "
                   "head=zero --set inner_lr=0.5 --set test_inner_steps=1.")
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
def evaluate(backbone, checkpoint, untrained, untrained_method, settings, dataset, archive, data_root, download,
             split_file, train_per_class, folder_image_size, split, image_size, n_way, n_shot, n_query, n_episodes,
             readouts, batch_size, seed, device, no_cache, out):
    """Few-shot evaluation of a backbone (RFS protocol) on the published episodes, per protocol and readout:
    mean accuracy with two 95% half-widths, over episodes (t-distribution: how precisely the episodes measure
    these test classes) and over test classes (how far another draw of as many classes would move it,
    docs/statistics.md; a warning below 20 classes), and calibration (ECE, NLL, Brier) for probabilistic readouts.

    A dataset with fixed episodes (omniglot_runs: Omniglot's 20 official runs, 20-way 1-shot with one query)
    takes its own protocol for the protocol options not given.

    \b
    Example:
      fsl-bench evaluate --backbone resnet12 --untrained --data tiny_imagenet=tiny-imagenet-200.zip \\
          --image-size 32 --n-shot 1,5 --readouts protonet,logreg --out eval
      fsl-bench evaluate --checkpoint runs/ce/export --data cifar_fs=cifar-100-python.tar.gz
      fsl-bench evaluate --untrained --method maml --backbone conv4 --seed 0 --readouts maml_finetune \\
          --set head=zero --set inner_lr=0.5 --set test_inner_steps=1 \\
          --data tiny_imagenet=tiny-imagenet-200.zip --image-size 32 --n-shot 5
      fsl-bench evaluate --checkpoint runs/mine/export --data image_folder=my_images \\
          --split-file split.json
    """
    import time

    from ..registry import check_names
    from ..utils import check_writable_dir
    from .episodes import check_episode_memory

    check_names(datasets=[dataset])
    protocols = dataset_protocols(dataset, n_way, n_shot, n_query, n_episodes)
    check_names(readouts=_names(readouts))  # a typo fails at once, nothing imported
    if (untrained_method or settings) and not untrained:
        raise ConfigError("--method/--set choose an untrained method's initial weights: pass them with --untrained "
                          "(a trained method's checkpoint already names its method)")
    if settings and not untrained_method:
        raise ConfigError("--set needs --method NAME (the method whose config it sets)")
    if untrained_method:
        check_names(methods=[untrained_method])
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
    if untrained_method:
        initial = _initial_method(untrained_method, settings, meta["backbone"], size, seed,
                                  len(ds.class_split()["train"]), device)
        model = initial.export_backbone().to(device)
        for p in model.parameters():
            p.requires_grad_(False)

        def method():
            return initial
    results = run_eval(model, split_data, protocols=protocols, readouts=specs, mean=spec.mean, std=spec.std,
                       image_size=size, batch_size=batch_size, device=device, cache=not no_cache, method=method)
    shown = "".join(f"; {s}" for s in settings)
    src = (f"untrained {untrained_method} (training seed {seed}'s initial weights{shown})" if untrained_method else
           f"untrained (seed {seed})" if untrained else str(checkpoint))
    click.echo(f"{meta['backbone']} [{src}] on {dataset} {split}: {split_data.num_classes} classes, {len(split_data)} "
               f"images, {size}x{size}; episodes: {', '.join(sorted({r.episodes_source for r in results}))}")
    for r in results:
        cal = f"  ECE {r.ece:.2f}% NLL {r.nll.mean():.3f} Brier {r.brier.mean():.3f}" if r.nll is not None else ""
        click.echo(f"  {r.protocol.label:<14} {r.label:<28} {r.mean:6.2f} % ± {r.ci95:.2f} over episodes, "
                   f"{_class_text(r)}  ({r.n_episodes} episodes, {r.protocol.n_query} queries/class, "
                   f"{r.seconds:.1f}s){cal}")
    click.echo(f"total {time.perf_counter() - t0:.1f}s")
    if out is not None:
        write_outputs(Path(out), results, {"backbone": meta["backbone"], "checkpoint": src, "dataset": dataset,
                                           "split": split, "image_size": size})
        click.echo(f"wrote {out}/summary.json, accuracies.npz, accuracies.csv")


def _class_text(r) -> str:
    """``± h over C test classes``: the half-width of the score's test-class interval (how far another draw of
    as many test classes would move the mean, docs/statistics.md)."""
    if not math.isfinite(r.class_ci95):
        return f"± ? over {r.n_classes} test classes (not estimable: every episode holds the same classes)"
    return f"± {r.class_ci95:.2f} over {r.n_classes} test classes"


def _initial_method(name: str, settings, backbone: str, image_size: int, seed: int, num_classes: int, device: str):
    """Method ``name`` with the weights ``fsl-bench train --method name --seed seed`` starts from
    (:func:`fsl_lsskd.methods.settings.initial_method`), ``num_classes`` base classes, eval mode."""
    from ..methods.settings import initial_method, method_config, parse_set_options
    from ..registry import METHODS

    mcfg = method_config(METHODS.get(name).config_cls, name, parse_set_options(settings))
    return initial_method(name, mcfg, backbone, image_size, seed, num_classes, 0).to(device).eval()


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
@click.option("--n-query", default=15, show_default=True, type=COUNT, help="Query images per class.")
@click.option("--episodes", "episodes_deprecated", type=COUNT, hidden=True, help="Deprecated: --n-episodes.")
@click.option("--readouts", default="protonet,logreg_batched", show_default=True,
              help="Frozen-feature readouts timed against the feature extraction (`fsl-bench ls`).")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Also time the per-episode learn2learn + scikit-learn pipeline on the same episodes (minutes).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Init seed of the untrained backbone.")
@click.option("--threads", type=COUNT, help="torch.set_num_threads (default: torch's).")
@click.option("--out", type=click.Path(path_type=Path), help="Write the report as JSON here.")
def perf_eval(backbone, checkpoint, dataset, archive, data_root, download, split_file, train_per_class,
              folder_image_size, split, image_size, n_shot, n_episodes, n_query, episodes_deprecated, readouts, baseline, seed,
              threads, out):
    """Scoring time: feature extraction (once per cell) vs each frozen-feature readout, so re-scoring a finished
    cell with a new readout is seen to take the readout's seconds. With --baseline (default), also the speed
    against the per-episode learn2learn + scikit-learn pipeline on identical episodes, checking identical
    ProtoNet / scikit-learn accuracies and batched logreg within 0.5 pt.

    \b
    Example:
      fsl-bench perf eval --backbone conv4 --data tiny_imagenet=tiny-imagenet-200-sub100.zip \\
          --split test --image-size 32 --n-episodes 2000
      fsl-bench perf eval --backbone resnet12 --no-baseline --readouts protonet,logreg_batched,logreg
    """
    import logging

    import torch

    from ..errors import FslError
    from ..protocol import protocol_grid
    from ..registry import check_names
    from .episodes import check_episode_memory
    from .perf import extraction_vs_readouts, run_benchmark

    if episodes_deprecated is not None:
        logging.getLogger(__name__).warning("--episodes is deprecated and will be removed: use --n-episodes")
        n_episodes = episodes_deprecated
    readout_names = [r.strip() for r in readouts.split(",") if r.strip()]
    check_names(where="--readouts", readouts=readout_names)
    shots = int_list(n_shot, "--n-shot")
    check_episode_memory(protocol_grid(5, shots, n_query, n_episodes), "--n-episodes")
    if threads:  # for this command only: a caller in the same process (tests, a notebook) keeps its setting
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        click.get_current_context().call_on_close(lambda: torch.set_num_threads(previous))
    data = {"archive": archive, "root": data_root, "download": download,
            **dataset_kwargs(dataset, split_file, train_per_class, folder_image_size)}
    model, meta, split_data, ds = prepare(backbone, checkpoint, checkpoint is None, dataset, data, split,
                                          image_size, seed)
    click.echo(f"perf eval: {meta['backbone']} {'untrained' if checkpoint is None else checkpoint} on {dataset} "
               f"{split} ({len(split_data)} images, {image_size}x{image_size}), {n_episodes} episodes, "
               f"torch threads {torch.get_num_threads()}")
    times = extraction_vs_readouts(model, split_data, ds.mean, ds.std, image_size, shots, n_episodes,
                                   n_query=n_query, readouts=readout_names)
    ex = times["extract"]
    click.echo(f"feature extraction: {ex['seconds']:.2f} s for {ex['images']:,} images ({ex['images_per_s']:.0f} "
               f"img/s), once per cell; a new frozen-feature readout re-scores from the cached features")
    click.echo(f"{'readout':<16} {'shot':>4} {'episodes':>8} {'readout s':>10} {'ms/episode':>10} "
               f"{'x extraction':>12} {'accuracy':>9}")
    for r in times["readouts"]:
        click.echo(f"{r['readout']:<16} {r['n_shot']:>4} {r['episodes']:>8} {r['seconds']:>10.3f} "
                   f"{r['ms_per_episode']:>10.3f} {r['seconds'] / max(ex['seconds'], 1e-9):>12.2f} "
                   f"{100 * r['accuracy']:>8.2f}%")
    if not baseline:
        if out is not None:
            from ..utils import atomic_write_text

            atomic_write_text(Path(out), json.dumps({"extraction_vs_readouts": times}, indent=2) + "\n")
        return
    rep = run_benchmark(model, split_data, ds.mean, ds.std, image_size, shots, n_episodes, n_query=n_query)
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

        atomic_write_text(Path(out), json.dumps({**rep, "extraction_vs_readouts": times}, indent=2) + "\n")
    if failures:
        raise FslError("; ".join(failures))
