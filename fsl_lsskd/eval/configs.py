"""The readouts' settings dataclasses, importable without torch (as :mod:`fsl_lsskd.methods.configs`): a
benchmark's scoring identities (`fsl-bench table --from-results`, `run --dry-run`) resolve every readout's
settings from here without importing the readout. Each readout's file names its config as ``config_cls``;
docs/design.md lists the settings."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..errors import ConfigError


@dataclass(frozen=True)
class ReadoutConfig:
    """Settings of a readout (none by default). Subclasses add fields; every field is part of the scoring
    identity. ``max_episodes`` (image-level readouts) scores only the first N of the published episodes."""


@dataclass(frozen=True)
class ProtoNetConfig(ReadoutConfig):
    """``temperature`` divides the negative squared distances before the softmax (probabilities only; the
    prediction does not depend on it). ``n_aug_support``: augmented copies of every support image (RFS
    ``n_aug_support_samples``; 0 = each support image embedded once, as is)."""

    temperature: float = 1.0
    n_aug_support: int = 0

    def __post_init__(self) -> None:
        if not float(self.temperature) > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if int(self.n_aug_support) < 0:
            raise ConfigError(f"n_aug_support must be >= 0, got {self.n_aug_support}")


@dataclass(frozen=True)
class LogRegConfig(ReadoutConfig):
    """``C``: inverse L2 strength (scikit-learn's ``C``; RFS uses 1.0). ``n_aug_support``: augmented copies of
    every support image (RFS ``n_aug_support_samples``; 0 = each support image once, as is)."""

    C: float = 1.0
    n_aug_support: int = 0

    def __post_init__(self) -> None:
        if not float(self.C) > 0:
            raise ConfigError(f"C must be > 0, got {self.C}")
        if int(self.n_aug_support) < 0:
            raise ConfigError(f"n_aug_support must be >= 0, got {self.n_aug_support}")


@dataclass(frozen=True)
class FinetuneConfig(ReadoutConfig):
    """Settings of the ``finetune`` readout (module docstring for their sources).

    Attributes:
        max_episodes: score the first N published episodes (None = all).
        steps: optimiser steps per episode (0 = the prototype head, i.e. ``protonet``).
        lr: head learning rate; backbone_lr: learning rate of the last stage (0 = head only, frozen backbone).
        momentum, weight_decay: SGD settings.
        n_aug_support: augmented copies of every support image (0 = the support images as they are).
        batch_size: support samples per step (None = all of them: full-batch steps).
        temperature: divides the head's logits (as ``protonet``'s temperature).
    """

    max_episodes: Optional[int] = None
    steps: int = 100
    lr: float = 0.01
    backbone_lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 1e-3
    n_aug_support: int = 5
    batch_size: Optional[int] = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.max_episodes is not None and int(self.max_episodes) < 1:
            raise ConfigError(f"max_episodes must be >= 1, got {self.max_episodes}")
        if int(self.steps) < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}")
        for name in ("lr", "backbone_lr", "weight_decay"):
            if float(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= float(self.momentum) < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if int(self.n_aug_support) < 0:
            raise ConfigError(f"n_aug_support must be >= 0, got {self.n_aug_support}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not float(self.temperature) > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class MAMLFinetuneConfig(ReadoutConfig):
    """``max_episodes``: score the first N published episodes (None = all). ``steps``/``inner_lr``: test-time
    fine-tuning (None = the method's ``test_inner_steps``/``inner_lr``; paper: 10, 0.01)."""

    max_episodes: Optional[int] = None
    steps: Optional[int] = None
    inner_lr: Optional[float] = None

    def __post_init__(self) -> None:
        if self.max_episodes is not None and int(self.max_episodes) < 1:
            raise ConfigError(f"max_episodes must be >= 1, got {self.max_episodes}")


def build_config(readout: str, config_cls: type, settings: Optional[Mapping[str, Any]] = None) -> ReadoutConfig:
    """Readout ``readout``'s settings dataclass ``config_cls`` from a mapping; unknown keys or bad values raise
    :class:`ConfigError` naming the valid ones."""
    settings = dict(settings or {})
    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(settings) - valid)
    if unknown:
        raise ConfigError(f"readout {readout!r} has no setting {unknown[0]!r}; valid settings: "
                          f"{', '.join(sorted(valid)) or 'none'}")
    try:
        return config_cls(**settings)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"readout {readout!r}: {exc}") from None
