"""Few-shot datasets (CIFAR-FS, Tiny ImageNet, a user's image folder, ...), class splits and the uint8 cache.

``get_dataset(name, root=None, archive=None, download=False, cache_dir=None, **kw)`` returns a
:class:`~fsl_lsskd.data.base.FewShotDataset`; ``ds.load_split("train")`` a :class:`SplitData`. Datasets are
found in :data:`fsl_lsskd.registry.DATASETS`, which reads their names from the sources of this package.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from .base import FewShotDataset

_LAZY = {"SPLITS", "CachedDataset", "FewShotDataset", "SplitData", "check_min_images"}


def __getattr__(name: str) -> Any:  # lazy: importing the package (`fsl-bench data --help`) must not import numpy
    if name in _LAZY:
        from . import base

        return getattr(base, name)
    raise AttributeError(name)


def get_dataset(name: str, root: Optional[os.PathLike] = None, archive: Optional[os.PathLike] = None,
                download: bool = False, cache_dir: Optional[os.PathLike] = None, **kwargs: Any) -> FewShotDataset:
    """Build registered dataset ``name``.

    Raises :class:`~fsl_lsskd.errors.UnknownNameError` (valid names listed) for an unknown name and
    :class:`~fsl_lsskd.errors.DataError` for missing or corrupt data (the message names the fix)."""
    from ..registry import DATASETS

    cls = DATASETS.get(name)
    return cls(root=root, archive=archive, download=download, cache_dir=cache_dir, **kwargs)


__all__ = ["SPLITS", "CachedDataset", "FewShotDataset", "SplitData", "check_min_images", "get_dataset"]
