"""Grid expansion: a benchmark becomes cells (dataset x backbone x method x seed), each with a
content-derived id so a finished cell is recognised in the MLflow store and skipped on resume.

Distillation methods (``needs_teacher``) get a *teacher cell*: the teacher method on the same dataset, seed
and budget (backbone from ``teachers:`` or the student's). It is an ordinary cell with its own content id, so
when it is also in the grid (``kd``'s default teacher ``ce``) it is trained once and shared; its id is part
of the student's payload, so a different teacher gives a different student cell."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..errors import ConfigError
from .config import Benchmark, content_id

CELL_FORMAT = 1


@dataclass(frozen=True)
class Cell:
    benchmark: str
    dataset: str
    backbone: str
    method: str
    seed: int
    payload: Tuple[Tuple[str, Any], ...]  # the resolved settings that define the cell
    #: the cell whose checkpoint teaches this one (distillation methods)
    teacher: Optional["Cell"] = None
    #: "grid" for cells of the benchmark's own grid, "teacher" for teacher-only cells
    role: str = "grid"
    #: fraction of every base class's training images (limited-data protocol)
    fraction: float = 1.0

    @property
    def id(self) -> str:
        return content_id(dict(self.payload))

    @property
    def data_label(self) -> str:
        """The dataset, with the limited-data fraction when it is not 100% (``tiny_imagenet@25%``)."""
        return self.dataset if self.fraction >= 1.0 else f"{self.dataset}@{100 * self.fraction:g}%"

    @property
    def label(self) -> str:
        return f"{self.method}/{self.backbone}/{self.data_label}/seed{self.seed}"

    def settings(self) -> Dict[str, Any]:
        return dict(self.payload)


def _needs_teacher(method: str) -> Tuple[bool, Optional[str]]:
    from .. import plugins
    from ..registry import METHODS

    plugins.import_submodules("fsl_lsskd.methods")
    cls = METHODS.get(method)
    return bool(getattr(cls, "needs_teacher", False)), getattr(cls, "default_teacher", None)


def make_cell(bench: Benchmark, dataset: str, backbone: str, method: str, seed: int, role: str = "grid",
              fraction: Optional[float] = None, _depth: int = 0) -> Cell:
    """The cell of (dataset, backbone, method, seed[, fraction]), with its teacher cell when the method needs
    one (trained on the same fraction of the data)."""
    train = dataclasses.asdict(bench.train)
    if fraction is not None:
        train["fraction"] = float(fraction)
    teacher = None
    needs, default = _needs_teacher(method)
    if needs:
        spec = bench.teachers.get(method)
        t_method = spec.method if spec else default
        if not t_method:
            raise ConfigError(f"method {method!r} needs a teacher: add `teachers: {{{method}: {{method: ce}}}}` to "
                              f"{bench.path or bench.name}")
        if _depth > 3:
            raise ConfigError(f"{bench.path or bench.name}: teacher chain of {method!r} is circular")
        teacher = make_cell(bench, dataset, (spec.backbone if spec and spec.backbone else backbone), t_method,
                            seed, role="teacher", fraction=fraction, _depth=_depth + 1)
    source = bench.data.get(dataset)
    payload = {
        "format": CELL_FORMAT,
        "benchmark": bench.name,
        "dataset": dataset,
        "data": dataclasses.asdict(source) if source else None,
        "backbone": backbone,
        "method": method,
        "seed": seed,
        "image_size": bench.image_size,
        "train": train,
        "eval": dataclasses.asdict(bench.eval),
        "overrides": dict(bench.method_overrides.get(method, {})),
    }
    if teacher is not None:
        payload["teacher"] = teacher.id
    return Cell(bench.name, dataset, backbone, method, seed, tuple(sorted(payload.items())), teacher, role,
                float(train["fraction"]))


def expand(bench: Benchmark) -> List[Cell]:
    """All cells of the grid, in a stable order (dataset, backbone, method, seed)."""
    fractions = list(bench.fractions) or [None]
    return [make_cell(bench, dataset, backbone, method, seed, fraction=fraction)
            for dataset in bench.datasets for fraction in fractions for backbone in bench.backbones
            for method in bench.methods for seed in bench.seeds]


def with_teachers(cells: List[Cell]) -> List[Cell]:
    """``cells`` plus the teacher-only cells they need, every teacher before its first student; a teacher
    that is also a grid cell appears once (at its grid position or earlier)."""
    out: Dict[str, Cell] = {}

    def add(c: Cell) -> None:
        if c.teacher is not None:
            add(c.teacher)
        if c.id not in out or (out[c.id].role == "teacher" and c.role == "grid"):
            out[c.id] = c if c.id not in out else dataclasses.replace(out[c.id], role="grid")

    for c in cells:
        add(c)
    return list(out.values())


def _group_key(cell: Cell) -> str:
    root = cell
    while root.teacher is not None:
        root = root.teacher
    return root.id


def shard(cells: List[Cell], spec: str) -> List[Cell]:
    """``I/N`` (1-based): the I-th of N disjoint slices, so N processes share a grid without overlap.

    Cells are dealt round-robin by *group* (a teacher with every cell it teaches), so a student and its
    teacher always run in the same process: no teacher is trained twice, no student waits on another shard."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {spec!r}: expected I/N, e.g. 1/4") from None
    if not (n >= 1 and 1 <= i <= n):
        raise ConfigError(f"--shard {spec!r}: need 1 <= I <= N")
    groups: Dict[str, int] = {}
    for c in with_teachers(cells):
        groups.setdefault(_group_key(c), len(groups))
    return [c for c in cells if groups[_group_key(c)] % n == i - 1]
