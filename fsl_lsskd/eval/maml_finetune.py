"""MAML meta-test: per episode, fine-tune a fresh copy of the meta-learned backbone + head on the support
set and classify the queries (Finn et al., ICML 2017, §5.2: 10 gradient steps of the inner lr 0.01 at test
time; cbfinn/maml ``main.py`` ``test_num_updates``). This scores MAML as MAML is meant to be used, next to
the standard frozen-feature evaluators (``protonet``, ``logreg``) on the same published episodes.

It needs the trained MAML *method* (the backbone alone has no head): pass it as ``method=`` (constructor or
call context), as ``checkpoint=`` (a training checkpoint, loaded with
``fsl_lsskd.train.checkpoint.load_method``), or as the evaluation ``backbone``: the method itself (its
``forward`` gives the pooled features, so it also serves the feature-based evaluators) or the in-memory export
of a MAML checkpoint (``MAML.export_backbone`` keeps a ``maml_method`` reference), which is what
``fsl-bench evaluate --checkpoint RUN/last.pt --classifiers protonet,maml_finetune`` passes. A saved
``backbone.safetensors`` export has no head and is refused with a message naming the fix. Cost is
``test_inner_steps`` forward/backward passes per episode: limit episodes with ``max_episodes``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..registry import EVALUATORS
from .base import Evaluator

log = logging.getLogger(__name__)


@EVALUATORS.register("maml_finetune")
class MAMLFinetuneEvaluator(Evaluator):
    """Per-episode fine-tuning of a MAML/FOMAML model (``needs_images``).

    Args:
        max_episodes: score only the first ``max_episodes`` episodes (published episodes are sequential, so
            this equals a run with that many episodes); ``None`` = all.
        steps / inner_lr: override the method's ``test_inner_steps`` / ``inner_lr`` (paper: 10, 0.01).
        method / checkpoint: the trained MAML method, or the path of its training checkpoint.
    """

    needs_images = True

    def __init__(self, max_episodes: Optional[int] = None, steps: Optional[int] = None,
                 inner_lr: Optional[float] = None, method: Any = None,
                 checkpoint: Optional[Union[str, Path]] = None) -> None:
        if max_episodes is not None and int(max_episodes) < 1:
            raise ConfigError(f"max_episodes must be >= 1, got {max_episodes}")
        self.max_episodes = None if max_episodes is None else int(max_episodes)
        self.steps = steps
        self.inner_lr = inner_lr
        self.method = method
        self.checkpoint = checkpoint

    def _resolve(self, ctx: dict, device) -> Any:
        backbone = ctx.get("backbone")
        for cand in (ctx.get("method"), self.method, backbone, getattr(backbone, "maml_method", None)):
            if cand is not None and hasattr(cand, "finetune_predict"):
                return cand.to(device)
        ckpt = ctx.get("checkpoint") or self.checkpoint
        if ckpt is not None:
            from ..train.checkpoint import load_method

            method = load_method(Path(ckpt), device)
            if not hasattr(method, "finetune_predict"):
                raise ConfigError(f"maml_finetune needs a maml/fomaml checkpoint; {ckpt} holds method "
                                  f"{getattr(method, 'registry_name', type(method).__name__)!r}")
            return method
        raise ConfigError("maml_finetune needs the trained MAML method (the exported backbone has no MAML head): "
                          "pass checkpoint=<training checkpoint of a maml/fomaml run> or method=<MAML method>")

    def evaluate_episodes(self, inputs, rows: np.ndarray, n_shot: int, device="cpu", mean: Sequence[float] = None,
                          std: Sequence[float] = None, image_size: Optional[int] = None, **ctx) -> np.ndarray:
        method = self._resolve(ctx, device)
        rows = np.asarray(rows, dtype=np.int64)
        if self.max_episodes is not None:
            rows = rows[:self.max_episodes]
        E, W, K = rows.shape
        if mean is None or std is None:
            raise ConfigError("maml_finetune needs the dataset's mean/std in the evaluation context")
        mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        images = inputs
        support_y = torch.arange(W, device=device).repeat_interleave(n_shot)
        query_y = torch.arange(W, device=device).repeat_interleave(K - n_shot)
        acc = np.empty(E, dtype=np.float64)
        for e in range(E):
            sup = rows[e, :, :n_shot].reshape(-1)
            qry = rows[e, :, n_shot:].reshape(-1)
            x = self._prepare(images, np.concatenate([sup, qry]), mean_t, std_t, image_size, device)
            logits = method.finetune_predict(x[:len(sup)], support_y, x[len(sup):], steps=self.steps,
                                             inner_lr=self.inner_lr)
            acc[e] = (logits.argmax(1) == query_y).double().mean().item()
        log.info("maml_finetune: %d episodes, mean acc %.4f", E, acc.mean() if E else float("nan"))
        return acc

    @staticmethod
    def _prepare(images, idx: np.ndarray, mean_t, std_t, image_size, device) -> torch.Tensor:
        """uint8 ``[N,H,W,3]`` rows -> normalised float ``[n,3,S,S]`` (antialiased resize when the split is not
        at the model's ``image_size``)."""
        x = torch.as_tensor(np.asarray(images[idx])).to(device).permute(0, 3, 1, 2).float().div_(255.0)
        if image_size is not None and x.shape[-1] != int(image_size):
            x = F.interpolate(x, size=(int(image_size), int(image_size)), mode="bilinear", antialias=True,
                              align_corners=False)
        return (x - mean_t) / std_t
