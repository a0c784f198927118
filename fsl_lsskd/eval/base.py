"""The readout contract and its result.

A *readout* turns a frozen (or, for image-level readouts, fine-tuned) backbone into a few-shot classifier on
the published episodes: ProtoNet, logistic regression, fine-tuning, ... A readout is one file in
``fsl_lsskd/eval/`` with a :class:`Readout` subclass decorated ``@READOUTS.register("name")``; its settings
are a frozen dataclass (:attr:`Readout.config_cls`) and are part of the scoring identity, so changing one
re-scores and adding one never retrains.

Episode layout (every readout): ``rows`` int64 ``[E, n_way, n_shot + n_query]`` indexes the split's rows,
class-major, support first; the label of ``rows[:, w]`` is ``w``. A readout returns, per episode, the
fraction of queries classified correctly and, when it is probabilistic, the class probabilities of every
query ``[E, n_way * n_query, n_way]`` (queries class-major: query ``j`` has label ``j // n_query``), from
which :mod:`fsl_lsskd.eval.calibration` computes NLL, Brier score and reliability statistics.

Units: readouts work in fractions; :class:`ScoreResult` (the public result) reports accuracy in percent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple

import numpy as np

from ..errors import ConfigError
from ..inputs import InputSpec
from ..protocol import EpisodeProtocol
from ..seeding import torch_generator
from .configs import ReadoutConfig  # noqa: F401  (re-exported: every readout's config derives from it)


@dataclass
class EpisodeInputs:
    """What a readout may use to score a batch of episodes.

    Attributes:
        rows: int64 ``[E, n_way, n_shot + n_query]`` split rows (layout in the module docstring).
        n_shot: support images per class.
        features: float32 ``[N, D]`` pooled features of every row of the split (frozen backbone), or None
            when no readout of the run needs them.
        images: uint8 ``[N, H, W, 3]`` images of the split.
        embed: ``embed(uint8 [n, H, W, 3], augment: bool, generator) -> float32 [n, D]`` features of images
            through the frozen backbone; ``augment=True`` applies the training transform (RFS support
            augmentation: random crop with padding 4, colour jitter, horizontal flip).
        backbone: the frozen backbone (``model(x)`` = pooled features), on ``device``.
        method: ``method()`` returns the trained method (backbone with its heads), loaded on first call;
            None when the scorer has no training checkpoint (e.g. an exported backbone).
        mean, std: per-channel normalisation; image_size: the backbone's input size.
        device: where to compute.
        progress: ``progress(n)`` when ``n`` more episodes are scored (progress display only; readouts call
            :meth:`done`, those that do not are counted when they return).
    """

    rows: np.ndarray
    n_shot: int
    features: Optional[np.ndarray] = None
    images: Optional[np.ndarray] = None
    embed: Optional[Callable[..., np.ndarray]] = None
    backbone: Any = None
    method: Optional[Callable[[], Any]] = None
    mean: Tuple[float, ...] = (0.5, 0.5, 0.5)
    std: Tuple[float, ...] = (0.25, 0.25, 0.25)
    image_size: int = 32
    device: Any = "cpu"
    progress: Optional[Callable[[int], None]] = None

    def done(self, n: int = 1) -> None:
        """``n`` more episodes are scored (for the progress display)."""
        if self.progress is not None:
            self.progress(int(n))

    @property
    def n_way(self) -> int:
        return int(self.rows.shape[1])

    @property
    def input_spec(self) -> InputSpec:
        """The backbone's input preparation (``mean``, ``std``, ``image_size``) as one
        :class:`~fsl_lsskd.inputs.InputSpec`: readouts that feed images prepare them with it."""
        return InputSpec(self.mean, self.std, self.image_size)

    @property
    def n_query(self) -> int:
        return int(self.rows.shape[2]) - int(self.n_shot)


@dataclass
class ReadoutOutput:
    """Per-episode fraction of correct queries ``[E]`` and, for probabilistic readouts, query probabilities
    ``[E, n_way * n_query, n_way]`` (float32)."""

    correct: np.ndarray
    probs: Optional[np.ndarray] = None


class Readout:
    """Base class of registered readouts.

    Class attributes: ``config_cls`` (the settings dataclass), ``needs_features`` (uses the cached frozen
    features), ``needs_images`` (uses images: fine-tuning, augmentation), ``needs_method`` (needs the whole
    trained method, not only its exported backbone: MAML's head; ``fsl-bench publish`` then ships the model
    directory too), ``probabilistic`` (returns query probabilities). Subclasses implement :meth:`predict`.
    ``options`` are run-time arguments that are not part of the identity (chunk sizes, a checkpoint to load)."""

    config_cls: ClassVar[type] = ReadoutConfig
    needs_features: ClassVar[bool] = True
    needs_images: ClassVar[bool] = False
    needs_method: ClassVar[bool] = False
    probabilistic: ClassVar[bool] = False
    registry_name: ClassVar[str] = ""

    def __init__(self, config: Optional[ReadoutConfig] = None, **options: Any) -> None:
        self.config = config if config is not None else self.config_cls()
        self.options = options

    @classmethod
    def build_config(cls, settings: Optional[Mapping[str, Any]] = None) -> ReadoutConfig:
        """The settings dataclass from a mapping; unknown keys or bad values raise :class:`ConfigError` naming
        the valid ones (:func:`fsl_lsskd.eval.configs.build_config`)."""
        from .configs import build_config

        return build_config(cls.registry_name, cls.config_cls, settings)

    def uses_features(self) -> bool:
        return self.needs_features

    def uses_images(self) -> bool:
        return self.needs_images

    def episode_limit(self) -> Optional[int]:
        """Score only the first N episodes (image-level readouts' ``max_episodes``); None = all."""
        n = getattr(self.config, "max_episodes", None)
        return None if n is None else int(n)

    def predict(self, inputs: EpisodeInputs) -> ReadoutOutput:
        raise NotImplementedError


def l2_normalize(x, eps: float = 1e-12):
    """Row-wise L2 normalisation (RFS ``is_norm``); numpy arrays and torch tensors, any leading shape."""
    if isinstance(x, np.ndarray):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def query_labels(n_way: int, n_query: int) -> np.ndarray:
    """Labels of the queries of an episode, class-major: ``[n_way * n_query]``."""
    return np.repeat(np.arange(n_way), n_query)


def mean_ci(values: np.ndarray) -> Tuple[float, float]:
    """Mean and 95% CI half-width with the t-distribution (RFS ``mean_confidence_interval``):
    ``h = sem * t.ppf(0.975, n-1)``, ``sem = std(ddof=1)/sqrt(n)`` (``scipy.stats``). NaN for no values; the
    half-width is NaN for one value."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    if n == 1:
        return float(values[0]), float("nan")
    sem = values.std(ddof=1) / math.sqrt(n)
    return float(values.mean()), float(sem * stats.t.ppf(0.975, n - 1))


@dataclass
class ScoreResult:
    """One (readout, protocol) score of one backbone on one split.

    Attributes:
        readout: the registered readout name; ``label``: its column label (name plus non-default settings).
        settings: the readout's resolved settings.
        protocol: the protocol; ``n_episodes`` there is the number of episodes actually scored (None for
            non-episodic scores, e.g. base-class images, whose arrays are per image).
        accuracy: per-episode accuracy in percent ``[E]``.
        nll, brier: per-episode mean negative log-likelihood (nats) and multiclass Brier score (0..2) of the
            queries ``[E]``, for probabilistic readouts, else None.
        reliability: per-episode reliability statistics ``[E, n_bins, 3]`` (count, sum of confidences, sum of
            correct) over 15 equal-width confidence bins, for probabilistic readouts.
        episodes_source: the published episode file (``splits/...``) or ``generated``; episodes_sha256: the
            sha256 of the published file, or of the generated episode arrays.
        seconds: readout time; info: dataset, split, image size, split fingerprint.
        classes: each scored episode's class ids ``[E, n_way]`` (int), for :meth:`class_interval`; None for
            non-episodic scores.
    """

    readout: str
    label: str
    settings: Dict[str, Any]
    protocol: Optional[EpisodeProtocol]
    accuracy: np.ndarray
    nll: Optional[np.ndarray] = None
    brier: Optional[np.ndarray] = None
    reliability: Optional[np.ndarray] = None
    episodes_source: str = "generated"
    episodes_sha256: str = ""
    seconds: float = 0.0
    info: Dict[str, Any] = field(default_factory=dict)
    classes: Optional[np.ndarray] = None
    _class_iv: Optional[Tuple[float, float]] = field(default=None, init=False, repr=False, compare=False)

    @property
    def n_episodes(self) -> int:
        return int(len(self.accuracy))

    @property
    def n_classes(self) -> int:
        """The number of distinct test classes the scored episodes draw from (0 for non-episodic scores)."""
        return 0 if self.classes is None else int(np.unique(self.classes).size)

    def class_interval(self) -> Optional[Tuple[float, float]]:
        """The 95% test-class interval ``(lo, hi)`` of the mean accuracy (%): how far another draw of as many
        test classes would move it (:func:`fsl_lsskd.eval.intervals.class_interval`, Lafargue et al. 2024). The
        episode interval (:attr:`ci95`) describes these classes only. ``(nan, nan)`` when the episodes cannot
        estimate it (every episode holds the same classes); None for non-episodic scores. Computed once."""
        if self.classes is None:
            return None
        if self._class_iv is None:
            from .intervals import class_interval

            self._class_iv = class_interval(self.accuracy, self.classes)
        return self._class_iv

    @property
    def class_ci95(self) -> float:
        """Half-width (points) of :meth:`class_interval`, as :attr:`ci95` is of the episode interval; NaN when
        it is not estimable or the score is not episodic."""
        iv = self.class_interval()
        return (iv[1] - iv[0]) / 2 if iv is not None and math.isfinite(iv[0]) else math.nan

    @property
    def mean(self) -> float:
        """Mean accuracy (%)."""
        return mean_ci(self.accuracy)[0]

    @property
    def ci95(self) -> float:
        """95% CI half-width of the mean accuracy over episodes (points, t-distribution)."""
        return mean_ci(self.accuracy)[1]

    @property
    def ece(self) -> Optional[float]:
        """Top-label expected calibration error (%) of the pooled queries; None for non-probabilistic readouts."""
        if self.reliability is None:
            return None
        from .calibration import ece_from_bins

        return 100.0 * ece_from_bins(self.reliability.sum(0))

    @property
    def key(self) -> str:
        return f"{self.protocol.key if self.protocol else 'base'}_{self.label}"

    def summary(self) -> Dict[str, Any]:
        out = {"readout": self.readout, "label": self.label, "settings": dict(self.settings),
               **(self.protocol.to_dict() if self.protocol else {}), "n_episodes": self.n_episodes,
               "accuracy": self.mean,
               "accuracy_ci95": self.ci95, "episodes": self.episodes_source, "episodes_sha256": self.episodes_sha256,
               "seconds": self.seconds, **self.info}
        if self.nll is not None:
            out.update(nll=float(np.mean(self.nll)), nll_ci95=mean_ci(self.nll)[1], brier=float(np.mean(self.brier)),
                       brier_ci95=mean_ci(self.brier)[1], ece=self.ece)
        return out


#: seed of the scorers' per-episode streams (``support_augment``, ``finetune_batches``: :mod:`fsl_lsskd.seeding`)
AUG_SEED = 0


def support_query_features(inputs: EpisodeInputs, n_aug_support: int, start: int, stop: int):
    """Support and query features of episodes ``start:stop``: ``(support [e, n_way, S, D], query
    [e, n_way, n_query, D])`` float32. Without augmentation ``S = n_shot`` and both come from the cached
    features; with ``n_aug_support = m > 0`` every support image is embedded ``m`` times through RFS's
    training transform (``S = m * n_shot``; RFS ``n_aug_support_samples``), drawn per episode from the
    ``support_augment`` stream of :data:`AUG_SEED` at the episode index, so every method sees the same augmented
    copies."""
    rows = inputs.rows[start:stop]
    e, w, k = rows.shape
    feats = inputs.features
    query = feats[rows[:, :, inputs.n_shot:]]
    if n_aug_support <= 0:
        return feats[rows[:, :, :inputs.n_shot]], query
    if inputs.embed is None or inputs.images is None:
        raise ConfigError("support augmentation needs the split's images and the backbone (n_aug_support > 0)")
    sup_rows = rows[:, :, :inputs.n_shot]
    out = np.empty((e, w, n_aug_support * inputs.n_shot, feats.shape[1]), dtype=np.float32)
    for i in range(e):
        g = torch_generator("support_augment", AUG_SEED, start + i)
        imgs = inputs.images[np.tile(sup_rows[i].reshape(-1), n_aug_support)]  # copy-major
        f = inputs.embed(imgs, augment=True, generator=g).reshape(n_aug_support, w, inputs.n_shot, -1)
        out[i] = f.transpose(1, 0, 2, 3).reshape(w, n_aug_support * inputs.n_shot, -1)
    return out, query
