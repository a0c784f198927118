"""Up-front checks of a benchmark (``fsl-bench run``), so bad input fails in seconds, before anything is trained,
decoded, cached or logged: every name is registered (the message lists the valid ones) and every dataset's files
are found (both before torch is imported), every method's settings build its config, every readout's settings
are valid, every training dataset can host the evaluation protocols and the validation episodes (counted from the
split files and the source's inventory, never by decoding), and the output directory can be written. The checks
themselves live beside what they check (:func:`fsl_lsskd.registry.check_names`,
:func:`fsl_lsskd.protocol.check_capacity`, ...); this module applies them to a benchmark and names the file and
key to change.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

from ..errors import ConfigError, DataError, ProtocolError, UserError
from ..options import benchmark_dataset
from ..protocol import check_capacity
from ..registry import check_names
from .config import Benchmark

log = logging.getLogger(__name__)


def check_method_settings(bench: Benchmark) -> None:
    """Each row's settings (``method_overrides``, variant settings, the ``train`` budget) build a valid method
    config (:func:`fsl_lsskd.train.config.resolved_method_config`)."""
    from ..train.config import resolved_method_config
    from .grid import training_config, make_cell

    for row in sorted(set(bench.methods) | set(bench.variants)):
        try:
            cell = make_cell(bench, bench.datasets[0], bench.backbones[0], row, bench.seeds[0])
            resolved_method_config(training_config(bench, cell, Path("."), data={}))
        except UserError as exc:
            raise ConfigError(f"{bench.where}: settings of {row!r}: {exc}") from None


def check_backbones(bench: Benchmark) -> None:
    """Every backbone of the benchmark (``backbones`` and the teachers') is built and takes ``image_size``
    inputs (:func:`fsl_lsskd.backbones.check_image_size`: a refused timm model, e.g. a vision transformer, or a
    size below the smallest that works fails here, naming the fix)."""
    from ..backbones import check_image_size

    names = list(dict.fromkeys(list(bench.backbones) + [t.backbone for t in bench.teachers.values() if t.backbone]))
    for name in names:
        try:
            check_image_size(name, bench.image_size)
        except UserError as exc:
            key = "backbones" if name in bench.backbones else "teachers"
            raise type(exc)(f"{bench.where}: `{key}`: {exc}") from None


def check_readouts(bench: Benchmark) -> None:
    """Every readout (and its settings) of ``eval`` is registered and valid."""
    from ..eval.specs import ReadoutSpec

    ev = bench.eval
    groups = [("eval.readouts", ev.readouts)] + [(f"eval.extra_readouts.{m}", r) for m, r in ev.extra_readouts.items()]
    if ev.curves is not None:
        groups.append(("eval.curves.readouts", ev.curves.readouts))
    groups += [(f"eval.targets.{t}.readouts", spec.readouts) for t, spec in ev.targets.items() if spec.readouts]
    for where, readouts in groups:
        for r in readouts:
            try:
                ReadoutSpec.parse(r)
            except UserError as exc:
                raise type(exc)(f"{bench.where}: `{where}`: {exc}") from None


def check_sources(bench: Benchmark) -> None:
    """Every dataset of ``bench`` (trained on or scored) is found on this machine: its ``--data`` path, archive or
    data root exists (nothing is read, decoded or downloaded; a source with ``download: true`` that is missing is
    left to :func:`check_data`). Cheap, so :func:`validate_benchmark` runs it before the checks that import torch."""
    from .grid import data_kwargs

    targets = {t for d in bench.datasets for t in bench.eval_datasets(d)}
    for name in sorted(set(bench.datasets) | targets):
        source = bench.data.get(name)
        if source is not None and source.generate:
            continue
        try:
            with benchmark_dataset(name):
                kwargs = data_kwargs(name, bench)
                try:
                    _dataset(name, kwargs)
                except DataError:
                    if not kwargs.get("download"):
                        raise
        except DataError as exc:
            raise _in_benchmark(exc, bench, name) from None


def _in_benchmark(exc: DataError, bench: Benchmark, name: str) -> DataError:
    return type(exc)(f"{bench.where}: dataset {name}: {exc} (a path on this machine can also be given as "
                     f"`fsl-bench run --data {name}=PATH`)")


def check_sizes(bench: Benchmark) -> None:
    """Every size the benchmark asks for fits in this machine's memory, before anything is generated, decoded or
    allocated (:mod:`fsl_lsskd.bounds`): the generated data (``data.NAME.generate``), the evaluation episodes
    (``eval``, its curves and targets) and the validation episodes (``train.validation``). Raises
    :class:`ConfigError` with the estimate."""
    from ..eval.episodes import check_episode_memory
    from .grid import GENERATED_SHAPE, check_generated

    for name, source in sorted(bench.data.items()):
        if source.generate and name in GENERATED_SHAPE:
            try:
                check_generated(name, tuple(source.generate), f"data.{name}.generate")
            except ConfigError as exc:
                raise ConfigError(f"{bench.where}: {exc}") from None
    ev = bench.eval
    targets = {t for d in bench.datasets for t in bench.eval_datasets(d)}
    groups = [("eval.n_episodes", ev.protocols() + (ev.curves.protocols() if ev.curves else []))]
    groups += [(f"eval.targets.{t}.n_episodes", ev.target_protocols(t)) for t in sorted(targets) if t in ev.targets]
    val = bench.train.validation_protocol()
    if val is not None:
        groups.append(("train.validation.n_episodes", [val]))
    for option, protocols in groups:
        try:
            check_episode_memory(protocols, option, probabilities=option != "train.validation.n_episodes")
        except ConfigError as exc:
            raise ConfigError(f"{bench.where}: {exc}") from None


def check_data(bench: Benchmark, data=None, fetch: bool = False) -> List[str]:
    """Every dataset of ``bench`` exists; every training dataset can host the evaluation protocols (on
    ``eval.split``) and the validation episodes (val split). Returns notes for cross-domain targets that
    cannot host a protocol (those are skipped, not errors). A dataset with ``download: true`` that is not on
    this machine is fetched first when ``fetch`` (a real run), else noted (a dry run fetches nothing)."""
    from ..data.base import split_counts
    from .grid import GENERATORS, data_kwargs

    notes: List[str] = []
    ev, tr = bench.eval, bench.train
    targets = {t for d in bench.datasets for t in bench.eval_datasets(d)}
    for name in sorted(set(bench.datasets) | targets):
        source = bench.data.get(name)
        if source is not None and source.generate and name not in GENERATORS:
            raise ConfigError(f"{bench.where}: data.{name}.generate is supported for {', '.join(GENERATORS)} only; "
                              f"give data.{name}.archive or data_root instead")
        try:
            if source is not None and source.generate:  # counted from the writer's spec, nothing generated
                ds = None
                classes = {s: generated_counts(name, source.generate, s)[0] for s in ("val", ev.split)}
                counts = {s: generated_counts(name, source.generate, s)[1] for s in ("val", ev.split)}
            else:
                with benchmark_dataset(name):  # messages name the benchmark file's keys, not CLI flags
                    kwargs = data_kwargs(name, bench)
                    try:
                        ds = data.dataset(name) if data is not None else _dataset(name, kwargs)
                    except DataError:
                        if not kwargs.get("download"):
                            raise
                        if not fetch:
                            notes.append(f"{name}: not on this machine yet; `fsl-bench run` downloads it first "
                                         f"(data.{name}.download: true) and checks its protocols then")
                            continue
                        ds = _dataset(name, kwargs, download=True)
                    counts = {s: split_counts(ds, s) for s in ("val", ev.split)}
                classes = ds.class_split()
        except DataError as exc:
            raise _in_benchmark(exc, bench, name) from None
        if name in bench.datasets:
            for p in ev.protocols():
                check_capacity(counts[ev.split], p, classes[ev.split], where=f"{bench.where}: {name} {ev.split} split",
                               fix=f"lower eval.n_way/n_shot/n_query in the benchmark file (at most "
                                   f"{int(min(counts[ev.split]))} images per class in all), or supply more images")
            val = tr.validation_protocol()
            if val is not None:
                check_capacity(counts["val"], val, classes["val"],
                               where=f"{bench.where}: {name} val split (train.validation)",
                               fix="set `train: {validation: null}` in the benchmark file (no per-epoch validation), "
                                   "or lower its n_way/n_shot/n_query")
        if name in targets and name not in bench.datasets:
            from ..protocol import can_host

            have = counts[ev.split]
            if len(have) == 0:
                raise DataError(f"{bench.where}: eval.datasets target {name} has no {ev.split} classes; score it on "
                                f"a split it has (its splits: {', '.join(k for k, v in classes.items() if v)})")
            hosted = [p for p in ev.target_protocols(name) if can_host(have, p)]
            for p in ev.target_protocols(name):
                if p not in hosted:
                    notes.append(f"{name} {ev.split}: cannot host {p.key} (fewest images per class: "
                                 f"{int(min(have))}); that column is skipped for {name}")
            if not hosted:
                raise ProtocolError(f"{bench.where}: eval.datasets target {name} cannot host any of its protocols "
                                    f"({', '.join(p.key for p in ev.target_protocols(name))}; fewest images per "
                                    f"class: {int(min(have))}): lower them with `eval: {{targets: {{{name}: "
                                    f"{{n_query: N}}}}}}` in the benchmark file")
    return notes


def _dataset_class(name: str):
    from ..registry import DATASETS

    return DATASETS.get(name)


def generated_counts(dataset: str, sizes, split: str):
    """(class names, counts) of a ``generate: [a, b]`` source without generating it: the fake writers
    (:mod:`fsl_lsskd.data.fake`) put ``a + b`` images in every class of the standard split."""
    import numpy as np

    from ..data.splits import standard_split

    names = standard_split(dataset)[split]
    return names, np.full(len(names), int(sum(sizes)), dtype=np.int64)


def _dataset(name: str, kwargs, download: bool = False):
    """The dataset from a present source; ``download`` fetches (checksummed) and decodes it first."""
    from ..data import get_dataset

    kw = dict(kwargs)
    kw["download"] = download
    ds = get_dataset(name, **kw)
    if download and hasattr(ds, "prepare"):
        ds.prepare()
    return ds


def validate_benchmark(bench: Benchmark, *, data: bool = True, out_root: Optional[Path] = None,
                       fetch: bool = False) -> List[str]:
    """Everything ``fsl-bench run`` can check before training (module docstring); raises a :class:`UserError`
    subclass, returns notes (skipped cross-domain protocols)."""
    from ..utils import check_writable_dir

    where = bench.where
    rows = set(bench.methods)
    check_names(methods=[bench.method_of(r) for r in rows], where=f"{where}: `methods`")
    check_names(methods=[v.method for v in bench.variants.values()], where=f"{where}: `variants`")
    check_names(backbones=bench.backbones, where=f"{where}: `backbones`")
    for row, seeds in bench.method_seeds.items():
        if row not in rows:
            raise ConfigError(f"{where}: `method_seeds` names {row!r}, which is not in `methods` ({', '.join(bench.methods)})")
        extra = sorted(set(seeds) - set(bench.seeds))
        if extra:
            raise ConfigError(f"{where}: `method_seeds.{row}` has seeds {extra} that are not in `seeds`")
    check_names(datasets=bench.datasets, where=f"{where}: `datasets`")
    check_names(datasets=bench.eval.datasets, where=f"{where}: `eval.datasets`")
    stray = sorted(set(bench.eval.targets) - {t for d in bench.datasets for t in bench.eval_datasets(d)})
    if stray:
        raise ConfigError(f"{where}: `eval.targets` names {stray[0]!r}, which is not scored (eval.datasets: "
                          f"{', '.join(bench.eval.datasets) or 'the training dataset'}); add it to eval.datasets")
    check_names(methods=[k for k in bench.eval.extra_readouts if k not in bench.variants],
                where=f"{where}: `eval.extra_readouts`")
    check_names(methods=[k for k in bench.method_overrides], where=f"{where}: `method_overrides`")
    check_names(methods=[k for k in bench.teachers if k not in bench.variants] +
                [bench.method_of(t.method) for t in bench.teachers.values()], where=f"{where}: `teachers`")
    check_names(backbones=[t.backbone for t in bench.teachers.values() if t.backbone], where=f"{where}: `teachers`")
    if bench.eval.base and bench.train.heldout <= 0:
        raise ConfigError(f"{where}: `eval.base` scores the held-out base images, but `train.heldout` is 0: set "
                          f"train.heldout (e.g. 0.1) or drop eval.base")
    check_sizes(bench)
    if out_root is not None:
        check_writable_dir(out_root, "--runs-dir")
    if data:  # a missing archive is reported before the checks below import torch and timm (seconds)
        check_sources(bench)
    check_readouts(bench)
    check_method_settings(bench)
    check_backbones(bench)
    return check_data(bench, fetch=fetch) if data else []
