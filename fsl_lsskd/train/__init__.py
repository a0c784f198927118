"""The training engine (``train(TrainConfig) -> TrainResult``), its fast data path and checkpoints."""
from __future__ import annotations

from typing import Any

_LAZY = {"TrainConfig": "config", "TrainResult": "engine", "train": "engine", "TrainLoader": "loader"}


def __getattr__(name: str) -> Any:  # lazy: importing the package (`fsl-bench train --help`) must not import torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(name)


__all__ = sorted(_LAZY)
