"""Images that occur more than once among a dataset's split classes: the same decoded pixels (so every
byte-identical file, and every re-encoding that decodes to the same pixels) within one class, across classes of
one split, or across splits. The last is leakage: a test image that is also a training image measures
memorisation, not few-shot generalisation.

Images are compared by :func:`pixel_hashes` (BLAKE2b, 128 bits, of each decoded uint8 image: a chance collision
among a million images has probability below 1e-26). :meth:`~fsl_lsskd.data.base.CachedDataset.verify` hashes
every image it decodes; the uint8 cache stores the hashes of each split beside it, so
:func:`check_leakage` (called by ``fsl-bench run`` and ``evaluate``) costs a set lookup once the splits are cached.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

HASH_BYTES = 16
#: (split, the split it must not share images with), in the order reports list them
LEAK_PAIRS: Tuple[Tuple[str, str], ...] = (("val", "train"), ("test", "train"), ("test", "val"))


def pixel_hashes(images: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """BLAKE2b-128 of every uint8 image of ``images`` ``[N, H, W, C]`` (its bytes and shape): uint8
    ``[N, 16]``. Equal rows mean identical decoded pixels."""
    out = np.empty((len(images), HASH_BYTES), dtype=np.uint8)
    for start in range(0, len(images), chunk):
        block = np.ascontiguousarray(images[start:start + chunk])
        for i, img in enumerate(block):
            out[start + i] = np.frombuffer(pixel_hash(img), dtype=np.uint8)
    return out


def pixel_hash(image: np.ndarray) -> bytes:
    """BLAKE2b-128 digest of one decoded uint8 image (its bytes and shape)."""
    h = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=HASH_BYTES)
    h.update(repr(tuple(image.shape)).encode())
    return h.digest()


@dataclass(frozen=True)
class ImageRef:
    """Where an image is: its split, its class and its name in the source (a file inside the archive or folder,
    or a row of the official arrays)."""

    split: str
    class_name: str
    name: str

    def __str__(self) -> str:
        return f"[{self.split} {self.class_name}] {self.name}"


@dataclass(frozen=True)
class DuplicateReport:
    """Groups of two or more images with identical decoded pixels among ``images`` images of the split classes.

    ``groups`` are in source order (train, val, test; split-file class order; image order), each group's images
    too. ``leaks[(a, b)]`` counts the images of split ``a`` whose pixels also occur among the images of split
    ``b`` (:data:`LEAK_PAIRS`)."""

    images: int
    groups: Tuple[Tuple[ImageRef, ...], ...]
    leaks: Dict[Tuple[str, str], int]

    @staticmethod
    def kind(group: Sequence[ImageRef]) -> str:
        """``within_class`` (one class of one split), ``across_classes`` (one split) or ``across_splits``."""
        if len({g.split for g in group}) > 1:
            return "across_splits"
        return "within_class" if len({g.class_name for g in group}) == 1 else "across_classes"

    def count(self, kind: str) -> int:
        """Number of groups of ``kind`` (:meth:`kind`)."""
        return sum(self.kind(g) == kind for g in self.groups)

    @property
    def extra_copies(self) -> int:
        """Images beyond the first of their group: how many images the data would lose without duplicates."""
        return sum(len(g) - 1 for g in self.groups)

    def ordered_groups(self) -> List[Tuple[ImageRef, ...]]:
        """The groups with the ones that matter most first: across splits, across classes, within a class."""
        rank = {"across_splits": 0, "across_classes": 1, "within_class": 2}
        return sorted(self.groups, key=lambda g: rank[self.kind(g)])

    def to_dict(self, max_groups: Optional[int] = None) -> Dict[str, object]:
        groups = self.ordered_groups()[:max_groups]
        return {"images": self.images, "groups": len(self.groups), "extra_copies": self.extra_copies,
                **{k: self.count(k) for k in ("within_class", "across_classes", "across_splits")},
                "leaks": {f"{a} in {b}": n for (a, b), n in self.leaks.items()},
                "examples": [[{"split": r.split, "class": r.class_name, "name": r.name} for r in g] for g in groups]}


def find_duplicates(refs: Sequence[ImageRef], hashes: Sequence[Optional[bytes]]) -> DuplicateReport:
    """The :class:`DuplicateReport` of images ``refs`` with pixel hashes ``hashes`` (same order; None for an image
    that failed to decode: it is left out)."""
    if len(refs) != len(hashes):
        raise ValueError(f"{len(refs)} images but {len(hashes)} hashes")
    by_hash: Dict[bytes, List[ImageRef]] = {}
    for ref, h in zip(refs, hashes):
        if h is not None:
            by_hash.setdefault(bytes(h), []).append(ref)
    groups = tuple(tuple(g) for g in by_hash.values() if len(g) > 1)
    leaks = {}
    for a, b in LEAK_PAIRS:
        leaks[(a, b)] = sum(sum(r.split == a for r in g) for g in groups if any(r.split == b for r in g))
    return DuplicateReport(sum(h is not None for h in hashes), groups, leaks)


def shared_images(hashes: np.ndarray, among: np.ndarray) -> int:
    """How many rows of ``hashes`` (``[N, 16]``, :func:`pixel_hashes`) also occur in ``among``."""
    seen = {bytes(r) for r in np.asarray(among)}
    return sum(bytes(r) in seen for r in np.asarray(hashes))


def check_leakage(dataset, split: str, against: str = "train", decode: bool = True) -> Optional[int]:
    """Number of images of ``split`` whose pixels also occur among the images of ``against`` in ``dataset`` (a
    :class:`~fsl_lsskd.data.base.CachedDataset`), logged as a WARNING when above 0 (``fsl-bench data verify``
    lists them). ``decode=False`` checks only when both splits are already in the uint8 cache and returns None
    otherwise (nothing is decoded). Datasets without cached hashes (other :class:`FewShotDataset` types) or
    without classes in either split: None."""
    if not hasattr(dataset, "split_hashes") or split == against:
        return None
    split_names = dataset.class_split()
    if not split_names.get(split) or not split_names.get(against):
        return None
    if not decode and not (dataset.is_cached(split) and dataset.is_cached(against)):
        log.info("%s: %s images not compared with %s images (the %s split is not decoded yet; `fsl-bench data "
                 "verify %s` compares every split)", dataset.name, split, against, against, dataset.name)
        return None
    mine = dataset.split_hashes(split)
    n = shared_images(mine, dataset.split_hashes(against))
    if n:
        log.warning("%s: %d of the %d %s images also occur among the %s images (identical decoded pixels): scores "
                    "on them measure memorisation, not few-shot learning; `fsl-bench data verify %s` lists them",
                    dataset.name, n, len(mine), split, against, dataset.name)
    else:
        log.debug("%s: no %s image occurs among the %s images", dataset.name, split, against)
    return n
