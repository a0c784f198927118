"""CIFAR-FS (Bertinetto et al., "Meta-learning with differentiable closed-form solvers", ICLR 2019).

Read from the official ``cifar-100-python.tar.gz`` (or its extracted folder): all 600 images of each
CIFAR-100 fine class (train and test rows pooled, train rows first, official row order), split 64/16/20 by
class name with ``splits/cifar_fs/*.txt`` (the R2D2 split; same as torchmeta's ``cifar-fs`` json and the
RFS/MetaOptNet pickles).

The archive's ``meta``, ``train`` and ``test`` members are pickles, and a pickle can name any callable to run
while it is read. They are read with :class:`CifarUnpickler`, which resolves only the globals the official
files (and ``fake.write_fake_cifar100``'s) name: numpy's array reconstruction (``ndarray``, ``dtype``,
``_reconstruct``, under both the numpy 1 and numpy 2 module names) and ``_codecs.encode`` for ``latin1``
(how protocol 2 stores an array's bytes). Any other global is refused before it is called.
"""
from __future__ import annotations

import codecs
import io
import os
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError
from ..options import dataset_option as opt
from ..registry import DATASETS
from .base import CachedDataset
from .sources import check_md5, resolve_source
from .splits import standard_split

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
ARCHIVE_NAME = "cifar-100-python.tar.gz"
FOLDER_NAME = "cifar-100-python"


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as protocol 2 uses it for ``bytes`` (``encode(str, 'latin1')``); no other codec."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError(f"_codecs.encode is allowed only as encode(str, 'latin1'), "
                                     f"not encode({type(text).__name__}, {encoding!r}, {errors!r})")
    return codecs.encode(text, "latin1")


#: (module, name) -> object: every global an official CIFAR-100 pickle names; nothing else is resolved
CIFAR_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),  # written by numpy 1 (the official files)
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),  # written by numpy 2
    ("_codecs", "encode"): _latin1_encode,
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside :data:`CIFAR_GLOBALS` (``.name`` = ``module.name``)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"it asks for {name}")
        self.name = name


class CifarUnpickler(pickle.Unpickler):
    """:class:`pickle.Unpickler` that resolves only :data:`CIFAR_GLOBALS`; any other global raises
    :class:`RefusedGlobal` before anything is imported or called. Persistent ids are refused too."""

    def find_class(self, module: str, name: str):
        try:
            return CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not part of a CIFAR-100 pickle")


def read_cifar_pickle(blob: bytes, member: str, source) -> object:
    """Unpickle one member (``meta``, ``train``, ``test``) of a CIFAR-100 archive with
    :class:`CifarUnpickler` (``encoding='bytes'``: Python-2 ``str`` keys come back as ``bytes``).

    Raises :class:`DataError` naming ``source``, the member and the refused global when the pickle asks for
    anything an official CIFAR-100 pickle does not; other parse errors propagate (the caller calls them
    corrupt)."""
    try:
        return CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except RefusedGlobal as exc:
        raise DataError(f"{source}: member {member!r} is not an official CIFAR-100 pickle: it asks for {exc.name}, "
                        f"which the official files never do; it was refused without running it. Use the archive "
                        f"from {URL} (md5 {MD5}) or a subset cut from it") from None


def _is_folder(p: Path) -> bool:
    return p.is_dir() and all((p / f).is_file() for f in ("train", "test", "meta"))


def _get(d: dict, key: str):
    return d[key] if key in d else d[key.encode()]


@DATASETS.register("cifar_fs")
class CifarFS(CachedDataset):
    """CIFAR-FS: CIFAR-100, 600 images/class (train+test pooled), 64/16/20 classes, 32x32."""

    name = "cifar_fs"
    image_size = 32
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    #: dataset-specific options of get_dataset (CLI --train-per-class, --split-file, --folder-image-size)
    options = ("train_per_class",)
    parts = ("train", "test")

    def __init__(self, root: Optional[os.PathLike] = None, archive: Optional[os.PathLike] = None,
                 download: bool = False, cache_dir: Optional[os.PathLike] = None, check_checksum: bool = False,
                 train_per_class: Optional[int] = None):
        super().__init__(cache_dir)
        if train_per_class is not None and int(train_per_class) < 1:
            raise DataError(f"train_per_class must be >= 1, got {train_per_class}")
        self.train_per_class = None if train_per_class is None else int(train_per_class)
        self.source = resolve_source("CIFAR-100", root, archive, download, ARCHIVE_NAME, "cifar-100-python*.tar.gz",
                                     FOLDER_NAME, _is_folder, URL, MD5)
        if check_checksum and self.source.is_file():
            check_md5(self.source, MD5)
        self._raw: Optional[Tuple[Dict[str, Tuple[np.ndarray, np.ndarray]], List[str]]] = None
        #: part -> (official row of every kept row, the pickle's file names or None)
        self._rows: Dict[str, Tuple[np.ndarray, Optional[List[str]]]] = {}

    def class_split(self) -> Dict[str, List[str]]:
        return standard_split("cifar_fs")

    def cache_extra(self) -> str:
        return f"train_per_class={self.train_per_class}" if self.train_per_class is not None else ""

    def _read_pickles(self) -> Dict[str, bytes]:
        want = ("train", "test", "meta")
        out: Dict[str, bytes] = {}
        if self.source.is_dir():
            for w in want:
                out[w] = (self.source / w).read_bytes()
            return out
        try:
            with tarfile.open(self.source, "r:*") as tar:
                for m in tar:
                    base = m.name.rsplit("/", 1)[-1]
                    if m.isfile() and base in want and base not in out:
                        f = tar.extractfile(m)
                        out[base] = f.read() if f else b""
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise DataError(f"archive {self.source} is corrupt or truncated ({type(exc).__name__}: {exc}); "
                            f"download it again ({URL}, md5 {MD5}) or pass the extracted folder") from None
        missing = [w for w in want if w not in out]
        if missing:
            raise DataError(f"archive {self.source} lacks cifar-100-python/{', '.join(missing)}; it is not the "
                            f"CIFAR-100 python archive or it is truncated: download {URL} again")
        return out

    def _raw_data(self):
        if self._raw is None:
            blobs = self._read_pickles()
            try:
                meta = read_cifar_pickle(blobs["meta"], "meta", self.source)
                fine = [n.decode() if isinstance(n, bytes) else n for n in _get(meta, "fine_label_names")]
                parts = {}
                for part in ("train", "test"):
                    d = read_cifar_pickle(blobs[part], part, self.source)
                    data = np.asarray(_get(d, "data"), dtype=np.uint8)
                    labels = np.asarray(_get(d, "fine_labels"), dtype=np.int64)
                    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
                        raise ValueError(f"{part}: data {data.shape}, {len(labels)} labels")
                    if len(labels) and (labels.min() < 0 or labels.max() >= len(fine)):
                        raise ValueError(f"{part}: fine label out of range")
                    parts[part] = (data, labels)
                    names = d.get(b"filenames", d.get("filenames"))
                    names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names] \
                        if names is not None and len(names) == len(labels) else None
                    self._rows[part] = (np.arange(len(labels)), names)
            except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, AttributeError,
                    IndexError, MemoryError) as exc:
                raise DataError(f"{self.source}: a CIFAR-100 pickle is corrupt or truncated ({type(exc).__name__}: "
                                f"{exc}); download {URL} again (md5 {MD5})") from None
            if self.train_per_class is not None:
                keep = self._first_per_class(parts["train"][1], fine)
                parts["train"] = (parts["train"][0][keep], parts["train"][1][keep])
                self._rows["train"] = (self._rows["train"][0][keep], self._rows["train"][1])
            self._raw = (parts, fine)
        return self._raw

    def _first_per_class(self, labels: np.ndarray, fine: List[str]) -> np.ndarray:
        """Mask of the first ``train_per_class`` train rows of every class (official row order); a class with fewer
        raises :class:`DataError` listing every short class."""
        n = self.train_per_class
        have = np.bincount(labels, minlength=len(fine))
        short = [(fine[c], int(k)) for c, k in enumerate(have) if k < n]
        if short:
            listing = ", ".join(f"{name} ({k})" for name, k in short[:20])
            more = f" ... ({len(short)} in all)" if len(short) > 20 else ""
            raise DataError(f"train_per_class {n}: {len(short)} classes of {self.source} have fewer train images: "
                            f"{listing}{more}; lower {opt('train_per_class', 'N')} (the "
                            f"shortest class has {min(k for _, k in short)}) or use the full archive")
        rank = np.zeros(len(labels), dtype=np.int64)
        for c in np.unique(labels):
            rank[labels == c] = np.arange(int((labels == c).sum()))
        return rank < n

    def inventory(self) -> Dict[str, Dict[str, int]]:
        parts, fine = self._raw_data()
        inv = {n: {p: 0 for p in self.parts} for n in fine}
        for p, (_, labels) in parts.items():
            for c, k in enumerate(np.bincount(labels, minlength=len(fine))):
                inv[fine[c]][p] = int(k)
        return inv

    def image_names(self, names: Sequence[str]) -> List[List[str]]:
        """Each class's rows of the official pickles in decode order: ``train[<row>] <file name>`` (train rows
        first, then test; the row in the official file, its ``filenames`` entry)."""
        parts, fine = self._raw_data()
        index = {n: i for i, n in enumerate(fine)}
        out = []
        for n in names:
            rows = []
            for p in ("train", "test"):
                official, files = self._rows[p]
                for r in official[parts[p][1] == index[n]]:
                    rows.append(f"{p}[{int(r)}]" + (f" {files[int(r)]}" if files is not None else ""))
            out.append(rows)
        return out

    def decode_classes(self, names: Sequence[str]) -> List[np.ndarray]:
        parts, fine = self._raw_data()
        index = {n: i for i, n in enumerate(fine)}
        out = []
        for n in names:
            c = index[n]
            rows = [parts[p][0][parts[p][1] == c] for p in ("train", "test")]
            flat = np.concatenate(rows)
            # R, G, B planes of 32x32, row-major -> HWC
            out.append(np.ascontiguousarray(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)))
        return out
