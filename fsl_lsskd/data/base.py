"""The data contract shared by datasets, the training engine and the evaluation: :class:`SplitData` (one
decoded split), :class:`FewShotDataset` (what a registered dataset provides) and :class:`CachedDataset`
(the base class of the built-in datasets: decode once from the source, then load a uint8 cache).

Adding a dataset: one file in ``fsl_lsskd/data/`` with a :class:`CachedDataset` subclass decorated
``@DATASETS.register("name")`` that implements ``class_split``, ``inventory`` and ``decode_classes``."""
from __future__ import annotations

import abc
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError
from ..options import dataset_option as opt
from ..progress import announce
from ..utils import atomic_path, atomic_write_text, cache_dir as default_cache_dir
from .duplicates import HASH_BYTES, ImageRef, find_duplicates, pixel_hash, pixel_hashes
from .sources import content_fingerprint, source_identity

log = logging.getLogger(__name__)

# Bump when the decoded layout changes: old cache entries are then ignored (the key includes it).
CACHE_FORMAT_VERSION = 2  # 2: content fingerprints
DEFAULT_MIN_IMAGES = 20  # 5 shot + 15 query, the usual episode protocol

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
        """The same split with every image resized to ``size``x``size`` (uint8 out, ``chunk`` images at a time),
        e.g. Tiny ImageNet at 32x32, by the package's one resize (:func:`fsl_lsskd.inputs.resize_uint8`: bilinear,
        antialiased, rounded). Returns ``self`` when the size already matches."""
        if self.images.shape[1:3] == (size, size):
            return self
        import torch

        from ..inputs import resize_uint8

        out = np.empty((len(self), size, size, 3), dtype=np.uint8)
        with torch.no_grad():
            for i in range(0, len(self), chunk):
                x = torch.from_numpy(np.array(self.images[i:i + chunk])).permute(0, 3, 1, 2)
                out[i:i + chunk] = resize_uint8(x, size).permute(0, 2, 3, 1).numpy()
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


def split_counts(dataset, split: str) -> np.ndarray:
    """Images per class of ``split`` (split-file order) without decoding when the dataset can tell
    (:meth:`CachedDataset.split_counts`); other datasets load the split."""
    if hasattr(dataset, "split_counts"):
        return np.asarray(dataset.split_counts(split), dtype=np.int64)
    return dataset.load_split(split).class_counts()


def scored_split_counts(dataset, name: str, split: str) -> np.ndarray:
    """:func:`split_counts` of a split about to be scored: a split with no classes (``omniglot_runs`` has only
    ``test``) raises :class:`~fsl_lsskd.errors.ConfigError` naming the splits that have classes (exit code 2),
    before a caller's capacity check reads an empty array."""
    from ..errors import ConfigError

    counts = split_counts(dataset, split)
    if len(counts) == 0:
        with_classes = [s for s in ("train", "val", "test") if len(dataset.class_split().get(s, ()))]
        raise ConfigError(f"{name} has no classes in its {split} split; pass --split "
                          f"{' or '.join(with_classes) or 'another split'}")
    return counts


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


class CachedDataset(FewShotDataset):
    """A dataset whose splits are decoded once from the source and then loaded from a uint8 ``.npy`` cache.

    Subclasses implement :meth:`class_split` (split -> class names), :meth:`inventory` (class -> part ->
    image count, without decoding) and :meth:`decode_classes` (one uint8 ``[n,H,W,3]`` array per class,
    official image order); :meth:`image_names` names the images in reports."""

    parts: Tuple[str, ...] = ("train",)

    def __init__(self, cache_dir: Optional[os.PathLike] = None) -> None:
        self._cache_root = Path(cache_dir) if cache_dir is not None else None
        self.source: Path = Path(".")

    # -- hooks
    def class_split(self) -> Dict[str, List[str]]:
        raise NotImplementedError

    def inventory(self) -> Dict[str, Dict[str, int]]:
        raise NotImplementedError

    def decode_classes(self, names: Sequence[str]) -> List[np.ndarray]:
        raise NotImplementedError

    def image_names(self, names: Sequence[str]) -> List[List[str]]:
        """For each class of ``names``, the name of each of its images in :meth:`decode_classes` order, as reports
        show it (a file inside the source, or a row of the official arrays). Default: ``<class> #<position>``."""
        inv = self.inventory()
        return [[f"{n} #{i}" for i in range(sum(inv[n].values()))] for n in names]

    def cache_extra(self) -> str:
        return ""

    def source_key(self, names: Sequence[str]) -> str:
        """Identity of what the reader loads for classes ``names`` (part of the cache key): by default
        :func:`~fsl_lsskd.data.sources.source_identity` of the whole source (archive or folder). It must change
        whenever a decoded image would; override it when the dataset knows exactly which files it opens."""
        return source_identity(self.source)

    # -- cache
    @property
    def cache_root(self) -> Path:
        return (self._cache_root or default_cache_dir() / "data") / self.name

    def _key(self, split: str, names: Sequence[str]) -> str:
        ident = "|".join([str(CACHE_FORMAT_VERSION), self.name, self.source_key(names), split,
                          ",".join(names), str(self.image_size), self.cache_extra()])
        return hashlib.sha256(ident.encode()).hexdigest()[:20]

    def cache_paths(self, split: str) -> Tuple[Path, Path]:
        names = self._names(split)
        stem = self.cache_root / f"{split}-{self._key(split, names)}"
        return stem.with_suffix(".npy"), stem.with_suffix(".json")

    def _names(self, split: str) -> List[str]:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return list(self.class_split()[split])

    def is_cached(self, split: str) -> bool:
        npy, meta = self.cache_paths(split)
        return npy.is_file() and meta.is_file()

    def _cached_counts(self, names: List[str], npy: Path, meta_path: Path) -> Optional[Tuple[np.ndarray, dict]]:
        """``(counts, meta)`` of a complete cache entry for exactly ``names``; None when there is none (or it is
        for other classes). Raises ``OSError``/``ValueError``/``KeyError`` on an unreadable entry."""
        if not (npy.is_file() and meta_path.is_file()):
            return None
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta["class_names"] != names:
            return None
        return np.asarray(meta["counts"], dtype=np.int64), meta

    def load_split(self, split: str, mmap: bool = False) -> SplitData:
        """One split, from the cache when present (``mmap=True`` memory-maps it), else decoded and cached."""
        names = self._names(split)
        npy, meta_path = self.cache_paths(split)
        try:
            entry = self._cached_counts(names, npy, meta_path)
            if entry is not None:
                counts, meta = entry
                images = np.load(npy, mmap_mode="r" if mmap else None, allow_pickle=False)
                if images.shape[0] == counts.sum():
                    labels = np.repeat(np.arange(len(names), dtype=np.int64), counts)
                    return SplitData(images, labels, tuple(names), self.name, split, meta["fingerprint"])
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable cache %s (%s); decoding again", npy, exc)
        return self._decode_and_cache(split, names, npy, meta_path)

    def split_counts(self, split: str) -> np.ndarray:
        """Images per class of ``split`` (split-file order) without decoding and without writing anything:
        from the cache entry when there is one (an unreadable entry, which ``load_split`` decodes again, is
        ignored), else from the source's inventory. Raises :class:`DataError` when the split names classes
        the source lacks. Lets callers check an episode protocol up front."""
        names = self._names(split)
        with contextlib.suppress(OSError, ValueError, KeyError):
            entry = self._cached_counts(names, *self.cache_paths(split))
            if entry is not None:
                return entry[0]
        self.check_classes_present(names)
        inv = self.inventory()
        return np.array([sum(inv[c].values()) for c in names], dtype=np.int64)

    def decode_split(self, split: str) -> SplitData:
        """Decode one split from the source without touching the cache (used by the cache benchmark)."""
        names = self._names(split)
        self.check_classes_present(names)
        arrays = self.decode_classes(names)
        return self._assemble(split, names, arrays, fingerprint="")

    def _assemble(self, split: str, names: Sequence[str], arrays: List[np.ndarray], fingerprint: str) -> SplitData:
        counts = np.array([len(a) for a in arrays], dtype=np.int64)
        s = self.image_size
        images = np.concatenate(arrays) if arrays else np.zeros((0, s, s, 3), np.uint8)
        labels = np.repeat(np.arange(len(names), dtype=np.int64), counts)
        return SplitData(images, labels, tuple(names), self.name, split, fingerprint)

    def _decode_and_cache(self, split: str, names: List[str], npy: Path, meta_path: Path) -> SplitData:
        self.check_classes_present(names)
        log.info("decoding %s %s (%d classes) from %s", self.name, split, len(names), self.source)
        announce(f"decoding {self.name} {split} ({len(names)} classes) from {self.source} into the cache (once)")
        arrays = self.decode_classes(names)
        empty = [n for n, a in zip(names, arrays) if len(a) == 0]
        if empty:
            raise DataError(f"{self.name} {split}: classes with no images: {', '.join(empty)}; "
                            "add images for them or remove them from the split file")
        data = self._assemble(split, names, arrays, fingerprint="")
        data = dataclasses.replace(data, fingerprint=content_fingerprint(self.name, split, data))
        with atomic_path(npy) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, data.images)
        meta = {"format_version": CACHE_FORMAT_VERSION, "dataset": self.name, "split": split,
                "source": str(self.source), "class_names": names,
                "counts": data.class_counts().tolist(), "fingerprint": data.fingerprint,
                "shape": list(data.images.shape), **_hashes_entry(pixel_hashes(data.images))}
        atomic_write_text(meta_path, json.dumps(meta, indent=1))  # written last: marks the entry complete
        return data

    def split_hashes(self, split: str) -> np.ndarray:
        """:func:`~fsl_lsskd.data.duplicates.pixel_hashes` of every image of ``split`` (rows as in
        :meth:`load_split`): uint8 ``[N, 16]``. Read from the cache entry's metadata, which stores them when the
        split is decoded; the split is decoded (and cached) first when it is not cached, and an entry written
        before hashes were stored gets them added."""
        data = self.load_split(split, mmap=True)
        _, meta_path = self.cache_paths(split)
        meta: dict = {}
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        hashes = _read_hashes(meta, len(data))
        if hashes is not None and meta.get("fingerprint") == data.fingerprint:
            return hashes
        hashes = pixel_hashes(data.images)
        if meta.get("fingerprint") == data.fingerprint:
            try:
                atomic_write_text(meta_path, json.dumps({**meta, **_hashes_entry(hashes)}, indent=1))
            except OSError as exc:  # a read-only cache still answers
                log.debug("could not add pixel hashes to %s: %s", meta_path, exc)
        return hashes

    def prepare(self) -> Dict[str, int]:
        """Decode every split into the cache; returns images per split."""
        self.check_classes_present([c for sp in SPLITS for c in self._names(sp)])  # fail before writing any
        return {s: len(self.load_split(s, mmap=True)) for s in SPLITS}

    # -- validation
    def check_classes_present(self, names: Sequence[str]) -> None:
        inv = self.inventory()
        missing = [n for n in names if n not in inv]
        if missing:
            shown = ", ".join(missing[:10]) + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
            raise DataError(f"the split names classes that {self.source} lacks: {shown}; fix the split file or "
                            f"point {opt('archive', 'PATH')} or {opt('data_root', 'DIR')} at the complete data")

    def scan_images(self, names: Sequence[str]) -> Tuple[List[Tuple[str, str, str]], List[List[Optional[bytes]]]]:
        """Decode every image of classes ``names`` as :meth:`decode_classes` does, without writing the cache:
        ``(undecodable, hashes)``: ``(class, file, reason)`` for every image the reader cannot read or decode, and
        per class the :func:`~fsl_lsskd.data.duplicates.pixel_hash` of each image (None where it failed), in
        :meth:`image_names` order. This default decodes class by class and reports the first failure of each
        class; datasets that read files one by one override it to name every file."""
        bad: List[Tuple[str, str, str]] = []
        hashes: List[List[Optional[bytes]]] = []
        inv = self.inventory()
        for n in names:
            try:
                (arr,) = self.decode_classes([n])
            except DataError as exc:
                bad.append((n, "", str(exc)))
                hashes.append([None] * sum(inv[n].values()))
                continue
            hashes.append([pixel_hash(img) for img in arr])
        return bad, hashes

    def verify(self, min_images: int = DEFAULT_MIN_IMAGES, decode: bool = True) -> Dict[str, object]:
        """Report on the source: classes, images per class per source part, the split's class counts, split
        classes missing from the source or without images (``empty_classes``), classes with fewer than
        ``min_images`` images and, when ``decode``, every image of a split class that fails to read or decode
        (``undecodable``: ``(class, file, reason)``; :meth:`scan_images`) and the images that occur more than once
        (``duplicates``: a :class:`~fsl_lsskd.data.duplicates.DuplicateReport`, None without ``decode``). Nothing
        is cached."""
        inv = self.inventory()
        split = self.class_split()
        parts: Dict[str, Dict[str, object]] = {}
        for part in self.parts:
            per = {c: d.get(part, 0) for c, d in inv.items()}
            vals = list(per.values()) or [0]
            parts[part] = {"total": int(sum(vals)), "min": int(min(vals)), "max": int(max(vals)),
                           "per_class": per}
        too_few: Dict[str, List[Tuple[str, int]]] = {}
        missing: Dict[str, List[str]] = {}
        empty: Dict[str, List[str]] = {}
        for s in SPLITS:
            miss = [c for c in split[s] if c not in inv]
            if miss:
                missing[s] = miss
            none = [c for c in split[s] if c in inv and sum(inv[c].values()) == 0]
            if none:
                empty[s] = none
            few = [(c, int(sum(inv[c].values()))) for c in split[s] if c in inv and sum(inv[c].values()) < min_images]
            if few:
                too_few[s] = few
        used = list(dict.fromkeys(c for s in SPLITS for c in split[s] if c in inv))
        undecodable: List[Tuple[str, str, str]] = []
        duplicates = None
        if decode:
            bad, hashes = self.scan_images(used)
            undecodable = [tuple(b) for b in bad]
            by_class = dict(zip(used, zip(self.image_names(used), hashes)))
            refs, flat = [], []
            for s in SPLITS:
                for c in split[s]:
                    if c in by_class:
                        files, hs = by_class[c]
                        refs += [ImageRef(s, c, f) for f in files]
                        flat += hs
            duplicates = find_duplicates(refs, flat)
        checked = int(sum(sum(inv[c].values()) for c in used)) if decode else 0
        return {"dataset": self.name, "source": str(self.source), "num_classes": len(inv), "parts": parts,
                "split_classes": {s: len(split[s]) for s in SPLITS}, "missing_classes": missing,
                "empty_classes": empty, "min_images": min_images, "too_few": too_few, "image_size": self.image_size,
                "decoded": bool(decode), "images_checked": checked,
                "undecodable": undecodable, "duplicates": duplicates}


def _hashes_entry(hashes: np.ndarray) -> Dict[str, str]:
    """The cache metadata field holding :func:`~fsl_lsskd.data.duplicates.pixel_hashes` (base64 of the rows)."""
    return {"pixel_hashes": base64.b64encode(np.ascontiguousarray(hashes, dtype=np.uint8).tobytes()).decode("ascii")}


def _read_hashes(meta: dict, n: int) -> Optional[np.ndarray]:
    """The ``[n, 16]`` pixel hashes of a cache entry's metadata; None when absent or not ``n`` rows."""
    text = meta.get("pixel_hashes")
    if not isinstance(text, str):
        return None
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != n * HASH_BYTES:
        return None
    return np.frombuffer(raw, dtype=np.uint8).reshape(n, HASH_BYTES)
