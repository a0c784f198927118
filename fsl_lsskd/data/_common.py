"""Shared machinery of the registered datasets: locating the source (archive, extracted folder, data root,
download with md5 check), the decoded uint8 cache and the verify report."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ChecksumError, DataError
from ..utils import atomic_path, atomic_write_text, cache_dir as default_cache_dir, md5_file
from .base import SPLITS, FewShotDataset, SplitData

log = logging.getLogger(__name__)

# Bump when the decoded layout changes: old cache entries are then ignored (the key includes it).
CACHE_FORMAT_VERSION = 2  # 2: content fingerprints
DEFAULT_MIN_IMAGES = 20  # 5 shot + 15 query, the usual episode protocol


# --------------------------------------------------------------------------------------------------- sources
def fetch(url: str, dest: Path) -> None:
    """Download ``url`` into ``dest`` (tests replace this function; never called without --download)."""
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as f:
            shutil.copyfileobj(resp, f, length=1 << 20)
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(f"could not download {url} ({exc}); download it by hand and pass "
                        f"--archive PATH (or --data-root DIR holding it)") from None


def download(url: str, dest: Path, md5: str) -> Path:
    """Fetch ``url`` to ``dest`` atomically; a file whose md5 differs from ``md5`` is deleted and raises
    :class:`ChecksumError`."""
    log.info("downloading %s -> %s", url, dest)
    with atomic_path(dest) as tmp:
        fetch(url, tmp)
        check_md5(tmp, md5, shown=dest, url=url)
    return dest


def check_md5(path: Path, md5: str, shown: Optional[Path] = None, url: str = "") -> None:
    actual = md5_file(path)
    if actual != md5:
        where = f" from {url}" if url else ""
        raise ChecksumError(f"checksum mismatch for {shown or path}{where}: md5 {actual}, expected {md5} (official). "
                            "The file is corrupt or not the official archive: delete it and download it again "
                            "(fsl-bench data prepare DATASET --download), or drop --check-md5 for a known subset")


def resolve_source(label: str, root: Optional[os.PathLike], archive: Optional[os.PathLike], download_ok: bool,
                   official_name: str, archive_glob: str, folder_name: str, is_folder: Callable[[Path], bool],
                   url: str, md5: str) -> Path:
    """Find the archive file or extracted folder of a dataset.

    ``archive`` (a file or an extracted folder) wins; else ``root`` (default ``<cache>/downloads``) is
    searched for the official archive name, the extracted folder, then any ``archive_glob`` match; else
    ``--download`` fetches the official archive into ``root``."""
    hint = (f"pass --archive PATH to {official_name} (or its extracted {folder_name}/ folder), "
            f"--data-root DIR holding one of them, or --download to fetch {url}")
    if archive is not None:
        p = Path(archive).expanduser()
        if not p.exists():
            raise DataError(f"{label} archive {p} does not exist; {hint}")
        if p.is_dir():
            if is_folder(p):
                return p
            if is_folder(p / folder_name):
                return p / folder_name
            raise DataError(f"{p} is not an extracted {label} folder (no {folder_name}/ layout inside); {hint}")
        return p
    explicit = root is not None
    r = Path(root).expanduser() if explicit else default_cache_dir() / "downloads"
    if explicit and not r.is_dir() and not download_ok:
        raise DataError(f"data root {r} does not exist or is not a directory; {hint}")
    if r.is_dir():
        if is_folder(r):
            return r
        cands = [r / official_name, r / folder_name] + sorted(r.glob(archive_glob))
        for c in cands:
            if (c.is_file() and c.suffix in (".gz", ".zip", ".tgz")) or (c.is_dir() and is_folder(c)):
                return c
    if download_ok:
        r.mkdir(parents=True, exist_ok=True)
        return download(url, r / official_name, md5)
    raise DataError(f"no {label} data found in {r} (looked for {official_name}, {folder_name}/, {archive_glob}); {hint}")


def source_identity(path: Path) -> str:
    """Fast identity of a source: name + size + mtime of the file, or of every file under a folder."""
    st = path.stat()
    if path.is_file():
        return f"file:{path.name}:{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for fn in sorted(filenames):
            fst = os.stat(os.path.join(dirpath, fn))
            h.update(f"{os.path.relpath(os.path.join(dirpath, fn), path)}:{fst.st_size}:{fst.st_mtime_ns}\n".encode())
    return f"dir:{path.name}:{h.hexdigest()}"


def content_fingerprint(dataset: str, split: str, data: SplitData) -> str:
    """Identity of a decoded split by its content (pixels, class names, counts), not by where the source lies
    or its mtime: a moved or re-copied archive decodes again (the cache key is the fast identity) but keeps
    its fingerprint, so training checkpoints made from it still resume."""
    h = hashlib.sha256(np.ascontiguousarray(data.images).tobytes())
    h.update("|".join(data.class_names).encode())
    h.update(data.class_counts().tobytes())
    return f"{dataset}-{split}-{h.hexdigest()[:20]}"


# ------------------------------------------------------------------------------------------------- datasets
class CachedDataset(FewShotDataset):
    """A dataset whose splits are decoded once from the source and then loaded from a uint8 ``.npy`` cache.

    Subclasses implement :meth:`class_split` (split -> class names), :meth:`inventory` (class -> part ->
    image count, without decoding) and :meth:`decode_classes` (one uint8 ``[n,H,W,3]`` array per class,
    official image order)."""

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

    def cache_extra(self) -> str:
        return ""

    # -- cache
    @property
    def cache_root(self) -> Path:
        return (self._cache_root or default_cache_dir() / "data") / self.name

    def _key(self, split: str, names: Sequence[str]) -> str:
        ident = "|".join([str(CACHE_FORMAT_VERSION), self.name, source_identity(self.source), split,
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
                images = np.load(npy, mmap_mode="r" if mmap else None)
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
                "shape": list(data.images.shape)}
        atomic_write_text(meta_path, json.dumps(meta, indent=1))  # written last: marks the entry complete
        return data

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
                            "point --archive/--data-root at the complete data")

    def verify(self, min_images: int = DEFAULT_MIN_IMAGES) -> Dict[str, object]:
        """Report (no decoding): classes in the source, images per class per source part, the split's class
        counts, split classes missing from the source and classes with fewer than ``min_images`` images."""
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
        for s in SPLITS:
            miss = [c for c in split[s] if c not in inv]
            if miss:
                missing[s] = miss
            few = [(c, int(sum(inv[c].values()))) for c in split[s] if c in inv and sum(inv[c].values()) < min_images]
            if few:
                too_few[s] = few
        return {"dataset": self.name, "source": str(self.source), "num_classes": len(inv), "parts": parts,
                "split_classes": {s: len(split[s]) for s in SPLITS}, "missing_classes": missing,
                "min_images": min_images, "too_few": too_few, "image_size": self.image_size}
