"""One backbone for deployment (``fsl-bench export``): the timm-format export, and with ONNX/int8/measures the
edge files and figures (:func:`fsl_lsskd.edge.report.edge_report`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from ..errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_for_edge` wrote: ``export`` (the export report of
    :func:`fsl_lsskd.checkpoint.export_backbone`: files, parameters, FLOPs at batch 1, ``load_with``) and ``edge``
    (the edge report, also in OUT/edge.json; None without ONNX, int8 or measures)."""

    export: Dict[str, Any]
    edge: Optional[Dict[str, Any]] = None


def export_for_edge(checkpoint: Path, out_dir: Path, *, onnx: bool = False, int8: bool = False,
                    measure: Sequence[str] = (), calibration_images: int = 512, dataset: Optional[str] = None,
                    archive: Optional[Path] = None, data_root: Optional[Path] = None, download: bool = False,
                    dataset_options: Optional[Mapping[str, Any]] = None, split: str = "test", protocols: Sequence = (),
                    readouts: Sequence[str] = (), latency=None, allow_load: bool = False,
                    on_export: Optional[Callable[[Dict[str, Any]], None]] = None) -> ExportResult:
    """Export the backbone of ``checkpoint`` (a model directory, a training checkpoint ``last.pt`` or an export)
    without auxiliary classifiers or classifier into ``out_dir`` (backbone.safetensors + backbone.json), and, with
    ``onnx``, ``int8`` (implies ONNX) or ``measure`` (names of :data:`~fsl_lsskd.edge.report.MEASURES`: latency,
    accuracy), the edge files and OUT/edge.json.

    Arguments: ``calibration_images`` (>= 1) seeded training images calibrate int8; ``dataset`` (default: the
    backbone's, from its meta) with ``archive``/``data_root``/``download`` (its location, as
    :func:`fsl_lsskd.data.get_dataset` takes them) and ``dataset_options`` (``split_file``, ``train_per_class``,
    ``folder_image_size`` as given on the command line) is read when int8 or accuracy needs it, or when a location
    is given (then ONNX parity is checked on its images); ``split`` is scored by accuracy on ``protocols``
    (:class:`~fsl_lsskd.protocol.EpisodeProtocol`) with ``readouts``; ``latency`` is a
    :class:`~fsl_lsskd.edge.latency.LatencySettings` (ms figures). ``on_export`` receives the export report as
    soon as the backbone is written, before the minutes of ONNX and measuring.

    Returns an :class:`ExportResult`. Raises, before torch is imported: :class:`ConfigError` for an unknown
    measure or ``calibration_images`` < 1, :class:`CheckpointError` for a missing checkpoint, an unwritable
    ``out_dir`` (:class:`~fsl_lsskd.errors.OutputError`), :class:`~fsl_lsskd.edge.guard.MachineBusy` when latency
    is measured on a busy machine without ``allow_load``; then :class:`ConfigError` when int8 or accuracy has no
    data (or no dataset name), and the dataset's own errors (exit code 2 for all of them)."""
    from ..options import dataset_kwargs
    from ..utils import check_writable_dir
    from .guard import check_quiet
    from .report import MEASURES

    wanted = list(measure)
    bad = sorted(set(wanted) - set(MEASURES))
    if bad:
        raise ConfigError(f"--measure {','.join(wanted)!r}: unknown {', '.join(bad)}; choose from "
                          f"{', '.join(MEASURES)}")
    if calibration_images < 1:
        raise ConfigError(f"--calibration-images {calibration_images}: need at least 1 (e.g. 512)")
    if not Path(checkpoint).exists():  # before torch is imported (seconds)
        raise CheckpointError(f"checkpoint {checkpoint} does not exist; pass a model directory (OUT/model of "
                              f"`fsl-bench train`), a training checkpoint (last.pt) or an export")
    check_writable_dir(out_dir, "--out")
    if "latency" in wanted and not allow_load:
        check_quiet(latency)  # fail fast, before minutes of export and scoring
    from ..checkpoint import export_backbone, load_backbone
    from .report import EdgeSettings, edge_report

    settings = EdgeSettings(latency=latency, calibration_images=int(calibration_images),
                            readouts=tuple(readouts))
    net, meta = load_backbone(checkpoint)
    edge = onnx or int8 or bool(wanted)
    needs_data = int8 or "accuracy" in wanted
    train_split = eval_split = None
    ds = None
    if edge and (needs_data or archive is not None or data_root is not None or download):
        name = dataset or meta.get("dataset")
        if not name:
            raise ConfigError("the checkpoint's meta names no dataset: pass --data NAME=PATH")
        if archive is None and data_root is None and not download:
            why = "--int8 calibrates on its training images" if int8 else "--measure accuracy scores its episodes"
            raise ConfigError(f"{why}: pass the {name} data with --data {name}=PATH (a file or a folder, as "
                              f"--archive/--data-root were; and --train-per-class N when the backbone was trained "
                              f"on a subset)")
        from ..data import get_dataset
        from ..data.base import scored_split_counts
        from ..protocol import check_capacity

        ds = get_dataset(name, archive=archive, root=data_root, download=download,
                         **dataset_kwargs(name, **dict(dataset_options or {})))
        counts = scored_split_counts(ds, name, split)
        for p in protocols:  # before anything is decoded
            check_capacity(counts, p, ds.class_split()[split], where=f"{name} {split}",
                           fix=f"lower --n-way/--n-shot/--n-query (at most {int(min(counts))} images per class)")
        eval_split = ds.load_split(split)
        if int8:
            train_split = ds.load_split("train")
    extra = {k: meta[k] for k in ("method", "train_id", "dataset", "mean", "std") if k in meta}
    report = export_backbone(net, meta["backbone"], int(meta["image_size"]), out_dir, extra=extra)
    if on_export is not None:
        on_export(report)
    if not edge:
        return ExportResult(report)
    mean = meta.get("mean") or (ds.mean if ds is not None else None)
    std = meta.get("std") or (ds.std if ds is not None else None)
    rep, _ = edge_report(out_dir, out_dir, eval_split=eval_split, train_split=train_split, protocols=protocols,
                         mean=mean, std=std, settings=settings, measure=wanted, allow_load=allow_load)
    return ExportResult(report, rep)
