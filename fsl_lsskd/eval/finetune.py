"""Fine-tuning readout ``finetune``: per episode, fine-tune the backbone's last stage and a linear head on the
augmented support set for a fixed number of steps, then classify the queries.

Settings and where they come from:

* **What is trained.** The last stage of the backbone (the module of timm's last ``feature_info`` entry:
  ``layer4`` of a ResNet, ``stages.3`` of a ConvNeXt, the last conv block of Conv-4) and a linear head; the
  earlier stages stay frozen ("partial fine-tuning": Shen et al., "Partial Is Better Than All: Revisiting
  Fine-tuning Strategy for Few-shot Learning", AAAI 2021). The network stays in eval mode: BatchNorm uses its
  running statistics (a 5-image support set cannot estimate them), its affine parameters in the last stage
  are trained.
* **Head.** Linear on L2-normalised features, initialised from the support prototypes as in Proto-MAML
  (Triantafillou et al., "Meta-Dataset", ICLR 2020, §3.2): ``W = 2 p``, ``b = -|p|^2``, logits divided by
  ``temperature``. Before the first step the head *is* the ``protonet`` readout (same prediction; the same
  probabilities at the same temperature), so ``steps=0`` reproduces ``protonet`` and every step after it is the
  effect of fine-tuning.
* **Optimiser.** SGD, momentum 0.9, weight decay 1e-3, head learning rate 0.01 (the fine-tuning optimiser of
  Chen et al., "A Closer Look at Few-shot Classification", ICLR 2019, ``methods/baselinefinetune.py``); the
  last stage learns at ``backbone_lr`` (a tenth of the head's by default: pretrained weights move less than a
  fresh head). ``steps`` full-batch steps on the augmented support set (``batch_size`` to subsample it).
* **Augmented support set.** ``n_aug_support`` copies of every support image through RFS's training
  transform (:func:`~fsl_lsskd.eval.features.support_augment`; RFS ``n_aug_support_samples=5``), drawn once per
  episode from a generator seeded by the episode index, so every method sees the same copies. The frozen
  stages run once per copy; the steps only run the last stage (checked against a full forward pass, with a
  full-forward fallback for networks where the shortcut does not reproduce the output).

Image-level, so it scores the first ``max_episodes`` published episodes (set it in the benchmark file).
Cost per episode: one frozen forward of ``n_aug_support * n_way * n_shot + n_way * n_query`` images plus
``steps`` forward/backward passes of the last stage.
"""
from __future__ import annotations

import copy
import logging
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..inputs import InputSpec
from ..registry import READOUTS
from ..seeding import torch_generator
from .base import AUG_SEED, EpisodeInputs, Readout, ReadoutOutput, l2_normalize
from .features import support_augment
from .configs import FinetuneConfig

log = logging.getLogger(__name__)


def last_stage_name(model: nn.Module) -> str:
    """Name of the backbone's last stage: the ``module`` of its last timm ``feature_info`` entry.

    Raises:
        ConfigError: the model has no ``feature_info`` (not a timm CNN backbone)."""
    info = getattr(model, "feature_info", None)
    entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info or [])
    if not entries or "module" not in entries[-1]:
        raise ConfigError(f"finetune needs a timm CNN backbone with feature_info (to find its last stage); "
                          f"{type(model).__name__} has none")
    return str(entries[-1]["module"])


class _Stop(Exception):
    pass


class LastStageSplit:
    """Run a network in two parts around its last stage: ``prefix(x)`` = the activations entering the stage
    (frozen part, no gradient), ``rest(a)`` = the pooled features computed from them. ``rest`` feeds ``a`` to the
    stage through a forward pre-hook while the frozen part runs on one placeholder image; :meth:`verify`
    checks ``rest(prefix(x)) == model(x)`` and :attr:`exact` says whether the shortcut may be used."""

    def __init__(self, model: nn.Module, stage: nn.Module) -> None:
        self.model, self.stage = model, stage
        self.placeholder: Optional[torch.Tensor] = None
        self.exact = False

    @torch.no_grad()
    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        captured: List[torch.Tensor] = []

        def grab(_module, args):
            captured.append(args[0])
            raise _Stop

        handle = self.stage.register_forward_pre_hook(grab)
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not captured:
            raise ConfigError("finetune: the backbone's forward pass never reached its last stage")
        return captured[0].detach()

    def rest(self, a: torch.Tensor) -> torch.Tensor:
        handle = self.stage.register_forward_pre_hook(lambda _m, args: (a,) + tuple(args[1:]))
        try:  # the frozen stages' work on the placeholder is discarded by the hook
            return self.model(self.placeholder)
        finally:
            handle.remove()

    def verify(self, x: torch.Tensor) -> bool:
        self.placeholder = x[:1]
        with torch.no_grad():
            ref = self.model(x)
            out = self.rest(self.prefix(x))
        self.exact = bool(ref.shape == out.shape and torch.allclose(out, ref, rtol=1e-4, atol=1e-5))
        if not self.exact:
            log.warning("finetune: %s does not split at its last stage reproducibly; every step runs the whole "
                        "network (slower, same result)", type(self.model).__name__)
        return self.exact


def prototype_head(support: torch.Tensor, labels: torch.Tensor, n_way: int) -> nn.Linear:
    """Linear head ``[n_way, D]`` on L2-normalised features with Proto-MAML's initialisation: ``W = 2 p``,
    ``b = -|p|^2`` for the class means ``p`` of the normalised ``support`` features ``[n, D]`` (then
    ``W f + b = -|f - p|^2 + |f|^2``: the same ranking and softmax as the squared-distance ProtoNet)."""
    f = l2_normalize(support)
    protos = torch.stack([f[labels == c].mean(0) for c in range(n_way)])
    head = nn.Linear(f.shape[1], n_way).to(f.device)
    with torch.no_grad():
        head.weight.copy_(2 * protos)
        head.bias.copy_(-(protos * protos).sum(1))
    return head


@READOUTS.register("finetune")
class FinetuneReadout(Readout):
    """Per-episode fine-tuning of the last stage and a prototype-initialised linear head on the augmented support set (Chen et al. 2019; Triantafillou et al. 2020).

    Settings: :class:`FinetuneConfig`; sources: the module docstring."""

    config_cls = FinetuneConfig
    needs_features = False
    needs_images = True
    probabilistic = True

    def predict(self, inputs: EpisodeInputs) -> ReadoutOutput:
        if inputs.backbone is None or inputs.images is None:
            raise ConfigError("finetune needs the backbone and the split's images")
        cfg = self.config
        device = inputs.device
        model = copy.deepcopy(inputs.backbone).to(device).eval()
        stage = model.get_submodule(last_stage_name(model))
        for p in model.parameters():
            p.requires_grad_(False)
        stage_params = list(stage.parameters())
        initial = {k: v.detach().clone() for k, v in stage.state_dict().items()}
        rows = np.asarray(inputs.rows, dtype=np.int64)
        E, W, K = rows.shape
        n_shot, n_query = inputs.n_shot, K - inputs.n_shot
        spec = inputs.input_spec
        split = LastStageSplit(model, stage)
        query_y = torch.arange(W, device=device).repeat_interleave(n_query)
        correct = np.empty(E, dtype=np.float64)
        probs = np.empty((E, W * n_query, W), dtype=np.float32)
        for e in range(E):
            stage.load_state_dict(initial)
            sup_imgs, sup_y = self._support(inputs.images[rows[e, :, :n_shot].reshape(-1)], n_shot, W, spec, e)
            qry = np.array(inputs.images[rows[e, :, n_shot:].reshape(-1)])
            qry_imgs = spec.resize_uint8(torch.from_numpy(qry).permute(0, 3, 1, 2))
            x_sup = spec.normalize(sup_imgs.to(device))
            x_qry = spec.normalize(qry_imgs.to(device))
            if e == 0:
                split.verify(x_sup[:8])
            sup_y = sup_y.to(device)
            a_sup = split.prefix(x_sup) if split.exact else None
            with torch.no_grad():
                f0 = split.rest(a_sup) if split.exact else model(x_sup)
            head = prototype_head(f0, sup_y, W)
            if cfg.steps > 0:
                groups = [{"params": head.parameters(), "lr": float(cfg.lr)}]
                if cfg.backbone_lr > 0:
                    for p in stage_params:
                        p.requires_grad_(True)
                    groups.append({"params": stage_params, "lr": float(cfg.backbone_lr)})
                opt = torch.optim.SGD(groups, momentum=float(cfg.momentum), weight_decay=float(cfg.weight_decay))
                g = torch_generator("finetune_batches", AUG_SEED, e)
                n = len(sup_y)
                for _ in range(int(cfg.steps)):
                    idx = (torch.randperm(n, generator=g)[:int(cfg.batch_size)] if cfg.batch_size
                           and cfg.batch_size < n else None)
                    feats = split.rest(a_sup if idx is None else a_sup[idx]) if split.exact else \
                        model(x_sup if idx is None else x_sup[idx])
                    y = sup_y if idx is None else sup_y[idx]
                    loss = F.cross_entropy(head(l2_normalize(feats)) / float(cfg.temperature), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                for p in stage_params:
                    p.requires_grad_(False)
            with torch.no_grad():
                logits = head(l2_normalize(model(x_qry))).double() / float(cfg.temperature)
            correct[e] = (logits.argmax(1) == query_y).double().mean().item()
            probs[e] = torch.softmax(logits, 1).float().cpu().numpy()
            inputs.done(1)
        log.info("finetune: %d episodes, mean acc %.4f (%d steps, last stage %s)", E,
                 correct.mean() if E else float("nan"), cfg.steps, last_stage_name(model))
        return ReadoutOutput(correct, probs)

    def _support(self, images: np.ndarray, n_shot: int, n_way: int, spec: InputSpec,
                 episode: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The augmented support set: uint8 ``[m * n_way * n_shot, 3, S, S]`` and labels (``m`` =
        ``n_aug_support`` copies, or the images once when it is 0)."""
        x = spec.resize_uint8(torch.from_numpy(np.array(images)).permute(0, 3, 1, 2))
        y = torch.arange(n_way).repeat_interleave(n_shot)
        m = int(self.config.n_aug_support)
        if m == 0:
            return x, y
        g = torch_generator("support_augment", AUG_SEED, episode)
        return support_augment(x.repeat(m, 1, 1, 1), g), y.repeat(m)

