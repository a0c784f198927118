"""`fsl-bench data ...`: every validation error exits 2 with a message naming the fix and leaves no cache
file; reports, download (mocked fetch, no network) and help texts."""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fsl_lsskd.cli import main
from fsl_lsskd.data import sources as _sources
from fsl_lsskd.data import splits as sp
from fsl_lsskd.data.fake import write_fake_cifar100, write_fake_tiny_imagenet
from fsl_lsskd.utils import cache_dir, project_root


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory) -> Path:
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar"), per_class_train=3, per_class_test=1, seed=3)


@pytest.fixture(scope="module")
def fake_tiny(tmp_path_factory) -> Path:
    return write_fake_tiny_imagenet(tmp_path_factory.mktemp("tiny"), per_class_train=2, per_class_val=1, seed=4)


def run(*args):
    return CliRunner().invoke(main, ["data", *map(str, args)])


def no_cache_files():
    root = cache_dir()
    return not root.exists() or not [p for p in root.rglob("*") if p.is_file()]


def assert_user_error(res, *fragments):
    assert res.exit_code == 2, res.output
    for f in fragments:
        assert f in res.output, res.output
    assert no_cache_files()


# --------------------------------------------------------------------------------------------- happy paths
def test_prepare_then_verify_cifar(fake_cifar):
    res = run("prepare", "cifar_fs", "--archive", fake_cifar)
    assert res.exit_code == 0, res.output
    assert "train   64 classes" in res.output and "decoded" in res.output
    assert len(list(cache_dir().rglob("*.npy"))) == 3
    res = run("prepare", "cifar_fs", "--data-root", fake_cifar.parent)
    assert res.exit_code == 0 and res.output.count("already cached") == 3
    res = run("verify", "cifar_fs", "--archive", fake_cifar, "--min-images", "4")
    assert res.exit_code == 0, res.output
    assert "classes in source: 100" in res.output and "64/16/20" in res.output
    assert "train: 3 each (300 in all)" in res.output and "fewer than 4 images: none" in res.output


def test_verify_reports_small_classes_and_strict_fails(fake_tiny):
    res = run("verify", "tiny_imagenet", "--archive", fake_tiny, "--min-images", "5")
    assert res.exit_code == 0, res.output
    assert "classes in source: 200" in res.output and "120/40/40" in res.output
    assert "warning: 200 classes have fewer than 5 images" in res.output
    res = run("verify", "tiny_imagenet", "--archive", fake_tiny, "--min-images", "5", "--strict")
    assert_user_error(res, "fewer than 5 images", "--min-images")


def test_download_with_mocked_fetch(fake_cifar, tmp_path, monkeypatch):
    calls = []

    def fake_fetch(url, dest):
        calls.append(url)
        Path(dest).write_bytes(fake_cifar.read_bytes())

    monkeypatch.setattr(_sources, "fetch", fake_fetch)
    monkeypatch.setattr("fsl_lsskd.data.cifar_fs.MD5", hashlib.md5(fake_cifar.read_bytes()).hexdigest())
    root = tmp_path / "dl"
    res = run("prepare", "cifar_fs", "--data-root", root, "--download")
    assert res.exit_code == 0, res.output
    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"]
    assert (root / "cifar-100-python.tar.gz").read_bytes() == fake_cifar.read_bytes()


def test_make_split_reproduces_published_split(fake_tiny, tmp_path):
    res = run("make-split", "tiny_imagenet", "--archive", fake_tiny, "--out", tmp_path)
    assert res.exit_code == 0, res.output
    for s in ("train", "val", "test"):
        assert (tmp_path / f"{s}.txt").read_bytes() == (project_root() / "splits/tiny_imagenet" / f"{s}.txt").read_bytes()


@pytest.mark.parametrize("cmd", [[], ["prepare"], ["verify"], ["make-split"], ["bench"]])
def test_help_has_example(cmd):
    res = run(*cmd, "--help")
    assert res.exit_code == 0 and "Example:" in res.output


def test_bench_command(fake_cifar):
    res = run("bench", "cifar_fs", "--archive", fake_cifar, "--split", "val", "--repeats", "1")
    assert res.exit_code == 0, res.output
    assert "decode from source" in res.output and "speed-up" in res.output
    assert no_cache_files()  # the bench uses a temporary cache


# ------------------------------------------------------------------------------------- validation errors
def test_missing_data_root(tmp_path):
    assert_user_error(run("prepare", "cifar_fs", "--data-root", tmp_path / "nope"), "does not exist", "--archive")


def test_wrong_data_root(tmp_path):
    (tmp_path / "junk.txt").write_text("x")
    assert_user_error(run("verify", "tiny_imagenet", "--data-root", tmp_path),
                      "no Tiny ImageNet data found", "--download")


def test_missing_archive(tmp_path):
    assert_user_error(run("prepare", "cifar_fs", "--archive", tmp_path / "cifar-100-python.tar.gz"), "does not exist")


def test_truncated_cifar_archive(fake_cifar, tmp_path):
    bad = tmp_path / "cifar-100-python.tar.gz"
    bad.write_bytes(fake_cifar.read_bytes()[: fake_cifar.stat().st_size // 2])
    assert_user_error(run("prepare", "cifar_fs", "--archive", bad), "corrupt or truncated", "download")


def test_truncated_tiny_archive(fake_tiny, tmp_path):
    bad = tmp_path / "tiny-imagenet-200.zip"
    bad.write_bytes(fake_tiny.read_bytes()[: fake_tiny.stat().st_size // 2])
    assert_user_error(run("prepare", "tiny_imagenet", "--archive", bad), "corrupt or truncated", "download")


def test_checksum_mismatch_on_download_leaves_nothing(fake_cifar, tmp_path, monkeypatch):
    monkeypatch.setattr(_sources, "fetch", lambda url, dest: Path(dest).write_bytes(fake_cifar.read_bytes()))
    root = tmp_path / "dl"
    assert_user_error(run("prepare", "cifar_fs", "--data-root", root, "--download"),
                      "checksum mismatch", "eb9058c3a382ffc7106e4002c42a8d85", "download it again")
    assert list(root.iterdir()) == []  # neither the archive nor a temp file


def test_checksum_mismatch_on_local_archive(fake_tiny):
    assert_user_error(run("verify", "tiny_imagenet", "--archive", fake_tiny, "--check-md5"),
                      "checksum mismatch", "90528d7ca1a48142e341f4ef8d21d0de")


def test_image_that_fails_to_decode_in_zip(fake_tiny, tmp_path):
    bad = tmp_path / "tiny-imagenet-200.zip"
    victim = sp.standard_split("tiny_imagenet")["train"][5]
    member = f"tiny-imagenet-200/train/{victim}/images/{victim}_1.JPEG"
    with zipfile.ZipFile(fake_tiny) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, b"this is not a jpeg" if info.filename == member else src.read(info))
    assert_user_error(run("prepare", "tiny_imagenet", "--archive", bad), "fails to decode", f"{victim}_1.JPEG")


def _folder(root: Path, classes=("a", "b", "c"), n=2):
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for j in range(n):
            Image.fromarray(np.full((20, 20, 3), 9, np.uint8)).save(root / c / f"{j}.jpg")
    return root


def test_image_folder_bad_image(tmp_path):
    root = _folder(tmp_path / "imgs")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    split = tmp_path / "s.json"
    split.write_text(json.dumps({"train": ["a"], "val": ["b"], "test": ["c"]}))
    assert_user_error(run("prepare", "image_folder", "--data-root", root, "--split-file", split),
                      "fails to decode", "broken.jpg")


def test_split_file_names_missing_classes(tmp_path):
    root = _folder(tmp_path / "imgs")
    split = tmp_path / "s.json"
    split.write_text(json.dumps({"train": ["a", "zebra"], "val": ["b"], "test": ["c"]}))
    args = ("--data-root", root, "--split-file", split)
    assert_user_error(run("prepare", "image_folder", *args), "lacks: zebra", "fix the split file")
    assert_user_error(run("verify", "image_folder", *args), "zebra", "fix the split")


def test_archive_lacking_split_classes(tmp_path):
    wnids = sorted(c for v in sp.standard_split("tiny_imagenet").values() for c in v)[:150]
    z = write_fake_tiny_imagenet(tmp_path, wnids=wnids, per_class_train=1, per_class_val=1)
    assert_user_error(run("prepare", "tiny_imagenet", "--archive", z), "lacks", "50 in all")


def test_image_folder_needs_split_file(tmp_path):
    assert_user_error(run("prepare", "image_folder", "--data-root", _folder(tmp_path / "i")), "--split-file")


def test_modified_split_file(tmp_path, monkeypatch, fake_cifar):
    import shutil

    copy = tmp_path / "splits"
    shutil.copytree(project_root() / "splits", copy)
    monkeypatch.setattr(sp, "splits_dir", lambda: copy)
    (copy / "cifar_fs" / "val.txt").write_text("apple\n")
    assert_user_error(run("prepare", "cifar_fs", "--archive", fake_cifar), "splits/cifar_fs/val.txt was modified")
