"""``fsl-bench perf train``: training throughput of the engine's step, per backbone and method, against the
machine's fp32 matmul peak measured in the same run.

What is timed is what :func:`fsl_lsskd.train.engine._run_epoch` does per batch: the :class:`TrainLoader` batch
(whole-batch augmentation), the method's ``training_step`` under the precision's autocast, backward, the
method's optimiser step (:func:`~fsl_lsskd.train.engine.build_optimizer`) and ``on_step_end`` (prediction
stores). FLOPs per training image are counted once per (backbone, method) with
``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward (matmuls and convolutions; a
multiply-add = 2), so ``% peak = img/s x FLOP per image / peak``. Every timing is repeated ``repeats`` times,
interleaved over the cells (A B A B), with the peak measured between them; the reports are medians.

``--reference`` adds the older comparison (:func:`run_train_bench`): images/s of CE training through the
engine's data path versus the reference pipeline of the official repos (rfs, PS-KD, HSAKD: a torchvision-style
Dataset over PIL images with per-image ``RandomCrop(pad 4)``, ``RandomHorizontalFlip``, ``ToTensor``,
``Normalize`` and a ``torch.utils.data.DataLoader``), same backbone, batch size, threads and machine."""
from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence

import click

from ..bounds import COUNT, COUNT_OR_ZERO, SIZE
from ..options import dataset_kwargs, dataset_options, int_list
from ..utils import malloc_setting, process_threads, usable_cores

if TYPE_CHECKING:  # torch and numpy load when the measurement runs, not for `fsl-bench perf train --help`
    import numpy as np

log = logging.getLogger(__name__)

#: the goals of issue 25 (docs/performance.md): share of the fp32 peak per backbone, and the auxiliary
#: methods' epoch time at most their FLOP ratio x this
PEAK_GOALS = {"conv4": 0.55, "resnet12": 0.80}
FLOP_RATIO_SLACK = 1.05


def matmul_peak(device="cpu", dtype=None, n: Optional[int] = None, min_seconds: float = 0.3) -> float:
    """The machine's measured matmul throughput in GFLOP/s: square ``n x n`` products (``n`` 1024 on CPU, 8192
    on CUDA) repeated for at least ``min_seconds``, after one warm-up product; ``dtype`` float32 by default
    (on CUDA with TF32 off, so it is the fp32 peak)."""
    import torch

    dtype = dtype or torch.float32
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 1024)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    tf32 = torch.backends.cuda.matmul.allow_tf32 if dev.type == "cuda" else None
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a @ b
        _sync(dev)
        reps, t0 = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            _sync(dev)
            dt = time.perf_counter() - t0
            if dt >= min_seconds:
                return 2.0 * n ** 3 * reps / dt / 1e9
    finally:
        if tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = tf32


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


SYNTHETIC_CLASSES = 64


def synthetic_split(n_images: int, image_size: int, num_classes: int = SYNTHETIC_CLASSES, seed: int = 0):
    """A ``SplitData`` of random uint8 images ``[n, S, S, 3]`` with balanced labels: throughput does not depend
    on pixel values, so timings need no archive."""
    import numpy as np

    from ..data.base import SplitData

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n_images, image_size, image_size, 3), dtype=np.uint8)
    labels = np.arange(n_images, dtype=np.int64) % num_classes
    return SplitData(images=images, labels=labels, class_names=tuple(f"c{i}" for i in range(num_classes)),
                     dataset="synthetic", split="train")


def train_flops_per_image(method, batch, precision: str = "fp32") -> float:
    """FLOPs of one training step (forward + backward of ``method.training_step``) per image of ``batch``
    (``FlopCounterMode``: matmuls and convolutions, a multiply-add = 2). Leaves the gradients set to None and
    discards the step's pending store update."""
    from torch.utils.flop_counter import FlopCounterMode

    from .engine import autocast

    counter = FlopCounterMode(display=False)
    method.train()
    with counter:
        with autocast(precision, batch.images.device):
            out = method.training_step(batch, 0)
        out["loss"].float().backward()
    for p in method.parameters():
        p.grad = None
    if hasattr(method, "_pending"):
        method._pending = None
    return counter.get_total_flops() / int(batch.images.shape[0])


def compiled_training_step(method):
    """``torch.compile`` of ``method.training_step`` (inductor), with its compiled kernels cached between runs
    under ``$TORCHINDUCTOR_CACHE_DIR`` (default: ``<fsl-bench cache>/inductor``, :func:`fsl_lsskd.utils.cache_dir`).
    The first call compiles (minutes on a CPU); the parameters and the state dict are the method's own."""
    import torch

    from ..utils import cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    return torch.compile(method.training_step)


def _endless(method, loader):
    """The method's own batches, epoch after epoch: the loader's mini-batches, or an episodic method's tasks
    (ProtoNet, MAML: ``iter_batches``), so images/s counts every image a step trains on."""
    e = 0
    while True:
        yield from method.iter_batches(loader, e)
        e += 1


def _make_method(name: str, backbone: str, num_classes: int, num_samples: int, image_size: int, device, seed: int):
    """The method ``name`` on a fresh ``backbone`` (its default settings), seeded, in the layout it trains in."""
    import torch

    from ..backbones import create_backbone
    from ..registry import METHODS

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cls = METHODS.get(name)
        net = create_backbone(backbone, num_classes=num_classes, image_size=image_size)
        method = cls(net, num_classes, num_samples, cls.config_cls()).to(device)
        return method.to(memory_format=method.memory_format())


class _Timed:
    """One cell of the table: a method on a backbone with its optimiser and an endless batch stream; ``mode``
    ``eager`` (the engine's step) or ``compile`` (:func:`compiled_training_step`)."""

    def __init__(self, method, batches: Iterable, precision: str, device, mode: str = "eager") -> None:
        from .engine import build_optimizer

        self.method, self.precision, self.device = method, precision, device
        self.step = compiled_training_step(method) if mode == "compile" else method.training_step
        self.optimizer = build_optimizer(method, method.config)
        self.batches = iter(batches)
        self.samples: List[float] = []
        self.compile_s: Optional[float] = None

    @property
    def store_bytes_per_sample(self) -> int:
        return store_bytes_per_sample(self.method)

    def steps(self, n: int) -> float:
        """images/s over ``n`` engine steps (data included, and the engine's per-step reading of every output,
        which waits for a GPU as the engine does)."""
        t0 = time.perf_counter()
        images = self.run(n)
        return images / (time.perf_counter() - t0)

    def run(self, n: int) -> int:
        """``n`` engine steps; returns the images they trained on."""
        from .engine import autocast

        method, opt = self.method, self.optimizer
        method.train()
        _sync(self.device)
        images, sums = 0, {}
        for _ in range(n):
            batch = next(self.batches)
            with autocast(self.precision, self.device):
                out = self.step(batch, 0)
            loss = out["loss"].float()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            method.on_step_end(batch, 0)
            bs = int(batch.images.shape[0])
            images += bs
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach().float()) * bs
        _sync(self.device)
        return images


class _Concurrent:
    """``n`` trainings of one (backbone, method, precision) at once, each a worker process
    (``python -m fsl_lsskd.train.perf_worker``) with :func:`~fsl_lsskd.utils.process_threads` threads, on this
    split (its arrays in ``workdir`` as ``images.npy``/``labels.npy``, read back without pickle). :meth:`start` launches the
    workers, which build and warm up their cell (untimed) and wait; :meth:`steps` starts them together and
    returns all their images over the wall time (in this process) from the start to the last worker's end, so a
    worker that ends early counts as idle time, as it would in a grid; :meth:`close` ends them. Only one group
    runs at a time (``run_throughput`` starts and closes it in each round), so the memory is N trainings'."""

    def __init__(self, n: int, num_classes: int, num_samples: int, mean, std, backbone: str, method: str,
                 precision: str, image_size: int, batch_size: int, warmup: int, seed: int, device,
                 workdir: Path) -> None:
        self.n, self.threads = n, process_threads(n)
        self.spec = {"backbone": backbone, "method": method, "precision": precision, "image_size": image_size,
                     "batch_size": batch_size, "warmup": warmup, "seed": seed, "device": str(device),
                     "threads": self.threads, "mean": list(mean), "std": list(std), "num_samples": num_samples,
                     "num_classes": num_classes, "malloc": malloc_setting(), "workdir": str(workdir)}
        self.workdir = workdir
        self.samples: List[float] = []
        self.compile_s: Optional[float] = None
        self.store_bytes_per_sample = 0
        self.procs: list = []

    def start(self) -> None:
        """Launch the workers and wait until each has warmed up."""
        import subprocess
        import sys

        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        for i in range(self.n):
            err = open(self.workdir / f"worker-{id(self)}-{i}.err", "w+")
            self.procs.append((subprocess.Popen([sys.executable, "-m", "fsl_lsskd.train.perf_worker",
                                                 json.dumps(self.spec)], stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE, stderr=err, text=True, env=env), err))
        for proc, err in self.procs:
            self.store_bytes_per_sample = int(self._read(proc, err)["store_bytes_per_sample"])

    def _read(self, proc, err) -> Dict[str, object]:
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            err.seek(0)
            raise RuntimeError(f"perf worker ({self.spec['backbone']} {self.spec['method']}) ended with code "
                               f"{proc.returncode}: {err.read()[-2000:]}")
        return json.loads(line)

    def steps(self, n: int) -> float:
        t0 = time.perf_counter()
        for proc, _err in self.procs:
            proc.stdin.write(f"{n}\n")
            proc.stdin.flush()
        images = sum(int(self._read(proc, err)["images"]) for proc, err in self.procs)
        return images / (time.perf_counter() - t0)

    def close(self, at_once: bool = False) -> None:
        """End the workers: at the end of their input (they exit after their step), or ``at_once`` (killed: an
        interrupted or failed measurement)."""
        for proc, err in self.procs:
            try:
                if proc.poll() is None:
                    if at_once:
                        proc.kill()
                    else:
                        proc.stdin.close()  # the worker's end-of-input: it exits
                    proc.wait(timeout=60)
            except BaseException:  # never leave a worker behind, even on a second Ctrl-C
                proc.kill()
                proc.wait()
                raise
            finally:
                err.close()
        self.procs = []


def run_throughput(train_split, mean, std, backbones: Sequence[str] = ("conv4", "resnet12"),
                   methods: Sequence[str] = ("ce", "pskd", "lsskd"), precisions: Sequence[str] = ("fp32",),
                   image_size: int = 32, batch_size: int = 64, steps: int = 10, warmup: int = 2, repeats: int = 2,
                   device="cpu", seed: int = 0, threads: Sequence[Optional[int]] = (None,),
                   modes: Sequence[str] = ("eager",), processes: Sequence[int] = (1,)) -> Dict[str, object]:
    """The table of the module docstring as a dict: ``{"peak_gflops": the best thread setting's median peak,
    "peaks": {threads: {"median", "samples"}}, "device", "cells": [{"threads", "backbone", "method",
    "precision", "images_per_s", "images_per_s_samples", "flops_per_image", "gflops", "peak_share",
    "store_bytes_per_sample" (the method's prediction stores), "time_vs_ce", "flops_vs_ce",
    "time_over_flop_ratio"}], "errors": [...], "omp_wait_policy", "malloc"}``. ``threads`` are ``torch.set_num_threads`` settings
    compared in the same rounds (None: torch's current setting); ``modes`` ``eager`` and/or ``compile`` (each cell
    also with :func:`compiled_training_step`; its compilation happens in the warm-up, untimed; every row has
    ``mode`` and, under ``compile``, ``compile_s``). ``time_vs_ce`` is the method's epoch time over
    CE's with the same processes, threads, backbone and precision (CE img/s / method img/s).

    ``processes`` above 1 also time each (backbone, method, precision) as that many trainings running at once,
    each its own process with :func:`~fsl_lsskd.utils.process_threads` threads (as ``fsl-bench run --launcher local --parallel
    N`` trains N cells): such a row's images/s are all the processes' images over the wall time from the common
    start until the last one finished its ``steps`` (:class:`_Concurrent`), its share is of the same peak, and
    every row has ``processes`` (1 for the in-process cells)."""
    import numpy as np
    import torch

    from .loader import TrainLoader

    split = train_split.resized(image_size)
    C, N = split.num_classes, len(split)
    dev = torch.device(device)
    default_threads = torch.get_num_threads()
    settings = list(dict.fromkeys(int(t) if t else default_threads for t in threads))  # each setting once
    loader = TrainLoader(split.images, split.labels, mean, std, batch_size=batch_size, seed=seed, device=dev)

    def endless(method):
        return _endless(method, loader)

    def make(name: str, backbone: str):
        return _make_method(name, backbone, C, N, image_size, dev, seed)

    cells: Dict[tuple, _Timed] = {}
    groups: Dict[tuple, _Concurrent] = {}
    flops: Dict[tuple, float] = {}
    errors: List[Dict[str, object]] = []
    tmp = None
    try:
        for bb in backbones:
            for m in methods:
                probe_method = make(m, bb)
                flops[(bb, m)] = train_flops_per_image(probe_method, next(iter(probe_method.iter_batches(loader, 0))))
                for prec in precisions:
                    for t in settings:
                        for mode in modes:
                            torch.set_num_threads(t)
                            method = make(m, bb)
                            cell = _Timed(method, endless(method), prec, dev, mode)
                            t0 = time.perf_counter()
                            try:
                                cell.steps(max(warmup, 2 if mode == "compile" else 0))
                            except Exception as exc:  # a step torch.compile cannot compile: reported, not fatal
                                if mode != "compile":
                                    raise
                                log.warning("torch.compile of %s on %s failed: %s", m, bb, exc)
                                errors.append({"threads": t, "mode": mode, "backbone": bb, "method": m,
                                               "precision": prec, "error": f"{type(exc).__name__}: {exc}"[:500]})
                                continue
                            cell.compile_s = time.perf_counter() - t0 if mode == "compile" else None
                            cells[(t, mode, bb, m, prec)] = cell
        concurrent = list(dict.fromkeys(int(n) for n in processes if int(n) > 1))
        if concurrent:  # the split's arrays, written once for every worker process
            import tempfile

            tmp = tempfile.TemporaryDirectory(prefix="fsl-bench-perf-")
            np.save(Path(tmp.name) / "images.npy", split.images)
            np.save(Path(tmp.name) / "labels.npy", split.labels)
        for n in concurrent:
            for bb in backbones:
                for m in methods:
                    for prec in precisions:
                        group = _Concurrent(n, C, N, mean, std, bb, m, prec, image_size, batch_size, warmup, seed,
                                            dev, workdir=Path(tmp.name))
                        groups[(n, group.threads, "eager", bb, m, prec)] = group
        peaks: Dict[int, List[float]] = {t: [] for t in settings}
        for _ in range(repeats):  # interleaved: every cell once per round, each thread setting's peak before them
            for t in settings:  # grouped by threads: a switch of the thread pool is not timed
                torch.set_num_threads(t)
                peaks[t].append(matmul_peak(dev))
                for (ct, *_k), cell in cells.items():
                    if ct == t:
                        cell.samples.append(cell.steps(steps))
            torch.set_num_threads(default_threads)  # this process only waits while the groups run
            for group in groups.values():  # one group's processes at a time: N trainings' memory, not all cells'
                ended = False
                try:
                    group.start()
                    group.samples.append(group.steps(steps))
                    ended = True
                finally:
                    group.close(at_once=not ended)
        for t in settings:
            torch.set_num_threads(t)
            peaks[t].append(matmul_peak(dev))
    finally:
        torch.set_num_threads(default_threads)
        if tmp is not None:
            tmp.cleanup()
    peak_by = {t: statistics.median(v) for t, v in peaks.items()}
    peak = max(peak_by.values())
    rows = []
    timed = {(1,) + k: c for k, c in cells.items()}
    timed.update(groups)
    for (n, t, mode, bb, m, prec), cell in timed.items():
        ips = statistics.median(cell.samples)
        f = flops[(bb, m)]
        row = {"processes": n, "threads": t, "mode": mode, "backbone": bb, "method": m, "precision": prec,
               "images_per_s": ips, "images_per_s_samples": cell.samples, "flops_per_image": f,
               "gflops": ips * f / 1e9, "peak_share": ips * f / 1e9 / peak,
               "store_bytes_per_sample": cell.store_bytes_per_sample}
        if cell.compile_s is not None:
            row["compile_s"] = cell.compile_s
        ce = timed.get((n, t, mode, bb, "ce", prec))
        if ce is not None:
            row["time_vs_ce"] = statistics.median(ce.samples) / ips
            row["flops_vs_ce"] = f / flops[(bb, "ce")]
            row["time_over_flop_ratio"] = row["time_vs_ce"] / row["flops_vs_ce"]
        rows.append(row)
    return {"device": str(dev), "image_size": image_size, "batch_size": batch_size, "steps": steps,
            "repeats": repeats, "peak_gflops": peak,
            "peaks": {str(t): {"median": peak_by[t], "samples": peaks[t]} for t in settings}, "cells": rows,
            "errors": errors, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "malloc": malloc_setting()}


def format_throughput(res: Dict[str, object]) -> List[str]:
    """The report's lines: the peak, then one row per cell."""
    lines = [f"fp32 matmul peak: {res['peak_gflops']:.1f} GFLOP/s on {res['device']} (the best thread setting's "
             f"median; measured between the timings: "
             + ", ".join(f"{t} threads {p['median']:.1f}" for t, p in res["peaks"].items())
             + f"; OMP_WAIT_POLICY {res.get('omp_wait_policy', 'unset')}; malloc {res.get('malloc', 'unset')})",
             f"{'procs':>5} {'threads':>7} {'mode':<7} {'backbone':<10} {'method':<7} {'prec':<5} {'img/s':>8} {'MFLOP/img':>10} {'GFLOP/s':>8} "
             f"{'% peak':>7} {'time/CE':>8} {'FLOP/CE':>8} {'time/FLOP':>9}"]
    for r in res["cells"]:
        goal = PEAK_GOALS.get(r["backbone"]) if r["method"] == "ce" and r["precision"] == "fp32" else None
        extra = ""
        if "time_vs_ce" in r:
            extra = f" {r['time_vs_ce']:>8.2f} {r['flops_vs_ce']:>8.2f} {r['time_over_flop_ratio']:>9.2f}"
        lines.append(f"{r.get('processes', 1):>5} {r['threads']:>7} {r['mode']:<7} {r['backbone']:<10} {r['method']:<7} {r['precision']:<5} {r['images_per_s']:>8.1f} "
                     f"{r['flops_per_image'] / 1e6:>10.1f} {r['gflops']:>8.1f} {100 * r['peak_share']:>6.1f}%"
                     + extra + (f"  (goal {100 * goal:.0f}%)" if goal else ""))
    for e in res.get("errors", ()):
        lines.append(f"{1:>5} {e['threads']:>7} {e['mode']:<7} {e['backbone']:<10} {e['method']:<7} {e['precision']:<5} "
                     f"failed: {e['error']}")
    stores = {r["method"]: r["store_bytes_per_sample"] for r in res["cells"] if r.get("store_bytes_per_sample")}
    if stores:
        lines.append("prediction stores: " + ", ".join(f"{m} {b:,} bytes per training image" for m, b in stores.items()))
    lines.append(f"time/FLOP: a method's epoch time over CE's divided by its FLOP ratio over CE's (goal <= "
                 f"{FLOP_RATIO_SLACK}); img/s are medians of {res['repeats']} interleaved rounds of {res['steps']} "
                 f"steps, data loading included"
                 + ("; procs > 1: that many trainings at once, one process each, img/s summed over the wall time "
                    "until the last one ended" if any(r.get("processes", 1) > 1 for r in res["cells"]) else ""))
    return lines


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
@click.option("--synthetic", type=COUNT, default=None,
              help="Time on N random uint8 images (64 classes) instead of a dataset: throughput does not depend on "
                   "pixel values, and no archive is needed.")
@click.option("--backbones", default="conv4,resnet12", show_default=True)
@click.option("--methods", default="ce,pskd,lsskd", show_default=True,
              help="Methods timed (CE is the reference of the time and FLOP ratios).")
@click.option("--precisions", default="fp32", show_default=True, help="Comma list of fp32, bf16, fp16 (autocast).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:i].")
@click.option("--image-size", default=32, show_default=True, type=SIZE)
@click.option("--batch-size", default=64, show_default=True, type=COUNT)
@click.option("--steps", default=10, show_default=True, type=COUNT, help="Timed steps per cell and round.")
@click.option("--warmup", default=2, show_default=True, type=COUNT_OR_ZERO)
@click.option("--repeats", default=2, show_default=True, type=COUNT,
              help="Interleaved rounds over all cells (A B A B); medians are reported.")
@click.option("--threads", default="", help="Comma list of torch.set_num_threads settings compared in the same "
              "rounds, e.g. 1,2 (default: torch's).")
@click.option("--processes", default="1", show_default=True,
              help="Comma list: also time N trainings at once, one process each with CPUs/N threads (as `fsl-bench "
                   "run --launcher local --parallel N` trains N cells), e.g. 1,2; their img/s are summed. The "
                   "one-process rows are always timed; N is at most the CPUs this process may use.")
@click.option("--compile", "compare_compile", is_flag=True,
              help="Also time every cell with torch.compile of the training step (compiled once, untimed; kernels "
                   "cached under <cache>/inductor between runs).")
@click.option("--reference", is_flag=True,
              help="Also time CE through the official repos' PIL + DataLoader pipeline (the first backbone).")
@click.option("--workers", default="0,2", show_default=True, help="DataLoader workers tried for --reference.")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def perf_train(dataset, archive, data_root, download, split_file, train_per_class, folder_image_size, synthetic,
               backbones, methods, precisions, device, image_size, batch_size, steps, warmup, repeats, threads,
               processes, compare_compile, reference, workers, json_out) -> None:
    """Training throughput per backbone and method: images/s, FLOPs per image, the share of the fp32 matmul peak
    measured in the same run, and each method's epoch time over CE's against its FLOP ratio.

    \b
    Example:
      fsl-bench perf train --synthetic 4096 --backbones conv4,resnet12 --methods ce,pskd,lsskd
      fsl-bench perf train --synthetic 4096 --backbones conv4 --methods ce --processes 1,2
      fsl-bench perf train --data tiny_imagenet=tiny-imagenet-200-sub100.zip --backbones conv4
      fsl-bench perf train --synthetic 4096 --device cuda --precisions fp32,bf16 --steps 30
    """
    from ..errors import ConfigError
    from ..registry import check_names

    bbs = [b.strip() for b in backbones.split(",") if b.strip()]
    ms = [m.strip() for m in methods.split(",") if m.strip()]
    precs = [p.strip() for p in precisions.split(",") if p.strip()]
    check_names(where="perf train", backbones=bbs, methods=ms)
    bad = [p for p in precs if p not in ("fp32", "bf16", "fp16")]
    if bad:
        raise ConfigError(f"--precisions: {bad[0]!r} is not fp32, bf16 or fp16")
    # the option checks come before torch is imported: an error is answered at once
    thread_settings = tuple(int_list(threads, "--threads")) if threads.strip() else (None,)
    if any(t < 1 for t in thread_settings if t is not None):
        raise ConfigError(f"--threads must be integers >= 1, got {threads!r}")
    process_settings = tuple(int_list(processes, "--processes"))
    if any(n < 1 for n in process_settings):
        raise ConfigError(f"--processes must be integers >= 1, got {processes!r}")
    if max(process_settings) > 1 and str(device).split(":", 1)[0] != "cpu":
        raise ConfigError("--processes N shares this machine's CPUs between N trainings: use it with --device cpu")
    cpus = usable_cores()
    if max(process_settings) > cpus:
        raise ConfigError(f"--processes {max(process_settings)}: this process may use {cpus} CPU(s), so at most "
                          f"{cpus} trainings can each have a core; pass at most {cpus}")
    import torch

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    from ..utils import atomic_write_text

    if synthetic:
        from ..registry import METHODS

        for m in ms:  # an episodic method's tasks need n_shot+n_query images in each of the 64 synthetic classes
            cls = METHODS.get(m)
            if not cls.episodic:
                continue
            cfg = cls.config_cls()
            k = cfg.n_shot + cfg.n_query
            if synthetic < SYNTHETIC_CLASSES * k:
                raise ConfigError(f"--synthetic {synthetic}: {m}'s episodes need {k} images in each of the "
                                  f"{SYNTHETIC_CLASSES} synthetic classes; pass --synthetic {SYNTHETIC_CLASSES * k} "
                                  f"or more")
        split, mean, std = synthetic_split(synthetic, image_size), (0.5,) * 3, (0.25,) * 3
    else:
        from ..data import get_dataset

        ds = get_dataset(dataset, root=data_root, archive=archive, download=download,
                         **dataset_kwargs(dataset, split_file, train_per_class, folder_image_size))
        split, mean, std = ds.load_split("train"), tuple(ds.mean), tuple(ds.std)
    res = run_throughput(split, mean, std, bbs, ms, precs, image_size, batch_size, steps, warmup, repeats, device,
                         threads=thread_settings, modes=("eager", "compile") if compare_compile else ("eager",),
                         processes=process_settings)
    res["data"] = f"synthetic {synthetic}" if synthetic else dataset
    for line in format_throughput(res):
        click.echo(line)
    if reference:
        ref = run_train_bench(split, mean, std, bbs[0], image_size, batch_size, steps, warmup,
                              tuple(int(w) for w in workers.split(",") if w.strip()), methods=())
        res["reference"] = ref
        click.echo(f"reference pipeline ({bbs[0]} CE): ours {ref['ours_images_per_s']:.1f} img/s; "
                   + ", ".join(f"{k} {v:.1f} img/s" for k, v in ref["reference_images_per_s"].items())
                   + f" -> {ref['speedup_vs_best_reference']:.2f}x; data path alone: "
                   + ", ".join(f"{k} {v:.2f} ms/batch" for k, v in ref["data_only_ms_per_batch"].items())
                   + f" -> {ref['data_only_speedup_vs_best_reference']:.1f}x")
    if json_out:
        atomic_write_text(json_out, json.dumps(res, indent=2) + "\n")
