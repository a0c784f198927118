"""Few-shot accuracy of the exported models on the same episodes as the PyTorch backbone, paired per episode.

Each engine's features come from the engine itself (ONNX Runtime sessions wrapped as
:class:`~fsl_lsskd.edge.onnx_export.OnnxBackbone`) and go through the same scoring
(:func:`fsl_lsskd.eval.scoring.evaluate`): same published episodes, same readouts. The difference to PyTorch fp32 is
taken per episode (accuracy points) and summarised by its mean and 95% t-interval
(:func:`fsl_lsskd.eval.base.mean_ci`), so an int8 model that loses accuracy shows it with its uncertainty.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from torch import nn

from ..eval.base import mean_ci
from ..eval.scoring import evaluate
from ..protocol import EpisodeProtocol
from .latency import ENGINES
from .onnx_export import OnnxBackbone

log = logging.getLogger(__name__)

REFERENCE = "pytorch_fp32"


def accuracy_key(engine: str, protocol: EpisodeProtocol, label: str) -> str:
    """Key of an engine's per-episode accuracy array: ``<engine>/<protocol key>/<readout label>``."""
    return f"{engine}/{protocol.key}/{label}"


def engine_accuracy(backbone: nn.Module, onnx_models: Mapping[str, Path], split,
                    protocols: Sequence[EpisodeProtocol], readouts: Sequence[Any], mean: Sequence[float],
                    std: Sequence[float], image_size: int, threads: Optional[int] = None
                    ) -> Tuple[List[Dict[str, Any]], Dict[str, np.ndarray]]:
    """Score PyTorch ``backbone`` and every ONNX model (engine id -> ``.onnx``) on ``split`` with ``protocols`` and
    ``readouts``.

    Returns (records, arrays): a record per (engine, protocol, readout) with ``accuracy``/``accuracy_ci95`` (%),
    ``n_episodes``, the episodes' source and sha256 and, for the ONNX engines, ``diff_vs_pytorch`` (mean of the
    per-episode differences, points), ``diff_ci95`` (half-width) and ``episodes_changed`` (episodes whose accuracy
    differs); arrays: per-episode accuracy (%) by :func:`accuracy_key`."""
    kw = dict(protocols=list(protocols), readouts=list(readouts), mean=mean, std=std, image_size=image_size)
    results = {REFERENCE: evaluate(backbone, split, **kw)}
    for engine, path in onnx_models.items():
        ob = OnnxBackbone(path, threads)
        results[engine] = evaluate(ob, split, model_hash=ob.content_hash, **kw)
    records: List[Dict[str, Any]] = []
    arrays: Dict[str, np.ndarray] = {}
    for i, ref in enumerate(results[REFERENCE]):
        for engine, res_list in results.items():
            res = res_list[i]
            if (res.protocol, res.label, res.episodes_sha256) != (ref.protocol, ref.label, ref.episodes_sha256):
                raise RuntimeError(f"{engine}: scored {res.protocol.key} {res.label}, expected {ref.protocol.key} "
                                   f"{ref.label} on the same episodes")
            runtime, precision, label = ENGINES[engine]
            rec = {"engine": engine, "runtime": runtime, "precision": precision, "label": label,
                   "protocol": ref.protocol.key, **ref.protocol.to_dict(), "readout": res.readout,
                   "readout_label": res.label, "accuracy": res.mean, "accuracy_ci95": res.ci95,
                   "n_episodes": res.n_episodes, "episodes": res.episodes_source,
                   "episodes_sha256": res.episodes_sha256}
            if engine != REFERENCE:
                diff = res.accuracy - ref.accuracy
                m, h = mean_ci(diff)
                rec.update(diff_vs_pytorch=m, diff_ci95=h, episodes_changed=int(np.sum(diff != 0)))
                log.info("%s %s %s: %.2f %% (%+.2f +- %.2f vs PyTorch)", label, ref.protocol.key, res.label,
                         res.mean, m, h)
            records.append(rec)
            arrays[accuracy_key(engine, ref.protocol, res.label)] = np.asarray(res.accuracy, dtype=np.float64)
    return records, arrays
