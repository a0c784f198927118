"""Standardised few-shot episodes, defined over (class position in split, image position within class).

An episode file holds, for E episodes of an ``n_way``-way (``n_shot + n_query``) protocol:
``classes`` int16 ``[E, n_way]`` (class positions within the split, distinct) and ``images`` uint16
``[E, n_way, n_shot + n_query]`` (image positions within each class, distinct, support first). They are a
pure function of the :class:`~fsl_lsskd.protocol.EpisodeProtocol` and the per-class image counts, using
``numpy.random.default_rng(seed)``, independent of the image bytes, so every method is scored on the same
episodes. Sampling follows RFS (WangYueFt/rfs ``MetaCIFAR100``): classes without replacement, then per
class ``n_shot`` support and ``n_query`` query images without replacement.

Published files (``splits/episodes/<dataset>-<variant>/<split>_<n>w<k>s<q>q_<E>.npz``) are sha256-checked
against ``splits/MANIFEST.json``. Episodes are generated sequentially, so the first N episodes of a
published file equal a generation with ``n_episodes = N``. Published: 5-way 1- and 5-shot with 15 queries
(2,000 episodes) for every split, and the way/shot curve protocols (:data:`CURVE_WAYS` x :data:`CURVE_SHOTS`,
15 queries, :data:`CURVE_EPISODES` episodes) on the test splits that can host them.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError, ProtocolError
from ..protocol import EpisodeProtocol, can_host, check_capacity
from ..seeding import numpy_generator
from ..utils import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
EPISODE_SEED = 0
PROTOCOL = "rfs-v1: classes w/o replacement, then per class n_shot+n_query images w/o replacement, support first"
PUBLISHED_EPISODES = 2000
PUBLISHED_SHOTS = (1, 5)
PUBLISHED_WAY = 5
PUBLISHED_QUERY = 15
CURVE_WAYS = (5, 10, 20)
CURVE_SHOTS = (1, 2, 5, 10, 20)
CURVE_EPISODES = 600  # RFS's n_test_runs; the curves' CIs are tight enough at this count

#: dtypes of the episode arrays: class positions, image positions, and the split rows scoring maps them to
CLASS_DTYPE, IMAGE_DTYPE, ROW_DTYPE = np.int16, np.uint16, np.int64
#: dtypes of a probabilistic readout's query probabilities, and of the copy the calibration metrics take
PROB_DTYPE, PROB_METRIC_DTYPE = np.float32, np.float64

# Per-class image counts of the official data (and of a Tiny ImageNet subset with train_per_class: 100).
VARIANTS: Dict[Tuple[str, str], Dict[str, Tuple[int, ...]]] = {
    ("cifar_fs", "full"): {"val": (600,) * 16, "test": (600,) * 20},
    ("tiny_imagenet", "full"): {"val": (550,) * 40, "test": (550,) * 40},
    ("tiny_imagenet", "sub100"): {"val": (150,) * 40, "test": (150,) * 40},
}


@dataclass(frozen=True)
class Episodes:
    """E episodes: ``classes [E, n_way]``, ``images [E, n_way, n_shot+n_query]`` (support first).

    ``source`` is the relative path of the published file, or ``"generated"``; ``sha256`` identifies the
    episodes: the published file's sha256 (with the episode count of the protocol), or the sha256 of the
    generated arrays."""

    classes: np.ndarray
    images: np.ndarray
    n_shot: int
    n_query: int
    seed: int
    counts: Tuple[int, ...]
    source: str = "generated"
    file_sha256: str = ""

    @property
    def n_way(self) -> int:
        return int(self.classes.shape[1])

    @property
    def protocol(self) -> EpisodeProtocol:
        return EpisodeProtocol(self.n_way, self.n_shot, self.n_query, len(self), self.seed)

    @property
    def sha256(self) -> str:
        if self.file_sha256:
            return self.file_sha256
        h = hashlib.sha256(np.ascontiguousarray(self.classes.astype(np.int16)).tobytes())
        h.update(np.ascontiguousarray(self.images.astype(np.uint16)).tobytes())
        return h.hexdigest()

    def __len__(self) -> int:
        return int(self.classes.shape[0])

    def head(self, n: int) -> "Episodes":
        return Episodes(self.classes[:n], self.images[:n], self.n_shot, self.n_query, self.seed, self.counts,
                        self.source, self.file_sha256)

    def rows(self, class_offsets: np.ndarray) -> np.ndarray:
        """Map to split rows: ``offsets[class] + image position`` -> int64 ``[E, n_way, n_shot+n_query]``."""
        return np.asarray(class_offsets, dtype=ROW_DTYPE)[self.classes.astype(ROW_DTYPE)][..., None] \
            + self.images.astype(ROW_DTYPE)


def episode_array_bytes(protocol: EpisodeProtocol) -> int:
    """Bytes of the episode arrays of ``protocol``: class positions ``[E, n_way]`` (:data:`CLASS_DTYPE`) and
    image positions ``[E, n_way, n_shot + n_query]`` (:data:`IMAGE_DTYPE`)."""
    e, w, k = protocol.n_episodes, protocol.n_way, protocol.images_per_class
    return e * w * np.dtype(CLASS_DTYPE).itemsize + e * w * k * np.dtype(IMAGE_DTYPE).itemsize


def readout_bytes(protocol: EpisodeProtocol, probabilities: bool = True) -> int:
    """Bytes one readout holds at once while it scores ``protocol``'s episodes: the split rows
    ``[E, n_way, n_shot + n_query]`` (:data:`ROW_DTYPE`), the per-episode accuracy (float64) and, when
    ``probabilities``, the query probabilities ``[E, n_way * n_query, n_way]`` (:data:`PROB_DTYPE`) with the
    copy the calibration metrics take (:data:`PROB_METRIC_DTYPE`)."""
    e, w, k, q = protocol.n_episodes, protocol.n_way, protocol.images_per_class, protocol.n_query
    out = e * w * k * np.dtype(ROW_DTYPE).itemsize + e * 8
    if probabilities:
        out += e * w * q * w * (np.dtype(PROB_DTYPE).itemsize + np.dtype(PROB_METRIC_DTYPE).itemsize)
    return out


def check_episode_memory(protocols: Sequence[EpisodeProtocol], option: str = "n_episodes",
                         probabilities: bool = True, fix: str = "") -> None:
    """Refuse, before anything is decoded or allocated, protocols whose episodes cannot be scored in this
    machine's available memory (:func:`fsl_lsskd.bounds.check_memory`): the episode arrays of every protocol
    (:func:`episode_array_bytes`, all held at once) plus what one readout holds for the largest
    (:func:`readout_bytes`). Raises :class:`~fsl_lsskd.errors.ConfigError` with the estimate; ``option`` names
    the setting to lower (``--n-episodes``, ``eval.n_episodes``)."""
    from ..bounds import check_memory

    protocols = list(protocols)
    if not protocols:
        return
    need = sum(episode_array_bytes(p) for p in protocols) + max(readout_bytes(p, probabilities) for p in protocols)
    big = max(protocols, key=lambda p: (p.n_episodes, readout_bytes(p, probabilities)))
    held = "image positions, split rows" + (" and query probabilities" if probabilities else "")
    what = (f"{option} {big.n_episodes}: {big.n_episodes:,} episodes of {big.label} with {big.n_query} queries per "
            f"class ({held}{', with the other protocols' if len(protocols) > 1 else ''})")
    check_memory(need, what, fix or f"lower {option} (the published protocols use {PUBLISHED_EPISODES:,} "
                                     f"episodes; {CURVE_EPISODES} for the way/shot curves)")


def generate_episodes(protocol: EpisodeProtocol, counts: Sequence[int]) -> Episodes:
    """Episodes as a pure function of ``protocol`` and the per-class ``counts``
    (the ``eval_episodes`` stream: ``numpy.random.default_rng(protocol.seed)``). Raises :class:`ProtocolError`
    when the counts cannot host it, and :class:`~fsl_lsskd.errors.ConfigError` when its episodes would not fit in
    the available memory."""
    counts = tuple(int(c) for c in counts)
    check_capacity(counts, protocol)
    if max(counts) > np.iinfo(IMAGE_DTYPE).max or len(counts) > np.iinfo(CLASS_DTYPE).max:
        raise ProtocolError("episode files store uint16 image / int16 class positions; split too large")
    check_episode_memory([protocol], probabilities=False)
    rng = numpy_generator("eval_episodes", protocol.seed)
    k = protocol.images_per_class
    classes = np.empty((protocol.n_episodes, protocol.n_way), dtype=CLASS_DTYPE)
    images = np.empty((protocol.n_episodes, protocol.n_way, k), dtype=IMAGE_DTYPE)
    num_classes = len(counts)
    for e in range(protocol.n_episodes):
        cls = rng.choice(num_classes, size=protocol.n_way, replace=False)
        classes[e] = cls
        for w, c in enumerate(cls):
            images[e, w] = rng.choice(counts[c], size=k, replace=False)
    return Episodes(classes, images, protocol.n_shot, protocol.n_query, protocol.seed, counts)


def episode_relpath(dataset: str, variant: str, split: str, protocol: EpisodeProtocol) -> str:
    """``episodes/<dataset>-<variant>/<split>_<n>w<k>s<q>q_<E>.npz``."""
    return f"episodes/{dataset}-{variant}/{split}_{protocol.key}_{protocol.n_episodes}.npz"


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


def published_protocols(split: str, counts: Sequence[int]) -> List[EpisodeProtocol]:
    """The protocols published for a split with per-class ``counts``: 5-way 1/5-shot (2,000 episodes) on every
    split, and the way/shot curves (600 episodes) on test splits, where the counts can host them."""
    out = [EpisodeProtocol(PUBLISHED_WAY, k, PUBLISHED_QUERY, PUBLISHED_EPISODES, EPISODE_SEED)
           for k in PUBLISHED_SHOTS]
    if split == "test":
        out += [EpisodeProtocol(w, k, PUBLISHED_QUERY, CURVE_EPISODES, EPISODE_SEED)
                for w in CURVE_WAYS for k in CURVE_SHOTS
                if (w, k) not in [(PUBLISHED_WAY, s) for s in PUBLISHED_SHOTS]]
    return [p for p in out if can_host(counts, p)]


def publish_all() -> list:
    """Maintainer tool: (re)generate every published episode file and record its sha256 in the manifest."""
    from ..data.splits import splits_dir, update_manifest

    rels = []
    for (dataset, variant), per_split in VARIANTS.items():
        for split, counts in per_split.items():
            for protocol in published_protocols(split, counts):
                ep = generate_episodes(protocol, counts)
                rel = episode_relpath(dataset, variant, split, protocol)
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


def published_file(dataset: str, split: str, counts: Sequence[int], protocol: EpisodeProtocol) -> Optional[str]:
    """The published file (relative to ``splits/``) holding ``protocol``'s episodes for this split, or None."""
    variant = find_variant(dataset, split, counts)
    if variant is None or protocol.seed != EPISODE_SEED:
        return None
    for pub in published_protocols(split, counts):
        if (pub.n_way, pub.n_shot, pub.n_query) == (protocol.n_way, protocol.n_shot, protocol.n_query) \
                and protocol.n_episodes <= pub.n_episodes:
            return episode_relpath(dataset, variant, split, pub)
    return None


def load_episodes(dataset: str, split: str, counts: Sequence[int], protocol: EpisodeProtocol,
                  class_names: Optional[Sequence[str]] = None) -> Episodes:
    """The standard episodes of ``protocol`` for a split: the published file (sha256-verified; its first
    ``n_episodes``) when the per-class counts match a published variant, else generated from the protocol's
    seed (logged; results are then comparable only with runs on the same data). Raises
    :class:`ProtocolError` (short classes named) when the split cannot host the protocol."""
    counts = tuple(int(c) for c in counts)
    check_capacity(counts, protocol, class_names or (), where=f"{dataset} {split}")
    fixed = _fixed_episodes(dataset, split, counts, protocol)
    if fixed is not None:
        return fixed
    rel = published_file(dataset, split, counts, protocol)
    if rel is not None:
        from ..data.splits import read_manifest, verified_path

        ep, meta = read_episode_file(verified_path(rel))
        if tuple(meta["counts"]) != counts or meta["seed"] != protocol.seed or meta["n_way"] != protocol.n_way:
            raise DataError(f"episode file splits/{rel} does not describe {dataset} {split} (counts/seed differ); "
                            "restore it with `git checkout -- splits/`")
        ep = Episodes(ep.classes, ep.images, ep.n_shot, ep.n_query, ep.seed, ep.counts, f"splits/{rel}",
                      read_manifest()[rel])
        return ep.head(protocol.n_episodes)
    log.info("no published episodes for %s %s (%d classes, per-class counts %s) with %s x%d seed %d: generated "
             "from the seed", dataset, split, len(counts), _summarise(counts), protocol.key, protocol.n_episodes,
             protocol.seed)
    return generate_episodes(protocol, counts)


def _fixed_episodes(dataset: str, split: str, counts: Tuple[int, ...], protocol: EpisodeProtocol
                    ) -> Optional[Episodes]:
    """The episodes a dataset defines itself (``fixed_episode_arrays``, e.g. Omniglot's official one-shot runs),
    or None for datasets whose episodes are sampled."""
    from ..registry import DATASETS

    cls = DATASETS.get(dataset) if dataset in DATASETS else None
    arrays = getattr(cls, "fixed_episode_arrays", None)
    if arrays is None:
        return None
    classes, images = arrays(split, protocol)
    return Episodes(classes, images, protocol.n_shot, protocol.n_query, protocol.seed, counts,
                    f"{dataset} (fixed episodes of the dataset)")


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
