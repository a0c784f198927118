"""Omniglot's 20 official one-shot classification runs (Lake, Salakhutdinov & Tenenbaum, "Human-level concept
learning through probabilistic program induction", Science 2015; brendenlake/omniglot
``python/one-shot-classification/all_runs.zip``), read from the archive as published.

Each run ``runNN`` holds 20 training images ``training/class01.png .. class20.png`` (one drawing of each of 20
characters of one alphabet) and 20 test images ``test/item01.png .. item20.png`` (another drawing of each);
``class_labels.txt`` pairs every test item with its training class. A run is a 20-way 1-shot episode with one
query per class; the paper reports the error rate over the 20 runs (people 4.5 %, Bayesian program learning
3.3 %, a deep Siamese network 8.0 %).

As a dataset: only a ``test`` split, 400 classes ``runNN/classMM`` (20 runs x 20 characters), each with two
images in this order: the training drawing (the support) and its test item (the query). The 20 episodes are
fixed (:meth:`OmniglotRuns.fixed_episodes`), not sampled: protocol ``20w1s1q`` with 20 episodes. Images are the
105x105 binary PNGs converted to RGB (white background, black strokes); readouts resize them to the backbone's
input size.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import zipfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from ..errors import DataError
from ..protocol import EpisodeProtocol
from ..registry import DATASETS
from .base import CachedDataset
from .sources import check_md5, refuse_other_dataset, resolve_source

URL = "https://github.com/brendenlake/omniglot/raw/master/python/one-shot-classification/all_runs.zip"
MD5 = "e8996daecdf12afeeb4a53a179f06b19"
ARCHIVE_NAME = "all_runs.zip"
FOLDER_NAME = "all_runs"
N_RUNS, N_WAY = 20, 20
PROTOCOL = EpisodeProtocol(n_way=N_WAY, n_shot=1, n_query=1, n_episodes=N_RUNS, seed=0)
_RUN = re.compile(r"^run(\d+)/")


def _is_folder(p: Path) -> bool:
    return p.is_dir() and (p / "run01" / "class_labels.txt").is_file()


@DATASETS.register("omniglot_runs")
class OmniglotRuns(CachedDataset):
    """Omniglot's 20 official one-shot runs (Lake et al. 2015): 20 fixed 20-way 1-shot episodes, a test split only."""

    name = "omniglot_runs"
    image_size = 105
    # Omniglot statistics are irrelevant here: readouts normalise with the training dataset's mean/std
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    options = ()
    parts = ("test",)

    def __init__(self, root: Optional[os.PathLike] = None, archive: Optional[os.PathLike] = None,
                 download: bool = False, cache_dir: Optional[os.PathLike] = None, check_checksum: bool = False):
        super().__init__(cache_dir)
        self.source = resolve_source("Omniglot one-shot runs", root, archive, download, ARCHIVE_NAME, "all_runs*.zip",
                                     FOLDER_NAME, _is_folder, URL, MD5)
        if check_checksum and self.source.is_file():
            check_md5(self.source, MD5)
        self._pairs: Optional[Dict[str, List[str]]] = None

    # -- source
    @contextlib.contextmanager
    def _reader(self) -> Iterator[Callable[[str], bytes]]:
        """``read(rel) -> bytes`` for paths inside the source (the archive opened once); corrupt or incomplete
        sources raise :class:`DataError` naming the fix."""
        def fail(rel: str, exc: BaseException) -> DataError:
            return DataError(f"cannot read {rel} from {self.source} ({type(exc).__name__}: {exc}); the archive is "
                             f"corrupt or incomplete: download {URL} again (md5 {MD5})")

        if not self.source.is_file():
            def read_file(rel: str) -> bytes:
                try:
                    return (self.source / rel).read_bytes()
                except OSError as exc:
                    raise fail(rel, exc) from None

            yield read_file
            return
        try:
            z = zipfile.ZipFile(self.source)
        except (zipfile.BadZipFile, OSError) as exc:
            raise fail("the archive", exc) from None
        with z:
            tops = [n[: -len("run01/class_labels.txt")] for n in z.namelist() if n.endswith("run01/class_labels.txt")]
            if not tops:
                refuse_other_dataset(self.source, ARCHIVE_NAME, z.namelist())  # another dataset's zip: say which
                raise DataError(f"{self.source} has no run01/class_labels.txt: it is not Omniglot's all_runs.zip; "
                                f"download {URL}")
            prefix = min(tops, key=len)

            def read_member(rel: str) -> bytes:
                try:
                    return z.read(prefix + rel)
                except (zipfile.BadZipFile, KeyError, OSError, EOFError) as exc:
                    raise fail(rel, exc) from None

            yield read_member

    def pairs(self) -> Dict[str, List[str]]:
        """class ``runNN/classMM`` -> [training image, test item] (paths inside the source), from
        ``class_labels.txt``; raises :class:`DataError` when a run does not pair every class with one item."""
        if self._pairs is None:
            pairs: Dict[str, List[str]] = {}
            with self._reader() as read:
                texts = [read(f"run{r:02d}/class_labels.txt").decode() for r in range(1, N_RUNS + 1)]
            for r, text in enumerate(texts, start=1):
                run = f"run{r:02d}"
                lines = [ln.split() for ln in text.splitlines() if ln.strip()]
                items = {}
                for item, cls in lines:
                    items.setdefault(cls, []).append(item)
                classes = [f"{run}/training/class{c:02d}.png" for c in range(1, N_WAY + 1)]
                bad = [c for c in classes if len(items.get(c, [])) != 1]
                if len(lines) != N_WAY or bad:
                    raise DataError(f"{self.source}: {run}/class_labels.txt does not pair each of its {N_WAY} classes "
                                    f"with one test item ({', '.join(bad[:3])}); download {URL} again")
                for c in classes:
                    pairs[c[: -len(".png")].replace("/training/", "/")] = [c, items[c][0]]
            self._pairs = pairs
        return self._pairs

    def class_split(self) -> Dict[str, List[str]]:
        names = [f"run{r:02d}/class{c:02d}" for r in range(1, N_RUNS + 1) for c in range(1, N_WAY + 1)]
        return {"train": [], "val": [], "test": names}

    def inventory(self) -> Dict[str, Dict[str, int]]:
        return {c: {"test": len(v)} for c, v in self.pairs().items()}

    def image_names(self, names: Sequence[str]) -> List[List[str]]:
        """Each class's training drawing and test item (``runNN/training/classMM.png``, ``runNN/test/itemKK.png``)."""
        pairs = self.pairs()
        return [list(pairs[n]) for n in names]

    def decode_classes(self, names: Sequence[str]) -> List[np.ndarray]:
        pairs = self.pairs()
        out = []
        with self._reader() as read:
            for n in names:
                out.append(np.stack([self._decode(read, rel) for rel in pairs[n]]))
        return out

    def _decode(self, read: Callable[[str], bytes], rel: str) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(read(rel))) as im:
                im = im.convert("RGB")
                if im.size != (self.image_size, self.image_size):
                    im = im.resize((self.image_size, self.image_size), Image.BICUBIC)
                return np.asarray(im)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"image {rel} in {self.source} fails to decode ({exc}); download {URL} again") from None

    # -- the fixed episodes
    @staticmethod
    def fixed_protocols() -> List[EpisodeProtocol]:
        """The only protocol of this dataset: 20-way 1-shot, one query per class, the 20 runs."""
        return [PROTOCOL]

    @staticmethod
    def fixed_episode_arrays(split: str, protocol: EpisodeProtocol):
        """The 20 runs over the test split, as the episode arrays of :mod:`fsl_lsskd.eval.episodes`:
        ``(classes [20, 20] int16, images [20, 20, 2] uint16)`` (run r = class positions ``20r .. 20r+19``;
        image position 0 = the training drawing (support), 1 = the test item (query)). Raises
        :class:`DataError` for another split or protocol."""
        if split != "test" or protocol.replace(n_episodes=N_RUNS) != PROTOCOL or protocol.n_episodes > N_RUNS:
            raise DataError(f"omniglot_runs has one fixed protocol, {PROTOCOL.key} on the test split with "
                            f"{N_RUNS} episodes (the official runs); got {protocol.key} x{protocol.n_episodes} on "
                            f"{split}")
        classes = (np.arange(N_RUNS)[:, None] * N_WAY + np.arange(N_WAY)[None]).astype(np.int16)
        images = np.broadcast_to(np.array([0, 1], dtype=np.uint16), (N_RUNS, N_WAY, 2)).copy()
        return classes[:protocol.n_episodes], images[:protocol.n_episodes]
