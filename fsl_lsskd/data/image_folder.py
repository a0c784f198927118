"""A user's own image folder as a few-shot dataset: ``root/<class>/<image>`` plus a class split file (JSON
``{"train": [...], "val": [...], "test": [...]}`` or a directory with ``train.txt``/``val.txt``/``test.txt``;
``fsl-bench data make-split image_folder`` writes one). Every format Pillow decodes is read (JPEG, PNG, BMP, GIF,
WebP, TIFF, PPM/PGM/PBM, ...; the first frame of an animation); other files are skipped with a warning. Images are
resized (shorter side) and centre-cropped to ``image_size`` (default 64). Answers the "use my own dataset" request
(sicara/easy-few-shot-learning#158)."""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError
from ..options import dataset_option as opt
from ..registry import DATASETS
from .base import DEFAULT_MIN_IMAGES, CachedDataset
from .duplicates import pixel_hash
from .sources import files_identity
from .splits import load_split_file

log = logging.getLogger(__name__)

#: Pillow formats that are registered for opening but cannot decode pixels here: MPEG (header only) and the
#: stub plugins (BUFR, GRIB, HDF5, WMF off Windows) are found at run time as ``StubImageFile`` subclasses
_HEADER_ONLY = frozenset({"MPEG"})


@functools.lru_cache(maxsize=1)
def image_extensions() -> FrozenSet[str]:
    """Lower-case suffixes (``.jpg``, ``.bmp``, ``.webp``, ...) of every image format this Pillow decodes: its
    registered extensions whose format has an opener, less header-only and stub formats."""
    from PIL import Image, ImageFile

    Image.init()
    readable = set()
    for fmt, (factory, _accept) in Image.OPEN.items():
        stub = isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)
        if not stub and fmt not in _HEADER_ONLY:
            readable.add(fmt)
    if "EPS" in readable:
        from PIL import EpsImagePlugin

        if not EpsImagePlugin.has_ghostscript():  # Pillow renders PostScript through Ghostscript only
            readable.discard("EPS")
    exts = {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in readable}
    if "JPEG" in readable:
        exts.add(".mpo")  # multi-picture JPEG: opened by the JPEG plugin
    return frozenset(exts)


def _decode_errors():
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _decode(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
        left, top = (nw - size) // 2, (nh - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size)))


def load_image(path: Path, size: int) -> np.ndarray:
    """Decode ``path`` (first frame) to RGB, resize its shorter side to ``size`` (bicubic) and centre-crop:
    uint8 ``[size, size, 3]``. Raises :class:`DataError` naming the file when it does not decode."""
    try:
        return _decode(path, size)
    except _decode_errors() as exc:
        raise DataError(f"image {path} fails to decode ({exc}); replace or delete that file") from None


def scan_image(path: Path, size: int) -> Tuple[Optional[bytes], Optional[str]]:
    """``path`` decoded as :func:`load_image` would decode it: ``(pixel hash, None)``
    (:func:`~fsl_lsskd.data.duplicates.pixel_hash`), or ``(None, why it fails)``."""
    try:
        return pixel_hash(_decode(path, size)), None
    except _decode_errors() as exc:
        return None, f"{type(exc).__name__}: {exc}"


def list_class_files(root: Path) -> Dict[str, List[Path]]:
    """``root``'s class folders (visible sub-folders, symlinks followed, sorted by name) -> their image files
    (:func:`image_extensions`, visible, sorted by name). Other files (other types, hidden files such as macOS's
    ``.DS_Store`` and ``._photo.jpg``) are skipped with one warning giving their number and an example. Raises
    :class:`DataError` when ``root`` has no class folder."""
    root = Path(root)
    exts = image_extensions()
    files: Dict[str, List[Path]] = {}
    skipped: List[Path] = []
    try:
        classes = sorted((e for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")),
                         key=lambda e: e.name)
        for d in classes:
            kept = []
            for e in os.scandir(d.path):
                if not e.is_file():
                    continue  # sub-folders of a class folder are not read
                if not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in exts:
                    kept.append(Path(e.path))
                else:
                    skipped.append(Path(e.path))
            files[d.name] = sorted(kept, key=lambda p: p.name)
    except OSError as exc:
        raise DataError(f"cannot list {exc.filename or root} ({exc.strerror or exc}); check that the data root "
                        f"{root} and its class folders are readable") from None
    if not files:
        raise DataError(f"data root {root} has no class sub-folders; expected {root}/<class>/<image files>")
    if skipped:
        example = min(skipped, key=lambda p: (p.parent.name, p.name))
        log.warning("skipped %d files of %s that are hidden or not images Pillow reads (by extension), e.g. %s",
                    len(skipped), root, example.relative_to(root))
    return files


def _refuse_other_dataset(root: Path) -> None:
    """Raise :func:`~fsl_lsskd.data.identify.wrong_dataset_error` when ``root`` is another dataset's archive or
    extracted folder (an image folder has no markers of its own)."""
    from .identify import IMAGE_FOLDER, identify, wrong_dataset_error

    err = wrong_dataset_error(root, IMAGE_FOLDER, identify(root))
    if err is not None:
        raise err


@DATASETS.register("image_folder")
class ImageFolder(CachedDataset):
    """A user's folder ``root/<class>/<images>`` with a class split file; images resized to ``image_size``."""

    name = "image_folder"
    image_size = 64
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)
    #: dataset-specific options of get_dataset (CLI --train-per-class, --split-file, --folder-image-size)
    options = ("split_file", "image_size")
    parts = ("all",)

    def __init__(self, root: Optional[os.PathLike] = None, archive: Optional[os.PathLike] = None,
                 download: bool = False, cache_dir: Optional[os.PathLike] = None,
                 split_file: Optional[os.PathLike] = None, image_size: int = 64, workers: int = 0):
        super().__init__(cache_dir)
        if download:
            raise DataError(f"image_folder has nothing to download; drop {opt('download')} and pass "
                            f"{opt('data_root', 'DIR')} with DIR/<class>/<images>")
        folder = root if root is not None else archive
        if folder is None:
            raise DataError(f"image_folder needs {opt('data_root', 'DIR')} (a folder with one sub-folder of images "
                            "per class)")
        self.source = Path(folder).expanduser()
        if self.source.is_file():  # an archive: another dataset's, or a zip of an image folder
            _refuse_other_dataset(self.source)
            raise DataError(f"data root {self.source} is a file; image_folder reads a folder: extract it and pass "
                            f"{opt('data_root', 'DIR')} with DIR/<class>/<images>")
        if not self.source.is_dir():
            raise DataError(f"data root {self.source} does not exist or is not a directory; pass "
                            f"{opt('data_root', 'DIR')} with DIR/<class>/<images>")
        if split_file is None:
            raise DataError(f"image_folder needs {opt('split_file', 'F')}: a JSON file {{\"train\": [...], "
                            "\"val\": [...], \"test\": [...]} or a directory with train.txt/val.txt/test.txt "
                            "(`fsl-bench data make-split image_folder --data image_folder=DIR --out split.json` writes one)")
        if int(image_size) < 8:
            raise DataError(f"image_size {image_size} is too small; use e.g. {opt('image_size', '64')}")
        self.split_file = Path(split_file)
        self.image_size = int(image_size)  # instance attribute shadows the class default
        self.workers = workers or min(4, os.cpu_count() or 1)
        self._split = load_split_file(self.split_file)
        self._files: Optional[Dict[str, List[Path]]] = None

    def class_split(self) -> Dict[str, List[str]]:
        return self._split

    def check_classes_present(self, names: Sequence[str]) -> None:
        """As :meth:`CachedDataset.check_classes_present`; a root that is another dataset's extracted folder (e.g.
        ``tiny-imagenet-200/``, whose sub-folders are not classes) is named as such."""
        try:
            super().check_classes_present(names)
        except DataError:
            _refuse_other_dataset(self.source)
            raise

    def verify(self, min_images: int = DEFAULT_MIN_IMAGES, decode: bool = True) -> Dict[str, object]:
        """As :meth:`CachedDataset.verify`; when the split names classes the root lacks and the root is another
        dataset's extracted folder, that is named instead (before anything is decoded)."""
        inv = self.inventory()
        if any(c not in inv for names in self._split.values() for c in names):
            _refuse_other_dataset(self.source)
        return super().verify(min_images, decode)

    def files(self) -> Dict[str, List[Path]]:
        """Class -> image files (:func:`list_class_files`), listed once per dataset object."""
        if self._files is None:
            try:
                self._files = list_class_files(self.source)
            except DataError:
                _refuse_other_dataset(self.source)
                raise
        return self._files

    def cache_extra(self) -> str:
        f = self.split_file if self.split_file.is_file() else None
        return hashlib.sha256(f.read_bytes()).hexdigest() if f else repr(self._split)

    def source_key(self, names: Sequence[str]) -> str:
        """Identity of the files of classes ``names`` the reader opens: class and file names, size, mtime,
        ctime, inode and device of each (symlinks followed), see :func:`~fsl_lsskd.data.sources.stat_line`."""
        files = self.files()
        listed = [p for n in names for p in files.get(n, [])]
        layout = hashlib.sha256("\0".join(f"{n}/{len(files.get(n, []))}" for n in names).encode(
            "utf-8", "surrogateescape")).hexdigest()
        return f"folder:{layout}:{files_identity(self.source, listed)}"


    def inventory(self) -> Dict[str, Dict[str, int]]:
        return {c: {"all": len(v)} for c, v in self.files().items()}

    def decode_classes(self, names: Sequence[str]) -> List[np.ndarray]:
        files = self.files()
        size = self.image_size
        out = []
        with ThreadPoolExecutor(self.workers) as ex:
            for n in names:
                imgs = list(ex.map(lambda p: load_image(p, size), files[n]))
                out.append(np.stack(imgs) if imgs else np.zeros((0, size, size, 3), np.uint8))
        return out

    def image_names(self, names: Sequence[str]) -> List[List[str]]:
        """Each class's image files, relative to the data root (``<class>/<file>``), in decode order."""
        files = self.files()
        return [[p.relative_to(self.source).as_posix() for p in files.get(n, [])] for n in names]

    def scan_images(self, names: Sequence[str]) -> Tuple[List[Tuple[str, str, str]], List[List[Optional[bytes]]]]:
        """Every image of classes ``names`` decoded (nothing cached): ``(class, file, reason)`` of each that fails,
        and the pixel hashes per class (None where it failed), as
        :meth:`~fsl_lsskd.data.base.CachedDataset.scan_images`."""
        files = self.files()
        with ThreadPoolExecutor(self.workers) as ex:
            scanned = [list(ex.map(lambda p: scan_image(p, self.image_size), files.get(n, []))) for n in names]
        bad = [(n, p.relative_to(self.source).as_posix(), why) for n, sc in zip(names, scanned)
               for p, (_, why) in zip(files.get(n, []), sc) if why is not None]
        return bad, [[h for h, _ in sc] for sc in scanned]
