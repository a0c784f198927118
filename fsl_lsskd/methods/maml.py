"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation
of Deep Networks", ICML 2017; reference code cbfinn/maml) and its first-order approximation FOMAML
(same paper, §5.2), through ``learn2learn.algorithms.MAML`` (learnables/learn2learn,
``examples/vision/maml_miniimagenet.py``).

Model: the timm backbone (``self.backbone``, pooled features, exported as usual) followed by a separate
linear head of ``n_way`` outputs (``self.head``). Per task: clone the model (``MAML.clone()``), take
``inner_steps`` SGD steps of size ``inner_lr`` on the support cross-entropy (``adapt``), then compute the
query cross-entropy with the adapted weights. The returned ``loss`` is the mean query loss over the
meta-batch; the engine's ``backward()`` differentiates through the inner loop (second order for
``maml``; for ``fomaml`` the inner gradients are detached, so the query gradient at the adapted weights
is applied to the initial weights).

BatchNorm is *transductive*: the model stays in train mode during adaptation and on the query set, so
every forward pass normalises with the current batch's statistics (support batch while adapting, query
batch for the outer loss), as in cbfinn/maml (TF batch_norm on the batch) and learn2learn's examples.
The running statistics are still updated (clones share the buffers), so the exported backbone can be
evaluated in eval mode by the standard readouts; the ``maml_finetune`` readout instead fine-tunes
backbone+head per test episode with batch statistics, as MAML is evaluated in the paper.
"""
from __future__ import annotations

from typing import ClassVar, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..deps import require_learn2learn
from ..registry import METHODS
from .episodic import EpisodicMethod, split_tasks
from .base import Batch, Method
from .configs import MAMLConfig


def adapt_and_predict(maml, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                      steps: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clone ``maml`` (a ``learn2learn.algorithms.MAML``), take ``steps`` inner steps on the support set,
    return ``(query_logits, support_loss_before, support_loss_after)``; the two support losses are
    detached (logged only)."""
    learner = maml.clone()
    before = None
    for _ in range(steps):
        loss = F.cross_entropy(learner(support_x), support_y)
        if before is None:
            before = loss.detach()
        learner.adapt(loss)
    with torch.no_grad():
        after = F.cross_entropy(learner(support_x), support_y)
    return learner(query_x), before, after


@METHODS.register("maml")
class MAML(EpisodicMethod):
    """Second-order MAML. Each yielded Batch holds ``meta_batch_size`` tasks (layout in
    :mod:`fsl_lsskd.methods.episodic`). ``training_step`` returns ``loss`` (mean query CE after
    adaptation), ``query_acc``, ``support_loss_before`` and ``support_loss_after``."""

    config_cls = MAMLConfig
    first_order: ClassVar[bool] = False
    own_readout: ClassVar[Optional[str]] = "maml_finetune"
    # second-order inner loop: 1.19x (1 step) and 1.62x (5 steps) faster per task in NCHW than channels_last on a
    # 2-core CPU (Conv-4, 32x32, interleaved A/B); the values differ by float rounding only
    channels_last: ClassVar[bool] = False

    def __init__(self, backbone, num_classes: int, num_samples: int, config: Optional[MAMLConfig] = None,
                 teacher: Optional[Method] = None) -> None:
        super().__init__(backbone, num_classes, num_samples, config, teacher)
        cfg: MAMLConfig = self.config
        self.tasks_per_batch = cfg.meta_batch_size
        self.head = nn.Linear(int(self.backbone.num_features), cfg.n_way)
        # head: normal (cbfinn/maml's Omniglot model): N(0,1) output weights, zero bias (torch's global RNG, seeded
        # by the engine before the backbone is built, like the backbone's own init).
        with torch.no_grad():
            self.head.weight.normal_()
            self.head.bias.zero_()
        if cfg.head == "xavier":  # after the N(0,1) draw: the backbone and the other heads' draws stay the same
            nn.init.xavier_uniform_(self.head.weight)
        elif cfg.head == "zero":
            self.zero_head()

    def zero_head(self) -> None:
        """The zeroing trick (``head: zero``): set the linear head's weights and bias to zero."""
        _zero_linear(self.head)

    def learner(self) -> nn.Module:
        """Backbone + head as one module (a transient wrapper: parameters are shared, not copied)."""
        return nn.Sequential(self.backbone, _Flatten(), self.head)

    def meta_model(self):
        """``learn2learn.algorithms.MAML`` around :meth:`learner`."""
        l2l = require_learn2learn()
        return l2l.algorithms.MAML(self.learner(), lr=self.config.inner_lr, first_order=self.first_order,
                                   allow_unused=True)

    def training_step(self, batch: Batch, epoch: int) -> Dict[str, torch.Tensor]:
        cfg: MAMLConfig = self.config
        if cfg.head == "zero":  # before every outer step: the optimiser's update of the head is discarded
            self.zero_head()
        maml = self.meta_model()
        q_losses, accs, befores, afters = [], [], [], []
        for sx, sy, qx, qy in split_tasks(batch.images, batch.labels, cfg.n_way, cfg.n_shot, cfg.n_query):
            logits, before, after = adapt_and_predict(maml, sx, sy, qx, cfg.inner_steps)
            q_losses.append(F.cross_entropy(logits, qy))
            accs.append((logits.argmax(1) == qy).float().mean().detach())
            befores.append(before)
            afters.append(after)
        loss = torch.stack(q_losses).mean()
        return {"loss": loss, "query_loss": loss.detach(), "query_acc": torch.stack(accs).mean(),
                "support_loss_before": torch.stack(befores).mean(),
                "support_loss_after": torch.stack(afters).mean()}

    def export_backbone(self) -> nn.Module:
        """The standard export (backbone alone, pooled features), plus a plain (non-module) attribute
        ``maml_method`` pointing at this method so the ``maml_finetune`` readout can fine-tune backbone+head
        when handed the in-memory export (``load_backbone(last.pt)``); it is not in the state dict, so saved
        exports are the plain backbone."""
        net = super().export_backbone()
        net.__dict__["maml_method"] = self
        return net

    def finetune_predict(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                         steps: Optional[int] = None, inner_lr: Optional[float] = None) -> torch.Tensor:
        """Meta-test on one episode: fine-tune a fresh copy of backbone+head on the support set
        (``test_inner_steps`` SGD steps of ``inner_lr``, first order: no meta-gradient is needed),
        return the query logits. Train-mode BatchNorm (transductive) as at meta-training; the method's
        own weights and running statistics are untouched (the copy is discarded)."""
        import copy

        cfg: MAMLConfig = self.config
        steps = cfg.test_inner_steps if steps is None else int(steps)
        lr = cfg.inner_lr if inner_lr is None else float(inner_lr)
        n_way = int(support_y.max()) + 1
        if n_way != self.head.out_features:
            from ..errors import ProtocolError

            raise ProtocolError(f"this MAML model was meta-trained {self.head.out_features}-way; the episode is "
                                f"{n_way}-way: evaluate with n_way={self.head.out_features}")
        model = copy.deepcopy(self.learner()).train()
        if cfg.head == "zero":
            _zero_linear(model[-1])
        params = [p for p in model.parameters()]
        with torch.enable_grad():
            for _ in range(steps):
                loss = F.cross_entropy(model(support_x), support_y)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        if g is not None:
                            p.sub_(lr * g)
        with torch.no_grad():
            return model(query_x)


@METHODS.register("fomaml")
class FOMAML(MAML):
    """First-order MAML (Finn et al. 2017 §5.2): same as :class:`MAML` with the inner-loop gradients
    treated as constants (``learn2learn.algorithms.MAML(first_order=True)``)."""

    first_order = True


def _zero_linear(layer: nn.Linear) -> None:
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()


class _Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)
