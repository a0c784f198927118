"""Up-front checks of a benchmark (``fsl-bench run``) and of a training command (``fsl-bench train``), so bad
input fails in seconds, before anything is trained, decoded, cached or logged to MLflow:

* every method, backbone, dataset and evaluator name is registered (the message lists the valid ones);
* per-method settings are valid fields of the method's config;
* every dataset can supply the evaluation protocol (``eval.n_way`` classes, ``shot + n_query`` images in every
  class of ``eval.split``) and the per-epoch validation episodes (``train.val_episodes``), counted from the
  split files and the source's inventory (the cache entry's counts when there is one), never by decoding;
* the output directory can be written.

Messages name the benchmark file and the key to change.
"""
from __future__ import annotations

import difflib
import inspect
import logging
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import numpy as np

from ..errors import ConfigError, DataError, ProtocolError, UnknownNameError, UserError
from .config import Benchmark

log = logging.getLogger(__name__)


def _registry(kind: str):
    from .. import plugins
    from ..registry import DATASETS, EVALUATORS, METHODS

    package, reg = {"method": ("fsl_lsskd.methods", METHODS), "dataset": ("fsl_lsskd.data", DATASETS),
                    "evaluator": ("fsl_lsskd.eval", EVALUATORS)}[kind]
    plugins.import_submodules(package)
    return reg


def check_backbone_name(name: str) -> None:
    """A registered few-shot backbone or any timm model name (``create_backbone`` rejects non-CNNs)."""
    import timm

    from ..registry import BACKBONES
    from .. import backbones  # noqa: F401  (registers the few-shot standards)

    if name in BACKBONES or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, BACKBONES.names(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownNameError(f"unknown backbone {name!r}.{hint} Valid backbones: {', '.join(BACKBONES.names())}, "
                           f"or any timm CNN name (e.g. resnet18, efficientnet_b0; list them with "
                           f"`python -c \"import timm; print(timm.list_models())\"`)")


def check_names(*, methods: Iterable[str] = (), backbones: Iterable[str] = (), datasets: Iterable[str] = (),
                evaluators: Iterable[str] = (), where: str = "") -> None:
    """Raise :class:`UnknownNameError` (valid names listed) for the first unregistered name; ``where``
    prefixes the message (e.g. ``"bench.yaml: `methods`"``)."""
    prefix = f"{where}: " if where else ""
    try:
        for kind, names in (("method", methods), ("dataset", datasets), ("evaluator", evaluators)):
            for name in names:
                _registry(kind).get(name)
        for name in backbones:
            check_backbone_name(name)
    except UnknownNameError as exc:
        raise UnknownNameError(f"{prefix}{exc}") from None


def split_counts(dataset, split: str) -> np.ndarray:
    """Images per class of ``split`` without decoding (``CachedDataset.split_counts``); other datasets are
    loaded (memory-mapped from their cache)."""
    if hasattr(dataset, "split_counts"):
        return np.asarray(dataset.split_counts(split), dtype=np.int64)
    return dataset.load_split(split, mmap=True).class_counts()


def _val_protocol() -> tuple:
    """(n_way, n_query) of the engine's per-epoch validation episodes (``train.engine.fewshot_val``)."""
    from ..train.engine import fewshot_val

    params = inspect.signature(fewshot_val).parameters
    return int(params["n_way"].default), int(params["n_query"].default)


def _check_counts(counts: np.ndarray, class_names: Sequence[str], n_way: int, n_shot: int, n_query: int,
                  what: str, fix_way: str, fix_images: str) -> None:
    """ProtocolError when ``counts`` cannot supply ``n_way``-way ``n_shot+n_query`` episodes; the fixes are
    templates filled with ``{classes}`` (classes in the split) and ``{most}`` (fewest images of a class)."""
    fill = {"classes": len(counts), "most": int(min(counts)) if len(counts) else 0}
    if n_way > len(counts):
        raise ProtocolError(f"{what}: {n_way}-way episodes need {n_way} classes but the split has {len(counts)}; "
                            + fix_way.format(**fill))
    need = n_shot + n_query
    short = [(class_names[i], int(c)) for i, c in enumerate(counts) if c < need]
    if short:
        listing = ", ".join(f"{n} ({c} images)" for n, c in short[:10]) + (
            f" and {len(short) - 10} more" if len(short) > 10 else "")
        raise ProtocolError(f"{what}: shot+query = {n_shot}+{n_query} = {need} images per class, but "
                            f"{len(short)} classes have fewer: {listing}; " + fix_images.format(**fill))


def _generated_counts(dataset: str, sizes: Sequence[int], split: str) -> tuple:
    """(class names, counts) of a ``generate: [a, b]`` source without generating it: the fake writers
    (``fsl_lsskd.data.fake``) put ``a`` + ``b`` images in every class of the standard split."""
    from ..data.splits import standard_split

    names = standard_split(dataset)[split]
    return names, np.full(len(names), int(sum(sizes)), dtype=np.int64)


def check_data(bench: Benchmark) -> None:
    """Every dataset of ``bench`` exists and can supply the evaluation episodes and the per-epoch validation
    episodes; reads split files and source inventories only (nothing decoded or written)."""
    from ..data import get_dataset
    from .runner import data_kwargs

    where = bench.path or bench.name
    ev, tr = bench.eval, bench.train
    val_way, val_query = _val_protocol()
    val_shot = _default_val_shot()
    for dataset in bench.datasets:
        source = bench.data.get(dataset)
        needs = [(ev.split, ev.n_way, k, ev.n_query, f"{where}: {dataset} {ev.split} split (eval)",
                  "set eval.n_way to {classes} or fewer in the benchmark file, or use a split with more classes",
                  "lower eval.shots / eval.n_query in the benchmark file (at most {most} images per class in "
                  "all), or supply more images") for k in ev.shots]
        if tr.val_episodes > 0:
            needs.append(("val", val_way, val_shot, val_query,
                          f"{where}: {dataset} val split (train.val_episodes = {tr.val_episodes} runs {val_way}-way "
                          f"{val_shot}-shot {val_query}-query validation episodes every epoch)",
                          "set train.val_episodes: 0 in the benchmark file (no per-epoch validation)",
                          "set train.val_episodes: 0 in the benchmark file (no per-epoch validation), or supply "
                          "more images"))
        if source is not None and source.generate:
            if dataset not in ("tiny_imagenet", "cifar_fs"):
                raise ConfigError(f"{where}: data.{dataset}.generate is supported for tiny_imagenet and cifar_fs "
                                  f"only; give data.{dataset}.archive or data_root instead")
            counts_of = {s: _generated_counts(dataset, source.generate, s) for s in {n[0] for n in needs}}
        else:
            try:
                ds = get_dataset(dataset, **data_kwargs(dataset, source, bench))
                counts_of = {s: (ds.class_split()[s], split_counts(ds, s)) for s in {n[0] for n in needs}}
            except DataError as exc:
                raise type(exc)(f"{where}: dataset {dataset}: {exc} (in the benchmark file: `data: {{{dataset}: "
                                f"{{archive: PATH}}}}` or `data_root: DIR`)") from None
        for split, n_way, n_shot, n_query, what, fix_way, fix_images in needs:
            names, counts = counts_of[split]
            _check_counts(counts, names, n_way, n_shot, n_query, what, fix_way, fix_images)


def _default_val_shot() -> int:
    from ..train.config import TrainConfig

    return int(TrainConfig.__dataclass_fields__["val_shot"].default)


def check_method_settings(bench: Benchmark) -> None:
    """Each method's settings (``method_overrides`` plus the ``train`` budget) build a valid method config."""
    from ..train.config import TrainConfig, build_method_config

    where = bench.path or bench.name
    methods = _registry("method")
    tr = bench.train
    for method in sorted(set(bench.methods) | set(bench.method_overrides)):
        try:
            cfg = TrainConfig(method=method, fraction=tr.fraction, epochs=tr.epochs, batch_size=tr.batch_size,
                              heldout=tr.heldout, val_episodes=tr.val_episodes,
                              method_overrides=dict(bench.method_overrides.get(method, {})))
            build_method_config(methods.get(method).config_cls, cfg)
        except UserError as exc:
            raise ConfigError(f"{where}: settings of method {method!r}: {exc}") from None


def validate_benchmark(bench: Benchmark, *, data: bool = True, out_root: Optional[Path] = None) -> None:
    """Everything ``fsl-bench run`` can check before training: names, method settings, ``out_root``
    writability and (``data=True``) the data against the protocols. Raises a :class:`UserError` subclass."""
    from ..utils import check_writable_dir

    where = bench.path or bench.name
    teachers: Dict[str, object] = dict(getattr(bench, "teachers", {}) or {})
    check_names(methods=bench.methods, where=f"{where}: `methods`")
    check_names(backbones=bench.backbones, where=f"{where}: `backbones`")
    check_names(datasets=bench.datasets, where=f"{where}: `datasets`")
    check_names(evaluators=bench.eval.classifiers, where=f"{where}: `eval.classifiers`")
    check_names(methods=bench.eval.extra_classifiers, where=f"{where}: `eval.extra_classifiers`")
    check_names(evaluators=[c for v in bench.eval.extra_classifiers.values() for c in v],
                where=f"{where}: `eval.extra_classifiers`")
    check_names(methods=bench.method_overrides, where=f"{where}: `method_overrides`")
    check_names(methods=list(teachers) + [getattr(t, "method", "") for t in teachers.values()],
                where=f"{where}: `teachers`")
    check_names(backbones=[t.backbone for t in teachers.values() if getattr(t, "backbone", None)],
                where=f"{where}: `teachers`")
    check_method_settings(bench)
    if out_root is not None:
        check_writable_dir(out_root, "--out")
    if data:
        check_data(bench)


def validate_train(cfg) -> None:
    """``fsl-bench train``: names, the output directory and (when per-epoch validation is on) the val split's
    capacity for the validation episodes, before any data is decoded or MLflow run opened."""
    from ..data import get_dataset
    from ..utils import check_writable_dir

    check_names(methods=[cfg.method], datasets=[cfg.dataset], backbones=[cfg.backbone])
    check_writable_dir(cfg.out_dir, "--out")
    check_resume_checkpoint(Path(cfg.out_dir))
    if cfg.val_episodes > 0:
        ds = get_dataset(cfg.dataset, root=cfg.data_root, archive=cfg.archive)
        n_way, n_query = _val_protocol()
        _check_counts(split_counts(ds, "val"), ds.class_split()["val"], n_way, cfg.val_shot, n_query,
                      f"{cfg.dataset} val split (--val-episodes {cfg.val_episodes} runs {n_way}-way {cfg.val_shot}-"
                      f"shot {n_query}-query validation episodes every epoch)",
                      "pass --val-episodes 0 (no per-epoch validation)",
                      "pass --val-episodes 0 (no per-epoch validation), or supply more images")


def check_resume_checkpoint(out_dir: Path) -> None:
    """A run directory's ``last.pt`` (resumed by the engine) must be readable: a truncated file fails here,
    before the data is decoded. Cheap: opens the zip directory only (torch checkpoints are zip files)."""
    import zipfile

    from ..train.checkpoint import read_checkpoint
    from ..train.engine import CHECKPOINT_NAME

    path = Path(out_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return
    try:
        with zipfile.ZipFile(path):
            return
    except (zipfile.BadZipFile, OSError):
        read_checkpoint(path)  # raises CheckpointError naming the fix (or loads a legacy non-zip file)
