"""The method contract: a pretraining method is one ``nn.Module`` subclass registered in
``fsl_lsskd.registry.METHODS`` (one file in ``fsl_lsskd/methods/``). The engine (``fsl_lsskd.train.engine``)
owns data, augmentation, optimisation, checkpoints and logging; a method owns its extra modules (auxiliary
classifiers, heads), its loss and its state (e.g. prediction memories kept as buffers so resume checkpoints
carry them). docs/methods.md gives every registered method's loss, sources and defaults."""
from __future__ import annotations

import abc
from typing import ClassVar, Dict, Iterator, NamedTuple, Optional, Type

import torch
from torch import nn
from .configs import MethodConfig  # noqa: F401  (re-exported: every method's config derives from it)


class Batch(NamedTuple):
    """One augmented training batch: float images ``[B,3,H,W]`` (normalised), labels ``[B]`` in 0..C-1 and
    the dataset index of every sample ``[B]`` (PS-KD/LSSKD keep per-sample predictions)."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor


class Method(nn.Module, abc.ABC):
    """Base class of every pretraining method.

    Args:
        backbone: a timm model created with ``num_classes=num_classes`` (its head is the final classifier).
        num_classes: number of base classes.
        num_samples: size of the training set (for per-sample prediction memories indexed by ``Batch.index``).
        config: an instance of ``config_cls``.
        teacher: a frozen teacher ``Method`` for methods with ``needs_teacher``.
    """

    config_cls: ClassVar[Type[MethodConfig]] = MethodConfig
    needs_teacher: ClassVar[bool] = False
    #: method trained first as the teacher by ``fsl-bench run`` (for ``needs_teacher`` methods)
    default_teacher: ClassVar[Optional[str]] = None
    #: methods that use the engine's standard shuffled mini-batches; episodic methods override ``iter_batches``.
    episodic: ClassVar[bool] = False
    #: train on the short last batch of an epoch too (methods with a per-sample prediction memory: every sample
    #: is trained on and stored every epoch); the others drop it, as RFS does
    keeps_last_batch: ClassVar[bool] = False
    #: bumped when the method's training maths change, so finished cells of the old maths are retrained
    #: (part of the training identity)
    training_version: ClassVar[int] = 1
    #: the readout the method's paper evaluates it with when it is not a frozen-feature one (MAML:
    #: ``maml_finetune``); validated every epoch beside ProtoNet, logged as ``val_<readout>_acc``
    own_readout: ClassVar[Optional[str]] = None
    #: the engine trains the model channels_last (faster convolutions on CPU, ``fsl-bench perf train``); False keeps
    #: the default NCHW layout for the model and its batches (MAML: its second-order inner loop is faster so)
    channels_last: ClassVar[bool] = True

    def __init__(self, backbone: nn.Module, num_classes: int, num_samples: int,
                 config: Optional[MethodConfig] = None, teacher: Optional["Method"] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_samples = num_samples
        self.config = config if config is not None else self.config_cls()
        if self.needs_teacher and teacher is None:
            from ..errors import ConfigError

            raise ConfigError(f"method {type(self).__name__} needs a teacher checkpoint (set `teacher:` in the config)")
        # stored outside the module tree so the teacher is neither trained nor saved with the student
        self.__dict__["teacher"] = teacher

    @abc.abstractmethod
    def training_step(self, batch: Batch, epoch: int) -> Dict[str, torch.Tensor]:
        """Return a dict with the total ``loss`` and each loss term (logged separately)."""

    def memory_format(self) -> torch.memory_format:
        """The layout the engine puts the model (and :meth:`iter_batches`' images) in: :attr:`channels_last`."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def iter_batches(self, loader, epoch: int) -> Iterator[Batch]:
        """Batches of one epoch. Default: the engine's shuffled, augmented mini-batches
        (``loader.epoch_batches(epoch)``). Episodic methods (ProtoNet, MAML) override this to yield
        episodes built from ``loader.images``/``loader.labels`` with ``loader.augment``."""
        return loader.epoch_batches(epoch)

    def on_epoch_start(self, epoch: int) -> None:
        """Hook called before each epoch (e.g. to update PS-KD's alpha)."""

    def on_step_end(self, batch: Batch, epoch: int) -> None:
        """Hook called after each optimiser step (e.g. PS-KD/LSSKD write the step's detached predictions
        into their per-sample prediction memories, as PS-KD main.py does after ``optimizer.step()``)."""

    def trainable_parameters(self):
        """Parameters the engine's optimiser updates (default: all with ``requires_grad``)."""
        return [p for p in self.parameters() if p.requires_grad]

    def export_backbone(self) -> nn.Module:
        """The inference network: the backbone alone, auxiliary heads removed, classifier reset."""
        import copy

        net = copy.deepcopy(self.backbone)
        net.reset_classifier(0)
        return net.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)
