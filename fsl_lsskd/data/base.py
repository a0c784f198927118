"""Core data contract shared by datasets, the training engine and the evaluator."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Dict, Optional, Sequence, Tuple

import numpy as np

SPLITS: Tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class SplitData:
    """All images of one few-shot split, decoded.

    ``images`` is uint8 ``[N, H, W, 3]``; ``labels`` int64 ``[N]`` indexing ``class_names`` (0..C-1, in the
    order of the split file). ``dataset``/``split`` name where it came from and ``fingerprint`` identifies
    the exact content (used to key feature caches and episode files).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: Tuple[str, ...]
    dataset: str
    split: str
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N,H,W,3], got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be [N] matching images")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def subset(self, index: np.ndarray, split: Optional[str] = None) -> "SplitData":
        return SplitData(self.images[index], self.labels[index], self.class_names, self.dataset,
                         split or self.split, f"{self.fingerprint}:subset{len(index)}")


class FewShotDataset(abc.ABC):
    """Base class of registered datasets (see ``fsl_lsskd.registry.DATASETS``).

    Subclasses set ``name``/``image_size`` and implement :meth:`_decode` (read the official archive or
    folder and return every split); caching, validation and split handling live here or in
    ``fsl_lsskd.data.cache``.
    """

    name: ClassVar[str] = ""
    image_size: ClassVar[int] = 32
    mean: ClassVar[Sequence[float]] = (0.5, 0.5, 0.5)
    std: ClassVar[Sequence[float]] = (0.25, 0.25, 0.25)

    @abc.abstractmethod
    def load_split(self, split: str) -> SplitData:
        """Return one split (``train``/``val``/``test``), from the uint8 cache when present."""

    @abc.abstractmethod
    def verify(self) -> Dict[str, object]:
        """Check the source data and split files; return a report (classes, images per split...)."""
