"""A method's settings and its initial weights, for every layer above ``methods`` (training, evaluation, the CLI):
``--set KEY=VALUE`` parsing (:func:`parse_set_options`), the config dataclass they give (:func:`method_config`)
and the weights training seed ``seed`` starts from (:func:`initial_method`). Nothing heavy is imported at module
level (the CLI's ``--help`` stays light)."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, Mapping, Optional

from ..errors import ConfigError


def parse_set_options(items) -> Dict[str, str]:
    """``["lr=0.1", "alpha_T=0.5"]`` -> dict (CLI ``--set``)."""
    out: Dict[str, str] = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r} (e.g. --set lr=0.1)")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def parse_value(name: str, text: Any, typ: Any) -> Any:
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
            return tuple(parse_value(name, p.strip(), inner) for p in parts)
        if typ is str or typ == "str":
            return text
        if origin is typing.Union:  # Optional[X]
            if text.strip().lower() in ("none", "null", ""):
                return None
            inner = [a for a in typing.get_args(typ) if a is not type(None)][0]
            return parse_value(name, text, inner)
    except ValueError:
        raise ConfigError(f"method setting {name}={text!r} is not a valid "
                          f"{getattr(typ, '__name__', str(typ).replace('typing.', ''))}") from None
    return text


def method_config(config_cls: type, method: str, overrides: Mapping[str, Any], epochs: Optional[int] = None,
                  batch_size: Optional[int] = None) -> Any:
    """``config_cls`` with ``epochs``/``batch_size`` and then ``overrides`` (parsed to each field's type; the more
    specific setting wins) applied; unknown keys raise :class:`ConfigError` listing the valid ones."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values: Dict[str, Any] = {}
    if epochs is not None:
        values["epochs"] = int(epochs)
    if batch_size is not None:
        values["batch_size"] = int(batch_size)
    for key, raw in overrides.items():
        if key not in fields:
            raise ConfigError(f"unknown setting {key!r} for method {method!r}; valid: {', '.join(sorted(fields))}")
        values[key] = parse_value(key, raw, hints.get(key, str))
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid settings for method {method!r}: {exc}") from None


def initial_method(method: str, mcfg, backbone: str, image_size: int, seed: int, num_classes: int,
                   num_samples: int, teacher=None):
    """Method ``method`` (config ``mcfg``) with the weights training seed ``seed`` starts from: the backbone and
    heads drawn from the ``init`` stream (:mod:`fsl_lsskd.seeding`) with ``num_classes`` base classes, the caller's
    global RNG untouched. ``fsl-bench evaluate --untrained --method NAME`` scores exactly these weights."""
    import torch

    from ..backbones import create_backbone
    from ..registry import METHODS
    from ..seeding import seed_torch

    cls = METHODS.get(method)
    with torch.random.fork_rng(devices=[]):
        seed_torch("init", seed)
        net = create_backbone(backbone, num_classes=num_classes, image_size=image_size)
        return cls(net, num_classes, num_samples, mcfg, teacher)
