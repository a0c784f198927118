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

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..deps import require_learn2learn
from ..errors import ConfigError
from ..registry import METHODS
from .episodic import EpisodicConfig, EpisodicMethod, split_tasks
from .base import Batch, Method


HEADS = ("normal", "xavier", "zero")


@dataclass(frozen=True)
class MAMLConfig(EpisodicConfig):
    """Defaults: Finn et al. 2017 §5.2 miniImageNet and cbfinn/maml ``main.py`` flags
    (``--update_lr=0.01 --num_updates=5 --meta_batch_size=4|2 --meta_lr=0.001 --num_filters=32``):

    - ``inner_lr`` 0.01, ``inner_steps`` 5 at meta-training, ``test_inner_steps`` 10 at meta-test;
    - meta-optimiser Adam, ``lr`` (meta lr) 1e-3, constant (no milestones), no weight decay;
    - ``meta_batch_size`` 2 tasks, the paper's 5-shot value (4 for 1-shot: set it with ``n_shot: 1``);
    - 5-way, 5-shot, 15 queries per class (cbfinn/maml samples ``update_batch_size + 15`` per class);
    - schedule: 60 000 meta-iterations x 2 tasks = ``epochs`` 100 x ``episodes_per_epoch`` 1200 tasks;
    - ``head``: the linear head's initial weights, meta-learned from ``normal`` (N(0,1), zero bias: cbfinn/maml's
      Omniglot model) or ``xavier`` (Xavier-uniform, zero bias: cbfinn/maml's mini-ImageNet model and learn2learn
      0.2.0's ``CNN4``), or ``zero`` (the zeroing trick of Kao et al., "MAML is a Noisy Contrastive Learner in Classification", ICLR
      2022, §4: the head starts every task at zero, before every outer step and at meta-test, so only the inner
      loop fits it; with one inner step it is a prototype-like classifier of the support features);
    - no augmentation. Backbone: the paper's Conv-4 has 32 filters; our ``conv4`` backbone has the width
      the backbone registry gives it (pooled features), so the architecture is close to, not exactly,
      the paper's.

    CPU scaling (honest): second-order MAML costs ~(inner_steps+2) forward/backward passes per task, so
    the CPU profiles train a tiny fraction of the paper's 120 000 tasks (e.g. 3 epochs x 200 tasks =
    0.5 %, with ``inner_steps`` kept at 5). Numbers from such runs show that the pipeline works; they are
    not reproductions of the paper's 63.1 % (5-shot) / 48.7 % (1-shot).
    """

    epochs: int = 100
    episodes_per_epoch: int = 1200
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_milestones: Tuple[float, ...] = ()
    optimizer: str = "adam"
    n_way: int = 5
    n_shot: int = 5
    n_query: int = 15
    inner_lr: float = 0.01
    inner_steps: int = 5
    test_inner_steps: int = 10
    meta_batch_size: int = 2
    head: str = "normal"

    identity_omit_if_default: ClassVar[Tuple[str, ...]] = ("head",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head not in HEADS:
            raise ConfigError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.inner_steps < 1 or self.test_inner_steps < 1 or self.meta_batch_size < 1:
            raise ConfigError("inner_steps, test_inner_steps and meta_batch_size must be >= 1")
        if self.inner_lr <= 0:
            raise ConfigError(f"inner_lr must be > 0, got {self.inner_lr}")


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
