"""MAML meta-test readout: per episode, fine-tune a fresh copy of the meta-learned backbone + head on the
support set and classify the queries (Finn et al., ICML 2017, §5.2: 10 gradient steps of the inner lr 0.01 at
test time; cbfinn/maml ``main.py`` ``test_num_updates``). This scores MAML as MAML is meant to be used, next
to the frozen-feature readouts (``protonet``, ``logreg``) on the same published episodes.

It needs the trained MAML *method* (the backbone alone has no head): the scorer's ``method()`` (the cell's
model directory), or ``method=``/``checkpoint=`` options. Cost is ``steps`` forward/backward passes per
episode: ``max_episodes`` scores the first N published episodes. The episode images are prepared as every other
readout's (:meth:`fsl_lsskd.inputs.InputSpec.prepare`: the rounded antialiased resize, then the normalisation).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..registry import READOUTS
from .base import EpisodeInputs, Readout, ReadoutOutput
from .configs import MAMLFinetuneConfig

log = logging.getLogger(__name__)


@READOUTS.register("maml_finetune")
class MAMLFinetuneReadout(Readout):
    """Per-episode fine-tuning of a MAML/FOMAML model (backbone + head), as MAML is evaluated (Finn et al.)."""

    config_cls = MAMLFinetuneConfig
    needs_features = False
    needs_images = True
    needs_method = True

    def _resolve(self, inputs: EpisodeInputs) -> Any:
        for cand in (self.options.get("method"), inputs.method() if inputs.method else None, inputs.backbone,
                     getattr(inputs.backbone, "maml_method", None)):
            if cand is not None and hasattr(cand, "finetune_predict"):
                return cand.to(inputs.device)
        ckpt = self.options.get("checkpoint")
        if ckpt is not None:
            from ..checkpoint import load_method

            method = load_method(Path(ckpt), inputs.device)
            if hasattr(method, "finetune_predict"):
                return method
            raise ConfigError(f"maml_finetune needs a maml/fomaml model; {ckpt} holds method "
                              f"{getattr(method, 'registry_name', type(method).__name__)!r}")
        raise ConfigError("maml_finetune needs the trained MAML method (an exported backbone has no MAML head): score "
                          "a maml/fomaml cell, or pass its model directory (fsl-bench evaluate --checkpoint RUN/model; "
                          "a published MAML cell ships it as results/weights/<benchmark>/<stem>.model); for untrained "
                          "weights pass --untrained --method maml")

    def predict(self, inputs: EpisodeInputs) -> ReadoutOutput:
        method = self._resolve(inputs)
        device = inputs.device
        rows = np.asarray(inputs.rows, dtype=np.int64)
        E, W, K = rows.shape
        n_shot = inputs.n_shot
        spec = inputs.input_spec
        support_y = torch.arange(W, device=device).repeat_interleave(n_shot)
        query_y = torch.arange(W, device=device).repeat_interleave(K - n_shot)
        acc = np.empty(E, dtype=np.float64)
        probs = np.empty((E, W * (K - n_shot), W), dtype=np.float32)
        for e in range(E):
            sup = rows[e, :, :n_shot].reshape(-1)
            qry = rows[e, :, n_shot:].reshape(-1)
            x = spec.prepare(inputs.images[np.concatenate([sup, qry])], device)
            logits = method.finetune_predict(x[:len(sup)], support_y, x[len(sup):], steps=self.config.steps,
                                             inner_lr=self.config.inner_lr)
            acc[e] = (logits.argmax(1) == query_y).double().mean().item()
            probs[e] = torch.softmax(logits.float(), 1).cpu().numpy()
            inputs.done(1)
        log.info("maml_finetune: %d episodes, mean acc %.4f", E, acc.mean() if E else float("nan"))
        return ReadoutOutput(acc, probs)
