"""``TrainConfig``: everything that defines a training run (hashed into checkpoints for safe resume)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Mapping, Optional

from ..errors import ConfigError

FRACTIONS = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    ``method_overrides`` replace fields of the method's config dataclass (values may be strings from the
    CLI; they are parsed to the field's type). ``epochs``/``batch_size`` (when set) override the method's.
    ``fraction``: limited-data protocol (HSAKD ``--few-ratio``; stratified, seeded per class).
    ``heldout``: stratified fraction of the train split held out for base-class validation accuracy.
    ``val_episodes``: ProtoNet 5-way 5-shot episodes on the val split per epoch (0 disables).
    ``sync_bn``: under torchrun with several processes, BatchNorm uses the statistics of the global batch
    (as one process would); False keeps per-process statistics (ignored on one process).
    """

    method: str = "ce"
    backbone: str = "conv4"
    dataset: str = "tiny_imagenet"
    archive: Optional[str] = None
    data_root: Optional[str] = None
    image_size: int = 32
    seed: int = 0
    fraction: float = 1.0
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    method_overrides: Mapping[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    out_dir: str = "runs/default"
    heldout: float = 0.1
    val_episodes: int = 200
    val_shot: int = 5
    experiment: str = "fsl-bench"
    run_name: Optional[str] = None
    teacher: Optional[str] = None
    export: bool = True
    num_threads: Optional[int] = None
    mlflow: bool = True
    sync_bn: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < float(self.fraction) <= 1.0:
            raise ConfigError(f"fraction must be in (0, 1] (the protocol uses {FRACTIONS}), got {self.fraction}")
        if not 0.0 <= float(self.heldout) < 1.0:
            raise ConfigError(f"heldout must be in [0, 1), got {self.heldout}")
        if self.epochs is not None and int(self.epochs) < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        object.__setattr__(self, "method_overrides", dict(self.method_overrides))

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["method_overrides"] = dict(sorted(d["method_overrides"].items()))
        return d

    # fields that may change between a run and its resumption (where/how, not what)
    RESUME_FREE = ("device", "out_dir", "num_threads", "run_name", "experiment", "export", "mlflow",
                   "archive", "data_root", "sync_bn")


def identity_dict(cfg: TrainConfig, method_config: Any, data_fingerprint: str = "") -> Dict[str, Any]:
    """The fields that must match for a resume: the run config (minus where/how fields), the resolved
    method config and the training data's fingerprint."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in TrainConfig.RESUME_FREE and k != "method_overrides"}
    d.update({f"method.{k}": v for k, v in asdict(method_config).items()})
    d["data_fingerprint"] = data_fingerprint
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def config_hash(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _parse_value(name: str, text: Any, typ: Any) -> Any:
    if not isinstance(text, str):
        return tuple(text) if isinstance(text, list) else text
    origin = typing.get_origin(typ)
    try:
        if typ is bool or typ == "bool":
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if typ is int or typ == "int":
            return int(text)
        if typ is float or typ == "float":
            return float(text)
        if origin is tuple or str(typ).startswith("Tuple") or str(typ).startswith("typing.Tuple"):
            args = typing.get_args(typ)
            inner = args[0] if args else float
            parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
            return tuple(_parse_value(name, p.strip(), inner) for p in parts)
        if typ is str or typ == "str":
            return text
        if origin is typing.Union:  # Optional[X]
            if text.strip().lower() in ("none", "null", ""):
                return None
            inner = [a for a in typing.get_args(typ) if a is not type(None)][0]
            return _parse_value(name, text, inner)
    except ValueError:
        raise ConfigError(f"method setting {name}={text!r} is not a valid {typ}") from None
    return text


def build_method_config(config_cls: type, cfg: TrainConfig) -> Any:
    """The method's config dataclass with ``cfg.method_overrides`` (parsed to each field's type) and the
    ``epochs``/``batch_size`` overrides applied; unknown keys raise :class:`ConfigError` listing the valid ones."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values: Dict[str, Any] = {}
    for key, raw in cfg.method_overrides.items():
        if key not in fields:
            raise ConfigError(f"unknown setting {key!r} for method {cfg.method!r}; valid: {', '.join(sorted(fields))}")
        values[key] = _parse_value(key, raw, hints.get(key, str))
    if cfg.epochs is not None:
        values["epochs"] = int(cfg.epochs)
    if cfg.batch_size is not None:
        values["batch_size"] = int(cfg.batch_size)
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid settings for method {cfg.method!r}: {exc}") from None


def parse_set_options(items) -> Dict[str, str]:
    """``["lr=0.1", "alpha_T=0.5"]`` -> dict (CLI ``--set``)."""
    out: Dict[str, str] = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r} (e.g. --set lr=0.1)")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out
