"""Where a dataset's files come from: the official archive, its extracted folder, a data root or a checked
download (md5), and the identities used by the cache (fast source identity, content fingerprint)."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional

import numpy as np

from ..errors import ChecksumError, DataError
from ..options import dataset_option as opt
from ..utils import atomic_path, cache_dir as default_cache_dir, md5_file

if TYPE_CHECKING:
    from .base import SplitData

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- sources
def fetch(url: str, dest: Path) -> None:
    """Download ``url`` into ``dest`` (tests replace this function; never called without --download)."""
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as f:
            shutil.copyfileobj(resp, f, length=1 << 20)
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(f"could not download {url} ({exc}); download it by hand and pass "
                        f"{opt('archive', 'PATH')} (or {opt('data_root', 'DIR')} holding it)") from None


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
    hint = (f"pass {opt('archive', 'PATH')} to {official_name} (or its extracted {folder_name}/ folder), "
            f"{opt('data_root', 'DIR')} holding one of them, or {opt('download')} to fetch {url}")
    if archive is not None:
        p = Path(archive).expanduser()
        if not p.exists():
            raise DataError(f"{label} archive {p} does not exist; {hint}")
        if p.is_dir():
            if is_folder(p):
                return p
            if is_folder(p / folder_name):
                return p / folder_name
            refuse_other_dataset(p, official_name)
            raise DataError(f"{p} is not an extracted {label} folder (no {folder_name}/ layout inside); {hint}")
        _check_archive_kind(p, official_name)
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


def refuse_other_dataset(path: Path, official_name: str, names: Optional[Iterable[str]] = None,
                         tar_members: Optional[int] = None) -> None:
    """Raise :func:`~fsl_lsskd.data.identify.wrong_dataset_error` when archive or folder ``path`` holds another
    dataset's files than the dataset whose official archive is ``official_name``: identified from ``names`` (its
    member names, when the reader has them) or by reading ``path`` (a tar: its first ``tar_members`` headers)."""
    from .identify import identify, layout_of, match, wrong_dataset_error

    expected = layout_of(official_name)
    if expected is None:
        return
    if names is not None:
        found = match(names)
    else:
        found = identify(path, tar_members) if tar_members else identify(path)
    err = wrong_dataset_error(path, expected, found)
    if err is not None:
        raise err


def _check_archive_kind(path: Path, official_name: str) -> None:
    """An archive of another kind than the official one (a tar where a zip is expected, or the reverse) is
    looked into, and refused when it holds another dataset (:mod:`fsl_lsskd.data.identify`); a tar of the
    expected kind is checked by its first member's name (one header: its top-level folder). Anything else is
    left to the reader, whose messages name a corrupt or truncated file."""
    import tarfile
    import zipfile

    want_zip = official_name.endswith(".zip")
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError:
        return
    if want_zip != is_zip:
        refuse_other_dataset(path, official_name)
    elif not want_zip:
        try:
            is_tar = tarfile.is_tarfile(path)
        except Exception:  # noqa: BLE001 - a corrupt stream: the reader names it
            return
        if is_tar:
            refuse_other_dataset(path, official_name, tar_members=1)


def stat_line(rel: str, st: os.stat_result) -> str:
    """One file's line in a source identity: its name (relative), size, mtime and ctime (ns), inode and device.

    The ctime cannot be set from user space: it changes with every write, ``utime`` (``touch -r``, ``cp -p``),
    rename onto the file and ``chmod``, so an in-place edit whose mtime was restored still changes the line; a
    file replaced by another (``mv``, a re-pointed symlink) has another inode or device."""
    return f"{rel}\0{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}\n"


def files_identity(root: Path, files: Iterable[Path]) -> str:
    """sha256 over :func:`stat_line` of every file in ``files`` (in the given order; names relative to ``root``),
    following symlinks: the identity of exactly the files a reader opens. Raises :class:`DataError` when a
    file vanished or cannot be read."""
    h = hashlib.sha256()
    prefix = len(str(root).rstrip(os.sep)) + 1
    for f in files:
        name = str(f)
        rel = name[prefix:] if name.startswith(str(root)) else os.path.relpath(name, root)
        try:
            st = os.stat(name)  # follows symlinks: the file the reader opens, not the link
        except OSError as exc:
            raise DataError(f"cannot read {f} ({exc.strerror or exc}); it vanished or is not readable: check "
                            f"the folder {root}") from None
        h.update(stat_line(rel, st).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def source_identity(path: Path) -> str:
    """Fast identity of a source (the uint8 cache key): :func:`stat_line` of an archive file, or of every file
    under a folder (symlinked files and folders followed, each real folder once), with the list of names.

    Cost: one ``stat`` per file, 0.3-0.6 s for the 30,203 files of the extracted Tiny ImageNet subset (measured on
    2 busy cores); hashing their 58 MB of contents instead took 0.7-1.2 s with the files in the page cache, and
    would grow with the bytes (a folder of camera photos) and read every byte on every load."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror or exc}); pass an existing archive or folder") from None
    if not path.is_dir():
        return f"file:{stat_line(path.name, st).strip()}"
    h = hashlib.sha256()
    seen = set()
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dst = os.stat(dirpath)
        if (dst.st_dev, dst.st_ino) in seen:  # a symlink loop or a folder linked twice: read once
            dirnames[:] = []
            continue
        seen.add((dst.st_dev, dst.st_ino))
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, path)
        h.update(f"dir\0{rel_dir}\n".encode("utf-8", "surrogateescape"))
        for fn in sorted(filenames):
            full = os.path.join(dirpath, fn)
            try:
                fst = os.stat(full)
            except OSError:  # a dangling symlink: no reader opens it, but its name is part of the listing
                h.update(f"dangling\0{os.path.join(rel_dir, fn)}\n".encode("utf-8", "surrogateescape"))
                continue
            h.update(stat_line(os.path.join(rel_dir, fn), fst).encode("utf-8", "surrogateescape"))
    return f"dir:{path.name}:{h.hexdigest()}"


def content_fingerprint(dataset: str, split: str, data: "SplitData") -> str:
    """Identity of a decoded split by its content (pixels, class names, counts), not by where the source lies
    or its mtime: a moved or re-copied archive decodes again (the cache key is the fast identity) but keeps
    its fingerprint, so training checkpoints made from it still resume."""
    h = hashlib.sha256(np.ascontiguousarray(data.images).tobytes())
    h.update("|".join(data.class_names).encode())
    h.update(data.class_counts().tobytes())
    return f"{dataset}-{split}-{h.hexdigest()[:20]}"


