"""Command-line options shared by the commands, so every command spells a dataset and a protocol the same way:
``--dataset NAME --archive FILE --data-root DIR --download --split-file F --train-per-class N --folder-image-size S``
and ``--n-way --n-shot --n-query --n-episodes`` (the :class:`~fsl_lsskd.protocol.EpisodeProtocol` fields)."""
from __future__ import annotations

import contextlib
import contextvars
import importlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import click

from .bounds import COUNT, COUNT_OR_ZERO, SIZE
from .errors import ConfigError


def dataset_options(default_dataset: Optional[str] = "tiny_imagenet", required: bool = False, argument: bool = False):
    """Decorator adding the dataset options (``dataset`` as an argument when ``argument``)."""
    def deco(f):
        f = click.option("--folder-image-size", type=SIZE, default=None,
                         help="image_folder: decode images at this size (square; default 64).")(f)
        f = click.option("--train-per-class", type=COUNT, default=None,
                         help="Read only the first N train images of every class, in the official order (e.g. "
                              "100 rebuilds the published Tiny ImageNet subset from tiny-imagenet-200.zip).")(f)
        f = click.option("--split-file", type=click.Path(path_type=Path), default=None,
                         help="Class split: a JSON {train, val, test} or a directory with train/val/test.txt "
                              "(image_folder needs one; `fsl-bench data make-split` writes one).")(f)
        f = click.option("--download", is_flag=True,
                         help="Download the official archive into --data-root (default <cache>/downloads) when it "
                              "is not found there; checks the official md5.")(f)
        f = click.option("--data-root", type=click.Path(path_type=Path), default=None,
                         help="Directory holding the dataset (the extracted folder, the official archive, or "
                              "class folders for image_folder).")(f)
        f = click.option("--archive", type=click.Path(path_type=Path), default=None,
                         help="The dataset's official archive (.zip/.tar.gz) or its extracted folder.")(f)
        if argument:
            return click.argument("dataset", callback=_check_dataset)(f)
        return click.option("--dataset", default=default_dataset, required=required and default_dataset is None,
                            show_default=default_dataset is not None, callback=_check_dataset,
                            help="Registered dataset (`fsl-bench ls`).")(f)
    return deco


#: command-line flag of each dataset option (the :func:`fsl_lsskd.data.get_dataset` keyword)
DATASET_FLAGS: Dict[str, str] = {"archive": "--archive", "data_root": "--data-root", "download": "--download",
                                 "split_file": "--split-file", "train_per_class": "--train-per-class",
                                 "image_size": "--folder-image-size"}
_BENCHMARK_DATASET: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fsl_bench_benchmark_dataset",
                                                                                   default=None)


def dataset_option(key: str, value: str = "") -> str:
    """How the user sets dataset option ``key`` (a :data:`DATASET_FLAGS` key) where it is read, for messages that
    name the fix: the command-line flag (``--archive PATH``, ``--download``) or, inside
    :func:`benchmark_dataset`, the benchmark-file key (```data.cifar_fs.archive: PATH```)."""
    name = _BENCHMARK_DATASET.get()
    if name is None:
        return f"{DATASET_FLAGS[key]} {value}".strip()
    return f"`data.{name}.{key}: {value or 'true'}`"


@contextlib.contextmanager
def benchmark_dataset(name: str) -> Iterator[None]:
    """Within the block, :func:`dataset_option` spells options as keys of dataset ``name`` in a benchmark file."""
    token = _BENCHMARK_DATASET.set(name)
    try:
        yield
    finally:
        _BENCHMARK_DATASET.reset(token)


def _check_dataset(ctx, param, value):
    if value is None:
        return value
    from .registry import DATASETS

    DATASETS.get(value)  # UnknownNameError (exit 2) lists the valid names
    return value


def dataset_kwargs(dataset: Optional[str], split_file=None, train_per_class=None, folder_image_size=None
                   ) -> Dict[str, Any]:
    """The dataset-specific arguments of :func:`fsl_lsskd.data.get_dataset` given on the command line;
    an option the dataset does not take is a :class:`ConfigError` naming the datasets that take it."""
    from .registry import DATASETS

    kw: Dict[str, Any] = {}
    if split_file is not None:
        kw["split_file"] = Path(split_file)
    if train_per_class is not None:
        kw["train_per_class"] = int(train_per_class)
    if folder_image_size is not None:
        kw["image_size"] = int(folder_image_size)
    if dataset is None or not kw:
        return kw
    accepted = set(getattr(DATASETS.get(dataset), "options", ()))
    for key in ("split_file", "train_per_class", "image_size"):
        flag = DATASET_FLAGS[key]
        if key in kw and key not in accepted:
            takers = [n for n in DATASETS.names() if key in getattr(DATASETS.get(n), "options", ())]
            raise ConfigError(f"{flag} does not apply to dataset {dataset!r}; it applies to {', '.join(takers)}")
    return kw


def protocol_options(prefix: str = "", default_way: int = 5, default_shot: str = "1,5", default_query: int = 15,
                     default_episodes: int = 2000, help_episodes: str = "Episodes per protocol.",
                     zero_disables: bool = False):
    """Decorator adding ``--[prefix-]n-way/n-shot/n-query/n-episodes`` (``n-way`` and ``n-shot`` accept lists;
    ``n-episodes`` and ``n-query`` are counts >= 1, or ``n-episodes`` >= 0 when ``zero_disables``)."""
    dash = f"{prefix}-" if prefix else ""
    under = f"{prefix}_" if prefix else ""

    def deco(f):
        f = click.option(f"--{dash}n-episodes", f"{under}n_episodes", default=default_episodes, show_default=True,
                         type=COUNT_OR_ZERO if zero_disables else COUNT, help=help_episodes)(f)
        f = click.option(f"--{dash}n-query", f"{under}n_query", default=default_query, show_default=True,
                         type=COUNT, help="Query images per class.")(f)
        f = click.option(f"--{dash}n-shot", f"{under}n_shot", default=default_shot, show_default=True,
                         help="Support images per class (comma list).")(f)
        f = click.option(f"--{dash}n-way", f"{under}n_way", default=str(default_way), show_default=True,
                         help="Classes per episode (comma list).")(f)
        return f
    return deco


def int_list(text: str, option: str) -> List[int]:
    try:
        vals = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated integers like 1,5 (got {text!r})") from None
    if not vals:
        raise ConfigError(f"{option} needs at least one integer (got {text!r})")
    return vals


def parse_protocol(n_way, n_shot, n_query, n_episodes, prefix: str = "", allow_zero: bool = False):
    """The protocols of :func:`protocol_options` (every n_way x n_shot); ``[]`` when ``allow_zero`` and
    n_episodes is 0."""
    from .protocol import protocol_grid

    dash = f"--{prefix}-" if prefix else "--"
    if allow_zero and int(n_episodes) == 0:
        return []
    return protocol_grid(int_list(n_way, f"{dash}n-way"), int_list(n_shot, f"{dash}n-shot"), int(n_query),
                         int(n_episodes))


class LazyCommands(click.Group):
    """A click group whose subcommands (``lazy_commands``: name -> "module:attribute") are imported only
    when run, so ``--help`` stays fast (torch, timm and mlflow take seconds to import)."""

    lazy_commands: Dict[str, str] = {}

    def list_commands(self, ctx: click.Context) -> List[str]:
        return sorted(self.lazy_commands)

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name not in self.lazy_commands:
            return None
        module, attr = self.lazy_commands[name].split(":")
        return getattr(importlib.import_module(module), attr)


def deprecated_alias(command: click.Command, old: str, new: str) -> click.Command:
    """A hidden copy of ``command`` under the name ``old`` whose run first logs one warning naming ``new`` (the
    full command to type instead, e.g. ``"fsl-bench perf data"``). For a group, the warning comes once, before
    its subcommand runs; ``--help`` works and warns nothing."""
    import copy
    import functools
    import logging

    alias = copy.copy(command)
    alias.name, alias.hidden = old.split()[-1], True
    callback = command.callback

    @functools.wraps(callback)
    def warn_then_run(*args, **kwargs):
        logging.getLogger("fsl_lsskd.cli").warning("`%s` is deprecated and will be removed: use `%s`", old, new)
        return callback(*args, **kwargs) if callback is not None else None

    alias.callback = warn_then_run
    return alias
