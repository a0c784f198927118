"""Which scores a benchmark asks of a training cell, and the keys that join the store to the tables' columns.

A :class:`Measure` is one score a cell has: what is scored (target dataset and split), how (an episode protocol,
or none for the held-out base images), with which readout and settings, and the part it plays in the tables
(``kind``). :func:`measures` lists them for a cell of a benchmark; it is the only code that reads
``eval.readouts``, ``eval.extra_readouts``, ``eval.targets``, ``eval.curves`` and ``eval.base`` to decide which
scores a cell has. Its users:

- the writer (:mod:`fsl_lsskd.bench.runner`) scores the measures a target's data can host and tags every score
  run with :attr:`Measure.key` (``fsl.measure``) and every training run with :func:`cell_key`
  (``fsl.cell_key``);
- the reader (:func:`fsl_lsskd.report.collect.collect`) finds a cell's training by its cell key and each score by
  (training, measure key);
- the run summary (:func:`fsl_lsskd.bench.runner.main_metrics`) and ``fsl-bench edge``'s default readouts
  (:func:`edge_readouts`) filter the same list.

A record that predates the tags gets the same keys from its identity (:func:`cell_key_of`,
:func:`measure_key_of`); ``fsl-bench store migrate`` writes them into a store.

Adding a readout setting or a target override changes what this module returns, and nothing else. Data-free:
nothing here reads a dataset or the store, and importing the module imports no torch, numpy or MLflow (listing
measures imports the readouts' modules, which resolve their settings).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..protocol import EpisodeProtocol
from ..record import TAG_CELL_KEY, TAG_MEASURE, TAG_TARGET

if TYPE_CHECKING:
    from ..eval.specs import ReadoutSpec
    from ..record import ScoreRecord, TrainingRecord
    from .config import Benchmark
    from .grid import Cell

#: A column of the tables: (target, protocol, readout) of ``eval`` (with ``eval.targets``' overrides and the row's
#: ``eval.extra_readouts``).
MAIN = "main"
#: A point of the way/shot curves (``eval.curves``), scored on the curves' own episodes.
CURVE = "curve"
#: A way/shot curve point that a main score fills where the curve has no score on its own episodes: a main
#: measure whose readout is one of the curves' and whose protocol has ``eval.n_episodes`` episodes. It has the
#: key of that main measure (nothing more is scored for it).
CURVE_FROM_MAIN = "curve_from_main"
#: Base-class accuracy and calibration of the method's classifier on the held-out base images (``eval.base``).
BASE = "base"
KINDS = (MAIN, CURVE, CURVE_FROM_MAIN, BASE)

#: The split of a base measure: the held-out images of the training split's base classes (``train.heldout``).
HELDOUT_SPLIT = "heldout"
#: The protocol part of a base measure's key.
BASE_PROTOCOL = "base"
#: The training-identity fields a cell key leaves out: the data's content and the teacher's training id (which
#: depends on the teacher's data); the reader matches a student to its teacher's training separately.
DATA_FIELDS = ("split_fingerprint", "teacher")


@dataclass(frozen=True)
class Measure:
    """One score that a benchmark asks of a training cell.

    Fields:
        target: the scored dataset (a registered dataset name, e.g. ``tiny_imagenet``); for ``base``, the
            training dataset.
        split: the scored split of ``target`` (``eval.split``, e.g. ``test``); ``heldout`` for ``base``.
        protocol: the episodes (:class:`~fsl_lsskd.protocol.EpisodeProtocol`: n_way, n_shot, n_query per class,
            n_episodes, seed); None for ``base`` (scored per held-out image, not in episodes).
        readout: the readout with its resolved settings and column label
            (:class:`~fsl_lsskd.eval.scoring.ReadoutSpec`); for ``base``, ``heldout_base`` (no settings).
        kind: the part it plays in the tables: :data:`MAIN`, :data:`CURVE`, :data:`CURVE_FROM_MAIN` or
            :data:`BASE`. Not part of :attr:`key`: one score can play two parts.
    """

    target: str
    split: str
    protocol: Optional[EpisodeProtocol]
    readout: "ReadoutSpec"
    kind: str

    @property
    def key(self) -> str:
        """What the score measures, as a stable string (:func:`measure_key`), e.g.
        ``tiny_imagenet/test/5w1s15q_2000/protonet(n_aug_support=0,temperature=1.0)``; the score run's
        ``fsl.measure`` tag."""
        return measure_key(self.target, self.split, self.protocol, self.readout.name, dict(self.readout.settings))

    @property
    def label(self) -> str:
        """The run summary's name of the score: ``<target> <protocol key> <readout label>``, or
        ``base top-1 <training dataset>``."""
        if self.protocol is None:
            return f"base top-1 {self.target}"
        return f"{self.target} {self.protocol.key} {self.readout.label}"


def _protocol_part(protocol: Union[EpisodeProtocol, Mapping[str, Any], None]) -> str:
    if protocol is None:
        return BASE_PROTOCOL
    p = EpisodeProtocol.parse(protocol)
    return f"{p.key}_{p.n_episodes}" + (f"_seed{p.seed}" if p.seed else "")


def _value(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"), default=str)


def measure_key(target: str, split: str, protocol: Union[EpisodeProtocol, Mapping[str, Any], None], readout: str,
                settings: Mapping[str, Any]) -> str:
    """``<target>/<split>/<protocol>/<readout>(<setting>=<value>,...)``: ``<protocol>`` is
    ``<n_way>w<n_shot>s<n_query>q_<n_episodes>`` (``_seed<S>`` appended for episodes not from the published seed
    0) or ``base``; the settings are every resolved setting of the readout, sorted, values as compact JSON (none:
    no parentheses). Raises :class:`~fsl_lsskd.errors.ProtocolError` for a malformed protocol."""
    args = ",".join(f"{k}={_value(v)}" for k, v in sorted(dict(settings).items()))
    return f"{target}/{split}/{_protocol_part(protocol)}/{readout}" + (f"({args})" if args else "")


def measure_key_of(record: "ScoreRecord") -> Optional[str]:
    """The measure key of a stored score: its ``fsl.measure`` tag, else derived from its scoring identity (target
    dataset and split, protocol, readout, settings; a base score's target from its ``fsl.target`` tag). None when
    neither tells (a score without identity)."""
    tagged = record.tags.get(TAG_MEASURE)
    if tagged:
        return tagged
    ident = record.identity
    if not ident.get("readout"):
        return None
    if "protocol" not in ident:  # the held-out base images (fsl_lsskd.eval.base_classes.base_identity)
        target = record.tags.get(TAG_TARGET)
        return measure_key(target, HELDOUT_SPLIT, None, ident["readout"], ident.get("settings", {})) if target \
            else None
    t = ident.get("target", {})
    return measure_key(str(t.get("dataset")), str(t.get("split")), ident["protocol"], ident["readout"],
                       ident.get("settings", {}))


def cell_key(identity: Mapping[str, Any]) -> str:
    """The data-free key of a training cell: the hash of its training identity without :data:`DATA_FIELDS`
    (:func:`fsl_lsskd.train.config.train_id`: 16 hex digits of the sha256 of its canonical JSON). Two trainings
    share it when they differ only in the data's content or the teacher's training id (the same cell trained on
    another version of the data)."""
    from ..train.config import train_id

    return train_id({k: v for k, v in identity.items() if k not in DATA_FIELDS})


def cell_key_of(record: "TrainingRecord") -> str:
    """The cell key of a stored training: its ``fsl.cell_key`` tag, else :func:`cell_key` of its identity."""
    return record.tags.get(TAG_CELL_KEY) or cell_key(record.identity)


def bench_cell_key(bench: "Benchmark", cell: "Cell") -> str:
    """The cell key of a benchmark's cell, without its data: :func:`cell_key` of the training identity of its
    :class:`~fsl_lsskd.train.config.TrainConfig` (:func:`fsl_lsskd.bench.grid.training_config`)."""
    from pathlib import Path

    from ..train.config import training_identity
    from .grid import training_config

    cfg = training_config(bench, cell, Path("."), data={})
    return cell_key(training_identity(cfg, "?", "?" if cell.teacher is not None else None))


def _readout_specs(bench: "Benchmark", readouts: Sequence[Any]) -> List["ReadoutSpec"]:
    from ..eval.specs import ReadoutSpec

    defaults = {"max_episodes": bench.eval.image_episodes} if bench.eval.image_episodes else {}
    return [ReadoutSpec.parse(r, defaults) for r in readouts]


def target_readouts(bench: "Benchmark", target: str, row: str, method: str) -> Tuple[Any, ...]:
    """The readout entries a cell of ``row`` (a method, or a variant of ``method``) is scored with on
    ``target``: ``eval.targets.<target>.readouts`` when set, else ``eval.readouts`` plus the row's (or else its
    method's) ``eval.extra_readouts``."""
    t = bench.eval.targets.get(target)
    if t is not None and t.readouts is not None:
        return tuple(t.readouts)
    extra = bench.eval.extra_readouts.get(row) or bench.eval.extra_readouts.get(method) or ()
    return tuple(bench.eval.readouts) + tuple(extra)


def _is_fixed(target: str) -> bool:
    """Whether ``target`` scores only its own fixed episodes (e.g. ``omniglot_runs``: no way/shot curves)."""
    from ..registry import DATASETS

    return target in DATASETS and getattr(DATASETS.get(target), "fixed_protocols", None) is not None


def measures(bench: "Benchmark", cell: "Cell") -> List[Measure]:
    """Every score ``bench`` asks of ``cell``, data-free and in a stable order: per scored target
    (``eval.datasets``, default the training dataset), the :data:`MAIN` measures (protocol by protocol, readouts
    in the file's order), the :data:`CURVE` measures (targets with fixed episodes have none) and the
    :data:`CURVE_FROM_MAIN` measures; then the :data:`BASE` measure (``eval.base``). Within a kind, a key appears
    once (the first entry's label wins). Which of them a target's data can host is the writer's business
    (:func:`fsl_lsskd.protocol.can_host`). Raises :class:`~fsl_lsskd.errors.ConfigError` /
    :class:`~fsl_lsskd.errors.UnknownNameError` for a readout entry that does not parse."""
    ev = bench.eval
    curve_specs = _readout_specs(bench, ev.curves.readouts) if ev.curves is not None else []
    curve_protocols = ev.curves.protocols() if ev.curves is not None else []
    out: List[Measure] = []
    for target in bench.eval_datasets(cell.dataset):
        main_protocols = ev.target_protocols(target)
        specs = _readout_specs(bench, target_readouts(bench, target, cell.row, cell.method))
        main = _unique(Measure(target, ev.split, p, s, MAIN) for p in main_protocols for s in specs)
        curve = [] if _is_fixed(target) else _unique(Measure(target, ev.split, p, s, CURVE)
                                                     for p in curve_protocols for s in curve_specs)
        # a main score is a curve point too when its readout is a curve readout and it has eval's episode count
        by_identity = {json.dumps(s.identity(), sort_keys=True): s for s in reversed(curve_specs)}
        from_main = _unique(Measure(target, ev.split, m.protocol, by_identity[ident], CURVE_FROM_MAIN)
                            for m in main
                            for ident in [json.dumps(m.readout.identity(), sort_keys=True)]
                            if ident in by_identity
                            and m.protocol.replace(n_episodes=ev.n_episodes) in main_protocols)
        out += main + curve + from_main
    if ev.base:
        from ..eval.specs import HELDOUT_BASE, ReadoutSpec

        out.append(Measure(cell.dataset, HELDOUT_SPLIT, None, ReadoutSpec(HELDOUT_BASE, (), HELDOUT_BASE), BASE))
    return out


def _unique(items) -> List[Measure]:
    seen: Dict[str, Measure] = {}
    for m in items:
        seen.setdefault(m.key, m)
    return list(seen.values())


def edge_readouts(bench: "Benchmark", cells: Sequence["Cell"]) -> Tuple[str, ...]:
    """The readouts ``fsl-bench edge`` scores on every engine by default: those of the cells' :data:`MAIN`
    measures on their training dataset that run on an exported backbone's frozen features (no images, no
    trained method: ONNX Runtime serves features only) at their default settings (the command names readouts
    without settings), in order of first appearance."""
    out: Dict[str, None] = {}
    for cell in cells:
        for m in measures(bench, cell):
            r = m.readout
            if m.kind != MAIN or m.target != cell.dataset or r.label != r.name or r.name in out:
                continue
            built = r.build()
            if built.uses_features() and not built.uses_images() and not built.needs_method:
                out[r.name] = None
    return tuple(out)
