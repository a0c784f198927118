"""Episodic few-shot evaluation (RFS protocol): frozen backbone, cached features, standard episodes,
ProtoNet / logistic-regression classifiers, mean ± 95% CI (t).

``evaluate(backbone, split, shots=(1, 5), classifiers=("protonet", "logreg_batched"), ...)`` ->
``list[EvalResult]``; evaluators subclass :class:`fsl_lsskd.eval.base.Evaluator`.
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:  # lazy: importing the package must not import torch
    if name == "evaluate":
        from ._core import evaluate

        return evaluate
    if name in ("EvalResult", "Evaluator", "mean_ci"):
        from . import base

        return getattr(base, name)
    if name in ("load_episodes", "generate_episodes", "Episodes"):
        from . import _episodes

        return getattr(_episodes, name)
    raise AttributeError(name)


__all__ = ["evaluate", "EvalResult", "Evaluator", "mean_ci", "load_episodes", "generate_episodes", "Episodes"]
