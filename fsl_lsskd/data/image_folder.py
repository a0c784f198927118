"""A user's own image folder as a few-shot dataset: ``root/<class>/*.jpg|jpeg|png`` plus a class split file
(JSON ``{"train": [...], "val": [...], "test": [...]}`` or a directory with ``train.txt``/``val.txt``/
``test.txt``). Images are resized (shorter side) and centre-cropped to ``image_size`` (default 64).
Answers the "use my own dataset" request (sicara/easy-few-shot-learning#158)."""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import DataError
from ..registry import DATASETS
from .base import CachedDataset
from .splits import load_split_file

EXTENSIONS = (".jpg", ".jpeg", ".png")


def _load_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = size / min(w, h)
            nw, nh = max(size, round(w * s)), max(size, round(h * s))
            im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
            left, top = (nw - size) // 2, (nh - size) // 2
            return np.asarray(im.crop((left, top, left + size, top + size)))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"image {path} fails to decode ({exc}); replace or delete that file") from None


@DATASETS.register("image_folder")
class ImageFolder(CachedDataset):
    """A user's folder ``root/<class>/*.jpg|png`` with a class split file; images resized to ``image_size``."""

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
            raise DataError("image_folder has nothing to download; pass --data-root DIR with DIR/<class>/*.jpg")
        folder = root if root is not None else archive
        if folder is None:
            raise DataError("image_folder needs --data-root DIR (a folder with one sub-folder of images per class)")
        self.source = Path(folder).expanduser()
        if not self.source.is_dir():
            raise DataError(f"data root {self.source} does not exist or is not a directory; pass --data-root DIR "
                            "with DIR/<class>/*.jpg")
        if split_file is None:
            raise DataError("image_folder needs --split-file: a JSON file {\"train\": [...], \"val\": [...], "
                            "\"test\": [...]} or a directory with train.txt/val.txt/test.txt")
        if int(image_size) < 8:
            raise DataError(f"image_size {image_size} is too small; use e.g. --image-size 64")
        self.split_file = Path(split_file)
        self.image_size = int(image_size)  # instance attribute shadows the class default
        self.workers = workers or min(4, os.cpu_count() or 1)
        self._split = load_split_file(self.split_file)
        self._files: Optional[Dict[str, List[Path]]] = None

    def class_split(self) -> Dict[str, List[str]]:
        return self._split

    def cache_extra(self) -> str:
        f = self.split_file if self.split_file.is_file() else None
        return hashlib.sha256(f.read_bytes()).hexdigest() if f else repr(self._split)

    def files(self) -> Dict[str, List[Path]]:
        if self._files is None:
            self._files = {
                d.name: sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
                for d in sorted(self.source.iterdir()) if d.is_dir() and not d.name.startswith(".")
            }
            if not self._files:
                raise DataError(f"data root {self.source} has no class sub-folders; expected "
                                f"{self.source}/<class>/*.jpg")
        return self._files

    def inventory(self) -> Dict[str, Dict[str, int]]:
        return {c: {"all": len(v)} for c, v in self.files().items()}

    def decode_classes(self, names: Sequence[str]) -> List[np.ndarray]:
        files = self.files()
        size = self.image_size
        out = []
        with ThreadPoolExecutor(self.workers) as ex:
            for n in names:
                imgs = list(ex.map(lambda p: _load_image(p, size), files[n]))
                out.append(np.stack(imgs) if imgs else np.zeros((0, size, size, 3), np.uint8))
        return out
