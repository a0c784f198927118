"""``fsl-bench bench train``: images/s of CE training through the engine's data path versus the reference
pipeline of the official repos (rfs, PS-KD, HSAKD: a torchvision-style Dataset over PIL images with per-image
``RandomCrop(pad 4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` and a ``torch.utils.data.DataLoader``),
same backbone, batch size, threads and machine, in one process. Also the epoch cost of the auxiliary-classifier
methods (LSSKD, BYOT, ...) relative to CE when they are registered."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable

import click

from ..bounds import COUNT, COUNT_OR_ZERO, SIZE
from ..options import dataset_kwargs, dataset_options

if TYPE_CHECKING:  # torch and numpy load when the benchmark runs, not for `fsl-bench bench train --help`
    import numpy as np


def _time_steps(method, batches: Iterable, steps: int, warmup: int, lr: float = 0.05) -> float:
    """images/s over ``steps`` optimiser steps after ``warmup`` steps (data loading included)."""
    import torch

    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                          weight_decay=5e-4)
    method.train()
    it = iter(batches)
    n, t0 = 0, None
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        batch = next(it)
        out = method.training_step(batch, 0)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        method.on_step_end(batch, 0)
        if i >= warmup:
            n += int(batch.images.shape[0])
    return n / (time.perf_counter() - t0)


def store_bytes_per_sample(method) -> int:
    """Bytes per training image of all the method's prediction stores (0 without stores)."""
    from ..methods.stores import PredictionStore

    return sum(m.bytes_per_sample for m in method.modules() if isinstance(m, PredictionStore))


def _time_data(batches: Iterable, n: int, warmup: int = 2) -> float:
    """Milliseconds per batch of a data pipeline alone (no model)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return 1e3 * (time.perf_counter() - t0) / n


class _PILDataset:
    """What rfs/PS-KD do: keep the decoded images, make a PIL image per item, apply PIL transforms (a map-style
    dataset of ``torch.utils.data.DataLoader``: ``__len__`` and ``__getitem__``)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i]), i


def _reference_batches(images, labels, mean, std, batch_size, workers, seed):
    import torch
    from torchvision import transforms

    from ..methods.base import Batch

    tf = transforms.Compose([transforms.RandomCrop(images.shape[1], padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(mean, std)])
    dl = torch.utils.data.DataLoader(_PILDataset(images, labels, tf), batch_size=batch_size, shuffle=True,
                                     num_workers=workers, drop_last=True,
                                     generator=torch.Generator().manual_seed(seed),
                                     persistent_workers=workers > 0)
    while True:
        for x, y, idx in dl:
            yield Batch(x.contiguous(memory_format=torch.channels_last), y, idx)


def run_train_bench(train_split, mean, std, backbone: str = "conv4", image_size: int = 32, batch_size: int = 64,
                    steps: int = 50, warmup: int = 5, workers=(0, 2), methods=("pskd", "byot", "lsskd"),
                    seed: int = 0) -> Dict[str, object]:
    """The benchmark as a dict (see module docstring)."""
    import torch

    from ..backbones import create_backbone
    from ..registry import METHODS
    from .loader import TrainLoader

    split = train_split.resized(image_size)
    C, N = split.num_classes, len(split)

    def make(name: str):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            cls = METHODS.get(name)
            net = create_backbone(backbone, num_classes=C, image_size=image_size)
            return cls(net, C, N, cls.config_cls()).to(memory_format=torch.channels_last)

    loader = TrainLoader(split.images, split.labels, mean, std, batch_size=batch_size, seed=seed)

    def ours_batches():
        e = 0
        while True:
            yield from loader.epoch_batches(e)
            e += 1

    res: Dict[str, object] = {"backbone": backbone, "image_size": image_size, "batch_size": batch_size,
                              "steps": steps, "threads": torch.get_num_threads(), "train_images": N}
    ours = _time_steps(make("ce"), ours_batches(), steps, warmup)
    res["ours_images_per_s"] = ours
    refs = {}
    for w in workers:
        refs[w] = _time_steps(make("ce"), _reference_batches(split.images, split.labels, mean, std, batch_size, w,
                                                             seed), steps, warmup)
    res["reference_images_per_s"] = {f"workers={w}": v for w, v in refs.items()}
    best = max(refs.values())
    res["speedup_vs_best_reference"] = ours / best
    # the data paths alone: what the engine's pipeline changes (a small model's epoch is compute-bound)
    ours_ms = _time_data(ours_batches(), steps)
    ref_ms = {w: _time_data(_reference_batches(split.images, split.labels, mean, std, batch_size, w, seed), steps)
              for w in workers}
    res["data_only_ms_per_batch"] = {"ours": ours_ms, **{f"reference workers={w}": v for w, v in ref_ms.items()}}
    res["data_only_speedup_vs_best_reference"] = min(ref_ms.values()) / ours_ms
    rel = {}
    for m in methods:
        if m in METHODS:
            try:
                method = make(m)
                ips = _time_steps(method, ours_batches(), steps, warmup)
                rel[m] = {"images_per_s": ips, "epoch_cost_vs_ce": ours / ips,
                          "store_bytes_per_sample": store_bytes_per_sample(method)}
            except Exception as exc:  # a method that needs a teacher etc.
                rel[m] = {"error": f"{type(exc).__name__}: {exc}"}
    res["methods"] = rel
    return res


@click.command("train")
@dataset_options(default_dataset="tiny_imagenet")
@click.option("--backbone", default="conv4", show_default=True)
@click.option("--image-size", default=32, show_default=True, type=SIZE)
@click.option("--batch-size", default=64, show_default=True, type=COUNT)
@click.option("--steps", default=50, show_default=True, type=COUNT, help="Timed steps per pipeline.")
@click.option("--warmup", default=5, show_default=True, type=COUNT_OR_ZERO)
@click.option("--workers", default="0,2", show_default=True, help="DataLoader workers tried for the reference.")
@click.option("--methods", default="pskd,byot,lsskd", show_default=True, help="Methods timed relative to CE.")
@click.option("--threads", type=COUNT, help="torch.set_num_threads (default: torch's).")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def bench_train(dataset, archive, data_root, download, split_file, train_per_class, folder_image_size, backbone,
                image_size, batch_size, steps, warmup, workers, methods, threads, json_out) -> None:
    """Training throughput: engine data path vs the official repos' PIL + DataLoader pipeline (CE, same
    backbone/batch/machine), plus auxiliary-classifier methods' cost relative to CE.

    \b
    Example:
      fsl-bench bench train --dataset tiny_imagenet --archive tiny-imagenet-200.zip \\
          --backbone conv4 --image-size 32 --steps 50
    """
    import torch

    from ..data import get_dataset
    from ..utils import atomic_write_text

    if threads:
        torch.set_num_threads(threads)
    ds = get_dataset(dataset, root=data_root, archive=archive, download=download,
                     **dataset_kwargs(dataset, split_file, train_per_class, folder_image_size))
    res = run_train_bench(ds.load_split("train"), tuple(ds.mean), tuple(ds.std), backbone, image_size, batch_size,
                          steps, warmup, tuple(int(w) for w in workers.split(",") if w.strip()),
                          tuple(m.strip() for m in methods.split(",") if m.strip()))
    res["dataset"] = dataset
    click.echo(f"ours: {res['ours_images_per_s']:.1f} img/s")
    for k, v in res["reference_images_per_s"].items():
        click.echo(f"reference ({k}): {v:.1f} img/s")
    click.echo(f"speedup vs best reference: {res['speedup_vs_best_reference']:.2f}x (whole training steps)")
    click.echo("data path alone: " + ", ".join(f"{k} {v:.2f} ms/batch" for k, v in res["data_only_ms_per_batch"].items())
               + f" -> {res['data_only_speedup_vs_best_reference']:.1f}x")
    for m, r in res["methods"].items():
        click.echo(f"{m}: " + (f"{r['images_per_s']:.1f} img/s, epoch cost {r['epoch_cost_vs_ce']:.2f}x CE, "
                               f"prediction stores {r['store_bytes_per_sample']:,} bytes per training image"
                               if "images_per_s" in r else r["error"]))
    if json_out:
        atomic_write_text(json_out, json.dumps(res, indent=2) + "\n")
