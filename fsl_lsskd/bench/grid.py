"""Grid expansion: a benchmark becomes training cells (dataset x fraction x backbone x method-or-variant x seed)
and each cell becomes a :class:`~fsl_lsskd.train.config.TrainConfig` through one function,
:func:`training_config`; the cell's training identity (and id) is computed from that config, so every setting
that reaches the id reaches the run.

Distillation methods (``needs_teacher``) get a *teacher cell*: the teacher method on the same dataset and seed,
by default on the full data (HSAKD's few-shot script loads the full-data teacher; ``teachers: {M: {fraction:
same}}`` trains it on the student's fraction). It is an ordinary cell: when it is also in the grid (``kd``'s
teacher ``ce``) it is trained once and shared; its training id is part of the student's identity.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..errors import ConfigError
from ..registry import METHODS
from .config import Benchmark, DataSource


@dataclass(frozen=True)
class Cell:
    """One training cell of a benchmark. ``row`` is the table row (a method or a variant's name), ``method``
    the registered method, ``settings`` its config overrides; ``teacher`` the cell that teaches it; ``role``
    ``grid`` or ``teacher`` (a cell trained only as a teacher)."""

    dataset: str
    backbone: str
    row: str
    method: str
    seed: int
    fraction: float = 1.0
    settings: Tuple[Tuple[str, Any], ...] = ()
    teacher: Optional["Cell"] = None
    role: str = "grid"

    @property
    def key(self) -> tuple:
        """What the cell is, without the data's fingerprint (used to deduplicate and shard)."""
        return (self.dataset, self.backbone, self.method, self.settings, self.seed, self.fraction,
                self.teacher.key if self.teacher else None)

    @property
    def data_label(self) -> str:
        """The dataset, with the limited-data fraction when it is not 100% (``tiny_imagenet@25%``)."""
        return self.dataset if self.fraction >= 1.0 else f"{self.dataset}@{100 * self.fraction:g}%"

    @property
    def label(self) -> str:
        return f"{self.row}/{self.backbone}/{self.data_label}/seed{self.seed}"


def make_cell(bench: Benchmark, dataset: str, backbone: str, row: str, seed: int, fraction: Optional[float] = None,
              role: str = "grid", _depth: int = 0) -> Cell:
    """The cell of (dataset, backbone, row, seed[, fraction]), with its teacher cell when its method needs one."""
    method = bench.method_of(row)
    fraction = float(bench.train.fraction if fraction is None else fraction)
    teacher = None
    if METHODS.class_constant(method, "needs_teacher", False):  # read from the source: planning imports no torch
        spec = bench.teachers.get(row) or bench.teachers.get(method)
        t_row = spec.method if spec else METHODS.class_constant(method, "default_teacher")
        if not t_row:
            raise ConfigError(f"method {method!r} needs a teacher: add `teachers: {{{row}: {{method: ce}}}}` to "
                              f"{bench.where}")
        if _depth > 3:
            raise ConfigError(f"{bench.where}: teacher chain of {row!r} is circular")
        t_fraction = fraction if spec is not None and spec.fraction == "same" else 1.0
        teacher = make_cell(bench, dataset, spec.backbone if spec and spec.backbone else backbone, t_row, seed,
                            t_fraction, role="teacher", _depth=_depth + 1)
    settings = tuple(sorted(bench.settings_of(row).items()))
    return Cell(dataset, backbone, row, method, int(seed), fraction, settings, teacher, role)


def expand(bench: Benchmark) -> List[Cell]:
    """All grid cells, in a stable order (dataset, fraction, backbone, row, seed)."""
    fractions = list(bench.fractions) or [None]
    return [make_cell(bench, dataset, backbone, row, seed, fraction)
            for dataset in bench.datasets for fraction in fractions for backbone in bench.backbones
            for row in bench.methods for seed in bench.seeds_of(row)]


def with_teachers(cells: List[Cell]) -> List[Cell]:
    """``cells`` plus the teacher-only cells they need, every teacher before its first student; a teacher that
    is also a grid cell appears once (as a grid cell)."""
    out: Dict[tuple, Cell] = {}

    def add(c: Cell) -> None:
        if c.teacher is not None:
            add(c.teacher)
        if c.key not in out:
            out[c.key] = c
        elif out[c.key].role == "teacher" and c.role == "grid":
            out[c.key] = dataclasses.replace(c, role="grid")

    for c in cells:
        add(c)
    # a grid cell that is also a teacher keeps its grid row name
    return list(out.values())


def _group_key(cell: Cell) -> tuple:
    root = cell
    while root.teacher is not None:
        root = root.teacher
    return root.key


def shard(cells: List[Cell], spec: str) -> List[Cell]:
    """``I/N`` (1-based): the I-th of N disjoint slices, so N processes share a grid without overlap.

    Cells are dealt round-robin by *group* (a teacher with every cell it teaches), so a student and its teacher
    always run in the same process: no teacher is trained twice, no student waits on another shard."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {spec!r}: expected I/N, e.g. 1/4") from None
    if not (n >= 1 and 1 <= i <= n):
        raise ConfigError(f"--shard {spec!r}: need 1 <= I <= N")
    groups: Dict[tuple, int] = {}
    for c in with_teachers(cells):
        groups.setdefault(_group_key(c), len(groups))
    return [c for c in cells if groups[_group_key(c)] % n == i - 1]


# --------------------------------------------------------------------------------------------------- data
def resolve_path(path: str, bench: Benchmark, relative_to_file: bool = True) -> Path:
    """A path from the benchmark file (relative to the file) or the command line (relative to the cwd)."""
    p = Path(os.path.expandvars(os.path.expanduser(path)))
    if not p.is_absolute() and bench.path and relative_to_file:
        p = Path(bench.path).resolve().parent / p
    return p.resolve()


def data_kwargs(dataset: str, bench: Benchmark) -> Dict[str, Any]:
    """Arguments of :func:`fsl_lsskd.data.get_dataset` for ``dataset`` in ``bench`` (``--data`` paths first)."""
    source: DataSource = bench.data.get(dataset) or DataSource()
    kw: Dict[str, Any] = {}
    if source.split_file:
        kw["split_file"] = resolve_path(source.split_file, bench)
    if source.train_per_class is not None:
        kw["train_per_class"] = int(source.train_per_class)
    if source.image_size is not None:
        kw["image_size"] = int(source.image_size)
    if dataset in bench.data_paths:
        from ..options import data_location

        return {**kw, **data_location(dataset, bench.data_paths[dataset])}
    if source.generate:
        return {**kw, "archive": generated_archive(dataset, tuple(source.generate))}
    if source.download:
        kw["download"] = True
    if source.archive:
        kw["archive"] = resolve_path(source.archive, bench)
    if source.data_root:
        kw["root"] = resolve_path(source.data_root, bench)
    return kw


GENERATORS = ("tiny_imagenet", "cifar_fs")
#: (classes, image size) of the datasets the official-format writers generate (:mod:`fsl_lsskd.data.fake`)
GENERATED_SHAPE = {"tiny_imagenet": (200, 64), "cifar_fs": (100, 32)}


def generated_bytes(dataset: str, sizes: Tuple[int, int]) -> int:
    """Memory a ``generate: [a, b]`` source needs (a lower bound): its decoded images, uint8
    ``[classes * (a + b), S, S, 3]``, plus the writer's float64 working array of one class's ``max(a, b)``
    images (:func:`fsl_lsskd.data.fake.class_images`)."""
    classes, size = GENERATED_SHAPE[dataset]
    per_image = size * size * 3
    return classes * (int(sizes[0]) + int(sizes[1])) * per_image + max(int(s) for s in sizes) * per_image * 8


def check_generated(dataset: str, sizes: Tuple[int, int], where: str = "generate") -> None:
    """Refuse (:class:`ConfigError`, with the estimate) a ``generate: [a, b]`` source whose sizes are not counts
    >= 1 or whose images would not fit in the available memory (:func:`generated_bytes`); before anything is
    generated or allocated."""
    from ..bounds import check_count, check_memory

    if len(sizes) != 2:
        raise ConfigError(f"{where} must be [train images per class, test images per class], got {list(sizes)}")
    a, b = (check_count(s, f"{where}[{i}] (images per class)") for i, s in enumerate(sizes))
    classes, size = GENERATED_SHAPE[dataset]
    check_memory(generated_bytes(dataset, (a, b)),
                 f"{where} [{a}, {b}]: {classes} classes of {a + b:,} generated {size}x{size} images each",
                 f"lower {where} (a few images per class suffice for a test run, e.g. [6, 2])")


def generated_archive(dataset: str, sizes: tuple) -> Path:
    """Generate (once, into the cache) a small dataset in the official archive format; sizes are checked first
    (:func:`check_generated`)."""
    from ..data import fake
    from ..utils import atomic_write_text, cache_dir, make_dir

    if dataset in GENERATED_SHAPE:
        check_generated(dataset, tuple(sizes))
    out = cache_dir() / "generated" / f"{dataset}-{'x'.join(map(str, sizes))}"
    writers = {
        "tiny_imagenet": lambda d, a, b: fake.write_fake_tiny_imagenet(d, per_class_train=a, per_class_val=b, seed=0),
        "cifar_fs": lambda d, a, b: fake.write_fake_cifar100(d, per_class_train=a, per_class_test=b, seed=0),
    }
    if dataset not in writers:
        raise ConfigError(f"`generate` is supported for {', '.join(writers)}, not {dataset!r}")
    done = out / ".done"
    if done.is_file():
        return Path(done.read_text().strip())
    make_dir(out)
    path = writers[dataset](out, sizes[0], sizes[1])
    atomic_write_text(done, str(path))  # the marker last: a killed generation is redone
    return Path(path)


# ------------------------------------------------------------------------------------------------ config
def training_config(bench: Benchmark, cell: Cell, out_dir: Path, teacher_dir: Optional[Path] = None,
                    data: Optional[Dict[str, Any]] = None):
    """THE way from a cell to the :class:`~fsl_lsskd.train.config.TrainConfig` that trains it (its training
    identity is computed from the result). ``data`` = :func:`data_kwargs` of the cell's dataset (computed
    when not given); ``teacher_dir`` = the teacher cell's finished model directory."""
    from ..train.config import TrainConfig

    kw = dict(data if data is not None else data_kwargs(cell.dataset, bench))
    archive, root = kw.pop("archive", None), kw.pop("root", None)
    kw.pop("download", None)
    tr = bench.train
    return TrainConfig(method=cell.method, backbone=cell.backbone, dataset=cell.dataset, image_size=bench.image_size,
                       seed=cell.seed, fraction=cell.fraction, heldout=tr.heldout, epochs=tr.epochs,
                       batch_size=tr.batch_size, method_overrides=dict(cell.settings), precision=tr.precision,
                       teacher=str(teacher_dir) if teacher_dir is not None else None,
                       dataset_options={k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items()},
                       archive=str(archive) if archive else None, data_root=str(root) if root else None,
                       device=tr.device, out_dir=str(out_dir), validation=tr.validation_protocol(),
                       experiment=experiment_name(bench), run_name=cell.label)


def experiment_name(bench: Benchmark) -> str:
    return f"fsl-bench/{bench.name}"
