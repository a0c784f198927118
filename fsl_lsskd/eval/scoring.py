"""Scoring a backbone: features once, then every readout on the published episodes of every protocol.

``evaluate(backbone, split, protocols=[EpisodeProtocol(...)], readouts=["protonet", ...])`` returns one
:class:`~fsl_lsskd.eval.base.ScoreResult` per (protocol, readout). Readouts are named by a
:class:`ReadoutSpec`: a registered name and its settings (``"logreg_batched"`` or
``{"readout": "logreg_batched", "n_aug_support": 5}``); the resolved settings are part of the scoring
identity (:func:`scoring_identity`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
from torch import nn

from ..inputs import InputSpec
from ..progress import Progress
from ..protocol import EpisodeProtocol, unique
from .base import EpisodeInputs, ScoreResult, query_labels
from .specs import ReadoutSpec, needs_method  # noqa: F401  (re-exported)
from .calibration import bin_stats, brier, nll
from .episodes import class_offsets, load_episodes
from .features import make_embedder, split_features, state_hash
from .intervals import few_classes_warning

log = logging.getLogger(__name__)

SCORE_FORMAT = 1


def scoring_identity(train_id: str, target: Mapping[str, Any], protocol: EpisodeProtocol, episodes_sha256: str,
                     readout: ReadoutSpec) -> Dict[str, Any]:
    """What a score is a function of: the trained weights (``train_id``), the scored split (``target``:
    dataset, split, content fingerprint, image size), the protocol with the sha256 of its episodes, and the
    readout with its settings."""
    return {"format": SCORE_FORMAT, "train_id": train_id, "target": dict(target), "protocol": protocol.to_dict(),
            "episodes_sha256": episodes_sha256, **readout.identity()}


def score_id(identity: Mapping[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def evaluate(backbone: nn.Module, split, *, protocols: Sequence[Union[EpisodeProtocol, str, Mapping]] = (),
             readouts: Sequence[Union[str, Mapping[str, Any], ReadoutSpec]] = ("protonet", "logreg_batched"),
             mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.25, 0.25, 0.25),
             image_size: Optional[int] = None, batch_size: int = 256, device="cpu", cache: bool = True,
             model_hash: Optional[str] = None, method: Optional[Callable[[], Any]] = None,
             options: Optional[Mapping[str, Mapping[str, Any]]] = None) -> List[ScoreResult]:
    """Score a frozen ``backbone`` (``model(x)`` = pooled features ``[B, D]``) on ``split``
    (:class:`~fsl_lsskd.data.base.SplitData`) with the standard episodes of every protocol and every readout.

    Args:
        protocols: :class:`EpisodeProtocol` values (or keys like ``5w1s15q_2000``); default 5-way 1- and
            5-shot, 15 queries, 2,000 episodes.
        readouts: readout names or specs (:class:`ReadoutSpec`).
        mean, std: the dataset's normalisation; image_size: the backbone's input size (images are resized
            with antialiasing when the split differs).
        cache: read/write the frozen features under ``$FSL_BENCH_CACHE/features`` (key: weights hash, split
            fingerprint, size, normalisation).
        method: ``method()`` returns the trained method (for readouts that need its heads, e.g.
            ``maml_finetune``).
        options: run-time readout options by readout name (not part of the identity).

    Returns one :class:`ScoreResult` per (protocol, readout), accuracy in percent. Raises
    :class:`~fsl_lsskd.errors.ProtocolError` when the split cannot host a protocol, and
    :class:`~fsl_lsskd.errors.UnknownNameError` for an unknown readout, before any work.
    """
    protocols = unique(EpisodeProtocol.parse(p) for p in (protocols or ("5w1s15q_2000", "5w5s15q_2000")))
    specs = [ReadoutSpec.parse(r) for r in readouts]
    built = [(spec, spec.build(**dict((options or {}).get(spec.name, {})))) for spec in specs]
    offsets, counts = class_offsets(split.labels, split.num_classes)
    episodes = {p: load_episodes(split.dataset, split.split, counts, p, split.class_names) for p in protocols}
    size = int(image_size or split.image_size)
    input_spec = InputSpec(mean, std, size)
    feats = None
    if any(r.uses_features() for _, r in built):
        t0 = time.perf_counter()
        feats = split_features(backbone, split, input_spec, batch_size, device, cache,
                               model_hash or (state_hash(backbone) if cache else None))
        log.info("features %s in %.1fs", feats.shape, time.perf_counter() - t0)
    embed = make_embedder(backbone, input_spec, device) if any(r.uses_images() for _, r in built) else None
    info = {"dataset": split.dataset, "split": split.split, "image_size": size, "fingerprint": split.fingerprint}
    results = []
    total = sum(min(len(ep), r.episode_limit() or len(ep)) for ep in episodes.values() for _, r in built)
    bar = Progress(total, f"scoring {split.dataset} {split.split}", "episode", announce=False, leave=False)
    for protocol in protocols:
        ep = episodes[protocol]
        rows_all = ep.rows(offsets)
        for spec, readout in built:
            limit = readout.episode_limit()
            rows = rows_all[:limit] if limit else rows_all
            bar.set_postfix(_what=f"{protocol.key} {spec.label}")
            start = bar.n
            t0 = time.perf_counter()
            out = readout.predict(EpisodeInputs(rows=rows, n_shot=protocol.n_shot, features=feats,
                                                images=split.images, embed=embed, backbone=backbone, method=method,
                                                mean=input_spec.mean, std=input_spec.std, image_size=size,
                                                device=device,
                                                progress=bar.update))
            bar.update(max(start + len(rows) - bar.n, 0))  # what a readout did not report
            res = _result(spec, protocol, rows, out, ep, time.perf_counter() - t0, info)
            log.info("%s %s: %.2f +- %.2f %%", protocol.key, spec.label, res.mean, res.ci95)
            results.append(res)
    bar.close()
    warning = few_classes_warning(results)
    if warning:
        log.warning("%s", warning)
    return results


def _result(spec: ReadoutSpec, protocol: EpisodeProtocol, rows: np.ndarray, out, ep, seconds: float,
            info: Dict[str, Any]) -> ScoreResult:
    correct = np.asarray(out.correct, dtype=np.float64)
    if correct.shape != (rows.shape[0],):
        raise RuntimeError(f"readout {spec.name} returned {correct.shape} accuracies for {rows.shape[0]} episodes")
    scored = protocol.replace(n_episodes=int(rows.shape[0]))
    res = ScoreResult(spec.name, spec.label, dict(spec.settings), scored, 100.0 * correct,
                      episodes_source=ep.source, episodes_sha256=ep.sha256, seconds=seconds, info=dict(info),
                      classes=np.asarray(ep.classes[:rows.shape[0]], dtype=np.int64))
    if out.probs is not None:
        probs = np.asarray(out.probs, dtype=np.float64)
        labels = np.broadcast_to(query_labels(protocol.n_way, protocol.n_query), probs.shape[:-1])
        res.nll, res.brier = nll(probs, labels), brier(probs, labels)
        res.reliability = bin_stats(probs, labels).astype(np.float32)
    return res
