"""Writers of small datasets in the OFFICIAL archive formats, for tests and the smoke benchmark.

- :func:`write_fake_cifar100` -> ``cifar-100-python.tar.gz`` with ``cifar-100-python/{train,test,meta}``,
  protocol-2 pickles with Python-2 ``str`` keys (``encoding='bytes'`` gives ``b'data'``...), ``data``
  uint8 N x 3072 (R, G, B planes), the real 100 fine and 20 coarse label names.
- :func:`write_fake_tiny_imagenet` -> ``tiny-imagenet-200.zip`` with the official layout (``wnids.txt``,
  ``words.txt``, ``train/<wnid>/images/<wnid>_<i>.JPEG``, ``train/<wnid>/<wnid>_boxes.txt``,
  ``val/images/val_<k>.JPEG``, ``val/val_annotations.txt``), some JPEGs greyscale.

Images carry class-dependent signal (a class colour and stripe pattern plus noise), so a smoke training run
can learn something."""
from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..utils import atomic_path

CIFAR100_FINE = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm").split()
CIFAR100_COARSE = (
    "aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices "
    "household_furniture insects large_carnivores large_man-made_outdoor_things large_natural_outdoor_scenes "
    "large_omnivores_and_herbivores medium_mammals non-insect_invertebrates people reptiles small_mammals trees "
    "vehicles_1 vehicles_2").split()
# fine label -> coarse label, as in the official files
CIFAR100_FINE_TO_COARSE = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1,
    10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17, 10, 3, 2, 12,
    12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0,
    17, 8, 14, 13)


def class_images(class_index: int, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uint8 ``[size,size,3]`` images of a class: class colour x class stripe pattern + noise."""
    crng = np.random.default_rng(10_000 + class_index)  # class identity, independent of the sample seed
    colour = crng.uniform(40, 215, size=3)
    angle = crng.uniform(0, np.pi)
    freq = crng.uniform(1.0, 4.0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
    stripes = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy)[None] + phase)
    img = colour[None, None, None, :] * (0.75 + 0.25 * stripes[..., None])
    img = img + rng.normal(0, 18, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------------------------------- CIFAR-100
class _Py2Str(bytes):
    """Pickled as a Python-2 ``str`` (BINSTRING), like the official CIFAR pickles."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us add an opcode writer
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + bytes(obj))
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + bytes(obj))
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2str


def _py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _s(text: str) -> _Py2Str:
    return _Py2Str(text.encode("latin1"))


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_fake_cifar100(out_dir: os.PathLike, per_class_train: int = 5, per_class_test: int = 2,
                        seed: int = 0, name: str = "cifar-100-python.tar.gz",
                        copies: Optional[Mapping[Tuple[str, str, int], Tuple[str, str, int]]] = None) -> Path:
    """Write ``out_dir/cifar-100-python.tar.gz`` in the official layout with ``per_class_*`` images of each of
    the 100 fine classes (rows shuffled like the original). ``copies`` plants duplicates: ``{(part, class, k):
    (part, class, j)}`` gives the k-th row of ``class`` in ``part`` the pixels of the j-th row of the other (e.g.
    ``{("test", "fox", 0): ("train", "apple", 1)}``). Returns the archive path."""
    rng = np.random.default_rng(seed)
    parts = {}
    images, part_labels = {}, {}
    for part, per in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(100), per)
        order = rng.permutation(len(labels))
        labels = labels[order]
        imgs = np.empty((len(labels), 32, 32, 3), np.uint8)
        for c in range(100):
            m = labels == c
            imgs[m] = class_images(c, int(m.sum()), 32, rng)
        images[part], part_labels[part] = imgs, labels

    def row(part: str, cls: str, k: int) -> int:
        return int(np.flatnonzero(part_labels[part] == CIFAR100_FINE.index(cls))[k])

    for (dp, dc, dk), (sp, sc, sk) in (copies or {}).items():
        images[dp][row(dp, dc, dk)] = images[sp][row(sp, sc, sk)]
    for part in ("train", "test"):
        imgs, labels = images[part], part_labels[part]
        data = imgs.transpose(0, 3, 1, 2).reshape(len(labels), 3072)  # R, G, B planes
        parts[part] = {
            _s("filenames"): [_s(f"{CIFAR100_FINE[c]}_s_{i:06d}.png") for i, c in enumerate(labels)],
            _s("batch_label"): _s("training batch 1 of 1" if part == "train" else "testing batch 1 of 1"),
            _s("fine_labels"): [int(c) for c in labels],
            _s("coarse_labels"): [CIFAR100_FINE_TO_COARSE[c] for c in labels],
            _s("data"): np.ascontiguousarray(data),
        }
    meta = {_s("fine_label_names"): [_s(n) for n in CIFAR100_FINE],
            _s("coarse_label_names"): [_s(n) for n in CIFAR100_COARSE]}
    dest = Path(out_dir) / name
    with atomic_path(dest) as tmp:
        with tarfile.open(tmp, "w:gz") as tar:
            for part in ("train", "test"):
                _add_bytes(tar, f"cifar-100-python/{part}", _py2_pickle(parts[part]))
            _add_bytes(tar, "cifar-100-python/meta", _py2_pickle(meta))
    return dest


# ---------------------------------------------------------------------------------------------- Tiny ImageNet
def _default_wnids() -> List[str]:
    from .splits import standard_split

    return sorted(c for names in standard_split("tiny_imagenet").values() for c in names)


def _jpeg(img: np.ndarray, grey: bool) -> bytes:
    from PIL import Image

    im = Image.fromarray(img)
    if grey:
        im = im.convert("L")
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_fake_tiny_imagenet(out_dir: os.PathLike, wnids: Optional[Sequence[str]] = None, per_class_train: int = 3,
                             per_class_val: int = 2, seed: int = 0, name: str = "tiny-imagenet-200.zip",
                             grey_every: int = 7, size: int = 64, copies: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``out_dir/tiny-imagenet-200.zip`` in the official layout (default wnids: the 200 of our split).
    Every ``grey_every``-th image is a greyscale JPEG, as in the real data. ``copies`` plants byte-identical
    duplicates: ``{member: source}`` (paths inside ``tiny-imagenet-200/``, e.g. ``{"train/<w2>/images/<w2>_0.JPEG":
    "train/<w1>/images/<w1>_1.JPEG"}``) writes the source's bytes as the member. Returns the zip path."""
    wnids = list(wnids) if wnids is not None else _default_wnids()
    rng = np.random.default_rng(seed)
    dest = Path(out_dir) / name
    top = "tiny-imagenet-200/"
    count = 0
    members: List[Tuple[str, bytes, int]] = [  # (path inside top, bytes, compression), in archive order
        ("wnids.txt", "".join(w + "\n" for w in wnids).encode(), zipfile.ZIP_DEFLATED),
        ("words.txt", "".join(f"{w}\tfake class {i}, synthetic\n" for i, w in enumerate(wnids)).encode(),
         zipfile.ZIP_DEFLATED)]
    for c, w in enumerate(wnids):
        boxes = []
        for i, img in enumerate(class_images(c, per_class_train, size, rng)):
            members.append((f"train/{w}/images/{w}_{i}.JPEG", _jpeg(img, count % grey_every == 0), zipfile.ZIP_STORED))
            boxes.append(f"{w}_{i}.JPEG\t0\t0\t{size - 1}\t{size - 1}\n")
            count += 1
        members.append((f"train/{w}/{w}_boxes.txt", "".join(boxes).encode(), zipfile.ZIP_DEFLATED))
    val_labels = np.repeat(np.arange(len(wnids)), per_class_val)[rng.permutation(len(wnids) * per_class_val)]
    ann = []
    for k, c in enumerate(val_labels):
        img = class_images(int(c), 1, size, rng)[0]
        members.append((f"val/images/val_{k}.JPEG", _jpeg(img, count % grey_every == 0), zipfile.ZIP_STORED))
        ann.append(f"val_{k}.JPEG\t{wnids[c]}\t0\t0\t{size - 1}\t{size - 1}\n")
        count += 1
    members.append(("val/val_annotations.txt", "".join(ann).encode(), zipfile.ZIP_DEFLATED))
    if copies:
        data = {m: b for m, b, _ in members}
        unknown = sorted((set(copies) | set(copies.values())) - set(data))
        if unknown:
            raise ValueError(f"copies name files the archive does not have: {unknown}")
        members = [(m, data[copies[m]] if m in copies else b, how) for m, b, how in members]
    with atomic_path(dest) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
            for m, b, how in members:
                z.writestr(top + m, b, how)
    return dest


# ---------------------------------------------------------------------------------------- first N per class
def first_per_class(archive: os.PathLike, n: int, out_dir: os.PathLike,
                    counts: Optional[Mapping[str, int]] = None) -> Path:
    """Write into ``out_dir`` (same file name) a copy of the official-format ``archive``
    (``tiny-imagenet-200.zip`` or ``cifar-100-python.tar.gz``) whose TRAIN part keeps only the first ``n``
    images of every class in the official order (Tiny ImageNet ``<wnid>_<i>``, CIFAR-100 row order); ``counts``
    (class name -> k) keeps k of those classes instead. The val/test part is copied unchanged. This is what
    ``train_per_class=n`` reads from ``archive``; the published Tiny ImageNet subset was cut the same way."""
    src = Path(archive)
    dest = Path(out_dir) / src.name
    keep = dict(counts or {})
    if zipfile.is_zipfile(src):
        import re

        num = re.compile(r"/train/([^/]+)/images/\1_(\d+)\.[A-Za-z]+$")
        with zipfile.ZipFile(src) as zin, atomic_path(dest) as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zout:
                for info in zin.infolist():
                    data = zin.read(info)
                    m = num.search(info.filename)
                    if m and int(m.group(2)) >= keep.get(m.group(1), n):
                        continue
                    if info.filename.endswith("_boxes.txt"):
                        wnid = Path(info.filename).name[: -len("_boxes.txt")]
                        lines = [ln for ln in data.decode().splitlines(keepends=True)
                                 if int(ln.split("\t")[0].rsplit("_", 1)[1].split(".")[0]) < keep.get(wnid, n)]
                        data = "".join(lines).encode()
                    zout.writestr(info, data)
        return dest
    from .cifar_fs import read_cifar_pickle  # refuses any global an official CIFAR-100 pickle does not name

    with tarfile.open(src, "r:*") as tin:
        members = [(m, tin.extractfile(m).read()) for m in tin if m.isfile()]
    fine = None
    for m, data in members:
        if m.name.rsplit("/", 1)[-1] == "meta":
            fine = [x.decode() for x in read_cifar_pickle(data, "meta", src)[b"fine_label_names"]]
    with atomic_path(dest) as tmp:
        with tarfile.open(tmp, "w:gz") as tout:
            for m, data in members:
                if m.name.rsplit("/", 1)[-1] == "train":
                    d = read_cifar_pickle(data, "train", src)
                    labels = np.asarray(d[b"fine_labels"])
                    rank = np.zeros(len(labels), dtype=np.int64)
                    for c in np.unique(labels):
                        rank[labels == c] = np.arange(int((labels == c).sum()))
                    limit = np.array([keep.get(name, n) for name in fine])[labels]
                    rows = np.flatnonzero(rank < limit)
                    data = _py2_pickle({
                        _s("filenames"): [_Py2Str(d[b"filenames"][i]) for i in rows],
                        _s("batch_label"): _Py2Str(d[b"batch_label"]),
                        _s("fine_labels"): [int(labels[i]) for i in rows],
                        _s("coarse_labels"): [int(d[b"coarse_labels"][i]) for i in rows],
                        _s("data"): np.ascontiguousarray(np.asarray(d[b"data"])[rows]),
                    })
                _add_bytes(tout, m.name, data)
    return dest
