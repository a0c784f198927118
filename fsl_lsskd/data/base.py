"""Core data contract shared by datasets, the training engine and the evaluator."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError

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

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def resized(self, size: int, chunk: int = 2048) -> "SplitData":
        """The same split with every image resized to ``size``x``size`` (bilinear, antialiased, uint8 out),
        e.g. Tiny ImageNet at 32x32. Returns ``self`` when the size already matches."""
        if self.images.shape[1:3] == (size, size):
            return self
        import torch
        import torch.nn.functional as F

        out = np.empty((len(self), size, size, 3), dtype=np.uint8)
        with torch.no_grad():
            for i in range(0, len(self), chunk):
                x = torch.from_numpy(np.ascontiguousarray(self.images[i:i + chunk])).permute(0, 3, 1, 2).float()
                y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                out[i:i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return SplitData(out, self.labels, self.class_names, self.dataset, self.split,
                         f"{self.fingerprint}:resized{size}")


def check_min_images(split: SplitData, needed: int) -> None:
    """Raise :class:`DataError` listing every class of ``split`` with fewer than ``needed`` images
    (e.g. ``needed = shot + query`` for an episode protocol)."""
    counts = split.class_counts()
    bad = [(split.class_names[c], int(n)) for c, n in enumerate(counts) if n < needed]
    if bad:
        listing = ", ".join(f"{name} ({n})" for name, n in bad)
        raise DataError(f"{split.dataset} {split.split}: {len(bad)} of {split.num_classes} classes have fewer "
                        f"than {needed} images (shot + query): {listing}. Use fewer shots/queries (at most "
                        f"{int(counts.min())} per class), or supply more images for these classes")


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
