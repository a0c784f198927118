"""Few-shot datasets (CIFAR-FS, Tiny ImageNet, a user's image folder), split files and the uint8 cache.

``get_dataset(name, root=None, archive=None, download=False, cache_dir=None, **kw)`` returns a
:class:`~fsl_lsskd.data.base.FewShotDataset`; ``ds.load_split("train")`` a :class:`SplitData`.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Optional

from .base import SPLITS, FewShotDataset, SplitData, check_min_images

_DATASET_MODULES = ("cifar_fs", "tiny_imagenet", "image_folder")


def get_dataset(name: str, root: Optional[os.PathLike] = None, archive: Optional[os.PathLike] = None,
                download: bool = False, cache_dir: Optional[os.PathLike] = None, **kwargs: Any) -> FewShotDataset:
    """Build a registered dataset; bad paths/archives raise :class:`~fsl_lsskd.errors.DataError`."""
    from ..registry import DATASETS

    for mod in _DATASET_MODULES:
        importlib.import_module(f"{__name__}.{mod}")
    cls = DATASETS.get(name)
    return cls(root=root, archive=archive, download=download, cache_dir=cache_dir, **kwargs)


__all__ = ["SPLITS", "FewShotDataset", "SplitData", "check_min_images", "get_dataset"]
