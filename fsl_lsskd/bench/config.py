"""Benchmark files (``benchmarks/*.yaml``) parsed into typed, frozen config objects.

An unknown key or a wrong type is a :class:`~fsl_lsskd.errors.ConfigError` naming the key and the file.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import yaml

from ..errors import ConfigError


@dataclass(frozen=True)
class DataSource:
    """Where a dataset's files come from: an archive, a data root, or generated in official format."""

    archive: Optional[str] = None
    data_root: Optional[str] = None
    #: generate a small dataset in the official format (``fsl_lsskd.data.fake``): images per class per part
    generate: Optional[Tuple[int, int]] = None
    download: bool = False


@dataclass(frozen=True)
class TrainSpec:
    epochs: int = 100
    batch_size: Optional[int] = None
    fraction: float = 1.0
    val_episodes: int = 200
    heldout: float = 0.1
    device: str = "cpu"


@dataclass(frozen=True)
class EvalSpec:
    split: str = "test"
    n_way: int = 5
    shots: Tuple[int, ...] = (1, 5)
    n_query: int = 15
    episodes: int = 2000
    classifiers: Tuple[str, ...] = ("protonet", "logreg_batched")
    #: evaluators run only for some methods' cells, e.g. ``{maml: [maml_finetune]}``
    extra_classifiers: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)
    #: cap on the episodes of image-level evaluators (``maml_finetune`` fine-tunes per episode): the first N
    #: of the same published episodes; ``None`` = all
    image_episodes: Optional[int] = None

    def classifiers_for(self, method: str) -> Tuple[str, ...]:
        return tuple(self.classifiers) + tuple(c for c in self.extra_classifiers.get(method, ())
                                               if c not in self.classifiers)


@dataclass(frozen=True)
class TeacherSpec:
    """The teacher of a distillation method's cells: a method (and optionally another backbone) trained on
    the same dataset, seed and budget first, as a cell of its own."""

    method: str
    backbone: Optional[str] = None


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str = ""
    datasets: Tuple[str, ...] = ()
    backbones: Tuple[str, ...] = ()
    methods: Tuple[str, ...] = ()
    seeds: Tuple[int, ...] = (0,)
    #: limited-data protocol (HSAKD ``--few-ratio``): a grid dimension over fractions of every base class's
    #: images, e.g. ``[0.25, 0.5, 0.75, 1.0]``; empty = ``train.fraction`` only
    fractions: Tuple[float, ...] = ()
    image_size: int = 32
    data: Mapping[str, DataSource] = field(default_factory=dict)
    #: where a dataset's files are on this machine (``--data NAME=PATH``: an archive file or a folder); it
    #: replaces ``data``'s location but is not part of the cell ids, so shards on machines with different
    #: paths share one grid. Point it only at the data the benchmark names.
    data_paths: Mapping[str, str] = field(default_factory=dict)
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()
    #: teachers of distillation methods, e.g. ``{kd: {method: ce, backbone: resnet12}}``; a method that needs
    #: a teacher and is not listed gets its class's ``default_teacher`` (kd: ce, hsakd: hsakd_teacher)
    teachers: Mapping[str, TeacherSpec] = field(default_factory=dict)
    #: per-method config overrides, e.g. ``{lsskd: {xlayer_kl: true}}``
    method_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: published numbers to show beside ours: ``{method: {"<dataset>/<shot>shot": "72.2±0.7 (source)"}}``
    published: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    path: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def with_filters(self, **kw: Any) -> "Benchmark":
        """Restrict the grid (CLI ``--methods`` etc.); values must be a subset of the file's."""
        changes = {}
        for key, values in kw.items():
            if not values:
                continue
            have = getattr(self, key)
            bad = [v for v in values if v not in have]
            if bad:
                raise ConfigError(f"--{key} {','.join(map(str, bad))} not in {self.path or self.name} "
                                  f"(it has {', '.join(map(str, have))})")
            changes[key] = tuple(values)
        return dataclasses.replace(self, **changes)


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
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        elem = args[0] if args else Any
        return tuple(_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, collections.abc.Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
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
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (valid keys: {', '.join(sorted(names))})")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in raw.items()})


def load_benchmark(path: Path) -> Benchmark:
    """Parse and validate a benchmark YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"benchmark file {path} not found (see benchmarks/*.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
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
    return dataclasses.replace(bench, path=str(path))


def content_id(payload: Mapping[str, Any]) -> str:
    """A short, stable id of a JSON-able mapping (run ids derived from content)."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
