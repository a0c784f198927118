"""``TrainConfig`` (one training run) and its *training identity*: exactly what determines the weights.

The training identity (:func:`training_identity`) holds the dataset and the content fingerprint of its
training split (so the class split, ``train_per_class`` and the image size of a folder dataset are in it),
the held-out share, the data fraction and the rule that draws it, the backbone, the method with its resolved
config (epochs, batch size, learning rate, ...) and its training version, the seed, the image size, the
precision and the teacher's training id. Not in it: the device, where the data is, the output directory,
the validation episodes or the MLflow settings. Its hash (:func:`train_id`) names a training cell in the
store and its run directory, so ``fsl-bench run`` trains a cell only when no finished run has that id.

The identity is computed from a :class:`TrainConfig` by one function, used by the engine (which records it)
and by the grid runner (which looks it up), so a setting reaches the id only by reaching the run.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Mapping, Optional

from ..errors import ConfigError
from ..methods.settings import method_config, parse_set_options  # noqa: F401 (re-exported)
from ..protocol import EpisodeProtocol

FRACTIONS = (0.25, 0.5, 0.75, 1.0)
PRECISIONS = ("fp32", "bf16", "fp16")
#: bump when the engine's training semantics change for every method (data path, heldout rule, schedule)
ENGINE_VERSION = 1
IDENTITY_FORMAT = 2
#: the per-epoch validation episodes by default: ProtoNet 5-way 5-shot, 15 queries, 200 val episodes
DEFAULT_VALIDATION = EpisodeProtocol(n_way=5, n_shot=5, n_query=15, n_episodes=200)


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    What is trained (the training identity): ``method``, ``backbone``, ``dataset`` (with ``dataset_options``
    that change the decoded content, e.g. ``split_file``, ``train_per_class``; they act through the split's
    fingerprint), ``image_size``, ``seed``, ``fraction`` (limited-data protocol, HSAKD ``--few-ratio``),
    ``heldout`` (stratified share of every base class held out for base-class accuracy), ``epochs`` /
    ``batch_size`` (override the method's), ``method_overrides`` (fields of the method's config; strings from
    the CLI are parsed to the field's type), ``precision`` (``fp32``, ``bf16`` or ``fp16`` autocast; fp16
    uses a gradient scaler) and ``teacher`` (a teacher's model directory, for distillation methods).

    Where and how (not in the identity): ``archive``/``data_root`` (the data's location; ``download``
    fetches the official archive into ``data_root`` when it is not there), ``device``,
    ``out_dir`` (resume state while training, then the finished model), ``validation`` (episodes scored every
    epoch on the val split; None disables), ``num_threads``, ``mlflow``/``experiment``/``run_name``,
    ``export``, ``sync_bn`` (under torchrun: BatchNorm over the global batch).
    """

    method: str = "ce"
    backbone: str = "conv4"
    dataset: str = "tiny_imagenet"
    image_size: int = 32
    seed: int = 0
    fraction: float = 1.0
    heldout: float = 0.1
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    method_overrides: Mapping[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    teacher: Optional[str] = None
    dataset_options: Mapping[str, Any] = field(default_factory=dict)
    archive: Optional[str] = None
    data_root: Optional[str] = None
    download: bool = False
    device: str = "cpu"
    out_dir: str = "runs/default"
    validation: Optional[EpisodeProtocol] = DEFAULT_VALIDATION
    experiment: str = "fsl-bench"
    run_name: Optional[str] = None
    export: bool = True
    num_threads: Optional[int] = None
    mlflow: bool = True
    sync_bn: bool = True

    def __post_init__(self) -> None:
        from ..bounds import check_seed, check_size

        check_seed(self.seed, "seed")
        check_size(self.image_size, "image_size")
        if not 0.0 < float(self.fraction) <= 1.0:
            raise ConfigError(f"fraction must be in (0, 1] (the protocol uses {FRACTIONS}), got {self.fraction}")
        if not 0.0 <= float(self.heldout) < 1.0:
            raise ConfigError(f"heldout must be in [0, 1), got {self.heldout}")
        if self.epochs is not None and int(self.epochs) < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        object.__setattr__(self, "method_overrides", dict(self.method_overrides))
        object.__setattr__(self, "dataset_options", dict(self.dataset_options))

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["method_overrides"] = dict(sorted(d["method_overrides"].items()))
        d["dataset_options"] = dict(sorted(d["dataset_options"].items()))
        return json.loads(json.dumps(d, default=str))

    def data_kwargs(self) -> Dict[str, Any]:
        """Arguments of :func:`fsl_lsskd.data.get_dataset` for this run's data."""
        return {"root": self.data_root, "archive": self.archive, "download": bool(self.download),
                **dict(self.dataset_options)}


def method_class(name: str):
    from ..registry import METHODS

    return METHODS.get(name)


def build_method_config(config_cls: type, cfg: TrainConfig) -> Any:
    """The method's config dataclass with the run's ``epochs``/``batch_size`` and then ``cfg.method_overrides``
    applied (:func:`fsl_lsskd.methods.settings.method_config`); unknown keys raise :class:`ConfigError` listing the
    valid ones."""
    return method_config(config_cls, cfg.method, cfg.method_overrides, cfg.epochs, cfg.batch_size)


def resolved_method_config(cfg: TrainConfig) -> Any:
    """The method config ``cfg`` trains with (:func:`build_method_config` of the registered method's
    ``config_cls``, read without importing the method, so no torch:
    :meth:`~fsl_lsskd.registry.Registry.class_constant`)."""
    from ..registry import METHODS

    return build_method_config(METHODS.class_constant(cfg.method, "config_cls"), cfg)


def training_identity(cfg: TrainConfig, split_fingerprint: str, teacher_train_id: Optional[str] = None
                      ) -> Dict[str, Any]:
    """The training identity of ``cfg`` (module docstring) given the content fingerprint of its training split
    (:attr:`SplitData.fingerprint`) and, for distillation methods, the teacher's training id."""
    from ..data.limited import SAMPLER

    from ..registry import METHODS

    # read without importing the method (no torch): its config class comes from fsl_lsskd.methods.configs
    if METHODS.class_constant(cfg.method, "needs_teacher", False) and not teacher_train_id:
        raise ConfigError(f"method {cfg.method!r} trains from a teacher: its training identity needs the teacher's "
                          f"training id (pass --teacher <teacher model directory>)")
    mcfg = resolved_method_config(cfg)
    identity = {
        "format": IDENTITY_FORMAT,
        "engine_version": ENGINE_VERSION,
        "dataset": cfg.dataset,
        "split_fingerprint": str(split_fingerprint),
        "heldout": float(cfg.heldout),
        "fraction": float(cfg.fraction),
        "backbone": cfg.backbone,
        "image_size": int(cfg.image_size),
        "method": cfg.method,
        "method_version": int(METHODS.class_constant(cfg.method, "training_version", 1)),
        "method_config": mcfg.identity_dict(),
        "seed": int(cfg.seed),
        "precision": cfg.precision,
    }
    if float(cfg.fraction) < 1.0:
        identity["fraction_sampler"] = SAMPLER
    if teacher_train_id:
        identity["teacher"] = str(teacher_train_id)
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


def train_id(identity: Mapping[str, Any]) -> str:
    """A 16-hex-digit hash of a training identity (the training cell's name in the store and on disk)."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def diff_keys(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list:
    """Dotted keys whose values differ between two (nested) identities."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += diff_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


