"""The edge column of one trained backbone: its ONNX files, their parity, latency and accuracy in one report.

:func:`build_onnx` writes ``backbone.onnx`` (fp32) and ``backbone_int8.onnx`` (int8, when a training split is
given) beside each other and checks the fp32 model against PyTorch on real images; :func:`edge_report` adds
:func:`fsl_lsskd.edge.accuracy.engine_accuracy` and :func:`fsl_lsskd.edge.latency.measure_latency`. The report
(``edge.json``, :data:`REPORT_FORMAT`) holds every figure with its machine, and the per-episode accuracies go to
``edge_accuracy.npz``. Used by ``fsl-bench export --onnx/--int8/--measure`` and ``fsl-bench edge``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError
from ..inputs import InputSpec
from ..protocol import EpisodeProtocol, can_host
from ..utils import PathLike, atomic_path, atomic_write_text, make_dir
from .latency import LatencySettings

log = logging.getLogger(__name__)

REPORT_FORMAT = 1
ONNX_FP32 = "backbone.onnx"
ONNX_INT8 = "backbone_int8.onnx"
REPORT = "edge.json"
ACCURACY_ARRAYS = "edge_accuracy.npz"
MEASURES = ("latency", "accuracy")


@dataclass(frozen=True)
class EdgeSettings:
    """What the edge column measures: ``latency`` settings, int8 calibration (``calibration_images`` training
    images sampled with ``calibration_seed``), ``parity_images`` real images for the parity check, the readouts
    and the ONNX opset (None = the exporter's default)."""

    latency: LatencySettings = field(default_factory=LatencySettings)
    calibration_images: int = 512
    calibration_seed: int = 0
    parity_images: int = 64
    readouts: Tuple[str, ...] = ("protonet", "logreg_batched")
    opset: Optional[int] = None


def sample_images(split, n: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(rows, uint8 images) of a seeded sample of ``min(n, len(split))`` rows of ``split`` (sorted rows)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(split), size=min(int(n), len(split)), replace=False))
    return rows, np.asarray(split.images[rows])


def build_onnx(export_dir: PathLike, out_dir: PathLike, *, images_split=None, train_split=None,
               mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
               settings: EdgeSettings = EdgeSettings()) -> Dict[str, Any]:
    """Write ``out_dir/backbone.onnx`` from the export (or any file :func:`load_backbone` reads) and, when
    ``train_split`` is given, ``out_dir/backbone_int8.onnx`` calibrated on it.

    Args:
        images_split: a split whose images (a seeded sample of ``settings.parity_images``) check ONNX against
            PyTorch; None = seeded standard-normal inputs (recorded as such).
        train_split: the **training** split of the backbone's dataset for int8 calibration (refused otherwise).
        mean, std: the input normalisation (default: the export's meta).

    Returns ``{"model": {...}, "files": {pytorch, onnx_fp32[, onnx_int8]}, "parity": {...}[, "int8": {...}]}``."""
    import torch

    from ..checkpoint import EXPORT_WEIGHTS, load_backbone
    from .onnx_export import OnnxBackbone, export_onnx, max_difference, parity

    out = make_dir(out_dir)
    net, meta = load_backbone(export_dir)
    spec = InputSpec.from_meta(meta, mean=mean, std=std)
    size = int(spec.image_size)
    src = Path(export_dir)
    weights = src / EXPORT_WEIGHTS if src.is_dir() else src
    model = {k: meta.get(k) for k in ("backbone", "method", "train_id", "dataset", "image_size", "num_features",
                                      "params", "flops") if meta.get(k) is not None}
    if "params" not in model:
        model["params"] = int(sum(p.numel() for p in net.parameters()))
    if "flops" not in model:
        from ..checkpoint import count_flops

        model["flops"] = count_flops(net, size)
    model.update(mean=list(spec.mean), std=list(spec.std))
    files: Dict[str, Any] = {"pytorch": {"path": weights.name, "bytes": weights.stat().st_size if weights.is_file()
                                         else None, "format": "safetensors (timm state dict)"}}
    files["onnx_fp32"] = export_onnx(net, size, out / ONNX_FP32, settings.opset)
    if images_split is not None:
        rows, images = sample_images(images_split, settings.parity_images)
        par = parity(net, out / ONNX_FP32, images, spec)
        par["images"] = f"{images_split.dataset}/{images_split.split}: {len(rows)} rows (seed 0)"
    else:
        from .onnx_export import PARITY_RTOL

        x = torch.randn(settings.parity_images, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ref = net.eval()(x).numpy()
        par = {"n_images": int(len(x)), **max_difference(ref, OnnxBackbone(out / ONNX_FP32)(x).numpy()),
               "tolerance": PARITY_RTOL, "images": "seeded standard-normal inputs (no dataset given)"}
        par["ok"] = bool(par["max_rel_diff"] <= PARITY_RTOL)
    if not par["ok"]:
        log.error("ONNX output differs from PyTorch by %.3g (relative %.3g > %.1g)", par["max_abs_diff"],
                  par["max_rel_diff"], par["tolerance"])
    report: Dict[str, Any] = {"format": REPORT_FORMAT, "model": model, "files": files, "parity": par}
    if train_split is not None:
        from .quantize import TrainSplitCalibrationReader, calibration_rows, quantize_int8

        rows = calibration_rows(len(train_split), settings.calibration_images, settings.calibration_seed)
        reader = TrainSplitCalibrationReader(train_split, rows, spec)
        info = quantize_int8(out / ONNX_FP32, out / ONNX_INT8, reader)
        info["calibration"]["seed"] = int(settings.calibration_seed)
        files["onnx_int8"] = {k: info[k] for k in ("path", "bytes", "sha256")}
        int8 = {k: v for k, v in info.items() if k not in ("path", "bytes", "sha256")}
        if images_split is not None:  # how far int8 moves the features (informative; accuracy is what counts)
            x = spec.prepare(images).contiguous()
            int8["feature_diff_vs_fp32"] = max_difference(OnnxBackbone(out / ONNX_FP32)(x).numpy(),
                                                          OnnxBackbone(out / ONNX_INT8)(x).numpy())
        report["int8"] = int8
    return report


def edge_report(export_dir: PathLike, out_dir: PathLike, *, eval_split=None, train_split=None,
                protocols: Sequence[EpisodeProtocol] = (), mean: Optional[Sequence[float]] = None,
                std: Optional[Sequence[float]] = None, settings: EdgeSettings = EdgeSettings(),
                measure: Sequence[str] = MEASURES, allow_load: bool = False,
                write: bool = True) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """ONNX files (:func:`build_onnx`), then accuracy on ``eval_split``'s episodes of every ``protocols`` (those
    it cannot host are skipped with a note) and latency, as ``measure`` asks; writes ``out_dir/edge.json`` and
    ``edge_accuracy.npz`` when ``write``. Returns (report, per-episode accuracy arrays).

    Raises :class:`~fsl_lsskd.edge.guard.MachineBusy` when the load guard trips and ``allow_load`` is False (the
    ONNX files are kept; no report is written), :class:`ConfigError` for an unknown measure or accuracy without an
    evaluation split."""
    from .accuracy import engine_accuracy
    from .guard import machine_info
    from .latency import measure_latency

    bad = sorted(set(measure) - set(MEASURES))
    if bad:
        raise ConfigError(f"--measure {','.join(measure)}: unknown {bad}; choose from {', '.join(MEASURES)}")
    if "accuracy" in measure and eval_split is None:
        raise ConfigError("accuracy needs the evaluation split: pass the dataset (--data NAME=PATH)")
    out = make_dir(out_dir)
    report = build_onnx(export_dir, out, images_split=eval_split, train_split=train_split, mean=mean, std=std,
                        settings=settings)
    m = report["model"]
    onnx_models = {"ort_fp32": out / ONNX_FP32}
    if (out / ONNX_INT8).is_file() and "int8" in report:
        onnx_models["ort_int8"] = out / ONNX_INT8
    report["machine"] = machine_info()
    report["notes"] = []
    arrays: Dict[str, np.ndarray] = {}
    if "accuracy" in measure:
        from ..checkpoint import load_backbone
        from ..eval.episodes import class_offsets

        _, counts = class_offsets(eval_split.labels, eval_split.num_classes)
        hosted = [p for p in protocols if can_host(counts, p)]
        report["notes"] += [f"{eval_split.dataset} {eval_split.split} cannot host {p.key} (fewest images per class: "
                            f"{int(min(counts))}); skipped" for p in protocols if p not in hosted]
        net, _ = load_backbone(export_dir)
        records, arrays = engine_accuracy(net, onnx_models, eval_split, hosted, settings.readouts, m["mean"],
                                          m["std"], int(m["image_size"]))
        report["accuracy"] = {"dataset": eval_split.dataset, "split": eval_split.split,
                              "fingerprint": eval_split.fingerprint, "records": records}
    if "latency" in measure:
        if eval_split is not None:
            _, images = sample_images(eval_split, max(settings.latency.batch_sizes), seed=1)
            inputs = InputSpec.from_meta(m).prepare(images).contiguous().numpy()
            source = f"{eval_split.dataset}/{eval_split.split}: {len(images)} images"
        else:
            rng = np.random.default_rng(1)
            s = int(m["image_size"])
            inputs = rng.standard_normal((max(settings.latency.batch_sizes), 3, s, s)).astype(np.float32)
            source = "seeded standard-normal inputs (no dataset given)"
        models = {"pytorch_fp32": Path(export_dir), **onnx_models}
        lat = measure_latency(models, inputs, settings.latency, allow_load, report["machine"])
        lat["inputs"] = source
        report["latency"] = lat
        report["under_load"] = lat["under_load"]
    if write:
        atomic_write_text(out / REPORT, to_json(report))
        if arrays:
            with atomic_path(out / ACCURACY_ARRAYS, suffix=".npz") as tmp:
                with open(tmp, "wb") as fh:
                    np.savez_compressed(fh, **arrays)
    return report, arrays


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars as Python numbers, paths as strings and non-finite floats as None (strict JSON)."""
    import math

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, Path):
        return obj.as_posix()
    return obj


def to_json(report: Dict[str, Any]) -> str:
    """The report as strict JSON text (NaN -> null)."""
    return json.dumps(jsonable(report), indent=2, allow_nan=False, default=str) + "\n"
