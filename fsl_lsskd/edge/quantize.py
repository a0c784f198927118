"""int8 ONNX by ONNX Runtime static quantisation, calibrated on base-class training images only.

``onnxruntime.quantization.quant_pre_process`` (symbolic shape inference and graph optimisation, ORT's
recommended first step), then ``quantize_static`` with ``QuantFormat.QDQ`` (QuantizeLinear/DequantizeLinear pairs
around every quantised operator), ``per_channel=True`` weights, signed int8 weights and unsigned int8 activations
(ORT's default U8S8, its recommendation for x86-64) and MinMax calibration of the activation ranges.

Calibration data: a seeded sample of ``n`` images of the **training** split (base classes) of the cell's dataset,
prepared exactly like the evaluation prepares its input (resized to the backbone's image size, normalised).
:class:`TrainSplitCalibrationReader` refuses any other split and records what it handed to the quantiser (rows and
the sha256 of every image), so a test can prove no validation or test image was ever used.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from ..errors import DataError
from ..inputs import InputSpec
from ..utils import PathLike, atomic_path, sha256_file

log = logging.getLogger(__name__)

CALIBRATION_SPLIT = "train"


def calibration_rows(n_rows: int, n: int, seed: int = 0) -> np.ndarray:
    """A seeded sample (without replacement, sorted) of ``min(n, n_rows)`` row indices of a split."""
    if n < 1:
        raise DataError(f"--calibration-images {n}: int8 calibration needs at least 1 image (e.g. 512)")
    if n_rows < 1:
        raise DataError("the training split is empty: there is nothing to calibrate int8 on")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_rows, size=min(int(n), int(n_rows)), replace=False)).astype(np.int64)


def image_sha256(image: np.ndarray) -> str:
    """sha256 of one uint8 image's bytes (C order)."""
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


class TrainSplitCalibrationReader(CalibrationDataReader):
    """Calibration batches for ``quantize_static`` from ``rows`` of a **training** split.

    Args:
        split: a :class:`~fsl_lsskd.data.base.SplitData` whose ``split`` is ``"train"`` (anything else raises
            :class:`~fsl_lsskd.errors.DataError`).
        rows: row indices of ``split`` to use (e.g. :func:`calibration_rows`).
        spec: the backbone's input preparation (:class:`~fsl_lsskd.inputs.InputSpec`).
        input_name: the ONNX model's input.
        batch_size: images per calibration batch.

    After calibration ``given_rows`` lists every row handed to the quantiser, in order, and ``given_sha256`` the
    sha256 of each image's bytes."""

    def __init__(self, split, rows: Sequence[int], spec: InputSpec, input_name: str = "images",
                 batch_size: int = 32) -> None:
        if getattr(split, "split", None) != CALIBRATION_SPLIT:
            raise DataError(f"int8 calibration uses training images only; got the {getattr(split, 'split', '?')!r} "
                            f"split of {getattr(split, 'dataset', '?')}. Pass the training split (base classes)")
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0 or rows.min() < 0 or rows.max() >= len(split):
            raise DataError(f"calibration rows must index the {len(split)} training images")
        self.split, self.rows = split, rows
        self.spec = spec
        self.input_name, self.batch_size = input_name, int(batch_size)
        self.given_rows: List[int] = []
        self.given_sha256: List[str] = []
        self._next = 0

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self._next >= len(self.rows):
            return None
        r = self.rows[self._next:self._next + self.batch_size]
        self._next += len(r)
        images = np.asarray(self.split.images[r])
        self.given_rows.extend(int(i) for i in r)
        self.given_sha256.extend(image_sha256(img) for img in images)
        x = self.spec.prepare(images).contiguous().numpy()
        return {self.input_name: x.astype(np.float32, copy=False)}

    def rewind(self) -> None:
        self._next = 0


def quantize_int8(fp32_path: PathLike, out_path: PathLike, reader: TrainSplitCalibrationReader,
                  pre_process: bool = True) -> Dict[str, Any]:
    """Quantise the fp32 ONNX model at ``fp32_path`` to ``out_path`` (atomic) with ``reader``'s calibration
    batches (module docstring); returns the record: file bytes/sha256, format and types, calibration (dataset,
    split, fingerprint, number of images, sha256 of the row list)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="fsl-quant-") as tmp:
        src = Path(fp32_path)
        if pre_process:
            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
            src = pre
        with atomic_path(out_path, suffix=".onnx") as dst:
            quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
    rows = np.asarray(reader.given_rows, dtype=np.int64)
    split = reader.split
    info = {"path": out_path.name, "bytes": out_path.stat().st_size, "sha256": sha256_file(out_path),
            "quant_format": "QDQ", "per_channel": True, "weight_type": "int8", "activation_type": "uint8",
            "calibrate_method": "MinMax", "pre_process": bool(pre_process),
            "calibration": {"dataset": split.dataset, "split": split.split, "fingerprint": split.fingerprint,
                            "n_images": int(len(rows)), "n_split_images": int(len(split)),
                            "rows_sha256": hashlib.sha256(rows.tobytes()).hexdigest(),
                            "image_size": reader.spec.image_size}}
    log.info("int8 %s: %d bytes, calibrated on %d %s %s images", out_path, info["bytes"], len(rows), split.dataset,
             split.split)
    return info

