"""``fsl-bench perf``: performance measurements of fsl-bench's components (speed ratios in one run, never timed
tests). "Benchmark" means a grid's benchmark file; these are the performance tools. Subcommands load lazily; add
one with one line in :data:`PERF_COMMANDS` ("name": "module:attr" of a click command).

``fsl-bench bench`` is the deprecated former name (hidden; it logs one line naming ``fsl-bench perf``)."""
from __future__ import annotations

from typing import Dict

import click

from .options import LazyCommands, deprecated_alias

PERF_COMMANDS: Dict[str, str] = {
    "data": "fsl_lsskd.data.cli:data_perf",
    "eval": "fsl_lsskd.eval.cli:perf_eval",
    "train": "fsl_lsskd.train.perf:perf_train",
}


class _LazyPerf(LazyCommands):
    lazy_commands = PERF_COMMANDS


@click.group("perf", cls=_LazyPerf)
def perf() -> None:
    """Performance of fsl-bench's components: training throughput against the machine's fp32 peak, scoring time
    (feature extraction vs readouts), dataset loading (archive vs cache).

    \b
    Example:
      fsl-bench perf train --data tiny_imagenet=tiny-imagenet-200-sub100.zip \\
          --backbones conv4,resnet12 --methods ce,pskd,lsskd
      fsl-bench perf eval --data tiny_imagenet=tiny-imagenet-200-sub100.zip \\
          --backbone conv4 --n-episodes 200
      fsl-bench perf data tiny_imagenet --data tiny_imagenet=tiny-imagenet-200-sub100.zip --split train
    """


#: ``fsl-bench bench ...``: the former name, hidden, warns once and runs ``fsl-bench perf ...``
bench = deprecated_alias(perf, "fsl-bench bench", "fsl-bench perf")
