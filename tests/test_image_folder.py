"""A user's own images: the folder dataset's cache identity (every way the files a reader opens can change), the
image formats it reads, `fsl-bench data make-split image_folder`, and the whole flow make-split -> train ->
evaluate -> `fsl-bench run` on generated images and on images cut from the real Tiny ImageNet subset, with class
folder names holding spaces and non-ASCII characters."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from fsl_lsskd.cli import main
from fsl_lsskd.data import get_dataset
from fsl_lsskd.data.image_folder import image_extensions
from fsl_lsskd.data.sources import source_identity

SIZE = 8  # decoded image size of the identity tests: solid images decode to exactly their value


def solid(path: Path, value: int, fmt: str = "BMP", size: int = SIZE) -> Path:
    """A ``size``x``size`` image of one grey ``value`` (BMP: uncompressed, so same size for any value)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path, format=fmt)
    return path


def values(split, cls: str):
    """The grey value of every image of class ``cls`` (images are solid), in split order."""
    c = split.class_names.index(cls)
    imgs = np.asarray(split.images[split.labels == c])
    assert (imgs == imgs[:, :1, :1, :1]).all()
    return [int(v) for v in imgs[:, 0, 0, 0]]


@pytest.fixture
def folder(tmp_path):
    """root/{a,b,c}/ with 3 BMPs each (values 10*class + image), ``e`` a symlink to ../store/e1; split file."""
    root = tmp_path / "imgs"
    for ci, c in enumerate("abc"):
        for j in range(3):
            solid(root / c / f"{j}.bmp", 10 * (ci + 1) + j)
    for j in range(3):
        solid(tmp_path / "store" / "e1" / f"{j}.bmp", 100 + j)
        solid(tmp_path / "store" / "e2" / f"{j}.bmp", 200 + j)
    os.symlink(tmp_path / "store" / "e1", root / "e")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["a", "b", "e"], "val": ["c"], "test": []}))
    return root, split


def load(root, split, must_hit: bool = False, monkeypatch=None):
    ds = get_dataset("image_folder", root=root, split_file=split, image_size=SIZE)
    if must_hit:
        with monkeypatch.context() as m:
            m.setattr(type(ds), "decode_classes", lambda self, names: pytest.fail("decoded despite the cache"))
            return ds.load_split("train")
    return ds.load_split("train")


def same_stat_times(path: Path, before: os.stat_result) -> None:
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


# ---------------------------------------------------------------------------------------- cache identity
def test_unchanged_folder_hits_the_cache(folder, monkeypatch):
    root, split = folder
    first = load(root, split)
    again = load(root, split, must_hit=True, monkeypatch=monkeypatch)
    assert values(again, "a") == [10, 11, 12] and again.fingerprint == first.fingerprint


def test_in_place_edit_with_restored_mtime(folder):
    root, split = folder
    assert values(load(root, split), "a") == [10, 11, 12]
    f = root / "a" / "1.bmp"
    before = f.stat()
    new = solid(root.parent / "new.bmp", 77).read_bytes()
    assert len(new) == before.st_size
    with open(f, "r+b") as fh:  # same inode, same size
        fh.write(new)
    same_stat_times(f, before)
    assert f.stat().st_ino == before.st_ino
    assert values(load(root, split), "a") == [10, 77, 12]


def test_file_replaced_by_mv(folder):
    root, split = folder
    load(root, split)
    f = root / "b" / "0.bmp"
    before = f.stat()
    other = solid(root.parent / "other.bmp", 55)
    os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(other, f)  # mv other b/0.bmp: same name, size and mtime, another inode
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert values(load(root, split), "b") == [55, 21, 22]


def test_cp_p_over_a_file(folder):
    root, split = folder
    load(root, split)
    f = root / "a" / "2.bmp"
    before = f.stat()
    src = solid(root.parent / "src.bmp", 33)
    os.utime(src, ns=(before.st_atime_ns, before.st_mtime_ns))
    shutil.copy2(src, f)  # cp -p src a/2.bmp: content copied into the same inode, mtime copied too
    assert (f.stat().st_ino, f.stat().st_size, f.stat().st_mtime_ns) == (before.st_ino, before.st_size,
                                                                        before.st_mtime_ns)
    assert values(load(root, split), "a") == [10, 11, 33]


def test_symlinked_class_folder_re_pointed(folder):
    root, split = folder
    assert values(load(root, split), "e") == [100, 101, 102]
    store = root.parent / "store"
    for j in range(3):  # the other target: same names, sizes and mtimes
        st = (store / "e1" / f"{j}.bmp").stat()
        os.utime(store / "e2" / f"{j}.bmp", ns=(st.st_atime_ns, st.st_mtime_ns))
    (root / "e").unlink()
    os.symlink(store / "e2", root / "e")
    assert values(load(root, split), "e") == [200, 201, 202]


def test_file_added_removed_and_renamed(folder):
    root, split = folder
    load(root, split)
    solid(root / "a" / "3.bmp", 13)
    assert values(load(root, split), "a") == [10, 11, 12, 13]
    (root / "a" / "0.bmp").unlink()
    assert values(load(root, split), "a") == [11, 12, 13]
    os.rename(root / "a" / "1.bmp", root / "a" / "9.bmp")  # images are read in name order
    assert values(load(root, split), "a") == [12, 13, 11]


def test_class_folders_renamed(folder):
    root, split = folder
    s = load(root, split)
    assert values(s, "a") == [10, 11, 12] and values(s, "b") == [20, 21, 22]
    os.rename(root / "a", root / "tmp")
    os.rename(root / "b", root / "a")
    os.rename(root / "tmp", root / "b")
    s = load(root, split)
    assert values(s, "a") == [20, 21, 22] and values(s, "b") == [10, 11, 12]


def test_archive_identity_sees_in_place_edit_with_restored_mtime(tmp_path):
    f = tmp_path / "cifar-100-python.tar.gz"
    f.write_bytes(b"x" * 100)
    before, ident = f.stat(), source_identity(f)
    with open(f, "r+b") as fh:
        fh.write(b"y")
    same_stat_times(f, before)
    assert source_identity(f) != ident


def test_extracted_folder_identity_follows_symlinks(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    (root / "train").mkdir(parents=True)
    for t in ("t1", "t2"):
        (tmp_path / t).mkdir()
        (tmp_path / t / "x.JPEG").write_bytes(b"same")
    os.symlink(tmp_path / "t1", root / "train" / "n1")
    os.symlink(root, root / "train" / "loop")  # a symlink loop is read once, not forever
    ident = source_identity(root)
    (root / "train" / "n1").unlink()
    os.symlink(tmp_path / "t2", root / "train" / "n1")
    assert source_identity(root) != ident


# ---------------------------------------------------------------------------------------------- formats
FORMATS = {".bmp": "BMP", ".gif": "GIF", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM",
           ".png": "PNG", ".JPG": "JPEG", ".jpeg": "JPEG"}


def test_every_pillow_image_format_is_read_and_other_files_are_warned(tmp_path, caplog):
    from PIL import features

    exts = image_extensions()
    assert {".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".png", ".jpg", ".jpeg", ".webp"} <= exts
    assert not {".txt", ".pdf", ".h5", ".mpg"} & exts  # not images, or header-only/stub formats
    root = tmp_path / "imgs"
    formats = {e: f for e, f in FORMATS.items() if f != "WEBP" or features.check("webp")}
    for i, (ext, fmt) in enumerate(formats.items()):
        kw = {"lossless": True} if fmt == "WEBP" else {}
        from PIL import Image

        (root / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((12, 12, 3), 40 + 10 * i, np.uint8)).save(root / "a" / f"{i}{ext}", format=fmt, **kw)
        solid(root / "b" / f"{i}.png", 5)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "a" / "._0.bmp").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS resource fork, not an image
    split = tmp_path / "s.json"
    split.write_text(json.dumps({"train": ["a", "b"], "val": [], "test": []}))
    with caplog.at_level(logging.WARNING, logger="fsl_lsskd.data.image_folder"):
        s = get_dataset("image_folder", root=root, split_file=split, image_size=12).load_split("train")
    got = values(s, "a")
    lossy = [i for i, f in enumerate(formats.values()) if f == "JPEG"]
    for i in range(len(formats)):
        assert abs(got[i] - (40 + 10 * i)) <= (2 if i in lossy else 0), (list(formats)[i], got[i])
    warned = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warned) == 1 and "skipped 3 files" in warned[0] and ".DS_Store" in warned[0]


# ------------------------------------------------------------------------------------------- make-split
def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def class_folders(root: Path, names, n: int = 3, size: int = 16) -> Path:
    for ci, c in enumerate(names):
        for j in range(n):
            solid(root / c / f"{j}.png", (7 * ci + j) % 256, fmt="PNG", size=size)
    return root


NAMES = ["golden retriever", "café", "Öl", "日本 犬"] + [f"class {i:02d}" for i in range(21)]


def test_make_split_writes_a_seeded_class_split(tmp_path):
    root = class_folders(tmp_path / "imgs", NAMES, n=20)
    out = tmp_path / "split.json"
    res = cli("data", "make-split", "image_folder", "--data-root", root, "--out", out)
    assert res.exit_code == 0, res.output
    split = json.loads(out.read_text(encoding="utf-8"))
    assert [len(split[s]) for s in ("train", "val", "test")] == [15, 5, 5]
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(NAMES)
    assert all(split[s] == sorted(split[s]) for s in split)
    assert "15/5/5 classes" in res.output and "seed 0" in res.output
    first = out.read_bytes()
    assert cli("data", "make-split", "image_folder", "--data-root", root, "--out", out).exit_code == 0
    assert out.read_bytes() == first  # seeded: the same split again
    other = tmp_path / "other.json"
    assert cli("data", "make-split", "image_folder", "--data-root", root, "--seed", 1, "--out", other).exit_code == 0
    assert other.read_bytes() != first
    res = cli("data", "make-split", "image_folder", "--data-root", root, "--ratios", "0.4,0.3,0.3", "--out", other)
    assert res.exit_code == 0 and "9/8/8 classes" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "other.json", "split.json"]  # no temp files


@pytest.mark.parametrize("n_classes, args, fragments", [
    (20, [], ["on 20 classes give train/val/test 12/4/4", "at least 5 classes in val and in test",
              "--ratios 0.50,0.25,0.25", "0.6,0.2,0.2 needs at least 23"]),
    (25, ["--ratios", "0.9,0.05,0.05"], ["give train/val/test 23/1/1", "--ratios 0.60,0.20,0.20"]),
    (10, [], ["10 classes", "needs at least 23"]),
    (25, ["--ratios", "0.6,0.2"], ["--ratios '0.6,0.2'", "sum to 1"]),
    (25, ["--ratios", "0.6,0.3,0.3"], ["sum to 1"]),
], ids=["20-classes", "tiny-shares", "10-classes", "two-shares", "sum"])
def test_make_split_refuses_ratios_that_cannot_host_5_way(tmp_path, n_classes, args, fragments):
    root = class_folders(tmp_path / "imgs", NAMES[:n_classes], n=20)
    out = tmp_path / "split.json"
    res = cli("data", "make-split", "image_folder", "--data-root", root, *args, "--out", out)
    assert res.exit_code == 2, res.output
    for f in fragments:
        assert f in res.output, res.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]


def test_make_split_refuses_classes_with_too_few_images(tmp_path):
    root = class_folders(tmp_path / "imgs", NAMES, n=20)
    for p in sorted((root / "café").iterdir())[3:]:
        p.unlink()
    (root / "empty one").mkdir()
    (root / "empty one" / "readme.txt").write_text("no images here")
    out = tmp_path / "split.json"
    res = cli("data", "make-split", "image_folder", "--data-root", root, "--out", out)
    assert res.exit_code == 2, res.output
    assert "2 class folders" in res.output and "'café' (3)" in res.output and "'empty one' (0)" in res.output
    assert "--min-images" in res.output and not out.exists()
    (root / "empty one" / "readme.txt").unlink()
    (root / "empty one").rmdir()
    res = cli("data", "make-split", "image_folder", "--data-root", root, "--min-images", 3, "--out", out)
    assert res.exit_code == 0, res.output


def test_make_split_options_belong_to_their_dataset(tmp_path):
    res = cli("data", "make-split", "image_folder", "--data-root", tmp_path, "--out", tmp_path)
    assert res.exit_code == 2 and "is a directory" in res.output and "split.json" in res.output
    res = cli("data", "make-split", "image_folder", "--out", tmp_path / "s.json")
    assert res.exit_code == 2 and "--data image_folder=DIR" in res.output
    res = cli("data", "make-split", "tiny_imagenet", "--ratios", "0.6,0.2,0.2", "--out", tmp_path / "x")
    assert res.exit_code == 2 and "--ratios applies to image_folder" in res.output


# -------------------------------------------------------------------------------------------- end to end
def generated_folder(root: Path, names, per_class: int = 25) -> Path:
    """Class folders of PIL-written JPEG/PNG images with class signal (``fsl_lsskd.data.fake.class_images``)."""
    from PIL import Image

    from fsl_lsskd.data.fake import class_images

    rng = np.random.default_rng(0)
    for ci, c in enumerate(names):
        (root / c).mkdir(parents=True)
        for j, img in enumerate(class_images(ci, per_class, 40, rng)):
            Image.fromarray(img).save(root / c / f"img {j:03d}.{'png' if j % 3 else 'jpg'}")
    return root


def real_folder(root: Path, zip_path: Path, names, per_class: int = 25) -> Path:
    """Class folders cut from the real Tiny ImageNet subset: the first ``per_class`` train images of the first
    ``len(names)`` wnids, the folders named ``names``."""
    with zipfile.ZipFile(zip_path) as z:
        top = next(n for n in z.namelist() if n.endswith("wnids.txt"))[: -len("wnids.txt")]
        wnids = z.read(top + "wnids.txt").decode().split()
        for c, w in zip(names, wnids):
            (root / c).mkdir(parents=True)
            for j in range(per_class):
                (root / c / f"{w}_{j}.JPEG").write_bytes(z.read(f"{top}train/{w}/images/{w}_{j}.JPEG"))
    return root


def run_flow(ws: Path, root: Path) -> None:
    """make-split -> train 1 epoch -> evaluate through the CLI, then `fsl-bench run` of a benchmark file."""
    split = ws / "my split.json"
    res = cli("data", "make-split", "image_folder", "--data-root", root, "--out", split)
    assert res.exit_code == 0, res.output
    names = json.loads(split.read_text(encoding="utf-8"))
    assert {"golden retriever", "café", "Öl"} <= set(names["train"] + names["val"] + names["test"])

    data = ["--dataset", "image_folder", "--data-root", root, "--split-file", split, "--folder-image-size", 32]
    res = cli("train", "--method", "ce", "--backbone", "conv4", *data, "--image-size", 32, "--epochs", 1,
              "--batch-size", 32, "--val-n-shot", 1, "--val-n-query", 5, "--val-n-episodes", 5, "--out", ws / "run")
    assert res.exit_code == 0, res.output
    assert (ws / "run" / "export" / "backbone.safetensors").is_file() and "mlflow run:" in res.output
    res = cli("evaluate", "--checkpoint", ws / "run" / "export", *data, "--n-shot", "1,5", "--n-query", 15,
              "--n-episodes", 10, "--readouts", "protonet,logreg_batched", "--out", ws / "eval")
    assert res.exit_code == 0, res.output
    summary = json.loads((ws / "eval" / "summary.json").read_text())
    assert summary["dataset"] == "image_folder" and len(summary["results"]) == 4
    assert "5 classes, 125 images" in res.output  # the test split: 5 classes x 25 images
    assert "± ? over 5 test classes (not estimable" in res.output  # 5-way episodes on 5 classes

    bench = {"name": "my_images", "datasets": ["image_folder"],
             "data": {"image_folder": {"data_root": str(root), "split_file": split.name, "image_size": 32}},
             "backbones": ["conv4"], "methods": ["ce"], "seeds": [0, 1], "image_size": 32,
             "train": {"epochs": 1, "batch_size": 32, "validation": None},
             "eval": {"split": "test", "n_shot": [1], "n_query": 5, "n_episodes": 10, "readouts": ["protonet"]}}
    f = ws / "my images.yaml"  # split_file relative to the benchmark file
    f.write_text(yaml.safe_dump(bench, allow_unicode=True), encoding="utf-8")
    res = cli("run", f, "--out", ws / "runs")
    assert res.exit_code == 0, res.output
    # seed 0 is the cell `fsl-bench train` trained above (same training identity): scored, not trained again
    assert "summary: 1 trained, 0 resumed, 1 re-scored" in res.output and "2 new scores" in res.output


@pytest.fixture
def ws(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


E2E_NAMES = ["golden retriever", "café", "Öl"] + [f"class {i:02d}" for i in range(22)]  # 25 -> 15/5/5


def test_own_images_end_to_end_generated(ws):
    run_flow(ws, generated_folder(ws / "my images", E2E_NAMES))


@pytest.mark.slow  # ~20 s: two training runs and an MLflow store on real images
def test_own_images_end_to_end_real(ws, shared_data):
    run_flow(ws, real_folder(ws / "my images", shared_data / "tiny-imagenet-200-sub100.zip", E2E_NAMES))
    s = get_dataset("image_folder", root=ws / "my images", split_file=ws / "my split.json").load_split("val")
    assert s.images.shape[1:] == (64, 64, 3) and (s.class_counts() == 25).all()


# ------------------------------------------------------------------------------------ few test classes (issue 24)
def graded_folder(root: Path, n_classes: int, per_class: int = 20, size: int = 24) -> Path:
    """Class folders of noisy solid-colour PNGs whose classes differ in how far apart their colours are: the
    first three share nearly one colour (hard to tell apart), the rest are far from everything. Per-class
    accuracy then varies a lot, which is what a test-class interval measures."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(n_classes):
        colour = np.array([90 + 6 * c, 110, 130]) if c < 3 else np.array([40 + 35 * c, 200 - 30 * c, 60 + 25 * c])
        (root / f"class {c:02d}").mkdir(parents=True)
        for j in range(per_class):
            img = np.clip(colour + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class {c:02d}" / f"{j}.png")
    return root


def evaluate_test_classes(ws: Path, root: Path, n_episodes: int):
    """`fsl-bench evaluate` of an untrained Conv-4 on every class folder of ``root`` as the test split: 5-way
    1-shot ProtoNet on ``n_episodes`` episodes, summary in ``ws/eval``."""
    split = ws / "split.json"
    split.write_text(json.dumps({"train": [], "val": [], "test": sorted(p.name for p in root.iterdir())}))
    res = cli("evaluate", "--untrained", "--backbone", "conv4", "--data", f"image_folder={root}", "--split-file",
              split, "--folder-image-size", 24, "--n-shot", 1, "--n-query", 15, "--n-episodes", n_episodes,
              "--readouts", "protonet", "--out", ws / "eval")
    assert res.exit_code == 0, res.output
    return res


def test_evaluate_on_six_test_classes_shows_the_test_class_interval_and_warns(ws, caplog):
    """Issue 24's input: a user's folder with 6 test classes (120 images) and 2,000 5-way episodes. The episode
    interval (about ±0.3) describes these 6 classes only; `evaluate` shows the test-class interval beside it,
    in its output and its summary.json, and warns that 6 test classes say little about new classes."""
    res = evaluate_test_classes(ws, graded_folder(ws / "imgs", 6), n_episodes=2000)
    line = next(x for x in res.output.splitlines() if "protonet" in x)
    m = re.search(r"% ± ([\d.]+) over episodes, ± ([\d.]+) over 6 test classes", line)
    assert m, line
    episodes, classes = float(m.group(1)), float(m.group(2))
    assert 0 < episodes < 1 and classes > 3 * episodes, line
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("only 6 classes" in w and "at least 20 classes" in w for w in warned) == 1, warned
    got = json.loads((ws / "eval" / "summary.json").read_text())["results"][0]
    assert got["n_test_classes"] == 6 and abs(got["accuracy_class_ci95"] - classes) < 0.006
    # the same split scored again in this process (validation scores its split every epoch): no second warning
    caplog.clear()
    evaluate_test_classes(ws, ws / "imgs", n_episodes=20)
    assert not [r for r in caplog.records if "only 6 classes" in r.getMessage()]


def test_evaluate_when_every_episode_holds_the_same_classes_says_not_estimable(ws, caplog):
    res = evaluate_test_classes(ws, graded_folder(ws / "imgs", 5, per_class=16), n_episodes=50)
    assert "± ? over 5 test classes (not estimable: every episode holds the same classes)" in res.output
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("only 5 classes" in w and "not estimable over classes" in w for w in warned), warned
    assert json.loads((ws / "eval" / "summary.json").read_text())["results"][0]["accuracy_class_ci95"] is None
