"""Scoring trained backbones: readouts on published episodes (RFS protocol), calibration, cached features.

``evaluate(backbone, split, protocols=[EpisodeProtocol(...)], readouts=["protonet", "logreg_batched"])`` ->
``list[ScoreResult]``; readouts subclass :class:`fsl_lsskd.eval.base.Readout` and register in
:data:`fsl_lsskd.registry.READOUTS`.
"""
from __future__ import annotations

from typing import Any

_LAZY = {"evaluate": "scoring", "ReadoutSpec": "scoring", "scoring_identity": "scoring", "score_id": "scoring",
         "ScoreResult": "base", "Readout": "base", "ReadoutConfig": "base", "EpisodeInputs": "base",
         "ReadoutOutput": "base", "mean_ci": "base", "load_episodes": "episodes", "generate_episodes": "episodes",
         "Episodes": "episodes"}


def __getattr__(name: str) -> Any:  # lazy: importing the package must not import torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(name)


__all__ = sorted(_LAZY)
