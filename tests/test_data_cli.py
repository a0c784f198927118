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
from fsl_lsskd.data.cifar_fs import URL
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


@pytest.mark.parametrize("cmd", [[], ["prepare"], ["verify"], ["make-split"]])
def test_help_has_example(cmd):
    res = run(*cmd, "--help")
    assert res.exit_code == 0 and "Example:" in res.output


def test_perf_data_command(fake_cifar):
    res = CliRunner().invoke(main, ["perf", "data", "cifar_fs", "--archive", str(fake_cifar), "--split", "val",
                                    "--repeats", "1"])
    assert res.exit_code == 0, res.output
    assert "decode from source" in res.output and "speed-up" in res.output
    assert no_cache_files()  # the measurement uses a temporary cache
    assert "Example:" in CliRunner().invoke(main, ["perf", "data", "--help"]).output


def test_data_bench_is_a_deprecated_alias_of_perf_data(fake_cifar, caplog):
    """The former name still runs, hidden from `fsl-bench data --help`, with one warning naming the new one."""
    import logging

    assert " bench " not in run("--help").output
    with caplog.at_level(logging.WARNING, logger="fsl_lsskd.cli"):
        res = run("bench", "cifar_fs", "--archive", fake_cifar, "--split", "val", "--repeats", "1")
    assert res.exit_code == 0 and "decode from source" in res.output, res.output
    warnings = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert warnings == ["`fsl-bench data bench` is deprecated and will be removed: use `fsl-bench perf data`"]


# ------------------------------------------------------------------------------------- validation errors
def test_missing_data_root(tmp_path):
    # the deprecated spelling still reaches the dataset, whose message names the new one
    assert_user_error(run("prepare", "cifar_fs", "--data-root", tmp_path / "nope"), "does not exist",
                      "--data cifar_fs=PATH", "--data cifar_fs=DIR")
    assert_user_error(run("prepare", "cifar_fs", "--data", f"cifar_fs={tmp_path / 'nope'}"), "does not exist",
                      "official archive or its extracted folder")


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


# ------------------------------------------------------------------------------ verify decodes every image
def _rewrite_zip(src: Path, dest: Path, drop=lambda name: False, replace=None) -> Path:
    """Copy zip ``src`` to ``dest`` without the members ``drop`` accepts, ``replace``: name -> new bytes."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            if not drop(info.filename):
                zout.writestr(info, replace[info.filename] if info.filename in replace else zin.read(info))
    return dest


def _zeroed(src: Path, dest: Path, n: int = 4096) -> Path:
    data = bytearray(src.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(n)
    dest.write_bytes(bytes(data))
    return dest


TOP = "tiny-imagenet-200/"


def _tiny_case(fake_tiny: Path, tmp_path: Path, case: str):
    """(archive, fragments the report must name) for a corrupted copy of the generated Tiny ImageNet zip."""
    split = sp.standard_split("tiny_imagenet")
    victim = split["train"][5]
    if case == "zeroed":
        bad = _zeroed(fake_tiny, tmp_path / "tiny-imagenet-200.zip")
        with zipfile.ZipFile(bad) as z:  # which images the 4 KB hit: their stored CRC no longer matches
            hit = []
            for info in z.infolist():
                try:
                    z.read(info)
                except zipfile.BadZipFile:
                    hit.append(info.filename[len(TOP):])
        images = [h for h in hit if h.endswith(".JPEG")]  # (a bounding-box file may be hit too: never read)
        assert images
        return bad, [f"{len(images)} images fail to read or decode", *images]
    if case == "fake_jpg":
        member = f"{TOP}train/{victim}/images/{victim}_1.JPEG"
        bad = _rewrite_zip(fake_tiny, tmp_path / "tiny-imagenet-200.zip", replace={member: b"this is not a jpeg"})
        return bad, ["1 images fail to read or decode", f"train/{victim}/images/{victim}_1.JPEG", "undecodable"]
    # empty class: every train and val image of one test class removed (and its val annotations)
    victim = split["test"][3]
    with zipfile.ZipFile(fake_tiny) as z:
        ann = z.read(f"{TOP}val/val_annotations.txt").decode().splitlines(keepends=True)
    gone = {f"{TOP}val/images/{a.split(chr(9))[0]}" for a in ann if a.split("\t")[1] == victim}
    kept = "".join(a for a in ann if a.split("\t")[1] != victim).encode()
    bad = _rewrite_zip(fake_tiny, tmp_path / "tiny-imagenet-200.zip",
                       drop=lambda n: n in gone or n.startswith(f"{TOP}train/{victim}/images/"),
                       replace={f"{TOP}val/val_annotations.txt": kept})
    return bad, [f"split classes without any image (test, 1): {victim}", "1 split classes have no images", victim]


@pytest.mark.parametrize("case", ["zeroed", "fake_jpg", "empty_class"])
def test_verify_decodes_tiny_imagenet(fake_tiny, tmp_path, case):
    good = run("verify", "tiny_imagenet", "--archive", fake_tiny, "--min-images", "2")
    assert good.exit_code == 0 and "images decoded: 600 of the split classes, 0 failed" in good.output, good.output
    assert no_cache_files()  # verify decodes without caching
    bad, fragments = _tiny_case(fake_tiny, tmp_path, case)
    assert run("verify", "tiny_imagenet", "--archive", bad, "--no-decode", "--min-images", "2").exit_code == (
        2 if case == "empty_class" else 0)  # without decoding, only the empty class is seen
    assert_user_error(run("verify", "tiny_imagenet", "--archive", bad, "--min-images", "2"), *fragments)


def _folder_from_tiny(fake_tiny: Path, root: Path, n_classes: int = 12) -> Path:
    """root/<wnid>/<images>: the train and val images of the first classes of the generated zip, as files."""
    with zipfile.ZipFile(fake_tiny) as z:
        wnids = z.read(f"{TOP}wnids.txt").decode().split()[:n_classes]
        for w in wnids:
            (root / w).mkdir(parents=True)
            for name in z.namelist():
                if name.startswith(f"{TOP}train/{w}/images/"):
                    (root / w / name.rsplit("/", 1)[1]).write_bytes(z.read(name))
    return root


def _folder_case(fake_tiny: Path, tmp_path: Path, case: str):
    from PIL import Image

    root = _folder_from_tiny(fake_tiny, tmp_path / "imgs")
    names = sorted(p.name for p in root.iterdir())
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": names[:4], "val": names[4:8], "test": names[8:]}))
    if case == "zeroed":  # a PNG (zlib stream with CRCs) with 4 KB zeroed in the middle
        png = root / names[1] / "photo.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(png)
        _zeroed(png, png)
        return root, split, ["1 images fail to read or decode", f"{names[1]}/photo.png"]
    if case == "fake_jpg":
        (root / names[9] / "holiday.jpg").write_text("this is not a jpeg")
        (root / names[2] / "cat.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
        return root, split, ["2 images fail to read or decode", f"{names[9]}/holiday.jpg", f"{names[2]}/cat.jpeg"]
    for p in (root / names[6]).iterdir():
        p.unlink()
    (root / names[6] / "notes.txt").write_text("no images")
    return root, split, [f"split classes without any image (val, 1): {names[6]}", "1 split classes have no images"]


@pytest.mark.parametrize("case", ["zeroed", "fake_jpg", "empty_class"])
def test_verify_decodes_image_folder(fake_tiny, tmp_path, case):
    root, split, fragments = _folder_case(fake_tiny, tmp_path, case)
    assert_user_error(run("verify", "image_folder", "--data-root", root, "--split-file", split, "--min-images", "1"),
                      *fragments)


@pytest.mark.parametrize("case", ["truncated_pickle", "zeroed_archive"])
def test_verify_corrupt_cifar(fake_cifar, tmp_path, case):
    import tarfile

    if case == "truncated_pickle":  # the extracted folder with its train pickle cut short
        with tarfile.open(fake_cifar) as tar:
            tar.extractall(tmp_path, filter="data")
        bad = tmp_path / "cifar-100-python"
        train = bad / "train"
        train.write_bytes(train.read_bytes()[: train.stat().st_size * 2 // 3])
    else:
        bad = _zeroed(fake_cifar, tmp_path / "cifar-100-python.tar.gz")
    assert_user_error(run("verify", "cifar_fs", "--archive", bad), "corrupt or truncated", "download")


# ------------------------------------------------------------------- every hint names an option the command has
def _help(*cmd) -> str:
    res = CliRunner().invoke(main, [*cmd, "--help"])
    assert res.exit_code == 0, res.output
    return res.output


HINT_COMMANDS = {
    "data prepare": ["data", "prepare", "cifar_fs"],
    "data verify": ["data", "verify", "cifar_fs"],
    "perf data": ["perf", "data", "cifar_fs"],
    "data make-split": ["data", "make-split", "tiny_imagenet", "--out", "OUT"],
    "train": ["train", "--dataset", "cifar_fs", "--val-n-episodes", "0", "--epochs", "1", "--out", "OUT"],
    "evaluate": ["evaluate", "--dataset", "cifar_fs", "--untrained", "--backbone", "conv4", "--n-episodes", "5"],
    "perf eval": ["perf", "eval", "--dataset", "cifar_fs", "--n-episodes", "5"],
    "perf train": ["perf", "train", "--dataset", "cifar_fs", "--steps", "1"],
}


@pytest.mark.parametrize("where", ["missing-archive", "empty-root"])
@pytest.mark.parametrize("name", list(HINT_COMMANDS))
def test_every_data_hint_names_an_option_of_its_command(tmp_path, monkeypatch, name, where):
    import re

    monkeypatch.chdir(tmp_path)
    src = (["--archive", tmp_path / "nope.zip"] if where == "missing-archive" else ["--data-root", tmp_path])
    args = [str(a).replace("OUT", str(tmp_path / "out")) for a in HINT_COMMANDS[name]] + [str(a) for a in src]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", res.output.split("error:", 1)[1]))
    assert "--download" in named, res.output
    helptext = _help(*name.split())
    for flag in named:
        assert flag in helptext, f"`fsl-bench {name}` names {flag}, which it lacks: {res.output}"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, not even an empty --out


def test_run_hint_names_benchmark_keys(tmp_path, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    f = tmp_path / "b.yaml"
    f.write_text(yaml.safe_dump({"datasets": ["cifar_fs"], "data": {"cifar_fs": {"archive": "nope.tar.gz"}},
                                 "backbones": ["conv4"], "methods": ["ce"], "seeds": [0],
                                 "train": {"epochs": 1, "validation": None},
                                 "eval": {"n_shot": [1], "n_query": 3, "n_episodes": 5}}))
    res = CliRunner().invoke(main, ["run", str(f), "--out", str(tmp_path / "runs")])
    assert res.exit_code == 2, res.output
    err = res.output.split("error:", 1)[1]
    for key in ("`data.cifar_fs.archive: PATH`", "`data.cifar_fs.data_root: DIR`", "`data.cifar_fs.download: true`",
                "fsl-bench run --data cifar_fs=PATH"):
        assert key in err, res.output
    assert "--archive" not in err and "--download" not in err and "--data-root" not in err


def _mock_download(monkeypatch, archive: Path):
    calls = []

    def fake_fetch(url, dest):
        calls.append(url)
        Path(dest).write_bytes(archive.read_bytes())

    monkeypatch.setattr(_sources, "fetch", fake_fetch)
    monkeypatch.setattr("fsl_lsskd.data.cifar_fs.MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    return calls


@pytest.mark.parametrize("validation", [False, True], ids=["no-val", "val"])
def test_train_and_evaluate_download(fake_cifar, tmp_path, monkeypatch, validation):
    """--download on train (with and without up-front validation checks) and evaluate fetches the archive."""
    calls = _mock_download(monkeypatch, fake_cifar)
    val = (["--val-n-shot", "1", "--val-n-query", "2", "--val-n-episodes", "3"] if validation
           else ["--val-n-episodes", "0"])
    root = tmp_path / "dl"
    res = CliRunner().invoke(main, ["train", "--dataset", "cifar_fs", "--data-root", str(root), "--download",
                                   "--epochs", "1", "--batch-size", "64", "--no-mlflow", *val,
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert calls == [URL] and (root / "cifar-100-python.tar.gz").is_file()
    assert (tmp_path / "run" / "export" / "backbone.safetensors").is_file()
    root2 = tmp_path / "dl2"
    res = CliRunner().invoke(main, ["evaluate", "--dataset", "cifar_fs", "--data-root", str(root2), "--download",
                                   "--checkpoint", str(tmp_path / "run" / "export"), "--n-shot", "1", "--n-query",
                                   "2", "--n-episodes", "5", "--readouts", "protonet"])
    assert res.exit_code == 0, res.output
    assert len(calls) == 2 and (root2 / "cifar-100-python.tar.gz").is_file()
