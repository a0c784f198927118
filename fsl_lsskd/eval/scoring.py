"""The episodic evaluation pipeline: features once, then every classifier on the standard episodes."""
from __future__ import annotations

import logging
import time
from typing import Any, List, Mapping, Optional, Sequence

import numpy as np
from torch import nn

from ..registry import EVALUATORS
from ._episodes import EPISODE_SEED, class_offsets, load_episodes
from ._features import split_features, state_hash
from .base import EvalResult

log = logging.getLogger(__name__)


def evaluate(backbone: nn.Module, split, *, shots: Sequence[int] = (1, 5), n_way: int = 5, n_query: int = 15,
             n_episodes: int = 2000, classifiers: Sequence[str] = ("protonet", "logreg_batched"),
             mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.25, 0.25, 0.25),
             image_size: Optional[int] = None, seed: int = EPISODE_SEED, batch_size: int = 256,
             device="cpu", cache: bool = True, model_hash: Optional[str] = None,
             evaluator_options: Optional[Mapping[str, Mapping[str, Any]]] = None) -> List[EvalResult]:
    """Score a frozen ``backbone`` on ``split`` (a :class:`~fsl_lsskd.data.base.SplitData`) with the
    standard episodes (published when available) for every shot and classifier.

    RFS protocol (Tian et al. 2020): pooled features, L2-normalised inside each classifier; mean ± 95% CI
    (t-distribution). Returns one :class:`EvalResult` per (shot, classifier), per-episode accuracies kept.
    ``evaluator_options`` maps an evaluator name to its constructor arguments (e.g.
    ``{"maml_finetune": {"checkpoint": path, "max_episodes": 500}}``)."""
    from .. import plugins

    plugins.import_submodules("fsl_lsskd.eval")
    options = evaluator_options or {}
    # unknown names fail before any work
    evaluators = {name: EVALUATORS.get(name)(**dict(options.get(name, {}))) for name in classifiers}
    offsets, counts = class_offsets(split.labels, split.num_classes)
    episodes = {k: load_episodes(split.dataset, split.split, counts, n_way, k, n_query, n_episodes, seed,
                                 split.class_names) for k in shots}
    size = int(image_size or split.image_size)
    feats = None
    if any(not ev.needs_images for ev in evaluators.values()):
        t0 = time.perf_counter()
        feats = split_features(backbone, split, mean, std, size, batch_size, device, cache,
                               model_hash or (state_hash(backbone) if cache else None))
        log.info("features %s in %.1fs", feats.shape, time.perf_counter() - t0)
    results = []
    for k in shots:
        ep = episodes[k]
        rows = ep.rows(offsets)
        for name, ev in evaluators.items():
            t0 = time.perf_counter()
            if ev.needs_images:
                acc = ev.evaluate_episodes(split.images, rows, k, backbone=backbone, mean=mean, std=std,
                                           image_size=size, device=device)
            else:
                acc = ev.evaluate_episodes(feats, rows, k, device=device)
            res = EvalResult(name, n_way, k, n_query, np.asarray(acc, dtype=np.float64), ep.source,
                             time.perf_counter() - t0, {"dataset": split.dataset, "split": split.split,
                                                        "image_size": size, "seed": ep.seed})
            log.info("%d-way %d-shot %s: %.2f +- %.2f", n_way, k, name, 100 * res.mean, 100 * res.ci95)
            results.append(res)
    return results
