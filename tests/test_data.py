"""Data layer: official-format readers (generated archives), cache, splits, resize, limited-data protocol."""
from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fsl_lsskd.data import check_min_images, get_dataset
from fsl_lsskd.data import splits as sp
from fsl_lsskd.data.base import SplitData
from fsl_lsskd.data.fake import CIFAR100_FINE, write_fake_cifar100, write_fake_tiny_imagenet
from fsl_lsskd.data.limited import stratified_fraction
from fsl_lsskd.errors import ConfigError, DataError
from fsl_lsskd.utils import cache_dir, project_root

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory) -> Path:
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar"), per_class_train=4, per_class_test=2, seed=1)


@pytest.fixture(scope="module")
def fake_tiny(tmp_path_factory) -> Path:
    return write_fake_tiny_imagenet(tmp_path_factory.mktemp("tiny"), per_class_train=3, per_class_val=2, seed=2)


def _cache_files():
    return sorted(p for p in cache_dir().rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------ splits
def test_cifar_fs_split_matches_anchors_and_meta():
    split = sp.standard_split("cifar_fs")
    assert [len(split[s]) for s in ("train", "val", "test")] == [64, 16, 20]
    anchors = {"val": "beaver, beetle, butterfly, camel, cattle, crab, crocodile, flatfish, lamp, maple_tree, "
                      "motorcycle, otter, sea, shark, television, tractor",
               "test": "baby, bed, bicycle, chimpanzee, fox, leopard, man, pickup_truck, plain, poppy, rocket, rose, "
                       "snail, sweet_pepper, table, telephone, wardrobe, whale, woman, worm"}
    for s, text in anchors.items():
        assert sorted(split[s]) == sorted(text.split(", "))
    union = set(split["train"]) | set(split["val"]) | set(split["test"])
    assert union == set(CIFAR100_FINE) and len(union) == 100


def test_tiny_split_is_reproducible_from_seed():
    split = sp.standard_split("tiny_imagenet")
    assert [len(split[s]) for s in ("train", "val", "test")] == [120, 40, 40]
    wnids = [w for s in ("test", "train", "val") for w in split[s]]  # any order: the generator sorts
    assert sp.make_tiny_imagenet_split(wnids, seed=sp.TINY_SPLIT_SEED) == split
    assert sp.make_tiny_imagenet_split(wnids, seed=1) != split
    readme = (project_root() / "splits" / "tiny_imagenet" / "README.md").read_text()
    assert "NOT a standard" in readme and "seed" in readme


def test_manifest_lists_every_split_file_with_its_sha256():
    manifest = sp.read_manifest()
    for d in ("cifar_fs", "tiny_imagenet"):
        for s in ("train", "val", "test"):
            assert sp.verified_path(f"{d}/{s}.txt").is_file()
            assert f"{d}/{s}.txt" in manifest


@pytest.fixture
def splits_copy(tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "splits"
    shutil.copytree(project_root() / "splits", copy)
    monkeypatch.setattr(sp, "splits_dir", lambda: copy)
    return copy


def test_modified_split_file_is_rejected_naming_the_file(splits_copy):
    f = splits_copy / "cifar_fs" / "test.txt"
    f.write_text(f.read_text().replace("fox", "wolf"))
    with pytest.raises(DataError, match=r"splits/cifar_fs/test.txt was modified"):
        sp.verified_path("cifar_fs/test.txt")
    (splits_copy / "cifar_fs" / "val.txt").unlink()
    with pytest.raises(DataError, match="missing"):
        sp.verified_path("cifar_fs/val.txt")


def test_update_manifest_adds_new_files(splits_copy):
    (splits_copy / "test_new").mkdir()
    (splits_copy / "test_new" / "x.json").write_text("{}")
    with pytest.raises(DataError, match="not listed"):
        sp.verified_path("test_new/x.json")
    files = sp.update_manifest(["test_new/x.json"])
    assert "test_new/x.json" in files and "cifar_fs/train.txt" in files
    assert sp.verified_path("test_new/x.json") == splits_copy / "test_new" / "x.json"


def test_load_split_file_json_and_txt(tmp_path):
    j = tmp_path / "s.json"
    j.write_text(json.dumps({"train": ["a", "b"], "val": ["c"], "test": ["d"]}))
    assert sp.load_split_file(j)["train"] == ["a", "b"]
    d = tmp_path / "txt"
    d.mkdir()
    for s, names in (("train", "a\nb\n"), ("val", "c\n"), ("test", "d\n")):
        (d / f"{s}.txt").write_text(names)
    assert sp.load_split_file(d) == sp.load_split_file(j)
    j.write_text(json.dumps({"train": ["a"], "val": ["a"], "test": []}))
    with pytest.raises(DataError, match="both"):
        sp.load_split_file(j)


# ---------------------------------------------------------------------------------------------- CIFAR-FS
def test_fake_cifar_is_official_format(fake_cifar):
    with tarfile.open(fake_cifar) as tar:
        names = sorted(tar.getnames())
        train = pickle.load(tar.extractfile("cifar-100-python/train"), encoding="bytes")
        meta = pickle.load(tar.extractfile("cifar-100-python/meta"), encoding="latin1")
    assert names == ["cifar-100-python/meta", "cifar-100-python/test", "cifar-100-python/train"]
    assert set(train) == {b"data", b"fine_labels", b"coarse_labels", b"filenames", b"batch_label"}
    assert train[b"data"].shape == (400, 3072) and train[b"data"].dtype == np.uint8
    assert meta["fine_label_names"] == CIFAR100_FINE and len(meta["coarse_label_names"]) == 20


def test_cifar_fs_pools_train_and_test_in_split_order(fake_cifar):
    ds = get_dataset("cifar_fs", archive=fake_cifar)
    split = sp.standard_split("cifar_fs")
    with tarfile.open(fake_cifar) as tar:
        raw = pickle.load(tar.extractfile("cifar-100-python/train"), encoding="bytes")
    for name in ("train", "val", "test"):
        s = ds.load_split(name)
        assert s.class_names == tuple(split[name]) and s.images.shape[1:] == (32, 32, 3)
        assert (s.class_counts() == 6).all()
        assert (np.diff(s.labels) >= 0).all()  # grouped by class
    # image 0 of class c = first official train row of c, R/G/B planes -> HWC
    s = ds.load_split("test")
    c = CIFAR100_FINE.index(s.class_names[0])
    row = raw[b"data"][np.asarray(raw[b"fine_labels"]) == c][0]
    np.testing.assert_array_equal(s.images[0], row.reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar_from_extracted_folder_and_data_root(fake_cifar, tmp_path):
    with tarfile.open(fake_cifar) as tar:
        tar.extractall(tmp_path)
    a = get_dataset("cifar_fs", archive=tmp_path / "cifar-100-python").load_split("val")
    b = get_dataset("cifar_fs", root=tmp_path).load_split("val")  # data root holding the folder
    c = get_dataset("cifar_fs", root=fake_cifar.parent).load_split("val")  # data root holding the archive
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.images, c.images)


def test_cache_is_used_and_keyed_by_source(fake_cifar, tmp_path, monkeypatch):
    import shutil

    arch = tmp_path / "cifar-100-python.tar.gz"
    shutil.copy(fake_cifar, arch)
    ds = get_dataset("cifar_fs", archive=arch)
    first = ds.load_split("train")
    files = _cache_files()
    assert files and all(str(cache_dir()) in str(p) for p in files)
    assert not any(p.name.endswith(".tmp") for p in files)
    assert not list((REPO / "fsl_lsskd").rglob("*.npy"))

    ds2 = get_dataset("cifar_fs", archive=arch)
    with monkeypatch.context() as m:  # not monkeypatch.undo(): that would also undo the isolated cache dir
        m.setattr(type(ds2), "decode_classes", lambda self, names: pytest.fail("decoded despite cache"))
        again = ds2.load_split("train", mmap=True)
    np.testing.assert_array_equal(first.images, again.images)
    assert first.fingerprint == again.fingerprint

    os.utime(arch, ns=(1, 1))  # a changed source invalidates the entry ...
    ds3 = get_dataset("cifar_fs", archive=arch)
    assert not ds3.is_cached("train")
    # ... but identical content decodes to the same fingerprint, so checkpoints made from it still resume
    assert ds3.load_split("train").fingerprint == first.fingerprint


def test_check_min_images_lists_offending_classes():
    s = SplitData(np.zeros((7, 4, 4, 3), np.uint8), np.array([0, 0, 0, 1, 2, 2, 2]), ("a", "b", "c"), "x", "test")
    check_min_images(s, 1)
    with pytest.raises(DataError, match=r"fewer than 3 images.*b \(1\)") as e:
        check_min_images(s, 3)
    assert "a (" not in str(e.value)


# ----------------------------------------------------------------------------------------- Tiny ImageNet
def test_fake_tiny_is_official_layout(fake_tiny):
    with zipfile.ZipFile(fake_tiny) as z:
        names = set(z.namelist())
        wnids = z.read("tiny-imagenet-200/wnids.txt").decode().split()
        ann = z.read("tiny-imagenet-200/val/val_annotations.txt").decode().splitlines()
        w = wnids[0]
        assert f"tiny-imagenet-200/train/{w}/images/{w}_0.JPEG" in names
        assert f"tiny-imagenet-200/train/{w}/{w}_boxes.txt" in names
        assert "tiny-imagenet-200/words.txt" in names
    assert len(wnids) == 200 and len(ann) == 400 and ann[0].split("\t")[0] == "val_0.JPEG"


def test_tiny_pools_train_and_val_and_converts_grey(fake_tiny):
    from PIL import Image

    ds = get_dataset("tiny_imagenet", archive=fake_tiny)
    s = ds.load_split("val")
    assert s.num_classes == 40 and len(s) == 200 and (s.class_counts() == 5).all()
    assert s.images.shape[1:] == (64, 64, 3)
    grey = (s.images[..., 0] == s.images[..., 1]).all(axis=(1, 2)) & (s.images[..., 1] == s.images[..., 2]).all(axis=(1, 2))
    assert grey.any() and not grey.all()
    # image 3 of class 0 is its first val image (after 3 train images), by val_annotations.txt
    w = s.class_names[0]
    with zipfile.ZipFile(fake_tiny) as z:
        ann = [l.split("\t") for l in z.read("tiny-imagenet-200/val/val_annotations.txt").decode().splitlines()]
        first = min((a[0] for a in ann if a[1] == w), key=lambda n: int(n[4:-5]))
        ref = np.asarray(Image.open(io.BytesIO(z.read(f"tiny-imagenet-200/val/images/{first}"))).convert("RGB"))
    np.testing.assert_array_equal(s.images[3], ref)


def test_tiny_images_carry_class_signal(fake_tiny):
    s = get_dataset("tiny_imagenet", archive=fake_tiny).load_split("train")
    means = np.stack([s.images[s.labels == c].reshape(-1, 3).mean(0) for c in range(s.num_classes)])
    assert means.std(axis=0).min() > 10  # class colours differ


def test_tiny_decode_uses_workers_consistently(fake_tiny):
    a = get_dataset("tiny_imagenet", archive=fake_tiny, workers=1).decode_split("test")
    b = get_dataset("tiny_imagenet", archive=fake_tiny, workers=2).decode_split("test")
    np.testing.assert_array_equal(a.images, b.images)


# --------------------------------------------------------------------------------------------- image_folder
def _write_folder(root: Path, classes=("cat", "dog", "fox", "owl"), n=3, size=(50, 30)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for j in range(n):
            img = np.full((size[1], size[0], 3), 40 * i, np.uint8) + rng.integers(0, 10, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(img).save(root / c / f"{j}.{'png' if j % 2 else 'jpg'}")
    return root


def test_image_folder_with_json_and_size(tmp_path):
    root = _write_folder(tmp_path / "imgs")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["dog", "cat"], "val": ["fox"], "test": ["owl"]}))
    ds = get_dataset("image_folder", root=root, split_file=split, image_size=24)
    s = ds.load_split("train")
    assert s.images.shape == (6, 24, 24, 3) and s.class_names == ("dog", "cat")
    assert abs(float(s.images[s.labels == 1].mean()) - 4.5) < 3  # "cat" = colour 0 (+ noise)
    assert ds.verify()["split_classes"] == {"train": 2, "val": 1, "test": 1}
    s64 = get_dataset("image_folder", root=root, split_file=split).load_split("test")
    assert s64.images.shape[1:] == (64, 64, 3)


# -------------------------------------------------------------------------------------- resize / limited
def test_resized_is_antialiased_uint8():
    img = np.zeros((2, 64, 64, 3), np.uint8)
    img[:, ::2] = 255  # 1-pixel stripes average to grey when downsampled with antialiasing
    s = SplitData(img, np.array([0, 1]), ("a", "b"), "x", "train", "fp")
    r = s.resized(32)
    assert r.images.shape == (2, 32, 32, 3) and r.images.dtype == np.uint8
    assert 100 < r.images.mean() < 155 and r.images.std() < 5
    assert s.resized(64) is s and r.fingerprint != s.fingerprint


def test_stratified_fraction():
    labels = np.repeat(np.arange(4), [8, 4, 20, 2])
    idx = stratified_fraction(labels, 0.5)
    assert np.bincount(labels[idx]).tolist() == [4, 2, 10, 1]
    assert (idx == stratified_fraction(labels, 0.5)).all()  # a fixed random_state, as HSAKD
    assert not (idx == stratified_fraction(labels, 0.5, random_state=1)).all()
    assert (stratified_fraction(labels, 1.0) == np.arange(len(labels))).all()
    with pytest.raises(ConfigError, match="leaves 1 classes without a training image"):
        stratified_fraction(labels, 0.25)  # 8 of 34 images: the class of 2 gets none
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError):
            stratified_fraction(labels, bad)


def test_tiny_from_extracted_folder_matches_zip(fake_tiny, tmp_path):
    with zipfile.ZipFile(fake_tiny) as z:
        z.extractall(tmp_path)
    a = get_dataset("tiny_imagenet", archive=fake_tiny).load_split("test")
    b = get_dataset("tiny_imagenet", root=tmp_path).load_split("test")  # data root holding tiny-imagenet-200/
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)


# ---------------------------------------------------------------------------------------- train_per_class
# The principle: train_per_class=N on an archive A with M > N train images per class reads exactly what an
# archive B holding the first N of each class of A (official order, same val/test part) holds: same decoded
# content and fingerprint on every split, same episodes, same evaluation numbers.
def _splits(ds):
    return {s: ds.load_split(s) for s in ("train", "val", "test")}


def _scores(split):
    import torch

    from fsl_lsskd.backbones import create_backbone
    from fsl_lsskd.eval import evaluate

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = create_backbone("conv4", image_size=32).eval()
    res = evaluate(net, split, protocols=["5w1s3q_20"], readouts=["protonet", "logreg_batched"], image_size=32,
                   cache=False)  # no feature cache: equal numbers must come from equal inputs, not from a cache hit
    return [(r.label, r.episodes_source, r.episodes_sha256, r.accuracy, r.nll, r.brier) for r in res]


def _assert_same_scores(a, b):
    assert len(a) == len(b) == 2
    for (la, sa, ha, *xa), (lb, sb, hb, *xb) in zip(a, b):
        assert (la, sa, ha) == (lb, sb, hb)
        for u, v in zip(xa, xb):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("dataset", ["tiny_imagenet", "cifar_fs"])
def test_train_per_class_reads_the_first_n_of_the_official_order(tmp_path, dataset):
    from fsl_lsskd.data.fake import first_per_class
    from fsl_lsskd.eval.episodes import load_episodes
    from fsl_lsskd.protocol import EpisodeProtocol

    if dataset == "tiny_imagenet":
        a = write_fake_tiny_imagenet(tmp_path / "a", per_class_train=6, per_class_val=2, seed=3, size=32)
    else:
        a = write_fake_cifar100(tmp_path / "a", per_class_train=6, per_class_test=2, seed=3)
    b = first_per_class(a, 4, tmp_path / "b")
    cut = _splits(get_dataset(dataset, archive=a, train_per_class=4))
    ref = _splits(get_dataset(dataset, archive=b))
    full = _splits(get_dataset(dataset, archive=a))
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(cut[s].images, ref[s].images)
        np.testing.assert_array_equal(cut[s].labels, ref[s].labels)
        assert cut[s].class_names == ref[s].class_names
        assert cut[s].fingerprint == ref[s].fingerprint
        assert (cut[s].class_counts() == 6).all()  # 4 train + 2 val/test images per class
        assert full[s].fingerprint != cut[s].fingerprint  # the option does change the content
    # the same N = 4 from B itself changes nothing
    assert _splits(get_dataset(dataset, archive=b, train_per_class=4))["test"].fingerprint == ref["test"].fingerprint
    p = EpisodeProtocol(5, 1, 3, 20)
    ea = load_episodes(dataset, "test", cut["test"].class_counts(), p)
    eb = load_episodes(dataset, "test", ref["test"].class_counts(), p)
    assert ea.source == eb.source and ea.sha256 == eb.sha256
    np.testing.assert_array_equal(ea.images, eb.images)
    _assert_same_scores(_scores(cut["test"]), _scores(ref["test"]))


@pytest.mark.parametrize("dataset", ["tiny_imagenet", "cifar_fs"])
def test_train_per_class_larger_than_a_class_lists_the_short_classes(tmp_path, dataset):
    from fsl_lsskd.data.fake import first_per_class

    if dataset == "tiny_imagenet":
        a = write_fake_tiny_imagenet(tmp_path / "a", per_class_train=5, per_class_val=1, seed=3, size=16)
        short = sp.standard_split("tiny_imagenet")["train"][:2] + sp.standard_split("tiny_imagenet")["test"][:1]
    else:
        a = write_fake_cifar100(tmp_path / "a", per_class_train=5, per_class_test=1, seed=3)
        short = ["apple", "tulip", "whale"]
    b = first_per_class(a, 5, tmp_path / "b", counts={short[0]: 3, short[1]: 4, short[2]: 2})
    get_dataset(dataset, archive=b, train_per_class=2).load_split("val")  # every class has 2
    before = _cache_files()
    with pytest.raises(DataError) as e:
        get_dataset(dataset, archive=b, train_per_class=4).load_split("train")
    msg = str(e.value)
    assert f"train_per_class 4: 2 classes of {b} have fewer train images" in msg
    assert f"{short[0]} (3)" in msg and f"{short[2]} (2)" in msg and short[1] not in msg
    assert "lower --train-per-class N" in msg and "shortest class has 2" in msg
    assert _cache_files() == before  # refused before anything was decoded or cached


@pytest.mark.slow
def test_train_per_class_100_on_the_real_subset_changes_nothing(shared_data):
    """The published subset has 100 train images per class: train_per_class=100 must read it unchanged."""
    from fsl_lsskd.eval.episodes import load_episodes
    from fsl_lsskd.protocol import EpisodeProtocol

    z = shared_data / "tiny-imagenet-200-sub100.zip"
    plain = get_dataset("tiny_imagenet", archive=z)
    cut = get_dataset("tiny_imagenet", archive=z, train_per_class=100)
    for s in ("train", "val", "test"):
        a, b = plain.load_split(s, mmap=True), cut.load_split(s, mmap=True)
        assert a.fingerprint == b.fingerprint and len(a) == len(b)
    counts = cut.split_counts("test")
    ep = load_episodes("tiny_imagenet", "test", counts, EpisodeProtocol(5, 1, 15, 2000))
    assert ep.source.startswith("splits/episodes/")  # the published episodes, chosen by the same counts
