"""Benchmark files (``benchmarks/*.yaml``) parsed into typed, frozen config objects.

An unknown key or a wrong type is a :class:`~fsl_lsskd.errors.ConfigError` naming the key and the file. The
keys, with an example::

    name: cpu_tiny_imagenet            # default: the file name
    description: "..."
    datasets: [tiny_imagenet]          # training datasets (their base classes)
    data:                              # where each dataset's files are (paths relative to this file)
      tiny_imagenet: {archive: ../data/tiny-imagenet-200.zip, train_per_class: 100}
    backbones: [conv4]
    methods: [ce, pskd, lsskd, lsskd_dense]   # registered methods or variants
    variants: {lsskd_dense: {method: lsskd, settings: {store_top_k: 0}}}
    seeds: [0, 1, 2]
    method_seeds: {hsakd: [0]}         # fewer seeds for a row (optional)
    fractions: [0.25, 0.5, 0.75, 1.0]  # limited-data protocol (optional)
    image_size: 32
    train: {epochs: 15, batch_size: 64, heldout: 0.1, precision: fp32, device: cpu,
            validation: {n_way: 5, n_shot: 5, n_query: 15, n_episodes: 200}}
    method_overrides: {lsskd: {xlayer_kl: true}}
    teachers: {kd: {method: ce}}       # default: each method's default teacher, trained on the full data
    eval:
      split: test
      n_way: 5
      n_shot: [1, 5]
      n_query: 15
      n_episodes: 2000
      readouts: [protonet, logreg_batched, {readout: logreg_batched, n_aug_support: 5}]
      extra_readouts: {maml: [maml_finetune]}
      image_episodes: 500              # image-level readouts score the first N episodes
      datasets: [tiny_imagenet, cifar_fs, omniglot_runs]   # scored targets (default: the training dataset)
      targets: {cifar_fs: {n_query: 6}}  # protocol overrides per target (here: a partial CIFAR-100)
      curves: {n_way: [5, 10, 20], n_shot: [1, 2, 5, 10, 20], n_episodes: 600, readouts: [protonet]}
      base: true                       # base-class accuracy and calibration on the held-out images
    published: {protonet: {"tiny_imagenet 5w1s15q protonet": "..."}}
    launcher: {slurm: {partition: gpu, gpus_per_node: 1, timeout_min: 240, mem_gb: 32, cpus_per_task: 8}}
"""
from __future__ import annotations

import collections.abc
import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple, Union

import yaml

from ..errors import ConfigError
from ..protocol import EpisodeProtocol, protocol_grid


#: The bounds of every number and name a benchmark file sets (:mod:`fsl_lsskd.bounds`), by class and field:
#: ``count`` an integer >= 1, ``count0`` >= 0, ``positive`` a number > 0, ``size`` an image size >= 1 pixel,
#: ``seed`` in [0, 2**32), ``name`` one file-name component; lists and mappings are checked item by item.
BOUNDS: Dict[str, Dict[str, str]] = {
    "DataSource": {"generate": "count", "train_per_class": "count", "image_size": "size"},
    "TrainSpec": {"epochs": "count", "batch_size": "count"},
    "CurveSpec": {"n_way": "count", "n_shot": "count", "n_query": "count", "n_episodes": "count"},
    "TargetSpec": {"n_way": "count", "n_shot": "count", "n_query": "count", "n_episodes": "count"},
    "EvalSpec": {"n_way": "count", "n_shot": "count", "n_query": "count", "n_episodes": "count",
                 "image_episodes": "count"},
    "SlurmSpec": {"gpus_per_node": "count0", "cpus_per_task": "count", "mem_gb": "count", "timeout_min": "count",
                  "array_parallelism": "count"},
    "LocalSpec": {"parallel": "count", "timeout_min": "positive", "signal_delay_s": "count0"},
    "Benchmark": {"name": "name", "seeds": "seed", "method_seeds": "seed", "image_size": "size",
                  "variants": "name"},
}


def _check_bound(value: Any, kind: str, key: str) -> None:
    """``value`` of field ``key`` within bound ``kind`` (:data:`BOUNDS`); None passes (unset)."""
    from ..bounds import check_count, check_name, check_seed, check_size

    if value is None:
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if kind == "name":  # the keys are the names (variants: their row names name files)
                check_name(k, f"{key}: the name")
            else:
                _check_bound(v, kind, f"{key}.{k}")
        return
    if isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            _check_bound(v, kind, f"{key}[{i}]")
        return
    if kind == "count":
        check_count(value, key)
    elif kind == "count0":
        check_count(value, key, minimum=0)
    elif kind == "size":
        check_size(value, key)
    elif kind == "seed":
        check_seed(value, key)
    elif kind == "name":
        check_name(value, key)
    elif kind == "positive":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{key} must be a number > 0, got {value!r}")


class _Checked:
    """Checks its fields against :data:`BOUNDS` when built (from a file, by ``dataclasses.replace`` or by
    ``--slurm KEY=VALUE``): a value out of bounds raises :class:`ConfigError` naming the key and the limit."""

    def __post_init__(self) -> None:
        for key, kind in BOUNDS.get(type(self).__name__, {}).items():
            _check_bound(getattr(self, key), kind, key)


@dataclass(frozen=True)
class DataSource(_Checked):
    """Where a dataset's files come from: an archive, a data root, or generated in official format; plus the
    options that select content (``split_file`` of an image folder, ``train_per_class`` images of every
    class in the official order, ``image_size`` a folder's images are decoded at)."""

    archive: Optional[str] = None
    data_root: Optional[str] = None
    #: generate a small dataset in the official format (``fsl_lsskd.data.fake``): images per class per part
    generate: Optional[Tuple[int, int]] = None
    download: bool = False
    split_file: Optional[str] = None
    train_per_class: Optional[int] = None
    image_size: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.generate is not None and len(self.generate) != 2:
            raise ConfigError(f"generate must be [train images per class, test images per class] (e.g. [6, 2]), "
                              f"got {list(self.generate)}")


@dataclass(frozen=True)
class TrainSpec(_Checked):
    """The training budget and how it runs. ``validation``: the episodes scored on the val split every epoch
    (``null`` disables); ``precision``: ``fp32``, ``bf16`` or ``fp16`` autocast (part of the training
    identity)."""

    epochs: int = 100
    batch_size: Optional[int] = None
    fraction: float = 1.0
    heldout: float = 0.1
    precision: str = "fp32"
    device: str = "cpu"
    validation: Optional[Mapping[str, int]] = field(
        default_factory=lambda: {"n_way": 5, "n_shot": 5, "n_query": 15, "n_episodes": 200})

    def validation_protocol(self) -> Optional[EpisodeProtocol]:
        return None if not self.validation else EpisodeProtocol.parse(dict(self.validation))


@dataclass(frozen=True)
class CurveSpec(_Checked):
    """Way/shot curves: the protocols ``n_way x n_shot`` (those a split can host) scored with ``readouts``."""

    n_way: Tuple[int, ...] = (5, 10, 20)
    n_shot: Tuple[int, ...] = (1, 2, 5, 10, 20)
    n_query: int = 15
    n_episodes: int = 600
    readouts: Tuple[Any, ...] = ("protonet",)

    def protocols(self) -> List[EpisodeProtocol]:
        return protocol_grid(self.n_way, self.n_shot, self.n_query, self.n_episodes)


@dataclass(frozen=True)
class TargetSpec(_Checked):
    """Overrides for one scored target (``eval.targets``), e.g. ``{n_query: 6}`` for a dataset with few images
    per class, ``readouts: [protonet]`` to score it with fewer readouts than the training dataset; unset keys
    take ``eval``'s values (``readouts``: ``eval.readouts`` plus the row's ``extra_readouts``)."""

    n_way: Optional[Tuple[int, ...]] = None
    n_shot: Optional[Tuple[int, ...]] = None
    n_query: Optional[int] = None
    n_episodes: Optional[int] = None
    readouts: Optional[Tuple[Any, ...]] = None


@dataclass(frozen=True)
class EvalSpec(_Checked):
    """What every trained cell is scored with (module docstring). Which scores these settings give a cell, and the
    tables' columns, is decided in one place: :func:`fsl_lsskd.bench.measures.measures`.

    ``split``: the scored split of every target (``test``); ``n_way``/``n_shot``: the main protocols' grid;
    ``n_query``: query images per class; ``n_episodes``: episodes per main protocol (the published episodes of
    seed 0); ``readouts``: readout names or ``{readout: NAME, <setting>: value}`` mappings, scored on every cell."""

    split: str = "test"
    n_way: Tuple[int, ...] = (5,)
    n_shot: Tuple[int, ...] = (1, 5)
    n_query: int = 15
    n_episodes: int = 2000
    readouts: Tuple[Any, ...] = ("protonet", "logreg_batched")
    #: readouts only some methods' cells get, e.g. ``{maml: [maml_finetune]}``
    extra_readouts: Mapping[str, Tuple[Any, ...]] = field(default_factory=dict)
    #: image-level readouts (fine-tuning) score the first N of the same published episodes; None = all
    image_episodes: Optional[int] = None
    #: scored datasets (test classes); empty = the training dataset only
    datasets: Tuple[str, ...] = ()
    #: per-target protocol overrides, e.g. ``{cifar_fs: {n_query: 6}}``
    targets: Mapping[str, TargetSpec] = field(default_factory=dict)
    curves: Optional[CurveSpec] = None
    #: base-class top-1 and calibration of the method's classifier on the held-out base images
    base: bool = False

    def protocols(self) -> List[EpisodeProtocol]:
        return protocol_grid(self.n_way, self.n_shot, self.n_query, self.n_episodes)

    def target_protocols(self, target: str) -> List[EpisodeProtocol]:
        """The protocols scored on ``target``: the dataset's own fixed episodes when it defines them (e.g.
        ``omniglot_runs``), else the ``eval`` grid with the target's overrides (``eval.targets``)."""
        from ..registry import DATASETS

        fixed = getattr(DATASETS.get(target), "fixed_protocols", None) if target in DATASETS else None
        if fixed is not None:
            return [EpisodeProtocol.parse(p) for p in fixed()]
        t = self.targets.get(target, TargetSpec())
        return protocol_grid(t.n_way or self.n_way, t.n_shot or self.n_shot,
                             self.n_query if t.n_query is None else t.n_query,
                             self.n_episodes if t.n_episodes is None else t.n_episodes)



@dataclass(frozen=True)
class TeacherSpec:
    """The teacher of a distillation method's cells: a method (and optionally another backbone) trained first
    as a cell of its own. ``fraction``: ``full`` (default: the teacher sees all the data, as HSAKD's few-shot
    script loads the full-data teacher checkpoint) or ``same`` (the student's fraction)."""

    method: str
    backbone: Optional[str] = None
    fraction: str = "full"


@dataclass(frozen=True)
class VariantSpec:
    """A named variant of a registered method (an ablation row): ``method`` with ``settings``."""

    method: str
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SlurmSpec(_Checked):
    """SLURM resources of one training job (``fsl-bench run --launcher slurm``; submitit's executor
    parameters). ``cpus_per_task`` and ``mem_gb`` left unset mean :attr:`DEFAULT_CPUS` CPUs and
    :attr:`DEFAULT_MEM_GB` GB, lowered to what the partition's largest node has (the run says so); a value that
    is set and exceeds every node is refused (:func:`fsl_lsskd.bench.launch.fit_to_partition`)."""

    DEFAULT_CPUS: ClassVar[int] = 4
    DEFAULT_MEM_GB: ClassVar[int] = 16

    partition: Optional[str] = None
    gpus_per_node: int = 0
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[int] = None
    timeout_min: int = 240
    array_parallelism: int = 64
    additional: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LocalSpec(_Checked):
    """``fsl-bench run --launcher local``: at most ``parallel`` cell jobs at once on this machine;
    ``timeout_min`` per job (then it is requeued and resumes; default one week), the requeue signal
    ``signal_delay_s`` seconds before it."""

    parallel: int = 1
    timeout_min: float = 7 * 24 * 60.0
    signal_delay_s: int = 30


@dataclass(frozen=True)
class LauncherSpec:
    """How ``--launcher local|slurm`` runs cell jobs (:mod:`fsl_lsskd.bench.launch`)."""

    slurm: SlurmSpec = SlurmSpec()
    local: LocalSpec = LocalSpec()


@dataclass(frozen=True)
class Benchmark(_Checked):
    """A parsed benchmark file (:func:`load_benchmark`; the keys with an example: module docstring): the grid of
    training cells (datasets x fractions x backbones x methods-or-variants x seeds,
    :func:`fsl_lsskd.bench.grid.expand`), how each trains and what each is scored with. Frozen; the CLI's filters
    (``--methods``, ``--seeds``...) make a restricted copy (:meth:`with_filters`).

    Fields (the file's keys):
        name: the benchmark's name (default: the file name without ``.yaml``): the MLflow experiment
            ``fsl-bench/<name>``, the result files ``<name>*.md/.csv/.tex/.png``; one file-name component.
        description: one line for the tables' captions.
        datasets: registered training datasets (their base classes train; each is a grid dimension).
        backbones: registered backbone names (or timm CNN names), a grid dimension.
        methods: the table rows: registered methods or names of ``variants``, a grid dimension.
        seeds: training seeds (integers in [0, 2**32)), a grid dimension; a cell's seed is part of its identity.
        method_seeds: fewer seeds for some rows, ``{row: [seed, ...]}`` (a subset of ``seeds``).
        fractions: the limited-data dimension: shares in (0, 1] of every base class's training images; empty =
            ``train.fraction`` only.
        image_size: the backbone's input side in pixels (images are resized to it; part of the identity).
        data: where each dataset's files come from, ``{dataset: DataSource}`` (paths relative to the file).
        data_paths: ``--data NAME=PATH`` of the command line: an archive or folder that replaces ``data``'s
            location on this machine; part of no identity.
        train: the training budget and how it runs (:class:`TrainSpec`: epochs, batch size, held-out share,
            precision, device, validation episodes).
        eval: what every trained cell is scored with (:class:`EvalSpec`): split, protocols, readouts, targets,
            curves, base-class scores. The scores a cell has: :func:`fsl_lsskd.bench.measures.measures`.
        teachers: the teacher of a distillation row, ``{row or method: TeacherSpec}`` (default: the method's own).
        variants: named variants of registered methods (ablation rows), ``{row: VariantSpec}``.
        method_overrides: per-method config overrides, ``{method: {setting: value}}`` (part of the identity).
        published: numbers from papers shown beside ours, ``{method: {"<column label>": "<text>"}}``.
        launcher: resources of cell jobs for ``--launcher local|slurm`` (:class:`LauncherSpec`).
        path: the file it was read from (set by :func:`load_benchmark`; not a key of the file).
    """

    name: str
    description: str = ""
    datasets: Tuple[str, ...] = ()
    backbones: Tuple[str, ...] = ()
    methods: Tuple[str, ...] = ()
    seeds: Tuple[int, ...] = (0,)
    #: fewer seeds for some rows, e.g. ``{hsakd: [0]}`` when CPU time forbids more (tables show each row's seeds)
    method_seeds: Mapping[str, Tuple[int, ...]] = field(default_factory=dict)
    #: limited-data protocol (HSAKD ``--few-ratio``): a grid dimension over fractions of every base class's
    #: images, e.g. ``[0.25, 0.5, 0.75, 1.0]``; empty = ``train.fraction`` only
    fractions: Tuple[float, ...] = ()
    image_size: int = 32
    data: Mapping[str, DataSource] = field(default_factory=dict)
    #: where a dataset's files are on this machine (``--data NAME=PATH``: an archive file or a folder); it
    #: replaces ``data``'s location and is not part of any identity
    data_paths: Mapping[str, str] = field(default_factory=dict)
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()
    teachers: Mapping[str, TeacherSpec] = field(default_factory=dict)
    variants: Mapping[str, VariantSpec] = field(default_factory=dict)
    #: per-method config overrides, e.g. ``{lsskd: {xlayer_kl: true}}``
    method_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: published numbers to show beside ours: ``{method: {"<column label>": "72.2±0.7 (source)"}}``
    published: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    launcher: LauncherSpec = LauncherSpec()
    path: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @property
    def where(self) -> str:
        return self.path or self.name

    def seeds_of(self, row: str) -> Tuple[int, ...]:
        """The training seeds of a row (``method_seeds`` when it names the row, else ``seeds``)."""
        return tuple(s for s in self.method_seeds.get(row, self.seeds) if s in self.seeds) \
            if row in self.method_seeds else tuple(self.seeds)

    def method_of(self, row: str) -> str:
        """The registered method of a row name (a method or a variant)."""
        return self.variants[row].method if row in self.variants else row

    def settings_of(self, row: str) -> Dict[str, Any]:
        """The method settings of a row: ``method_overrides`` of its method, then the variant's settings."""
        out = dict(self.method_overrides.get(self.method_of(row), {}))
        if row in self.variants:
            out.update(self.variants[row].settings)
        return out

    def eval_datasets(self, training_dataset: str) -> Tuple[str, ...]:
        return tuple(self.eval.datasets) or (training_dataset,)

    def with_filters(self, **kw: Any) -> "Benchmark":
        """Restrict the grid (CLI ``--methods`` etc.); values must be a subset of the file's."""
        changes = {}
        for key, values in kw.items():
            if not values:
                continue
            have = getattr(self, key)
            if not have:
                raise ConfigError(f"--{key}: {self.where} has no `{key}`; leave the option out")
            bad = [v for v in values if v not in have]
            if bad:
                raise ConfigError(f"--{key} {','.join(map(str, bad))} not in {self.where} "
                                  f"(it has {', '.join(map(str, have))})")
            changes[key] = tuple(values)
        if self.method_seeds and ("methods" in changes or "seeds" in changes):
            # per-row seeds follow the filters: a row filtered out loses its entry, and a row keeps only the seeds
            # still selected (``--seeds 1`` on a file with ``method_seeds: {hsakd: [0]}`` runs no hsakd cell)
            rows = set(changes.get("methods", self.methods))
            seeds = set(changes.get("seeds", self.seeds))
            changes["method_seeds"] = {row: tuple(s for s in row_seeds if s in seeds)
                                       for row, row_seeds in self.method_seeds.items() if row in rows}
        return dataclasses.replace(self, **changes)


_RENAMED = {"val_episodes": "train.validation: {n_way: 5, n_shot: 5, n_query: 15, n_episodes: N} (or null)",
            "shots": "n_shot", "episodes": "n_episodes", "classifiers": "readouts",
            "extra_classifiers": "extra_readouts"}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is tuple:
        elem = args[0] if args else Any
        if isinstance(value, (str, int, float)) or (isinstance(value, Mapping) and elem is Any):
            value = [value]  # a single item for a list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, collections.abc.Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, _join(where, str(k))) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, raw: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls) if f.name != "path"}
    unknown = sorted(set(raw) - names)
    if unknown:
        hint = f"; renamed: use {_RENAMED[unknown[0]]}" if unknown[0] in _RENAMED else ""
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (valid keys: {', '.join(sorted(names))}){hint}")
    values = {k: _coerce(v, hints[k], _join(where, k)) for k, v in raw.items()}
    try:
        return cls(**values)
    except ConfigError as exc:  # a bound (:data:`BOUNDS`): name the file and the key's path
        raise ConfigError(f"{_join(where, str(exc))}") from None


def _join(where: str, key: str) -> str:
    """``file.yaml: train.epochs``: the file, then the dotted key."""
    return f"{where}: {key}" if where.endswith((".yaml", ".yml")) else f"{where}.{key}"


def _missing_benchmark_message(path: Path) -> str:
    """Name the benchmark files that do exist (next to ``path`` and in ``./benchmarks``), and the one that was
    probably meant when only the folder or the ``.yaml`` suffix was left out."""
    found: List[Path] = []
    for folder in (path.parent, Path("benchmarks")):
        if folder.is_dir():
            found += [f for f in sorted(folder.glob("*.y*ml")) if f.is_file() and f not in found]
    meant = [f for f in found if f.stem == path.stem or f.stem == path.name]
    if meant:
        return f"benchmark file {path} not found; did you mean {meant[0]}?"
    if found:
        return f"benchmark file {path} not found; benchmark files here: {', '.join(str(f) for f in found)}"
    return (f"benchmark file {path} not found, and there is no benchmarks/ folder here: "
            "run from the repository root or give the path of a benchmark YAML file")


def load_benchmark(path: Union[str, Path]) -> Benchmark:
    """Parse and check a benchmark YAML file (structure and types; names and data are checked by
    :func:`fsl_lsskd.bench.validate.validate_benchmark`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(_missing_benchmark_message(path))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw = dict(raw)
    raw.setdefault("name", path.stem)
    bench = _build(Benchmark, raw, str(path))
    for attr in ("datasets", "backbones", "methods"):
        if not getattr(bench, attr):
            raise ConfigError(f"{path}: `{attr}` must list at least one entry")
    bad = [f for f in bench.fractions if not 0.0 < f <= 1.0]
    if bad:
        raise ConfigError(f"{path}: fractions must be in (0, 1] (e.g. [0.25, 0.5, 0.75, 1.0]), got {bad}")
    for name, t in bench.teachers.items():
        if t.fraction not in ("full", "same"):
            raise ConfigError(f"{path}: teachers.{name}.fraction must be 'full' or 'same', got {t.fraction!r}")
    clash = sorted(set(bench.variants) & _registered_methods())
    if clash:
        raise ConfigError(f"{path}: variant {clash[0]!r} has the name of a registered method; rename the variant")
    return dataclasses.replace(bench, path=str(path))


def _registered_methods() -> set:
    from ..registry import METHODS

    return set(METHODS.names())
