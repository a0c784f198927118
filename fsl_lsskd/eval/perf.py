"""``fsl-bench perf eval``: the scoring path's time, split into feature extraction (once per cell) and each
frozen-feature readout (:func:`extraction_vs_readouts`), and its speed against the per-episode pipeline most
few-shot repositories use (:func:`run_benchmark`).

Re-scoring a finished cell with a new frozen-feature readout costs the readout's time only once the features
are cached, and the extraction once otherwise: the first table says how many seconds that is.

Baseline (e.g. learn2learn examples, RFS ``meta_test``): per episode, sample a task with learn2learn's
``Taskset`` (``MetaDataset`` + task transforms + ``LoadData`` + ``RemapLabels``), forward its images through
the backbone, fit the classifier (ProtoNet; scikit-learn ``LogisticRegression``). To compare on IDENTICAL
episodes, the task description comes from our episode index arrays (a custom ``TaskTransform``) instead of
``NWays``/``KShots``. Ours: features of the split once, then vectorised ProtoNet / batched logistic
regression over all episodes.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, Sequence

import numpy as np
import torch

from ..inputs import InputSpec
from ..protocol import EpisodeProtocol
from .base import EpisodeInputs, l2_normalize
from .episodes import class_offsets, load_episodes
from .features import extract_features
from .logreg import LogRegReadout, fit_predict_sklearn
from .logreg_batched import LogRegBatchedReadout
from .protonet import ProtoNetReadout, sq_dist

log = logging.getLogger(__name__)


def _fixed_episode_transform(l2l, dataset, rows: np.ndarray):
    """A learn2learn ``TaskTransform`` yielding the task descriptions of ``rows`` in order."""
    from learn2learn.data.task_dataset import DataDescription

    class FixedEpisodes(l2l.data.transforms.TaskTransform):
        def __init__(self, ds):
            super().__init__(ds)
            self.next = 0

        def __call__(self, task_description):
            e = self.next
            self.next += 1
            return [DataDescription(int(r)) for r in rows[e].reshape(-1)]

    return FixedEpisodes(dataset)


def extraction_vs_readouts(model: torch.nn.Module, split, mean: Sequence[float], std: Sequence[float],
                           image_size: int, shots: Sequence[int] = (1, 5), n_episodes: int = 2000, n_way: int = 5,
                           n_query: int = 15, readouts: Sequence[str] = ("protonet", "logreg_batched"),
                           device="cpu", batch_size: int = 256) -> Dict[str, object]:
    """Seconds of the feature extraction of ``split`` (once) and of each frozen-feature readout (registered name,
    default settings) on ``n_episodes`` published/seeded episodes per shot.

    Returns ``{"extract": {"seconds", "images", "images_per_s"}, "readouts": [{"readout", "n_shot", "episodes",
    "seconds", "ms_per_episode", "accuracy"}, ...]}``. Raises :class:`~fsl_lsskd.errors.ConfigError` for a readout
    that needs images, a fine-tuned backbone or the whole method (not a frozen-feature readout)."""
    from ..errors import ConfigError
    from ..registry import READOUTS

    classes = {}
    for name in readouts:
        cls = READOUTS.get(name)
        if not cls.needs_features or cls.needs_images or cls.needs_method:
            raise ConfigError(f"readout {name!r} is not a frozen-feature readout (it needs images or the trained "
                              f"method); `fsl-bench perf eval --readouts` takes frozen-feature readouts only")
        classes[name] = cls
    model = model.to(device).eval()
    offsets, counts = class_offsets(split.labels, split.num_classes)
    t0 = time.perf_counter()
    feats = extract_features(model, split.images, InputSpec(mean, std, image_size), batch_size, device)
    t_extract = time.perf_counter() - t0
    rows_out = []
    for k in shots:
        ep = load_episodes(split.dataset, split.split, counts, EpisodeProtocol(n_way, k, n_query, n_episodes),
                           split.class_names)
        rows = ep.rows(offsets)
        for name, cls in classes.items():
            inputs = EpisodeInputs(rows=rows, n_shot=k, features=feats, device=device)
            t0 = time.perf_counter()
            correct = cls().predict(inputs).correct
            dt = time.perf_counter() - t0
            rows_out.append({"readout": name, "n_shot": int(k), "episodes": int(len(rows)), "seconds": dt,
                             "ms_per_episode": 1e3 * dt / max(len(rows), 1), "accuracy": float(np.mean(correct))})
    return {"extract": {"seconds": t_extract, "images": int(len(split)),
                        "images_per_s": len(split) / max(t_extract, 1e-9)}, "readouts": rows_out}


def run_benchmark(model: torch.nn.Module, split, mean: Sequence[float], std: Sequence[float], image_size: int,
                  shots: Sequence[int] = (1, 5), n_episodes: int = 2000, n_way: int = 5, n_query: int = 15,
                  device="cpu", batch_size: int = 256) -> Dict[str, Dict[str, float]]:
    """Run ours and the baseline on the same episodes; check equal accuracies; return timings per shot."""
    from ..deps import require_learn2learn
    from torch.utils.data import TensorDataset

    l2l = require_learn2learn()
    model = model.to(device).eval()
    offsets, counts = class_offsets(split.labels, split.num_classes)
    report: Dict[str, Dict[str, float]] = {}
    # ---- ours: extract once (timed once, shared by both readouts and both shots)
    t0 = time.perf_counter()
    spec = InputSpec(mean, std, image_size)
    feats = extract_features(model, split.images, spec, batch_size, device)
    t_extract = time.perf_counter() - t0
    report["extract"] = {"seconds": t_extract, "images": float(len(split))}
    images_t = torch.from_numpy(np.array(split.images))
    labels_t = torch.from_numpy(np.asarray(split.labels, dtype=np.int64))
    for k in shots:
        ep = load_episodes(split.dataset, split.split, counts, EpisodeProtocol(n_way, k, n_query, n_episodes),
                           split.class_names)
        rows = ep.rows(offsets)
        inputs = EpisodeInputs(rows=rows, n_shot=k, features=feats, device=device)
        t0 = time.perf_counter()
        ours_proto = ProtoNetReadout().predict(inputs).correct
        t_proto = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours_lrb = LogRegBatchedReadout().predict(inputs).correct
        t_lrb = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours_lr = LogRegReadout().predict(inputs).correct
        t_lr_ours = time.perf_counter() - t0
        # ---- baseline: learn2learn Taskset driven by the same episodes, per-episode forward + fit
        meta = l2l.data.MetaDataset(TensorDataset(images_t, labels_t))
        tr = l2l.data.transforms
        taskset = l2l.data.Taskset(meta, task_transforms=[_fixed_episode_transform(l2l, meta, rows),
                                                          tr.LoadData(meta), tr.RemapLabels(meta)], num_tasks=-1)
        W, K = rows.shape[1], rows.shape[2]
        base_proto = np.empty(len(rows))
        base_lr = np.empty(len(rows))
        t_lf = t_bp = t_bl = 0.0
        for e in range(len(rows)):
            t0 = time.perf_counter()
            x, y = taskset.sample()
            yy = y.long().view(W, K)  # RemapLabels relabels 0..n_way-1; the class blocks must stay intact
            if not (bool((yy == yy[:, :1]).all()) and len(set(yy[:, 0].tolist())) == W):
                raise RuntimeError("learn2learn task is not grouped by class as described")
            x = spec.normalize(spec.resize(x.permute(0, 3, 1, 2).float()))
            with torch.no_grad():
                f = model(x.to(device)).float().cpu()
            t_lf += time.perf_counter() - t0
            t0 = time.perf_counter()
            f64 = l2_normalize(f.double()).view(W, K, -1)
            protos = f64[:, :k].mean(1)
            q = f64[:, k:].reshape(-1, f64.shape[-1])
            pred = (-sq_dist(q, protos)).argmax(-1)
            base_proto[e] = (pred == torch.arange(W).repeat_interleave(K - k)).double().mean().item()
            t_bp += time.perf_counter() - t0
            t0 = time.perf_counter()
            fn = f64.numpy()
            pred = fit_predict_sklearn(fn[:, :k].reshape(-1, fn.shape[-1]), np.repeat(np.arange(W), k),
                                       fn[:, k:].reshape(-1, fn.shape[-1])).argmax(1)
            base_lr[e] = float(np.mean(pred == np.repeat(np.arange(W), K - k)))
            t_bl += time.perf_counter() - t0
        report[f"{k}shot"] = {
            "episodes": float(len(rows)),
            "ours_extract_s": t_extract, "ours_protonet_s": t_proto, "ours_logreg_batched_s": t_lrb,
            "ours_logreg_sklearn_loop_s": t_lr_ours,
            "base_load_forward_s": t_lf, "base_protonet_s": t_bp, "base_logreg_sklearn_s": t_bl,
            "acc_ours_protonet": float(ours_proto.mean()), "acc_base_protonet": float(base_proto.mean()),
            "acc_ours_logreg_batched": float(ours_lrb.mean()), "acc_ours_logreg": float(ours_lr.mean()),
            "acc_base_logreg": float(base_lr.mean()),
            "protonet_episodes_differing": float(np.sum(ours_proto != base_proto)),
            "logreg_sklearn_episodes_differing": float(np.sum(ours_lr != base_lr)),
            "speedup_protonet_pipeline": (t_lf + t_bp) / (t_extract + t_proto),
            "speedup_logreg_pipeline": (t_lf + t_bl) / (t_extract + t_lrb),
            "speedup_logreg_readout_only": t_bl / t_lrb,
        }
    return report
