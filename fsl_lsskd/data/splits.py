"""Class split files (``splits/<dataset>/{train,val,test}.txt``) and their sha256 manifest.

Every split or episode file read by fsl-bench goes through :func:`verified_path`, which checks the file's
sha256 against ``splits/MANIFEST.json``, so a silently edited split cannot produce incomparable numbers.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple, Union

import numpy as np

from ..errors import DataError
from ..options import dataset_option as opt
from ..utils import atomic_write_text, project_root, sha256_file

log = logging.getLogger(__name__)

MANIFEST_NAME = "MANIFEST.json"

# Tiny ImageNet has no standard few-shot class split (see splits/tiny_imagenet/README.md); ours is seeded.
TINY_SPLIT_VERSION = "v1"
TINY_SPLIT_SEED = 0
TINY_SPLIT_COUNTS = (120, 40, 40)


def splits_dir() -> Path:
    """``<repo>/splits`` (checkout), else the copy shipped as package data (``fsl_lsskd/data/_splits``)."""
    repo = project_root() / "splits"
    if (repo / MANIFEST_NAME).is_file():
        return repo
    packaged = Path(__file__).resolve().parent / "_splits"
    if (packaged / MANIFEST_NAME).is_file():
        return packaged
    return repo


def _manifest_path() -> Path:
    return splits_dir() / MANIFEST_NAME


def read_manifest() -> Dict[str, str]:
    path = _manifest_path()
    if not path.is_file():
        raise DataError(f"split manifest {path} is missing; restore it from git (git checkout -- splits/)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"split manifest {path} is unreadable ({exc}); restore it from git") from None
    return dict(data.get("files", data))


def verified_path(relpath: Union[str, Path]) -> Path:
    """Absolute path of ``splits/<relpath>`` after checking its sha256 against ``splits/MANIFEST.json``.

    Raises :class:`DataError` naming the file when it is missing, unlisted or modified."""
    rel = Path(relpath).as_posix()
    path = splits_dir() / rel
    if not path.is_file():
        raise DataError(f"split file {path} is missing; restore it with `git checkout -- splits/{rel}`")
    manifest = read_manifest()
    if rel not in manifest:
        raise DataError(f"split file splits/{rel} is not listed in {_manifest_path()}; "
                        f"add it with fsl_lsskd.data.splits.update_manifest([{rel!r}])")
    actual = sha256_file(path)
    if actual != manifest[rel]:
        raise DataError(f"split file splits/{rel} was modified (sha256 {actual[:12]}..., manifest "
                        f"{manifest[rel][:12]}...); restore it with `git checkout -- splits/{rel}` or, if the "
                        f"change is intended, run update_manifest([{rel!r}])")
    return path


def update_manifest(relpaths: Iterable[Union[str, Path]]) -> Dict[str, str]:
    """Record the current sha256 of each ``splits/<relpath>`` in the manifest (maintainer tool).

    Other entries are kept; the manifest is rewritten atomically. Returns the new manifest."""
    root = splits_dir()
    path = root / MANIFEST_NAME
    manifest: Dict[str, str] = {}
    if path.is_file():
        manifest = dict(json.loads(path.read_text(encoding="utf-8")).get("files", {}))
    for rp in relpaths:
        rel = Path(rp).as_posix()
        f = root / rel
        if not f.is_file():
            raise DataError(f"cannot add splits/{rel} to the manifest: file {f} does not exist")
        manifest[rel] = sha256_file(f)
    doc = {"comment": "sha256 of every split/episode file; checked by fsl_lsskd.data.splits.verified_path",
           "files": dict(sorted(manifest.items()))}
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    return doc["files"]


def read_class_list(path: Union[str, Path]) -> List[str]:
    """One class name per line; blank lines and ``#`` comments ignored."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]


def standard_split(dataset: str) -> Dict[str, List[str]]:
    """The published class split of ``dataset`` (``cifar_fs`` / ``tiny_imagenet``), sha256-verified."""
    return {s: read_class_list(verified_path(f"{dataset}/{s}.txt")) for s in ("train", "val", "test")}


def load_split_file(path: Union[str, Path]) -> Dict[str, List[str]]:
    """A user's class split: a JSON file ``{"train": [...], "val": [...], "test": [...]}`` or a directory
    with ``train.txt``/``val.txt``/``test.txt``. Classes must be disjoint."""
    path = Path(path)
    if path.is_dir():
        missing = [s for s in ("train", "val", "test") if not (path / f"{s}.txt").is_file()]
        if missing:
            raise DataError(f"split directory {path} lacks {', '.join(m + '.txt' for m in missing)}; "
                            "provide train.txt, val.txt and test.txt (one class per line) or a JSON file")
        split = {s: read_class_list(path / f"{s}.txt") for s in ("train", "val", "test")}
    elif path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DataError(f"split file {path} is not valid JSON ({exc}); write "
                            '{"train": [...], "val": [...], "test": [...]}') from None
        if not isinstance(data, dict) or not all(isinstance(data.get(s), list) for s in ("train", "val", "test")):
            raise DataError(f'split file {path} must be a JSON object {{"train": [...], "val": [...], '
                            f'"test": [...]}} with a list of class names for each split')
        split = {s: [str(c) for c in data[s]] for s in ("train", "val", "test")}
    else:
        raise DataError(f"split file {path} does not exist; pass {opt('split_file', 'F')} with a JSON file or a "
                        "directory holding train.txt/val.txt/test.txt")
    seen: Dict[str, str] = {}
    for s, names in split.items():
        for c in names:
            if c in seen:
                raise DataError(f"split file {path}: class {c!r} is in both {seen[c]!r} and {s!r}; "
                                "each class must belong to one split")
            seen[c] = s
    return split


def make_tiny_imagenet_split(wnids: Sequence[str], seed: int = TINY_SPLIT_SEED,
                             counts: Tuple[int, int, int] = TINY_SPLIT_COUNTS) -> Dict[str, List[str]]:
    """Our seeded (NON-standard) Tiny ImageNet class split: sort the wnids, permute them with
    ``numpy.random.default_rng(seed).permutation``, take the first 120/40/40 for train/val/test; each
    list is written sorted. No published few-shot split of Tiny ImageNet exists (splits/tiny_imagenet/README.md)."""
    names = sorted(set(wnids))
    if len(names) != sum(counts):
        raise DataError(f"expected {sum(counts)} distinct wnids, got {len(names)}; pass the official wnids.txt")
    perm = np.random.default_rng(seed).permutation(len(names))
    out: Dict[str, List[str]] = {}
    start = 0
    for s, n in zip(("train", "val", "test"), counts):
        out[s] = sorted(names[i] for i in perm[start:start + n])
        start += n
    return out


def write_split(split: Dict[str, List[str]], out_dir: Union[str, Path]) -> List[Path]:
    """Write ``train.txt``/``val.txt``/``test.txt`` (one class per line) atomically."""
    out_dir = Path(out_dir)
    paths = []
    for s in ("train", "val", "test"):
        p = out_dir / f"{s}.txt"
        atomic_write_text(p, "".join(c + "\n" for c in split[s]))
        paths.append(p)
    return paths


#: default class shares of ``make_class_split`` (train, val, test)
DEFAULT_RATIOS = (0.6, 0.2, 0.2)
#: fewest classes a val/test split needs to host 5-way episodes, and a train split to train a classifier
MIN_EPISODE_CLASSES = 5
MIN_TRAIN_CLASSES = 2


def parse_ratios(text: Union[str, Sequence[float]], option: str = "--ratios") -> Tuple[float, float, float]:
    """``"0.6,0.2,0.2"`` -> three non-negative class shares (train, val, test) summing to 1; anything else
    raises :class:`DataError` naming ``option``."""
    try:
        vals = tuple(float(v) for v in (text.split(",") if isinstance(text, str) else text))
    except ValueError:
        vals = ()
    if len(vals) != 3 or any(not np.isfinite(v) or v < 0 for v in vals) or abs(sum(vals) - 1.0) > 1e-6:
        raise DataError(f"{option} {text!r}: give three non-negative class shares for train,val,test that sum to 1, "
                        f"e.g. {option} 0.6,0.2,0.2")
    return vals  # type: ignore[return-value]


def split_sizes(n_classes: int, ratios: Sequence[float]) -> Tuple[int, int, int]:
    """Classes per split for ``n_classes`` classes: val and test get ``round(share * n)``, train the rest."""
    n_val, n_test = (int(round(r * n_classes)) for r in ratios[1:])
    return n_classes - n_val - n_test, n_val, n_test


def _sizes_ok(sizes: Sequence[int]) -> bool:
    return sizes[0] >= MIN_TRAIN_CLASSES and min(sizes[1:]) >= MIN_EPISODE_CLASSES


def make_class_split(names: Sequence[str], ratios: Sequence[float] = DEFAULT_RATIOS,
                     seed: int = 0) -> Dict[str, List[str]]:
    """A seeded class split of ``names`` (a user's image folder): sort the names, permute them with
    ``numpy.random.default_rng(seed).permutation``, then take :func:`split_sizes` classes for val, test and
    train in that order; each list is sorted. Raises :class:`DataError` (naming ratios that work, or how many
    classes these ratios need) when val or test would get fewer than 5 classes (5-way episodes) or train
    fewer than 2."""
    names = sorted(set(names))
    n = len(names)
    sizes = split_sizes(n, ratios)
    if not _sizes_ok(sizes):
        shown = ",".join(f"{r:g}" for r in ratios)
        need = next((m for m in range(n + 1, 100 * MIN_EPISODE_CLASSES + 1000)
                     if _sizes_ok(split_sizes(m, ratios))), None)
        fixes = []
        if n >= MIN_TRAIN_CLASSES + 2 * MIN_EPISODE_CLASSES:
            q = np.ceil(100 * MIN_EPISODE_CLASSES / n) / 100
            fixes.append(f"use --ratios {1 - 2 * q:.2f},{q:.2f},{q:.2f}")
        if need is not None:
            fixes.append(f"add classes ({shown} needs at least {need})")
        else:
            fixes.append(f"give val and test larger shares than {shown}")
        raise DataError(f"class shares {shown} on {n} classes give train/val/test {sizes[0]}/{sizes[1]}/{sizes[2]} "
                        f"classes; 5-way episodes need at least {MIN_EPISODE_CLASSES} classes in val and in test "
                        f"and training needs {MIN_TRAIN_CLASSES}: {' or '.join(fixes)}")
    perm = np.random.default_rng(seed).permutation(n)
    shuffled = [names[i] for i in perm]
    n_train, n_val, n_test = sizes
    return {"val": sorted(shuffled[:n_val]), "test": sorted(shuffled[n_val:n_val + n_test]),
            "train": sorted(shuffled[n_val + n_test:])}


def write_split_json(split: Dict[str, List[str]], dest: Union[str, Path]) -> Path:
    """Write ``{"train": [...], "val": [...], "test": [...]}`` (UTF-8, names as written) atomically."""
    dest = Path(dest)
    doc = {s: list(split[s]) for s in ("train", "val", "test")}
    atomic_write_text(dest, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    return dest
