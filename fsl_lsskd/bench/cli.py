"""``fsl-bench bench``: performance benchmarks (not timed tests). Subcommands load lazily; add one with
one line in :data:`BENCH_COMMANDS` ("name": "module:attr" of a click command)."""
from __future__ import annotations

from typing import Dict

import click

from ..options import LazyCommands

BENCH_COMMANDS: Dict[str, str] = {
    "eval": "fsl_lsskd.eval.cli:bench_eval",
    "train": "fsl_lsskd.train.bench:bench_train",
}


class _LazyBench(LazyCommands):
    lazy_commands = BENCH_COMMANDS


@click.group("bench", cls=_LazyBench)
def bench() -> None:
    """Performance benchmarks of fsl-bench components (speed ratios against common baselines).

    \b
    Example:
      fsl-bench bench eval --dataset tiny_imagenet --archive tiny-imagenet-200-sub100.zip \\
          --backbone conv4 --episodes 200
    """
