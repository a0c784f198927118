"""Base-class scoring of a trained method on its held-out base images: top-1 accuracy (the seed papers' metric:
PS-KD, HSAKD and LSSKD report top-1 on held-out images of the training classes) and the calibration of its
classifier (PS-KD claims better calibration: ECE, NLL, Brier; Kim et al. ICCV 2021 §4).

The held-out images are the ones the training run set aside (:func:`fsl_lsskd.data.limited.heldout_split` of
the training split at the run's image size, seed and held-out share), so no trained image is scored. A method
without a base-class classifier (episodic methods) is scored by the nearest class mean of its training
features (accuracy only).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import numpy as np
import torch

from .base import ScoreResult
from .calibration import bin_stats, brier, nll
from .specs import HELDOUT_BASE as READOUT
BASE_FORMAT = 1


def base_identity(train_id: str) -> Dict[str, Any]:
    """Scoring identity of the base-class readout of a training cell (the held-out rows follow from it)."""
    return {"format": BASE_FORMAT, "train_id": train_id, "readout": READOUT, "settings": {}}


def heldout_images(train_split, identity: Mapping[str, Any]):
    """``(held-out split, training rows split)`` of a training run with ``identity`` (image size, seed,
    held-out share, fraction), at the run's image size."""
    from ..data.limited import heldout_split, stratified_fraction

    resized = train_split.resized(int(identity["image_size"]))
    rows, held = heldout_split(resized.labels, float(identity["heldout"]), int(identity["seed"]))
    keep = stratified_fraction(resized.labels[rows], float(identity.get("fraction", 1.0)))
    return resized.subset(held, split="heldout"), resized.subset(rows[keep], split="train")


@torch.no_grad()
def score_heldout(method, train_split, identity: Mapping[str, Any], mean: Sequence[float], std: Sequence[float],
                  device="cpu") -> ScoreResult:
    """Score ``method`` on the held-out base images of its training run. Per image: ``accuracy`` (0 or 100 %),
    and with a classifier ``nll``, ``brier`` and reliability statistics; ``protocol`` is None."""
    from .validation import class_logits

    held, trained = heldout_images(train_split, identity)
    labels = np.asarray(held.labels)
    method = method.to(device).eval()
    out = class_logits(method.backbone, held.images, mean, std, device)
    info = {"dataset": train_split.dataset, "split": "heldout", "images": int(len(held)),
            "image_size": int(identity["image_size"])}
    if out.ndim == 2 and out.shape[1] == method.num_classes and not getattr(method, "episodic", False):
        probs = torch.softmax(out.double(), 1).numpy()
        correct = probs.argmax(1) == labels
        res = ScoreResult(READOUT, READOUT, {}, None, 100.0 * correct.astype(np.float64), info=info)
        y = labels[:, None]
        p = probs[:, None, :]
        res.nll, res.brier = nll(p, y), brier(p, y)
        res.reliability = bin_stats(p, y).astype(np.float32)
        res.info["classifier"] = "method head"
        return res
    feats = torch.nn.functional.normalize(class_logits(method.backbone, trained.images, mean, std, device), dim=1)
    tl = torch.as_tensor(np.asarray(trained.labels))
    centroids = torch.zeros(method.num_classes, feats.shape[1]).index_add_(0, tl, feats)
    centroids = torch.nn.functional.normalize(centroids, dim=1)
    pred = (torch.nn.functional.normalize(out, dim=1) @ centroids.T).argmax(1).numpy()
    res = ScoreResult(READOUT, READOUT, {}, None, 100.0 * (pred == labels).astype(np.float64), info=info)
    res.info["classifier"] = "nearest class mean"
    return res
