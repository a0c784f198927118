"""Standardised few-shot episodes, defined over (class position in split, image position within class).

An episode file holds, for E episodes of an n_way (n_shot + n_query) protocol:
``classes`` int16 ``[E, n_way]`` (class positions within the split, distinct) and ``images`` uint16
``[E, n_way, n_shot + n_query]`` (image positions within each class, distinct, support first). They are a
pure function of ``(seed, n_way, n_shot, n_query, n_episodes, per-class image counts)`` using
``numpy.random.default_rng(seed)``, independent of the image bytes, so every method is scored on the same
episodes. Sampling follows RFS (WangYueFt/rfs ``MetaCIFAR100``): classes without replacement, then per
class ``n_shot`` support and ``n_query`` query images without replacement.

Published files (``splits/episodes/<dataset>-<variant>/<split>_<n>w<k>s<q>q_<E>.npz``) are sha256-checked
against ``splits/MANIFEST.json``. Episodes are generated sequentially, so the first N episodes of a
published file equal a generation with ``n_episodes = N``.
"""
from __future__ import annotations

import io
import os
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError, ProtocolError
from ..utils import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
EPISODE_SEED = 0
PROTOCOL = "rfs-v1: classes w/o replacement, then per class n_shot+n_query images w/o replacement, support first"
PUBLISHED_EPISODES = 2000
PUBLISHED_SHOTS = (1, 5)
PUBLISHED_WAY = 5
PUBLISHED_QUERY = 15

# Per-class image counts of the official data (and of the Tiny ImageNet subset in shared/data).
VARIANTS: Dict[Tuple[str, str], Dict[str, Tuple[int, ...]]] = {
    ("cifar_fs", "full"): {"val": (600,) * 16, "test": (600,) * 20},
    ("tiny_imagenet", "full"): {"val": (550,) * 40, "test": (550,) * 40},
    ("tiny_imagenet", "sub100"): {"val": (150,) * 40, "test": (150,) * 40},
}


@dataclass(frozen=True)
class Episodes:
    """E episodes: ``classes [E, n_way]``, ``images [E, n_way, n_shot+n_query]`` (support first).

    ``source`` is the relative path of the published file, or ``"generated"``."""

    classes: np.ndarray
    images: np.ndarray
    n_shot: int
    n_query: int
    seed: int
    counts: Tuple[int, ...]
    source: str = "generated"

    @property
    def n_way(self) -> int:
        return int(self.classes.shape[1])

    def __len__(self) -> int:
        return int(self.classes.shape[0])

    def head(self, n: int) -> "Episodes":
        return Episodes(self.classes[:n], self.images[:n], self.n_shot, self.n_query, self.seed, self.counts,
                        self.source)

    def rows(self, class_offsets: np.ndarray) -> np.ndarray:
        """Map to split rows: ``offsets[class] + image position`` -> int64 ``[E, n_way, n_shot+n_query]``."""
        return np.asarray(class_offsets, dtype=np.int64)[self.classes.astype(np.int64)][..., None] \
            + self.images.astype(np.int64)


def check_protocol(counts: Sequence[int], n_way: int, n_shot: int, n_query: int,
                   class_names: Optional[Sequence[str]] = None, where: str = "split") -> None:
    """Raise :class:`ProtocolError` if the split cannot supply the protocol (naming the short classes)."""
    counts = np.asarray(counts, dtype=np.int64)
    if n_way < 1 or n_shot < 1 or n_query < 1:
        raise ProtocolError(f"n_way, n_shot and n_query must be >= 1 (got {n_way}, {n_shot}, {n_query})")
    if n_way > len(counts):
        raise ProtocolError(f"{n_way}-way episodes need {n_way} classes but {where} has {len(counts)}; "
                            f"use --way {len(counts)} or fewer, or a split with more classes")
    need = n_shot + n_query
    short = np.nonzero(counts < need)[0]
    if len(short):
        names = class_names if class_names is not None else [str(i) for i in range(len(counts))]
        listing = ", ".join(f"{names[i]} ({int(counts[i])} images)" for i in short[:20])
        more = f" and {len(short) - 20} more" if len(short) > 20 else ""
        raise ProtocolError(f"{where}: shot+query = {n_shot}+{n_query} = {need} images per class, but "
                            f"{len(short)} classes have fewer: {listing}{more}. Lower --shots/--queries "
                            f"(at most {int(counts.min())} per class in total)")


def generate_episodes(seed: int, n_way: int, n_shot: int, n_query: int, n_episodes: int,
                      counts: Sequence[int]) -> Episodes:
    """Episodes as a pure function of the arguments (``numpy.random.default_rng(seed)``)."""
    counts = tuple(int(c) for c in counts)
    check_protocol(counts, n_way, n_shot, n_query)
    if max(counts) > np.iinfo(np.uint16).max or len(counts) > np.iinfo(np.int16).max:
        raise ProtocolError("episode files store uint16 image / int16 class positions; split too large")
    rng = np.random.default_rng(seed)
    k = n_shot + n_query
    classes = np.empty((n_episodes, n_way), dtype=np.int16)
    images = np.empty((n_episodes, n_way, k), dtype=np.uint16)
    num_classes = len(counts)
    for e in range(n_episodes):
        cls = rng.choice(num_classes, size=n_way, replace=False)
        classes[e] = cls
        for w, c in enumerate(cls):
            images[e, w] = rng.choice(counts[c], size=k, replace=False)
    return Episodes(classes, images, n_shot, n_query, int(seed), counts)


def episode_relpath(dataset: str, variant: str, split: str, n_way: int, n_shot: int, n_query: int,
                    n_episodes: int) -> str:
    return f"episodes/{dataset}-{variant}/{split}_{n_way}w{n_shot}s{n_query}q_{n_episodes}.npz"


def _meta(ep: Episodes, dataset: str, variant: str, split: str) -> Dict[str, object]:
    return {"format_version": FORMAT_VERSION, "protocol": PROTOCOL, "seed": ep.seed, "n_way": ep.n_way,
            "n_shot": ep.n_shot, "n_query": ep.n_query, "n_episodes": len(ep), "counts": list(ep.counts),
            "dataset": dataset, "variant": variant, "split": split}


def save_episodes(ep: Episodes, path: Path, dataset: str, variant: str, split: str) -> None:
    """Write a compressed npz (deterministic bytes: no timestamps) atomically."""
    import zipfile

    meta = json.dumps(_meta(ep, dataset, variant, split), sort_keys=True)
    buf = io.BytesIO()
    # np.savez_compressed stamps the current time into the zip; write members ourselves with a fixed date.
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in (("classes", ep.classes), ("images", ep.images),
                          ("meta", np.frombuffer(meta.encode("utf-8"), dtype=np.uint8))):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, member.getvalue())
    atomic_write_bytes(path, buf.getvalue())
    os.chmod(path, 0o644)  # mkstemp makes 0600; these are repository files


def read_episode_file(path: Path) -> Tuple[Episodes, Dict[str, object]]:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode("utf-8"))
        ep = Episodes(z["classes"], z["images"], int(meta["n_shot"]), int(meta["n_query"]), int(meta["seed"]),
                      tuple(meta["counts"]))
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"episode file {path} has format version {meta.get('format_version')}, expected "
                        f"{FORMAT_VERSION}; restore it with `git checkout -- splits/`")
    return ep, meta


def publish_all(n_episodes: int = PUBLISHED_EPISODES, seed: int = EPISODE_SEED) -> list:
    """Maintainer tool: (re)generate every published episode file and record its sha256 in the manifest."""
    from ..data.splits import splits_dir, update_manifest

    rels = []
    for (dataset, variant), per_split in VARIANTS.items():
        for split, counts in per_split.items():
            for shot in PUBLISHED_SHOTS:
                ep = generate_episodes(seed, PUBLISHED_WAY, shot, PUBLISHED_QUERY, n_episodes, counts)
                rel = episode_relpath(dataset, variant, split, PUBLISHED_WAY, shot, PUBLISHED_QUERY, n_episodes)
                save_episodes(ep, splits_dir() / rel, dataset, variant, split)
                rels.append(rel)
    update_manifest(rels)
    return rels


def find_variant(dataset: str, split: str, counts: Sequence[int]) -> Optional[str]:
    counts = tuple(int(c) for c in counts)
    for (ds, variant), per_split in VARIANTS.items():
        if ds == dataset and per_split.get(split) == counts:
            return variant
    return None


def load_episodes(dataset: str, split: str, counts: Sequence[int], n_way: int = 5, n_shot: int = 1,
                  n_query: int = 15, n_episodes: int = PUBLISHED_EPISODES, seed: int = EPISODE_SEED,
                  class_names: Optional[Sequence[str]] = None) -> Episodes:
    """The standard episodes for a split: the published file (sha256-verified) when the per-class counts
    match a published variant and the protocol is published, else generated from ``seed`` (with a warning)."""
    counts = tuple(int(c) for c in counts)
    check_protocol(counts, n_way, n_shot, n_query, class_names, where=f"{dataset} {split}")
    variant = find_variant(dataset, split, counts)
    published = (variant is not None and seed == EPISODE_SEED and n_way == PUBLISHED_WAY
                 and n_query == PUBLISHED_QUERY and n_shot in PUBLISHED_SHOTS and n_episodes <= PUBLISHED_EPISODES)
    if published:
        from ..data.splits import verified_path

        rel = episode_relpath(dataset, variant, split, n_way, n_shot, n_query, PUBLISHED_EPISODES)
        ep, meta = read_episode_file(verified_path(rel))
        if tuple(meta["counts"]) != counts or meta["seed"] != seed or meta["n_way"] != n_way:
            raise DataError(f"episode file splits/{rel} does not describe {dataset} {split} (counts/seed differ); "
                            "restore it with `git checkout -- splits/`")
        ep = Episodes(ep.classes, ep.images, ep.n_shot, ep.n_query, ep.seed, ep.counts, f"splits/{rel}")
        return ep.head(n_episodes)
    log.warning("no published episodes for %s %s (%d classes, per-class counts %s) with %d-way %d-shot "
                "%d-query x%d seed %d: generating them from the seed; results are comparable only with runs "
                "on the same data", dataset, split, len(counts), _summarise(counts), n_way, n_shot, n_query,
                n_episodes, seed)
    return generate_episodes(seed, n_way, n_shot, n_query, n_episodes, counts)


def _summarise(counts: Sequence[int]) -> str:
    u = sorted(set(counts))
    return f"{u[0]}" if len(u) == 1 else f"{u[0]}..{u[-1]}"


def class_offsets(labels: np.ndarray, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per-class row offsets and counts of a split whose rows are grouped by class in label order."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    if len(labels) and np.any(labels[1:] < labels[:-1]):
        raise DataError("split rows are not grouped by class in label order (SplitData contract); "
                        "reload the split through fsl_lsskd.data.get_dataset")
    return offsets, counts
