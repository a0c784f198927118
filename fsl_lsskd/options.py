"""Command-line options shared by the commands, so every command spells a dataset and a protocol the same way:
``--dataset NAME --data NAME=PATH --download --split-file F --train-per-class N --folder-image-size S``
and ``--n-way --n-shot --n-query --n-episodes`` (the :class:`~fsl_lsskd.protocol.EpisodeProtocol` fields).

``--data NAME=PATH`` says where dataset NAME is on this machine, in every command that reads data (``run``,
``table``, ``edge``, ``train``, ``evaluate``, ``export``, ``data``); one parser (:func:`parse_data_items`) and one
rule (:func:`data_location`: a file is the archive, a directory the root) serve them all. The spellings it
replaces, ``--archive FILE`` and ``--data-root DIR``, still work and print a deprecation note (:func:`deprecated`);
so does ``--out`` where a command's output option got its own name (:func:`renamed_option`)."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional

import click

from .bounds import COUNT, COUNT_OR_ZERO, SIZE
from .errors import ConfigError


DATA_METAVAR = "NAME=PATH"


def deprecated(old: str, new: str) -> None:
    """The deprecation note of an old option spelling that still works: one line on stderr naming the new one."""
    click.echo(f"note: {old} is deprecated and will be removed in a later release; use {new}", err=True)


def parse_data_items(items: Iterable[str], names: Iterable[str], of: str) -> Dict[str, str]:
    """``--data NAME=PATH`` items (as typed) -> ``{NAME: PATH}`` (PATH as typed; :func:`data_location` reads it).

    ``names`` are the datasets NAME may be, described by ``of`` in the error (e.g. "a dataset of b.yaml").
    Raises :class:`ConfigError` (exit code 2) for an item that is not NAME=PATH (no ``=``, no NAME or no PATH),
    a NAME not in ``names``, and a NAME given twice."""
    valid = set(names)
    out: Dict[str, str] = {}
    for item in items:
        name, sep, path = str(item).partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ConfigError(f"--data {item!r}: expected NAME=PATH, e.g. --data cifar_fs=cifar-100-python.tar.gz")
        if name not in valid:
            raise ConfigError(f"--data {item!r}: {name!r} is not {of} ({', '.join(sorted(valid))})")
        if name in out:
            raise ConfigError(f"--data {name}=... is given twice ({out[name]!r} and {path!r}); give it once")
        out[name] = path
    return out


def data_location(name: str, path: str, download: bool = False) -> Dict[str, Path]:
    """Where ``--data NAME=PATH`` puts dataset ``name``, as the :func:`fsl_lsskd.data.get_dataset` keyword:
    ``{"archive": P}`` when PATH is a file (the official archive), ``{"root": P}`` when it is a directory (the
    extracted folder, a directory holding the archive, or class folders for image_folder). P is absolute, with
    ``~`` and ``$VARS`` expanded, relative to the current directory. With ``download`` a PATH that does not exist
    yet is the root to download into; otherwise it is a :class:`ConfigError`."""
    p = Path(os.path.expandvars(os.path.expanduser(path))).resolve()
    if not p.exists():
        if download:
            return {"root": p}
        raise ConfigError(f"--data {name}={path}: {p} does not exist; pass the dataset's official archive or its "
                          f"extracted folder")
    return {"root" if p.is_dir() else "archive": p}


def data_option(help: str):
    """Decorator adding ``--data NAME=PATH`` (repeatable, parameter ``data_paths``)."""
    return click.option("--data", "data_paths", multiple=True, metavar=DATA_METAVAR, help=help)


_DATA_HELP = ("Where the dataset is on this machine: NAME=FILE for its official archive (.zip/.tar.gz), NAME=DIR "
              "for a directory holding it (the extracted folder, the archive, or class folders for image_folder). "
              "NAME is the dataset (`fsl-bench ls`); it is the one read when --dataset is not given.")


def dataset_options(default_dataset: Optional[str] = "tiny_imagenet", required: bool = False, argument: bool = False):
    """Decorator adding the dataset options (``dataset`` as an argument when ``argument``).

    The command receives ``dataset, archive, data_root, download, split_file, train_per_class,
    folder_image_size``: ``--data NAME=PATH`` arrives as ``archive`` (a file) or ``data_root`` (a directory),
    and sets ``dataset`` to NAME when ``--dataset`` is not given (see :func:`with_data_option`)."""
    def deco(f):
        f = with_data_option(f, required=required)
        f = click.option("--folder-image-size", type=SIZE, default=None,
                         help="image_folder: decode images at this size (square; default 64).")(f)
        f = click.option("--train-per-class", type=COUNT, default=None,
                         help="Read only the first N train images of every class, in the official order (e.g. "
                              "100 rebuilds the published Tiny ImageNet subset from tiny-imagenet-200.zip).")(f)
        f = click.option("--split-file", type=click.Path(path_type=Path), default=None,
                         help="Class split: a JSON {train, val, test} or a directory with train/val/test.txt "
                              "(image_folder needs one; `fsl-bench data make-split` writes one).")(f)
        f = click.option("--download", is_flag=True,
                         help="Download the official archive into the --data directory (default <cache>/downloads) "
                              "when it is not found there; checks the official md5.")(f)
        f = click.option("--data-root", type=click.Path(path_type=Path), default=None,
                         help="Deprecated: use --data NAME=DIR.")(f)
        f = click.option("--archive", type=click.Path(path_type=Path), default=None,
                         help="Deprecated: use --data NAME=FILE.")(f)
        f = data_option(_DATA_HELP)(f)
        if argument:
            return click.argument("dataset", callback=_check_dataset)(f)
        return click.option("--dataset", default=default_dataset, show_default=default_dataset is not None,
                            callback=_check_dataset,
                            help="Registered dataset (`fsl-bench ls`)" + (" [required unless --data NAME=PATH "
                                 "names it]." if required and default_dataset is None else "."))(f)
    return deco


def with_data_option(f, required: bool = False):
    """Wrap command callback ``f`` (parameters ``dataset``, ``archive``, ``data_root``, ``download``) so that its
    ``--data NAME=PATH`` (parameter ``data_paths``, added by :func:`data_option`) arrives as ``archive`` or
    ``data_root`` (:func:`data_location`), and ``--archive``/``--data-root`` print their deprecation note.

    NAME must be a registered dataset; it sets ``dataset`` unless the command line gives another one (then, as
    for --data together with --archive/--data-root, a second --data, or ``required`` and no dataset at all, a
    :class:`ConfigError`: exit code 2). Within the command, messages that name the data options spell them
    ``--data <dataset>=PATH`` (:func:`dataset_option`)."""
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        from .registry import DATASETS

        items = tuple(kwargs.pop("data_paths", ()) or ())
        archive, root = kwargs.get("archive"), kwargs.get("data_root")
        dataset = kwargs.get("dataset")
        ctx = click.get_current_context()
        source = ctx.get_parameter_source("dataset")
        given = source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
        old = [flag for flag, value in (("--archive", archive), ("--data-root", root)) if value is not None]
        if items and old:
            raise ConfigError(f"--data and {'/'.join(old)} both say where the data is; give --data NAME=PATH only "
                              f"({'/'.join(old)} {'is' if len(old) == 1 else 'are'} its deprecated spelling)")
        for flag in old:
            deprecated(flag, f"--data {dataset or 'NAME'}={'FILE' if flag == '--archive' else 'DIR'}")
        if items:
            paths = parse_data_items(items, DATASETS.names(), "a registered dataset")
            if len(paths) > 1:
                raise ConfigError(f"--data is given for {', '.join(paths)}; this command reads one dataset: give "
                                  f"--data once")
            (name, path), = paths.items()
            if given and dataset != name:
                positional = any(isinstance(p, click.Argument) and p.name == "dataset" for p in ctx.command.params)
                fix = (f"or run it for {name}" if positional else f"or drop --dataset to read {name}")
                raise ConfigError(f"--data {name}={path}: this command reads dataset {dataset!r}; pass "
                                  f"--data {dataset}=PATH, {fix}")
            kwargs["dataset"] = dataset = name
            loc = data_location(name, path, download=bool(kwargs.get("download")))
            kwargs["archive"], kwargs["data_root"] = loc.get("archive"), loc.get("root")
        if required and dataset is None:
            raise ConfigError("pass --dataset NAME or --data NAME=PATH (`fsl-bench ls` lists the datasets)")
        token = _CLI_DATASET.set(dataset)
        try:
            return f(*args, **kwargs)
        finally:
            _CLI_DATASET.reset(token)
    return wrapper


class _RenamedOption(click.Option):
    """An option with a new name whose old spelling (a second, exposed-nowhere option ``alias``) still works:
    the old spelling's value arrives under the new name, after a deprecation note; both together are a usage
    error (exit code 2)."""

    def __init__(self, *args, alias: str = "", alias_dest: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.alias, self.alias_dest = alias, alias_dest

    def consume_value(self, ctx: click.Context, opts: Mapping[str, Any]):
        value, source = super().consume_value(ctx, opts)
        old = opts.get(self.alias_dest)
        if old is None:
            return value, source
        new = self.opts[0]
        if source == click.core.ParameterSource.COMMANDLINE:
            raise click.UsageError(f"{self.alias} and {new} are the same option ({self.alias} is its deprecated "
                                   f"spelling); give {new} only", ctx=ctx)
        deprecated(self.alias, new)
        return old, click.core.ParameterSource.COMMANDLINE


def renamed_option(new: str, name: str, old: str, **kwargs):
    """Decorator adding option ``new`` (parameter ``name``; ``kwargs`` as for :func:`click.option`) and its
    deprecated spelling ``old`` (e.g. ``--out``), which sets the same parameter and prints a deprecation note
    (:func:`deprecated`). Giving both is a usage error (exit code 2)."""
    alias_dest = f"{name}__{old.lstrip('-').replace('-', '_')}_alias"

    def deco(f):
        f = click.option(old, alias_dest, type=kwargs.get("type"), expose_value=False,
                         metavar=kwargs.get("metavar"), help=f"Deprecated: use {new}.")(f)
        return click.option(new, name, cls=_RenamedOption, alias=old, alias_dest=alias_dest, **kwargs)(f)
    return deco


#: command-line flag of each dataset option (the :func:`fsl_lsskd.data.get_dataset` keyword)
#: (``archive`` and ``data_root`` are both ``--data NAME=PATH``: a file or a directory)
DATASET_FLAGS: Dict[str, str] = {"archive": "--data", "data_root": "--data", "download": "--download",
                                 "split_file": "--split-file", "train_per_class": "--train-per-class",
                                 "image_size": "--folder-image-size"}
_BENCHMARK_DATASET: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fsl_bench_benchmark_dataset",
                                                                                   default=None)
_CLI_DATASET: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fsl_bench_cli_dataset", default=None)


def dataset_option(key: str, value: str = "") -> str:
    """How the user sets dataset option ``key`` (a :data:`DATASET_FLAGS` key) where it is read, for messages that
    name the fix: the command-line flag (``--data tiny_imagenet=PATH``, ``--download``; NAME where the command's
    dataset is not known) or, inside :func:`benchmark_dataset`, the benchmark-file key
    (```data.cifar_fs.archive: PATH```)."""
    name = _BENCHMARK_DATASET.get()
    if name is None:
        if key in ("archive", "data_root"):
            return f"--data {_CLI_DATASET.get() or 'NAME'}={value or 'PATH'}"
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


def dataset_protocols(dataset: Optional[str], n_way, n_shot, n_query, n_episodes, prefix: str = ""):
    """:func:`parse_protocol` of the current command, where a dataset with one fixed protocol (its class's
    ``fixed_protocols()``, e.g. omniglot_runs: 20-way 1-shot, 1 query, 20 episodes) supplies the value of every
    protocol option not given on the command line. An option given with another value is kept (the dataset then
    refuses it, naming its protocol)."""
    fixed = None
    if dataset is not None:
        from .registry import DATASETS

        if dataset in DATASETS:
            fixed_protocols = getattr(DATASETS.get(dataset), "fixed_protocols", None)
            fixed = fixed_protocols() if fixed_protocols is not None else None
    if fixed is not None and len(fixed) == 1:
        ctx = click.get_current_context()
        under = f"{prefix}_" if prefix else ""
        own = {"n_way": fixed[0].n_way, "n_shot": fixed[0].n_shot, "n_query": fixed[0].n_query,
               "n_episodes": fixed[0].n_episodes}
        values = {"n_way": n_way, "n_shot": n_shot, "n_query": n_query, "n_episodes": n_episodes}
        for key in values:
            source = ctx.get_parameter_source(under + key)
            if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
                values[key] = own[key]
        n_way, n_shot, n_query, n_episodes = (values[k] for k in ("n_way", "n_shot", "n_query", "n_episodes"))
    return parse_protocol(n_way, n_shot, n_query, n_episodes, prefix=prefix)


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
