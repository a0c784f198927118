#!/usr/bin/env python3
"""Cross-check fsl-bench's MAML against learn2learn's own MAML recipe on the same data.

learn2learn's example ``examples/vision/maml_miniimagenet.py`` trains ``l2l.vision.models.CNN4`` (32 filters)
with ``l2l.algorithms.MAML(model, lr=fast_lr, first_order=False)`` and Adam(``meta_lr``) on tasks sampled
by learn2learn's Taskset transforms (NWays, KShots, LoadData, RemapLabels, ConsecutiveLabels). It adapts
with ``adaptation_steps`` SGD steps on the support set, then back-propagates the query loss, averaged over
``meta_batch_size`` tasks. BatchNorm always uses batch statistics, because the model is never put in eval
mode. Its flags are ways=5, shots=5, meta_lr=0.003, fast_lr=0.5, meta_batch_size=32 and
adaptation_steps=1.

This script runs that procedure with our own code, on exactly the rows the ``cpu_tiny_imagenet`` MAML cell
trains on. Those rows come from ``fsl_lsskd.train.engine.prepare_data``: the Tiny ImageNet subset's 120
base classes at 32x32, with 10 % held out, giving 135 images a class, normalised with the dataset's
statistics. The tasks have 15 queries a class, as our protocol does.

It validates on tasks that learn2learn samples from the val split. The val tasks are the same at every
validation point (a fixed seed), and a point is also taken before training. Each point is one JSON line
on stdout, also written to ``--out``. Compare those lines with ``val_maml_finetune_acc`` of
``fsl-bench train --method maml`` at the same settings. Both numbers are mean query accuracy after adapting
on 5-way 5-shot val tasks: learn2learn's on its sampled tasks, ours on the published val episodes.

Example (the settings of the published MAML cells, and learn2learn's own head):
  python tools/maml_l2l_crosscheck.py --data tiny_imagenet=tiny-imagenet-200-sub100.zip \\
      --tasks 2000 --meta-batch-size 4 --val-every 100 --out maml_l2l.jsonl
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def taskset(images: torch.Tensor, labels: torch.Tensor, ways: int, samples: int):
    """learn2learn's documented task pipeline over in-memory tensors."""
    import learn2learn as l2l
    from learn2learn.data.transforms import ConsecutiveLabels, KShots, LoadData, NWays, RemapLabels
    from torch.utils.data import TensorDataset

    ds = l2l.data.MetaDataset(TensorDataset(images, labels))
    transforms = [NWays(ds, ways), KShots(ds, samples), LoadData(ds), RemapLabels(ds), ConsecutiveLabels(ds)]
    return l2l.data.Taskset(ds, task_transforms=transforms, num_tasks=-1)


def adapt_and_score(learner, batch, shots: int, ways: int, steps: int):
    """(query loss, query accuracy) after ``steps`` adaptation steps on the first ``shots`` images of each
    class (ConsecutiveLabels sorts a task by label)."""
    x, y = batch
    support = torch.zeros(len(y), dtype=torch.bool)
    for c in range(ways):
        support[torch.nonzero(y == c).flatten()[:shots]] = True
    for _ in range(steps):
        learner.adapt(F.cross_entropy(learner(x[support]), y[support]))
    logits = learner(x[~support])
    return F.cross_entropy(logits, y[~support]), (logits.argmax(1) == y[~support]).float().mean().item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, metavar="tiny_imagenet=PATH")
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--queries", type=int, default=15)
    ap.add_argument("--meta-lr", type=float, default=0.003)
    ap.add_argument("--fast-lr", type=float, default=0.5)
    ap.add_argument("--adaptation-steps", type=int, default=1)
    ap.add_argument("--meta-batch-size", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=2000,
                    help="meta-training tasks in all, rounded up to whole meta-batches")
    ap.add_argument("--val-every", type=int, default=100, help="meta-iterations between validation points")
    ap.add_argument("--val-tasks", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=32, help="CNN4 filters (the example's MiniImagenetCNN: 32)")
    ap.add_argument("--classifier-init", choices=("xavier", "normal"), default="xavier",
                    help="the head's initial weights: xavier (learn2learn 0.2.0's CNN4, cbfinn/maml's mini-ImageNet "
                         "model) or normal (N(0,1): cbfinn/maml's Omniglot model, fsl-bench's `head: normal`)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    import learn2learn as l2l

    from fsl_lsskd.errors import UserError
    from fsl_lsskd.train.config import TrainConfig
    from fsl_lsskd.train.engine import prepare_data

    name, _, path = args.data.partition("=")
    if name != "tiny_imagenet" or not path:
        print("error: --data tiny_imagenet=PATH (the official zip or the published subset)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(method="maml", dataset="tiny_imagenet", archive=path, image_size=args.image_size,
                      seed=args.seed, dataset_options={"train_per_class": args.train_per_class})
    try:
        data = prepare_data(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)

    def tensors(split):
        x = torch.as_tensor(np.asarray(split.images)).permute(0, 3, 1, 2).float().div(255.0)
        return ((x - mean) / std).contiguous(), torch.as_tensor(np.asarray(split.labels), dtype=torch.int64)

    samples = args.shots + args.queries
    train_tasks = taskset(*tensors(data.train), args.ways, samples)
    val_tasks = taskset(*tensors(data.val), args.ways, samples)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    embedding = args.hidden * (args.image_size // 16) ** 2  # four 2x2 max-pools
    model = l2l.vision.models.CNN4(args.ways, hidden_size=args.hidden, embedding_size=embedding)
    if args.classifier_init == "normal":
        with torch.no_grad():
            model.classifier.weight.normal_()
    maml = l2l.algorithms.MAML(model, lr=args.fast_lr, first_order=False)
    opt = torch.optim.Adam(maml.parameters(), args.meta_lr)
    val_state = random.Random(10_000 + args.seed).getstate()  # the same val tasks at every point
    lines = []

    def validate(iteration: int, tasks_seen: int, seconds: float) -> None:
        saved = random.getstate()
        random.setstate(val_state)
        try:
            accs = [adapt_and_score(maml.clone(), val_tasks.sample(), args.shots, args.ways,
                                    args.adaptation_steps)[1] for _ in range(args.val_tasks)]
        finally:
            random.setstate(saved)
        a = 100.0 * np.asarray(accs)
        line = {"iteration": iteration, "tasks": tasks_seen, "val_acc": round(float(a.mean()), 3),
                "val_ci95": round(float(1.96 * a.std(ddof=1) / np.sqrt(len(a))), 3), "seconds": round(seconds, 1)}
        lines.append(line)
        print(json.dumps(line), flush=True)

    iterations = -(-args.tasks // args.meta_batch_size)
    t0 = time.perf_counter()
    validate(0, 0, 0.0)
    for it in range(1, iterations + 1):
        opt.zero_grad()
        for _ in range(args.meta_batch_size):
            loss, _ = adapt_and_score(maml.clone(), train_tasks.sample(), args.shots, args.ways,
                                      args.adaptation_steps)
            loss.backward()
        for p in maml.parameters():
            if p.grad is not None:
                p.grad.mul_(1.0 / args.meta_batch_size)
        opt.step()
        if it % args.val_every == 0 or it == iterations:
            validate(it, it * args.meta_batch_size, time.perf_counter() - t0)
    if args.out:
        args.out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
