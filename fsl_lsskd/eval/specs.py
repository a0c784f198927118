"""Naming a readout and its settings: :class:`ReadoutSpec`, importable without torch (the settings come from
:mod:`fsl_lsskd.eval.configs`), so a benchmark's scoring identities are computed before, or without, any
heavy import; :mod:`fsl_lsskd.eval.scoring` re-exports it."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from ..errors import ConfigError
from ..registry import READOUTS
from .base import Readout
from .configs import build_config

#: the base-class readout's name (:mod:`fsl_lsskd.eval.base_classes`: held-out images of the training classes)
HELDOUT_BASE = "heldout_base"


@dataclass(frozen=True)
class ReadoutSpec:
    """A readout and its resolved settings (every field of its config, defaults included), with the label
    used for table columns (the name, plus the settings that differ from the defaults)."""

    name: str
    settings: Tuple[Tuple[str, Any], ...] = ()
    label: str = ""

    @classmethod
    def parse(cls, value: Union[str, Mapping[str, Any], "ReadoutSpec"],
              defaults: Optional[Mapping[str, Any]] = None) -> "ReadoutSpec":
        """From a name, a mapping ``{readout: NAME, label: ..., <setting>: value, ...}`` or a spec.
        ``defaults`` are settings applied when the readout has them and the value does not set them (e.g.
        ``max_episodes`` of image-level readouts from a benchmark's ``eval.image_episodes``). Unknown names or
        settings raise :class:`ConfigError`/:class:`UnknownNameError` listing the valid ones."""
        if isinstance(value, ReadoutSpec):
            return value
        if isinstance(value, str):
            name, settings, label = value, {}, ""
        elif isinstance(value, Mapping):
            raw = dict(value)
            name = raw.pop("readout", None)
            if not name:
                raise ConfigError(f"readout {dict(value)}: name it with `readout: NAME` (e.g. readout: protonet)")
            label = str(raw.pop("label", "") or "")
            settings = raw
        else:
            raise ConfigError(f"a readout is a name or a mapping {{readout: NAME, ...settings}}, got {value!r}")
        # from eval/configs.py, no torch import; an unknown name raises UnknownNameError naming the valid ones
        config_cls = READOUTS.class_constant(str(name), "config_cls")
        fields = {f.name: f for f in dataclasses.fields(config_cls)}
        merged = {k: v for k, v in (defaults or {}).items() if k in fields}
        merged.update(settings)
        config = build_config(str(name), config_cls, merged)
        resolved = dataclasses.asdict(config)
        if not label:
            changed = [(k, v) for k, v in resolved.items() if k != "max_episodes"  # stated in captions instead
                       and fields[k].default is not dataclasses.MISSING and v != fields[k].default]
            label = str(name) + (f"({','.join(f'{k}={v}' for k, v in changed)})" if changed else "")
        return cls(str(name), tuple(sorted(resolved.items())), label)

    def build(self, **options: Any) -> Readout:
        """The readout itself (imports its module)."""
        cls_ = READOUTS.get(self.name)
        return cls_(cls_.build_config(dict(self.settings)), **options)

    def identity(self) -> Dict[str, Any]:
        return {"readout": self.name, "settings": json.loads(json.dumps(dict(self.settings), default=str))}


def needs_method(readout: str) -> bool:
    """Whether the registered readout named ``readout`` needs the whole trained method, not only its exported
    backbone (:attr:`Readout.needs_method`; e.g. ``maml_finetune``). Unregistered names: False."""
    return readout in READOUTS and bool(READOUTS.class_constant(readout, "needs_method", False))
