"""``fsl-bench bench``: performance benchmarks (not timed tests). Subcommands load lazily; add one with
one line in :data:`BENCH_COMMANDS` ("name": "module:attr" of a click command)."""
from __future__ import annotations

import importlib
from typing import Dict, List, Optional

import click

BENCH_COMMANDS: Dict[str, str] = {
    "eval": "fsl_lsskd.eval.cli:bench_eval",
    "train": "fsl_lsskd.train.bench:bench_train",
}


class _LazyBench(click.Group):
    def list_commands(self, ctx: click.Context) -> List[str]:
        return sorted(BENCH_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name not in BENCH_COMMANDS:
            return None
        module, attr = BENCH_COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group("bench", cls=_LazyBench)
def bench() -> None:
    """Performance benchmarks of fsl-bench components (speed ratios against common baselines).

    \b
    Example:
      fsl-bench bench eval --dataset tiny_imagenet --archive tiny-imagenet-200-sub100.zip \\
          --backbone conv4 --episodes 200
    """
