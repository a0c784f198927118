"""Which dataset an archive or folder holds, from the names inside it (never its pixels), so a reader given
another dataset's file says so ("X holds CIFAR-100, not Tiny ImageNet: found cifar-100-python/meta, ...; expected
tiny-imagenet-200.zip ...") instead of "corrupt or truncated; download it again".

Every reader calls it where its own layout is not found (:func:`wrong_dataset_error`): the archive type differs
from its official one (a ``.tar.gz`` where a ``.zip`` is expected, or the reverse; checked by
:func:`fsl_lsskd.data.sources.resolve_source` for every dataset), a zip lacks its marker file, or a folder is not
its extracted layout. Recognised: the archives and folders of every registered dataset, CIFAR-10 and Omniglot's
background/evaluation sets.
"""
from __future__ import annotations

import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from ..errors import DataError


@dataclass(frozen=True)
class Layout:
    """A dataset's file layout: ``label`` (its name for people), ``dataset`` (the registered name, or "" for a
    dataset fsl-bench does not read), ``official`` (the official archive's file name), ``expected`` (what its
    archive or folder holds, for messages) and ``markers`` (regular expressions over member paths, without any
    leading folders, that only this dataset's files match)."""

    label: str
    dataset: str
    official: str
    expected: str
    markers: Tuple[str, ...]


LAYOUTS: Tuple[Layout, ...] = (
    Layout("Tiny ImageNet", "tiny_imagenet", "tiny-imagenet-200.zip",
           "tiny-imagenet-200/wnids.txt, train/<wnid>/images/<wnid>_<i>.JPEG and val/val_annotations.txt",
           (r"(^|/)tiny-imagenet-200/", r"(^|/)wnids\.txt$", r"(^|/)val/val_annotations\.txt$")),
    Layout("CIFAR-100", "cifar_fs", "cifar-100-python.tar.gz",
           "cifar-100-python/meta, cifar-100-python/train and cifar-100-python/test (Python pickles)",
           (r"(^|/)cifar-100-python(/|$)",)),
    Layout("CIFAR-10", "", "cifar-10-python.tar.gz",
           "cifar-10-batches-py/data_batch_1..5, test_batch and batches.meta",
           (r"(^|/)cifar-10-batches-py(/|$)", r"(^|/)data_batch_\d$", r"(^|/)batches\.meta$")),
    Layout("Omniglot's one-shot runs", "omniglot_runs", "all_runs.zip",
           "run01/ to run20/, each with class_labels.txt, training/classNN.png and test/itemNN.png",
           (r"(^|/)run\d\d/class_labels\.txt$", r"(^|/)all_runs/")),
    Layout("Omniglot's background or evaluation set (alphabets of characters, not the one-shot runs)", "",
           "images_background.zip",
           "images_background/<alphabet>/<character>/*.png",
           (r"(^|/)images_(background|evaluation)(_small\d)?(/|$)",)),
)
#: a user's image folder (``image_folder``): no archive, no markers (any folder of class folders)
IMAGE_FOLDER = Layout("an image folder", "image_folder", "", "one sub-folder of images per class (DIR/<class>/<images>)",
                      ())

_TAR_MEMBERS = 64  # members read from a tar before giving up: headers only, but a .tar.gz decompresses each


@dataclass(frozen=True)
class Found:
    """What :func:`identify` found: the layout and up to three member names that match it."""

    layout: Layout
    evidence: Tuple[str, ...]


def _member_names(path: Path, tar_members: int = _TAR_MEMBERS) -> Tuple[str, List[str]]:
    """(kind of file, member names) of an archive or folder; kind is ``zip``, ``tar``, ``folder``, ``gzip``
    (not a tar inside) or ``file`` (none of these). Unreadable archives give the names read so far."""
    if path.is_dir():
        names = []
        for p in sorted(path.rglob("*")):
            names.append(p.relative_to(path).as_posix() + ("/" if p.is_dir() else ""))
            if len(names) >= 2000:
                break
        return "folder", names
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                return "zip", z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError):
            return "zip", []
    names: List[str] = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                names.append(m.name + ("/" if m.isdir() else ""))
                if len(names) >= tar_members:
                    break
    except Exception:  # noqa: BLE001 - not a tar (ReadError), or a corrupt stream (zlib.error, EOFError): keep what was read
        pass
    if names:
        return "tar", names
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError:
        return "file", []
    return ("gzip" if head == b"\x1f\x8b" else "file"), []


def match(names: Iterable[str]) -> Optional[Found]:
    """The layout whose markers the member ``names`` match most often (ties: the first in :data:`LAYOUTS`), or
    None."""
    names = list(names)
    best: Optional[Found] = None
    for layout in LAYOUTS:
        hits = [n for n in names if any(re.search(m, n) for m in layout.markers)]
        if hits and (best is None or len(hits) > len(best.evidence)):
            best = Found(layout, tuple(hits))
    return Found(best.layout, best.evidence[:3]) if best is not None else None


def identify(path: Path, tar_members: int = _TAR_MEMBERS) -> Optional[Found]:
    """The dataset layout of archive or folder ``path`` from its member names (a tar: its first
    ``tar_members`` headers), or None when it matches none of :data:`LAYOUTS` or cannot be read."""
    return match(_member_names(Path(path), tar_members)[1])


def layout_of(official: str) -> Optional[Layout]:
    """The layout whose official archive is named ``official`` (e.g. ``tiny-imagenet-200.zip``)."""
    return next((lay for lay in LAYOUTS if lay.official == official), None)


def wrong_dataset_error(path: Path, expected: Layout, found: Optional[Found]) -> Optional[DataError]:
    """A :class:`DataError` saying that ``path`` is another dataset's archive or folder (what was found, what
    was expected, and the fix) when ``found`` (:func:`identify` of ``path``) is another layout than
    ``expected``; None when nothing was recognised or it is ``expected``'s."""
    if found is None or found.layout == expected:
        return None
    other = found.layout
    want = (f"{expected.official} or its extracted folder, holding {expected.expected}" if expected.official
            else expected.expected)
    own = "its own archive" if expected.official else "a folder of class folders"
    fix = (f"Read it with --dataset {other.dataset} (`datasets: [{other.dataset}]` in a benchmark file)"
           if other.dataset else "It is not a dataset fsl-bench reads")
    return DataError(f"{path} holds {other.label}, not {expected.label}: found {', '.join(found.evidence)}; "
                     f"expected {want}. {fix}; for {expected.label}, pass {own}")
