"""Tiny ImageNet (Stanford CS231n, http://cs231n.stanford.edu/tiny-imagenet-200.zip), 200 classes, 64x64.

Read directly from the official zip (or its extracted ``tiny-imagenet-200/`` folder): labelled train
images (``train/<wnid>/images/<wnid>_<i>.JPEG``) and val images (labels from ``val/val_annotations.txt``),
pooled per class. Greyscale JPEGs are converted to RGB. The few-shot class split (120/40/40) is our own
seeded split ``splits/tiny_imagenet`` — no standard one exists (see splits/tiny_imagenet/README.md).
"""
from __future__ import annotations

import io
import os
import re
import threading
import zipfile
import zlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError
from ..options import dataset_option as opt
from ..registry import DATASETS
from .base import CachedDataset
from .duplicates import pixel_hash
from .sources import check_md5, refuse_other_dataset, resolve_source
from .splits import standard_split

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
ARCHIVE_NAME = "tiny-imagenet-200.zip"
FOLDER_NAME = "tiny-imagenet-200"
_NUM = re.compile(r"_(\d+)\.[A-Za-z]+$")
_READ_ERRORS = (zipfile.BadZipFile, KeyError, OSError, EOFError, zlib.error)


def _is_folder(p: Path) -> bool:
    return p.is_dir() and (p / "wnids.txt").is_file() and (p / "train").is_dir()


def _num(name: str) -> int:
    m = _NUM.search(name)
    return int(m.group(1)) if m else -1


class _Source:
    """Uniform read access to the zip (opened per thread) or the extracted folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.is_zip = path.is_file()
        self.prefix = ""
        self._local = threading.local()
        if self.is_zip:
            try:
                with zipfile.ZipFile(path) as z:
                    names = z.namelist()
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise DataError(f"archive {path} is corrupt or truncated ({exc}); download it again "
                                f"({URL}, md5 {MD5}) or pass the extracted folder") from None
            tops = [n[: -len("wnids.txt")] for n in names if n.endswith("wnids.txt")]
            if not tops:
                refuse_other_dataset(path, ARCHIVE_NAME, names)  # another dataset's zip: say which
                raise DataError(f"archive {path} has no wnids.txt: it is not tiny-imagenet-200.zip; download {URL}")
            self.prefix = min(tops, key=len)
            self.names = [n[len(self.prefix):] for n in names if n.startswith(self.prefix)]
        else:
            self.names = []
            for sub in ("train", "val"):
                for dirpath, _, files in os.walk(path / sub):
                    rel = Path(dirpath).relative_to(path).as_posix()
                    self.names += [f"{rel}/{f}" for f in files]
            self.names += [f for f in ("wnids.txt", "words.txt") if (path / f).is_file()]

    def _zip(self) -> zipfile.ZipFile:
        # one handle per thread: opening parses the central directory (30k entries), so reuse it
        z = getattr(self._local, "zip", None)
        if z is None:
            z = self._local.zip = zipfile.ZipFile(self.path)
        return z

    def _raw(self, rel: str, z: Optional[zipfile.ZipFile] = None) -> bytes:
        if self.is_zip:
            return (z or self._zip()).read(self.prefix + rel)
        return (self.path / rel).read_bytes()

    def read(self, rel: str, z: Optional[zipfile.ZipFile] = None) -> bytes:
        try:
            return self._raw(rel, z)
        except _READ_ERRORS as exc:
            raise DataError(f"cannot read {rel} from {self.path} ({type(exc).__name__}: {exc}); the archive is "
                            f"corrupt or truncated: download it again ({URL}, md5 {MD5})") from None

    def _image(self, rel: str, raw: bytes, size: int) -> np.ndarray:
        from PIL import Image

        with Image.open(io.BytesIO(raw)) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            return np.asarray(im)

    def decode(self, rels: Sequence[str], size: int) -> np.ndarray:
        from PIL import UnidentifiedImageError

        out = np.empty((len(rels), size, size, 3), dtype=np.uint8)
        for i, rel in enumerate(rels):
            raw = self.read(rel)
            try:
                out[i] = self._image(rel, raw, size)
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
                raise DataError(f"image {rel} in {self.path} fails to decode ({exc}); the file is corrupt: "
                                f"download the archive again ({URL}) or delete that image") from None
        return out

    def scan(self, rels: Sequence[str], size: int) -> List[Tuple[Optional[bytes], str]]:
        """For every image of ``rels``, decoded as :meth:`decode` would: ``(pixel hash, "")``, or ``(None,
        reason)`` when it cannot be read or decoded."""
        from PIL import UnidentifiedImageError

        out: List[Tuple[Optional[bytes], str]] = []
        for rel in rels:
            try:
                raw = self._raw(rel)
            except _READ_ERRORS as exc:
                out.append((None, f"unreadable ({type(exc).__name__}: {exc})"))
                continue
            try:
                out.append((pixel_hash(self._image(rel, raw, size)), ""))
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
                out.append((None, f"undecodable ({type(exc).__name__}: {exc})"))
        return out


def _decode_chunk(path: Path, rels: Sequence[str], size: int) -> np.ndarray:
    return _Source(path).decode(rels, size)


def _scan_chunk(path: Path, rels: Sequence[str], size: int) -> List[Tuple[Optional[bytes], str]]:
    return _Source(path).scan(rels, size)


@DATASETS.register("tiny_imagenet")
class TinyImageNet(CachedDataset):
    """Tiny ImageNet: 200 classes, train+val pooled per class, seeded 120/40/40 split (non-standard), 64x64."""

    name = "tiny_imagenet"
    image_size = 64
    mean = (0.4802, 0.4481, 0.3975)
    std = (0.2770, 0.2691, 0.2821)
    #: dataset-specific options of get_dataset (CLI --train-per-class, --split-file, --folder-image-size)
    options = ("train_per_class",)
    parts = ("train", "val")

    def __init__(self, root: Optional[os.PathLike] = None, archive: Optional[os.PathLike] = None,
                 download: bool = False, cache_dir: Optional[os.PathLike] = None, check_checksum: bool = False,
                 workers: int = 0, train_per_class: Optional[int] = None):
        super().__init__(cache_dir)
        if train_per_class is not None and int(train_per_class) < 1:
            raise DataError(f"train_per_class must be >= 1, got {train_per_class}")
        self.train_per_class = None if train_per_class is None else int(train_per_class)
        self.source = resolve_source("Tiny ImageNet", root, archive, download, ARCHIVE_NAME, "tiny-imagenet-200*.zip",
                                     FOLDER_NAME, _is_folder, URL, MD5)
        if check_checksum and self.source.is_file():
            check_md5(self.source, MD5)
        self.workers = workers or min(4, os.cpu_count() or 1)
        self._src: Optional[_Source] = None
        self._files: Optional[Dict[str, Dict[str, List[str]]]] = None

    def class_split(self) -> Dict[str, List[str]]:
        return standard_split("tiny_imagenet")

    def cache_extra(self) -> str:
        return f"train_per_class={self.train_per_class}" if self.train_per_class is not None else ""

    @property
    def src(self) -> _Source:
        if self._src is None:
            self._src = _Source(self.source)
        return self._src

    def wnids(self) -> List[str]:
        """The official wnids (``wnids.txt``), in file order."""
        return self.src.read("wnids.txt").decode().split()

    def files(self) -> Dict[str, Dict[str, List[str]]]:
        """wnid -> part -> image paths (inside the source), in official order (train ``_i``, ``val_i``)."""
        if self._files is None:
            src = self.src
            files: Dict[str, Dict[str, List[str]]] = {w: {"train": [], "val": []} for w in self.wnids()}
            for n in src.names:
                p = n.split("/")
                if len(p) == 4 and p[0] == "train" and p[2] == "images" and p[3] and p[1] in files:
                    files[p[1]]["train"].append(n)
            present = set(src.names)
            ann = src.read("val/val_annotations.txt").decode()
            for line in ann.splitlines():
                f = line.split("\t")
                if len(f) < 2:
                    continue
                rel = f"val/images/{f[0]}"
                if f[1] not in files:
                    raise DataError(f"val/val_annotations.txt in {self.source} names {f[1]!r}, not in wnids.txt; "
                                    f"the archive is inconsistent: download {URL} again")
                if rel not in present:
                    raise DataError(f"{self.source} lacks {rel} listed in val_annotations.txt; the archive is "
                                    f"truncated or corrupt: download {URL} again")
                files[f[1]]["val"].append(rel)
            for d in files.values():
                d["train"].sort(key=_num)
                d["val"].sort(key=_num)
            if self.train_per_class is not None:
                short = [(w, len(d["train"])) for w, d in files.items() if len(d["train"]) < self.train_per_class]
                if short:
                    listing = ", ".join(f"{w} ({n})" for w, n in short[:20])
                    more = f" ... ({len(short)} in all)" if len(short) > 20 else ""
                    raise DataError(f"train_per_class {self.train_per_class}: {len(short)} classes of {self.source} "
                                    f"have fewer train images: {listing}{more}; lower {opt('train_per_class', 'N')} "
                                    f"(the shortest class has {min(n for _, n in short)}) or use the full archive")
                for d in files.values():
                    d["train"] = d["train"][:self.train_per_class]
            self._files = files
        return self._files

    def inventory(self) -> Dict[str, Dict[str, int]]:
        return {w: {p: len(v) for p, v in d.items()} for w, d in self.files().items()}

    def _map_chunks(self, fn_process, fn_local, rels: List[str]) -> list:
        """``fn(rels[a:b])`` over chunks of ``rels``: processes for many images (PIL's JPEG decode of tiny
        images is GIL-bound enough that threads do not scale), threads for some, inline for few."""
        step = max(256, -(-len(rels) // self.workers))
        chunks = [(i, min(len(rels), i + step)) for i in range(0, len(rels), step)]
        size = self.image_size
        if self.workers > 1 and len(chunks) > 1 and len(rels) >= 4000:
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
            with ProcessPoolExecutor(self.workers, mp_context=ctx) as ex:
                return list(ex.map(fn_process, [self.source] * len(chunks), [rels[a:b] for a, b in chunks],
                                   [size] * len(chunks)))
        if self.workers > 1 and len(chunks) > 1:
            with ThreadPoolExecutor(self.workers) as ex:
                return list(ex.map(lambda ab: fn_local(rels[ab[0]:ab[1]], size), chunks))
        return [fn_local(rels[a:b], size) for a, b in chunks]

    def _rels(self, names: Sequence[str]) -> Tuple[List[str], List[int]]:
        files = self.files()
        rels = [r for n in names for r in files[n]["train"] + files[n]["val"]]
        return rels, [len(files[n]["train"]) + len(files[n]["val"]) for n in names]

    def decode_classes(self, names: Sequence[str]) -> List[np.ndarray]:
        rels, counts = self._rels(names)
        size = self.image_size
        parts = self._map_chunks(_decode_chunk, self.src.decode, rels)
        allimg = np.concatenate(parts) if parts else np.zeros((0, size, size, 3), np.uint8)
        return np.split(allimg, np.cumsum(counts)[:-1]) if names else []

    def image_names(self, names: Sequence[str]) -> List[List[str]]:
        """The files of each class inside the archive or folder (``train/<wnid>/images/<wnid>_<i>.JPEG``,
        ``val/images/val_<k>.JPEG``), in decode order."""
        files = self.files()
        return [files[n]["train"] + files[n]["val"] for n in names]

    def scan_images(self, names: Sequence[str]) -> Tuple[List[Tuple[str, str, str]], List[List[Optional[bytes]]]]:
        """Every file of classes ``names`` read and decoded (nothing cached): ``(class, file, reason)`` of each that
        fails, and the pixel hashes per class (None where it failed), as
        :meth:`~fsl_lsskd.data.base.CachedDataset.scan_images`."""
        rels, counts = self._rels(names)
        scanned = [s for part in self._map_chunks(_scan_chunk, self.src.scan, rels) for s in part]
        owner = [n for n, k in zip(names, counts) for _ in range(k)]
        bad = [(n, r, why) for n, r, (h, why) in zip(owner, rels, scanned) if h is None]
        ends = np.cumsum(counts).tolist()
        hashes = [[h for h, _ in scanned[e - k:e]] for e, k in zip(ends, counts)]
        return bad, hashes
