"""ONNX export of the inference backbone and its parity check against PyTorch.

The exported graph is what :func:`fsl_lsskd.checkpoint.load_backbone` gives: the backbone without auxiliary
classifiers and without the classifier, ``features = model(images)`` with ``images`` float32 ``[B, 3, S, S]``
normalised as in :meth:`fsl_lsskd.inputs.InputSpec.prepare` and ``features`` float32 ``[B, D]`` pooled. The
batch dimension is dynamic. Export uses ``torch.onnx.export(..., dynamo=True)`` (the torch.export-based exporter,
PyTorch's default since 2.9; it folds BatchNorm into the convolutions of an eval-mode network) with the weights
inside the one ``.onnx`` file.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

from ..inputs import InputSpec
from ..utils import PathLike, atomic_path, sha256_file

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "features"
PARITY_RTOL = 1e-4  # max |ORT - PyTorch| over max |PyTorch| on real images


def export_onnx(net: nn.Module, image_size: int, path: PathLike, opset: Optional[int] = None) -> Dict[str, Any]:
    """Export the inference backbone ``net`` (``net(x)`` = pooled features ``[B, D]``) to ``path`` (one file,
    written atomically) with a dynamic batch dimension; returns ``{path, bytes, sha256, opset, input, output,
    image_size, num_features}``.

    ``opset``: the ONNX opset (default: the exporter's). Raises the exporter's error when the network does not
    export (e.g. data-dependent control flow)."""
    import onnx

    path = Path(path)
    net = net.to("cpu").eval()
    example = torch.zeros(2, 3, int(image_size), int(image_size))
    batch = torch.export.Dim("batch", min=1, max=4096)
    with atomic_path(path, suffix=".onnx") as tmp, torch.no_grad():
        kwargs = {"opset_version": opset} if opset else {}
        torch.onnx.export(net, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False,
                          report=False, optimize=True, **kwargs)
        model = onnx.load(str(tmp))
        onnx.checker.check_model(model)
    opset_used = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    out_dim = model.graph.output[0].type.tensor_type.shape.dim
    num_features = int(out_dim[1].dim_value) if len(out_dim) > 1 else 0
    info = {"path": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path), "opset": int(opset_used),
            "input": INPUT_NAME, "output": OUTPUT_NAME, "image_size": int(image_size),
            "num_features": num_features, "exporter": f"torch.onnx.export(dynamo=True) torch {torch.__version__}"}
    log.info("exported ONNX %s (%d bytes, opset %d)", path, info["bytes"], info["opset"])
    return info


def session(path: PathLike, threads: Optional[int] = None):
    """An ONNX Runtime CPU inference session of ``path`` with ``threads`` intra-op threads (None = ORT's
    default: all cores) and one inter-op thread (sequential execution), all graph optimisations on."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OnnxBackbone(nn.Module):
    """An ONNX Runtime session as a frozen backbone: ``forward(x float32 [B, 3, S, S]) -> float32 [B, D]``
    (CPU), so the evaluation machinery (:func:`fsl_lsskd.eval.scoring.evaluate`) scores an exported model
    exactly like a PyTorch one. Pass ``model_hash`` = :attr:`content_hash` to ``evaluate`` (it has no
    parameters to hash)."""

    def __init__(self, path: PathLike, threads: Optional[int] = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = session(self.path, threads)
        self.input_name = self.session.get_inputs()[0].name
        shape = self.session.get_outputs()[0].shape
        self.num_features = int(shape[1]) if len(shape) > 1 and isinstance(shape[1], int) else 0
        self.content_hash = "onnx-" + sha256_file(self.path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: arr})[0])

    def __deepcopy__(self, memo):  # an ORT session cannot be copied; nothing to fold either
        raise TypeError("OnnxBackbone holds an ONNX Runtime session and is not copied")


def max_difference(reference: np.ndarray, other: np.ndarray) -> Dict[str, float]:
    """``{max_abs_diff, max_rel_diff}``: the largest absolute difference and that over max ``|reference|``."""
    reference, other = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    if reference.shape != other.shape:
        raise ValueError(f"outputs differ in shape: {reference.shape} vs {other.shape}")
    diff = float(np.abs(reference - other).max()) if reference.size else 0.0
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    return {"max_abs_diff": diff, "max_rel_diff": rel, "max_abs_reference": scale}


@torch.inference_mode()
def parity(net: nn.Module, onnx_path: PathLike, images: np.ndarray, spec: InputSpec,
           tolerance: float = PARITY_RTOL) -> Dict[str, Any]:
    """Compare the ONNX model with the PyTorch network on real images (uint8 ``[N, H, W, 3]``, prepared like
    the evaluation prepares them: ``spec.prepare``): ``{n_images, max_abs_diff, max_rel_diff, max_abs_reference,
    tolerance, ok}`` with ``ok`` = max_rel_diff <= ``tolerance``."""
    x = spec.prepare(images).contiguous()
    ref = net.to("cpu").eval()(x).float().numpy()
    out = OnnxBackbone(onnx_path, threads=None)(x).numpy()
    res = {"n_images": int(len(images)), **max_difference(ref, out), "tolerance": float(tolerance)}
    res["ok"] = bool(res["max_rel_diff"] <= tolerance)
    return res
