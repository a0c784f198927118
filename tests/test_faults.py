"""Reliability matrix: bad input ends with exit code 2, a message naming the fix and NOTHING written (no
output, no cache entry, no temp file, no MLflow run); a training run killed with a real SIGKILL resumes to
the same weights and evaluation numbers as an uninterrupted run; reruns are deterministic; split and
episode files are verified at every load.

Data-source cases (missing/wrong data root, truncated archives, checksum mismatch, undecodable images,
split naming unknown classes) live in ``tests/test_data_cli.py``; their ``assert_user_error`` asserts that
the cache holds no file afterwards.

Read-only directories: root ignores permission bits, so the chmod test skips as root; the same failures are
also produced by patching the OS calls (``refuse_writes``), which exercises the error handling as root.
"""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from fsl_lsskd.cli import main
from fsl_lsskd.data.base import SplitData
from fsl_lsskd.data.fake import write_fake_cifar100
from fsl_lsskd.utils import cache_dir

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the kill test compares a subprocess with this process: same thread count, same float sums; 1 thread
    # is also the fastest on a loaded 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ws(tmp_path, monkeypatch) -> Path:
    """Working directory with its own MLflow store (./mlflow.db would appear if a run were created)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory) -> Path:
    """CIFAR-100 archive with 3 + 1 images per class: CIFAR-FS test = 20 classes x 4 images."""
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar"), per_class_train=3, per_class_test=1, seed=5)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(*roots: Path) -> set:
    """Every file and directory under ``roots`` (an empty directory left behind counts as written)."""
    return {str(p) for r in roots if Path(r).exists() for p in Path(r).rglob("*")}


def assert_user_error(res, *fragments):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output, res.output
    for f in fragments:
        assert str(f) in res.output, f"{f!r} not in: {res.output}"


def assert_nothing_written(before: set, *roots: Path):
    # the one exception: timm's model names, cached whole (atomically) per timm version when a backbone name that
    # is not registered here is checked (fsl_lsskd.registry.timm_model_names); no result and no data
    index = cache_dir() / "timm"
    new = {p for p in snapshot(*roots) - before if p != str(index) and not p.startswith(str(index / "models-"))}
    assert not new, f"files written by a failed command: {sorted(new)}"


def temp_files(root: Path) -> list:
    return sorted(str(p) for p in Path(root).rglob("*") if p.name.endswith(".tmp"))


def failing(ws: Path, *args, fragments=()):
    """Run a CLI command that must fail with exit 2, naming ``fragments``, and write nothing anywhere."""
    before = snapshot(ws, cache_dir())
    res = cli(*args)
    assert_user_error(res, *fragments)
    assert_nothing_written(before, ws, cache_dir())
    return res


# --------------------------------------------------------------------------------------- benchmark files
def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def bench_file(ws: Path, archive: Path, name: str = "faults.yaml", **over) -> Path:
    doc = {"name": "faults", "datasets": ["cifar_fs"], "data": {"cifar_fs": {"archive": str(archive)}},
           "backbones": ["conv4"], "methods": ["ce"], "seeds": [0], "image_size": 32,
           "train": {"epochs": 1, "batch_size": 32, "validation": None},
           "eval": {"split": "test", "n_shot": [1], "n_query": 3, "n_episodes": 5, "readouts": ["protonet"]}}
    path = ws / name
    path.write_text(yaml.safe_dump(_merge(doc, over)))
    return path


@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
def test_benchmark_unknown_key(ws, fake_cifar, dry):
    f = bench_file(ws, fake_cifar, trian={"epochs": 3})
    failing(ws, "run", f, *(["--dry-run"] if dry else []), fragments=[f, "unknown key 'trian'", "valid keys"])
    f = bench_file(ws, fake_cifar, "nested.yaml", eval={"shotz": [1]})
    failing(ws, "run", f, *(["--dry-run"] if dry else []), fragments=[f, "eval: unknown key 'shotz'"])


@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
def test_benchmark_wrong_type(ws, fake_cifar, dry):
    f = bench_file(ws, fake_cifar, train={"epochs": "two"})
    failing(ws, "run", f, *(["--dry-run"] if dry else []), fragments=[f, "train.epochs", "expected an integer"])
    f = bench_file(ws, fake_cifar, "seeds.yaml", seeds={"a": 1})
    failing(ws, "run", f, *(["--dry-run"] if dry else []), fragments=[f, "seeds", "expected a list"])


# ------------------------------------------------------------------------------------------ protocols
def test_evaluate_way_larger_than_split(ws, fake_cifar):
    # checked from the split's class counts before anything is decoded: not even the data cache is written
    failing(ws, "evaluate", "--backbone", "conv4", "--untrained", "--dataset", "cifar_fs", "--archive", fake_cifar,
            "--n-way", "25", "--n-shot", "1", "--n-query", "2", "--n-episodes", "5", "--readouts", "protonet",
            "--out", ws / "ev", fragments=["25-way", "cifar_fs test: 25-way episodes need 25 classes but it has 20",
                                           "lower --n-way"])


def test_evaluate_shot_plus_query_larger_than_class(ws, fake_cifar):
    failing(ws, "evaluate", "--backbone", "conv4", "--untrained", "--dataset", "cifar_fs", "--archive", fake_cifar,
            "--n-shot", "1,2", "--n-query", "3", "--n-episodes", "5", "--readouts", "protonet", "--out", ws / "ev",
            fragments=["n_shot + n_query = 2 + 3 = 5", "(4 images)", "lower --n-way/--n-shot/--n-query", "at most 4"])


@pytest.mark.parametrize("over, fragments", [
    ({"eval": {"n_way": 25}}, ["eval.n_way", "25-way", "it has 20", "lower eval.n_way/n_shot/n_query"]),
    ({"eval": {"n_shot": [1, 5], "n_query": 15}}, ["n_shot + n_query = 1 + 15 = 16", "(4 images)",
                                                   "eval.n_way/n_shot/n_query", "at most 4"]),
    ({"train": {"validation": {"n_way": 5, "n_shot": 5, "n_query": 15, "n_episodes": 10}}},
     ["val split (train.validation)", "5 + 15 = 20", "validation: null"]),
], ids=["n_way", "shot+query", "validation"])
def test_run_refuses_protocol_before_training(ws, fake_cifar, over, fragments):
    f = bench_file(ws, fake_cifar, **over)
    failing(ws, "run", f, "--out", ws / "runs", fragments=[f, *fragments])


def test_train_val_episodes_checked_up_front(ws, fake_cifar):
    # the per-epoch validation episodes would fail after the first epoch: refused before any training
    failing(ws, "train", "--dataset", "cifar_fs", "--archive", fake_cifar, "--epochs", "1", "--out", ws / "run",
            fragments=["cifar_fs val split", "5 + 15 = 20", "(4 images)", "--val-n-episodes 0"])


def test_run_data_source_checked_up_front(ws, fake_cifar):
    bad = ws / "cifar-100-python.tar.gz"
    bad.write_bytes(fake_cifar.read_bytes()[: fake_cifar.stat().st_size // 2])
    f = bench_file(ws, bad)
    failing(ws, "run", f, "--out", ws / "runs", fragments=[f, "corrupt or truncated", "download"])
    f = bench_file(ws, ws / "missing.tar.gz", "missing.yaml")
    failing(ws, "run", f, "--out", ws / "runs", fragments=[f, "does not exist", "archive: PATH"])


def test_generated_counts_match_the_fake_writer(tmp_path):
    """validate.py counts a ``generate: [a, b]`` source without generating it: a + b per class."""
    from fsl_lsskd.bench.validate import generated_counts
    from fsl_lsskd.data import get_dataset

    arch = write_fake_cifar100(tmp_path, per_class_train=3, per_class_test=2, seed=0)
    ds = get_dataset("cifar_fs", archive=arch)
    for split in ("train", "val", "test"):
        names, counts = generated_counts("cifar_fs", (3, 2), split)
        assert names == ds.class_split()[split] and counts.tolist() == ds.split_counts(split).tolist()
    assert not snapshot(cache_dir())  # counting decodes and caches nothing


def test_shipped_benchmarks_pass_up_front_validation():
    from fsl_lsskd.bench.config import load_benchmark
    from fsl_lsskd.bench.validate import validate_benchmark

    for f in sorted((REPO / "benchmarks").glob("*.yaml")):
        validate_benchmark(load_benchmark(f), data=False)
    validate_benchmark(load_benchmark(REPO / "benchmarks" / "smoke.yaml"), data=True)  # generated: no files
    assert not snapshot(cache_dir())


# ------------------------------------------------------------------------------------------ unknown names
VALID = {"method": ["Valid methods", "ce", "lsskd"], "backbone": ["backbones", "conv4", "resnet12", "timm"],
         "dataset": ["Valid datasets", "cifar_fs", "tiny_imagenet"],
         "readout": ["Valid readouts", "protonet", "logreg_batched"]}


@pytest.mark.parametrize("kind", ["method", "backbone", "dataset"])
def test_train_unknown_name(ws, fake_cifar, kind):
    args = {"method": "ce", "backbone": "conv4", "dataset": "cifar_fs", kind: "nope"}
    failing(ws, "train", "--method", args["method"], "--backbone", args["backbone"], "--dataset", args["dataset"],
            "--archive", fake_cifar, "--epochs", "1", "--val-n-episodes", "0", "--out", ws / "run",
            fragments=[f"unknown {kind} 'nope'", *VALID[kind]])


@pytest.mark.parametrize("kind", ["backbone", "dataset", "readout"])
def test_evaluate_unknown_name(ws, fake_cifar, kind):
    args = {"backbone": "conv4", "dataset": "cifar_fs", "readout": "protonet", kind: "nope"}
    failing(ws, "evaluate", "--backbone", args["backbone"], "--untrained", "--dataset", args["dataset"], "--archive",
            fake_cifar, "--readouts", args["readout"], "--n-shot", "1", "--n-query", "2", "--n-episodes", "5",
            "--out", ws / "ev", fragments=[f"unknown {kind} 'nope'", *VALID[kind]])


@pytest.mark.parametrize("kind, over, key", [
    ("method", {"methods": ["ce", "nope"]}, "`methods`"),
    ("backbone", {"backbones": ["nope"]}, "`backbones`"),
    ("dataset", {"datasets": ["nope"]}, "`datasets`"),
    ("readout", {"eval": {"readouts": ["protonet", "nope"]}}, "`eval.readouts`"),
    ("method", {"method_overrides": {"nope": {"lr": 0.1}}}, "`method_overrides`"),
], ids=["method", "backbone", "dataset", "readout", "override-method"])
@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
def test_run_unknown_name_up_front(ws, fake_cifar, kind, over, key, dry):
    f = bench_file(ws, fake_cifar, **over)
    failing(ws, "run", f, "--out", ws / "runs", *(["--dry-run"] if dry else []),
            fragments=[f, key, f"unknown {kind} 'nope'", *VALID[kind]])


def test_run_bad_method_setting_up_front(ws, fake_cifar):
    f = bench_file(ws, fake_cifar, method_overrides={"ce": {"lr_typo": 0.1}})
    failing(ws, "run", f, "--out", ws / "runs", fragments=[f, "'ce'", "lr_typo", "valid:"])


# ---------------------------------------------------------------------------------------------- checkpoints
def synthetic(n_classes=4, per_class=10, size=16, split="train", seed=0) -> SplitData:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    base = (labels[:, None, None, None] * 60 + 20).astype(np.int64)  # class colour: learnable
    imgs = np.clip(base + rng.integers(-20, 20, (len(labels), size, size, 3)), 0, 255).astype(np.uint8)
    return SplitData(imgs, labels, tuple(f"c{i}" for i in range(n_classes)), "synthetic", split, f"syn{seed}")


def train_cfg(out: Path, **kw):
    from fsl_lsskd.train import TrainConfig

    base = dict(method="ce", backbone="conv4", dataset="synthetic", image_size=16, epochs=3, batch_size=8,
                out_dir=str(out), validation=None, mlflow=False, export=True, heldout=0.1, seed=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def conv4_run(tmp_path_factory):
    """A conv4 training run: (last.pt after epoch 1 of 2, export/backbone.safetensors of the finished run)."""
    from fsl_lsskd.train import train

    root = tmp_path_factory.mktemp("conv4")
    part = train(train_cfg(root / "part", epochs=2), train_data=synthetic(), stop_after_epoch=1)
    res = train(train_cfg(root / "run", epochs=1), train_data=synthetic())
    return part.out_dir / "last.pt", res.export_dir / "backbone.safetensors"


@pytest.mark.parametrize("which", ["last.pt", "export file", "export dir"])
def test_evaluate_checkpoint_of_another_backbone(ws, fake_cifar, conv4_run, which):
    ckpt = {"last.pt": conv4_run[0], "export file": conv4_run[1], "export dir": conv4_run[1].parent}[which]
    failing(ws, "evaluate", "--backbone", "resnet12_narrow", "--checkpoint", ckpt, "--dataset", "cifar_fs",
            "--archive", fake_cifar, "--n-shot", "1", "--n-query", "2", "--n-episodes", "5", "--out", ws / "ev",
            fragments=["does not match backbone 'resnet12_narrow'", "--backbone conv4"])


def _truncated(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


@pytest.mark.parametrize("kind", ["truncated last.pt", "truncated safetensors", "not a checkpoint"])
def test_evaluate_corrupt_checkpoint(ws, fake_cifar, conv4_run, kind):
    if kind == "truncated last.pt":
        bad = _truncated(conv4_run[0], ws / "in" / "last.pt")
    elif kind == "truncated safetensors":
        bad = _truncated(conv4_run[1], ws / "in" / "backbone.safetensors")
        (ws / "in" / "backbone.json").write_text(conv4_run[1].with_suffix(".json").read_text())
    else:
        bad = ws / "in" / "weights.pt"
        bad.parent.mkdir()
        bad.write_bytes(b"definitely not a checkpoint\n" * 10)
    res = failing(ws, "evaluate", "--backbone", "conv4", "--checkpoint", bad, "--dataset", "cifar_fs", "--archive",
                  fake_cifar, "--n-shot", "1", "--n-query", "2", "--n-episodes", "5", "--out", ws / "ev",
                  fragments=[bad, "corrupt", "re-"])
    assert len(res.output) < 600, res.output  # one clear line, not torch's multi-paragraph unpickler lecture


def test_export_and_resume_from_truncated_checkpoint(ws, fake_cifar, conv4_run):
    bad = _truncated(conv4_run[0], ws / "run" / "last.pt")
    failing(ws, "export", bad, "--out", ws / "exp", fragments=[bad, "corrupt or truncated"])
    # resuming a run whose last.pt is corrupt: refused before the data is decoded, the file is left as it was
    failing(ws, "train", "--dataset", "cifar_fs", "--archive", fake_cifar, "--epochs", "1", "--val-n-episodes", "0",
            "--out", ws / "run", fragments=[bad, "corrupt or truncated", "Delete it"])
    assert bad.read_bytes() == conv4_run[0].read_bytes()[: conv4_run[0].stat().st_size // 2]


# ------------------------------------------------------------------------------- no empty --out left behind
def _bad_image_folder(ws: Path) -> Path:
    """An image folder whose train class holds an undecodable file (fails when the split is decoded)."""
    from PIL import Image

    root = ws / "imgs"
    for c in "abcdefghijkl":
        (root / c).mkdir(parents=True)
        for j in range(4):
            Image.fromarray(np.full((8, 8, 3), 20 * j, np.uint8)).save(root / c / f"{j}.png")
    (root / "a" / "9.jpg").write_text("not a jpeg")
    (ws / "split.json").write_text(json.dumps({"train": list("ab"), "val": list("cdefg"), "test": list("hijkl")}))
    return root


@pytest.mark.parametrize("case", ["missing-archive", "undecodable-train-image", "bad-setting"])
def test_train_failing_early_leaves_no_out_dir(ws, fake_cifar, case):
    """A run that fails on its data or settings (validation off: nothing is checked before the engine) must not
    leave an empty --out directory (nor any cache file or MLflow store)."""
    common = ["--epochs", "1", "--val-n-episodes", "0", "--out", ws / "nested" / "run"]
    if case == "missing-archive":
        failing(ws, "train", "--dataset", "cifar_fs", "--archive", ws / "nope.tar.gz", *common,
                fragments=["does not exist", "--download"])
    elif case == "undecodable-train-image":
        root = _bad_image_folder(ws)
        failing(ws, "train", "--dataset", "image_folder", "--data-root", root, "--split-file", ws / "split.json",
                "--folder-image-size", "16", "--image-size", "16", *common, fragments=["9.jpg", "fails to decode"])
    else:
        failing(ws, "train", "--dataset", "cifar_fs", "--archive", fake_cifar, "--set", "lr=fast", *common,
                fragments=["lr='fast'"])
    assert not (ws / "nested").exists()


def test_evaluate_failing_on_its_data_leaves_no_out_dir(ws, fake_cifar):
    root = _bad_image_folder(ws)
    (root / "h" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    failing(ws, "evaluate", "--untrained", "--backbone", "conv4", "--dataset", "image_folder", "--data-root", root,
            "--split-file", ws / "split.json", "--folder-image-size", "16", "--n-shot", "1", "--n-query", "2",
            "--n-episodes", "5", "--readouts", "protonet", "--out", ws / "ev" / "x",
            fragments=["broken.png", "fails to decode"])
    failing(ws, "evaluate", "--untrained", "--backbone", "conv4", "--dataset", "cifar_fs", "--archive",
            ws / "nope.tar.gz", "--n-episodes", "5", "--out", ws / "ev2", fragments=["does not exist", "--download"])


# -------------------------------------------------------------------------------- unwritable outputs, full disk
def _under(path, root: Path) -> bool:
    try:
        return Path(os.fsdecode(path)).absolute().resolve().is_relative_to(root)
    except (TypeError, ValueError):
        return False


def refuse_writes(monkeypatch, root: Path, err: int) -> None:
    """Creating or writing anything under ``root`` fails with ``OSError(err)`` as the kernel reports it
    (EROFS: read-only mount; EACCES: a directory this user may not write); reads still work."""
    root = Path(root).resolve()
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def fail(path):
        raise OSError(err, os.strerror(err), os.fsdecode(path))

    def fake_open(file, mode="r", *a, **kw):
        if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and _under(file, root):
            fail(file)
        return real_open(file, mode, *a, **kw)

    def fake_os_open(path, flags, *a, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _under(path, root):
            fail(path)
        return real_os_open(path, flags, *a, **kw)

    def fake_mkdir(path, *a, **kw):
        if _under(path, root):
            fail(path)
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


class _FullDiskFile(io.RawIOBase):
    """A file on a full disk: each write stores half its bytes, then fails with ENOSPC."""

    def __init__(self, real):
        self.real = real

    def writable(self):
        return True

    def write(self, b):
        b = bytes(b)
        self.real.write(b[: len(b) // 2])
        self.real.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fileno(self):
        return self.real.fileno()

    def close(self):
        self.real.close()
        super().close()


def disk_full(monkeypatch, root: Path, torch_save_from: int = 1, files: bool = True) -> None:
    """The disk holding ``root`` is full: files and directories can still be created (free inodes) but data
    writes (``files=False``: only the checkpoint writer's) store part of their bytes and fail with ENOSPC;
    ``torch.save`` (a C++ writer) does so from its ``torch_save_from``-th call on."""
    root = Path(root).resolve()
    real_open, real_save, calls = builtins.open, torch.save, [0]

    def fake_open(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and _under(file, root):
            return _FullDiskFile(f)
        return f

    def fake_save(obj, f, *a, **kw):
        calls[0] += 1
        if calls[0] < torch_save_from or not _under(getattr(f, "name", f), root):
            return real_save(obj, f, *a, **kw)
        buf = io.BytesIO()
        real_save(obj, buf)
        half = buf.getvalue()[: len(buf.getvalue()) // 2]
        if hasattr(f, "write"):
            f.write(half)
            f.flush()
        else:
            with real_open(f, "wb") as fh:
                fh.write(half)
        try:  # as torch reports it: its C++ writer's own error, raised while handling the file's ENOSPC
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 168256 vs 168152")

    if files:
        monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(torch, "save", fake_save)


def _train_args(fake_cifar, out, *extra):
    return ["train", "--dataset", "cifar_fs", "--archive", fake_cifar, "--epochs", "1", "--batch-size", "64",
            "--val-n-episodes", "0", "--out", out, *extra]


def _evaluate_args(fake_cifar, out):
    return ["evaluate", "--backbone", "conv4", "--untrained", "--dataset", "cifar_fs", "--archive", fake_cifar,
            "--n-shot", "1", "--n-query", "2", "--n-episodes", "5", "--readouts", "protonet", "--no-cache",
            "--out", out]


def fake_results(monkeypatch):
    """``fsl-bench table`` without a store: collect() returns a small ResultSet."""
    from fsl_lsskd.report import collect
    from fsl_lsskd.report.results import ResultSet

    def fake_collect(bench, store=None, data=None):
        rs = ResultSet()
        rng = np.random.default_rng(0)
        for m in ("ce", "lsskd"):
            rs.add((m, "conv4"), ("cifar_fs", "cifar_fs", "5w1s3q", "protonet"), 0,
                   {"accuracy": rng.uniform(20, 80, 5)})
        rs.curves[("ce", "conv4")] = {"train_loss": [(1, 2.0), (2, 1.5)]}
        rs.meta.update(episodes_source={"generated"}, cells_found=2, cells_expected=2)
        return rs

    monkeypatch.setattr(collect, "collect", fake_collect)


def _command(which, ws, fake_cifar, out, monkeypatch):
    if which == "train":
        return _train_args(fake_cifar, out)
    if which == "evaluate":
        return _evaluate_args(fake_cifar, out)
    if which == "table":
        fake_results(monkeypatch)
        return ["table", bench_file(ws, fake_cifar), "--out", out]
    return ["run", bench_file(ws, fake_cifar), "--out", out]


@pytest.mark.parametrize("which", ["train", "evaluate", "table", "run"])
def test_readonly_out_real_permissions(ws, fake_cifar, monkeypatch, which):
    ro = ws / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: permission bits do not stop root writing (the OSError path is covered "
                        "by test_unwritable_out_oserror_path and test_unwritable_out_refused_up_front)")
        args = _command(which, ws, fake_cifar, ro / "out", monkeypatch)
        failing(ws, *args, fragments=[ro, "not writable", "chmod u+w", "--out"])
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("which", ["train", "evaluate", "table", "run"])
def test_unwritable_out_refused_up_front(ws, fake_cifar, monkeypatch, which):
    """The kernel's answer for a non-root user on a 0555 directory (``os.access`` false): every command
    refuses before doing any work, so not even the data cache or an MLflow store appears."""
    ro = ws / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if _under(p, ro.resolve()) else
                        real_access(p, mode, **kw))
    args = _command(which, ws, fake_cifar, ro / "out", monkeypatch)
    failing(ws, *args, fragments=[ro, "not writable", "--out"])


@pytest.mark.parametrize("err, fragment", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only file system")],
                         ids=["EACCES", "EROFS"])
@pytest.mark.parametrize("which, exists", [("train", True), ("train", False), ("evaluate", False), ("table", True)])
def test_unwritable_out_oserror_path(ws, fake_cifar, monkeypatch, which, exists, err, fragment):
    """Past the up-front check (as root, or a mount that turns read-only mid-run) the OS refuses the write:
    exit 2 naming the directory, no file and no temp file left, no MLflow run."""
    out = ws / "out"
    if exists:
        out.mkdir()
    args = _command(which, ws, fake_cifar, out, monkeypatch)
    refuse_writes(monkeypatch, out if exists else ws / "out", err)
    res = cli(*args)
    assert_user_error(res, "cannot write", fragment, out if exists else ws, "--out")
    assert not snapshot(out) and not temp_files(ws)
    assert not (ws / "mlflow.db").exists() and not (ws / "mlruns").exists()


@pytest.mark.parametrize("which", ["train", "evaluate", "table"])
def test_disk_full(ws, fake_cifar, monkeypatch, which):
    """ENOSPC while writing: exit 2 naming the directory and the fix; the half-written temp file is removed
    and no output file appears (train: before any MLflow run is opened)."""
    out = ws / "out"
    args = _command(which, ws, fake_cifar, out, monkeypatch)
    disk_full(monkeypatch, out)
    res = cli(*args)
    assert_user_error(res, "no space left on the device holding", out, "Free disk space", "--out")
    assert not snapshot(out) and not temp_files(ws)
    assert not (ws / "mlflow.db").exists()


def test_disk_full_while_caching_data(ws, fake_cifar, monkeypatch):
    """The data cache's disk is full while a decoded split is written: exit 2 naming the cache directory and
    $FSL_BENCH_CACHE; neither a partial .npy, nor its .json marker, nor a temp file is left."""
    disk_full(monkeypatch, cache_dir())
    res = cli("data", "prepare", "cifar_fs", "--archive", fake_cifar)
    assert_user_error(res, "no space left on the device holding", cache_dir() / "data" / "cifar_fs",
                      "$FSL_BENCH_CACHE")
    assert not [p for p in cache_dir().rglob("*") if p.is_file()]


def test_disk_full_mid_training_keeps_last_checkpoint_and_resumes(ws, fake_cifar, monkeypatch):
    """The disk fills while epoch 2's checkpoint is written: exit 2, epoch 1's last.pt intact, no temp
    file; once space is freed the same command resumes from epoch 1 and finishes."""
    out = ws / "run"
    args = _train_args(fake_cifar, out, "--no-mlflow", "--no-export")
    args[args.index("--epochs") + 1] = "2"
    with monkeypatch.context() as mp:
        disk_full(mp, out, torch_save_from=2, files=False)  # epoch 2's checkpoint hits the full disk
        res = cli(*args)
    assert_user_error(res, "no space left", out, "Free disk space")
    assert not temp_files(out)
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["epoch"] == 1
    res = cli(*args)
    assert res.exit_code == 0, res.output
    assert "epoch 2" in res.output and "epoch 1 " not in res.output  # resumed, not restarted
    assert not (out / "last.pt").exists() and (out / "model" / "model.safetensors").is_file()  # finished
    assert not temp_files(out)


@pytest.mark.slow  # creates an MLflow store (~10 s)
@pytest.mark.parametrize("fault", ["EACCES", "ENOSPC"])
def test_run_unwritable_or_full_out_stops_the_grid(ws, fake_cifar, monkeypatch, fault):
    """Past the up-front check, the first cell cannot write its run directory: the grid stops with exit 2
    (not a 'crashed cell' and the next cell), nothing half-written, no cell marked complete."""
    import mlflow

    out = ws / "runs"
    out.mkdir()
    f = bench_file(ws, fake_cifar, methods=["ce", "pskd"])
    with monkeypatch.context() as mp:
        if fault == "EACCES":
            refuse_writes(mp, out, errno.EACCES)
        else:
            disk_full(mp, out)
        res = cli("run", f, "--out", out)
    assert_user_error(res, "cannot write", out, "--out")
    assert not temp_files(ws) and not [p for p in out.rglob("*") if p.is_file()]
    client = mlflow.tracking.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("fsl-bench/faults").experiment_id])
    assert [r.data.tags.get("fsl.kind") for r in runs] == ["invocation"]  # no cell run was opened
    assert runs[0].info.status == "FAILED"  # the invocation run records the failure


def test_atomic_write_cleans_up_and_names_directory(tmp_path, monkeypatch):
    from fsl_lsskd.errors import OutputError
    from fsl_lsskd.utils import atomic_write_text

    dest = tmp_path / "d" / "x.json"
    atomic_write_text(dest, "old")
    with monkeypatch.context() as mp:
        disk_full(mp, tmp_path)
        with pytest.raises(OutputError, match=r"no space left on the device holding .*/d\b"):
            atomic_write_text(dest, "new" * 1000)
    assert dest.read_text() == "old" and not temp_files(tmp_path)


def test_stale_temp_of_a_killed_writer_is_removed(tmp_path):
    """A temp file left by a SIGKILLed writer (dead pid) is removed by the next write of the same file; a
    live writer's temp file is kept."""
    from fsl_lsskd.utils import _temp_prefix, atomic_write_text

    dest = tmp_path / "last.pt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / (_temp_prefix(dest).replace(f"~{os.getpid()}~", f"~{dead.pid}~") + "abc.tmp")
    live = tmp_path / (_temp_prefix(dest).replace(f"~{os.getpid()}~", f"~{os.getppid()}~") + "def.tmp")
    other = tmp_path / (_temp_prefix(tmp_path / "other.pt").replace(f"~{os.getpid()}~", f"~{dead.pid}~") + "g.tmp")
    for p in (stale, live, other):
        p.write_bytes(b"half")
    atomic_write_text(dest, "x")
    assert not stale.exists() and live.exists() and other.exists()


# --------------------------------------------------------------------------------------- kill and resume
KILL_SEED = int(os.environ.get("FSL_FAULTS_SEED", "20240607"))  # set to explore other kill points
EPOCHS = 3


def steps_per_epoch(method: str) -> int:
    """synthetic(): 40 images, 10 % held out -> 36, batch 8: 4 steps (RFS drops the short batch), 5 for methods
    with prediction stores (they train on every sample every epoch)."""
    from fsl_lsskd.registry import METHODS

    return 5 if METHODS.get(method).keeps_last_batch else 4
KILL_CASES = [("ce", "step"), ("pskd", "step"), ("pskd", "save"), ("lsskd", "step")]

DRIVER = r'''
"""Start one training run per case, each in its own process, and SIGKILL it at the N-th training step or
half-way through writing the N-th checkpoint. The interpreter imports torch once; each run is a child
forked before any computation (so no thread pool is inherited), killed by a real SIGKILL."""
import io, json, os, signal, sys
import numpy as np
import torch

torch.set_num_threads(1)
from fsl_lsskd.data.base import SplitData
from fsl_lsskd.protocol import EpisodeProtocol
from fsl_lsskd.registry import METHODS
from fsl_lsskd.train import TrainConfig, train

spec = json.loads(open(sys.argv[1]).read())


def killed_run(case):
    z = np.load(spec["data"])
    data = SplitData(z["images"], z["labels"], tuple(str(c) for c in z["class_names"]), "synthetic", "train",
                     str(z["fingerprint"]))
    cls = METHODS.get(case["cfg"]["method"])
    kind, at = case["kill"]
    if kind == "step":
        real_step, calls = cls.training_step, [0]

        def step(self, batch, epoch):
            calls[0] += 1
            if calls[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_step(self, batch, epoch)

        cls.training_step = step
    else:
        real_save, saves = torch.save, [0]

        def save(obj, f, *a, **kw):
            saves[0] += 1
            if saves[0] != at:
                return real_save(obj, f, *a, **kw)
            buf = io.BytesIO()
            real_save(obj, buf)
            fh = f if hasattr(f, "write") else open(f, "wb")  # the checkpoint writer passes its open file
            fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            fh.flush()
            os.fsync(fh.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save
    train(TrainConfig(**{**case["cfg"], "validation": None}), train_data=data)


pids = {}
for name, case in spec["cases"].items():
    pid = os.fork()
    if pid == 0:
        try:
            killed_run(case)
        finally:
            os._exit(3)  # reached only when the kill never happened
    pids[name] = pid
status = {}
for name, pid in pids.items():
    _, st = os.waitpid(pid, 0)
    status[name] = {"signal": os.WTERMSIG(st) if os.WIFSIGNALED(st) else None,
                    "exit": os.WEXITSTATUS(st) if os.WIFEXITED(st) else None}
with open(spec["result"], "w") as fh:
    json.dump(status, fh)
'''


def kill_point(method: str, kind: str) -> int:
    rng = np.random.default_rng([KILL_SEED, zlib.crc32(f"{method}/{kind}".encode())])
    return int(rng.integers(1, EPOCHS * steps_per_epoch(method) + 1)) if kind == "step" else \
        int(rng.integers(1, EPOCHS + 1))


@pytest.fixture(scope="module", autouse=True)
def _kill_driver(request, tmp_path_factory):
    """Starts the driver (every killed run of KILL_CASES) with the module's first test, so it overlaps the
    fast tests; only when a kill test is selected."""
    if not any(getattr(item, "originalname", "") == "test_sigkill_then_resume_equals_uninterrupted"
               for item in request.session.items):
        yield None
        return
    root = tmp_path_factory.mktemp("kill")
    data = synthetic()
    np.savez(root / "train.npz", images=data.images, labels=data.labels, class_names=np.array(data.class_names),
             fingerprint=np.array(data.fingerprint))
    (root / "driver.py").write_text(DRIVER)
    cases = {f"{m}-{k}": {"cfg": train_cfg(root / f"{m}-{k}", method=m).to_dict(), "kill": [k, kill_point(m, k)]}
             for m, k in KILL_CASES}
    spec = {"data": str(root / "train.npz"), "result": str(root / "status.json"), "cases": cases}
    (root / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "FSL_BENCH_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(root / "driver.py"), str(root / "spec.json")], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def get(method, kind):
        if proc.returncode is None:
            log = proc.communicate(timeout=600)[0]
            assert proc.returncode == 0, f"kill driver failed ({proc.returncode}):\n{log[-3000:]}"
        status = json.loads((root / "status.json").read_text())[f"{method}-{kind}"]
        return status, root / f"{method}-{kind}", cases[f"{method}-{kind}"]["kill"][1]

    yield get
    if proc.poll() is None:  # the driver and its forked runs
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def killed_runs(_kill_driver):
    return _kill_driver


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """Uninterrupted runs, one per method, trained in this process."""
    from fsl_lsskd.train import train

    root, done = tmp_path_factory.mktemp("ref"), {}

    def get(method):
        if method not in done:
            done[method] = train(train_cfg(root / method, method=method), train_data=synthetic())
        return done[method]

    return get


def _losses(history):
    return [{k: v for k, v in h.items() if k.startswith("train_") or k in ("epoch", "lr", "steps",
                                                                          "heldout_base_acc")} for h in history]


def _eval(export: Path):
    from fsl_lsskd.checkpoint import load_backbone
    from fsl_lsskd.eval import evaluate

    model, _ = load_backbone(export)
    test = synthetic(n_classes=6, per_class=20, split="test", seed=3)
    return evaluate(model, test, protocols=["5w1s10q_30", "5w5s10q_30"], readouts=("protonet", "logreg_batched"),
                    image_size=16, cache=False)


@pytest.mark.parametrize("method, kind", KILL_CASES, ids=[f"{m}-{k}" for m, k in KILL_CASES])
def test_sigkill_then_resume_equals_uninterrupted(killed_runs, reference_runs, method, kind):
    from fsl_lsskd.train import train

    status, out, at = killed_runs(method, kind)
    why = f"(kill seed {KILL_SEED}: SIGKILL at {kind} {at} of {method}; rerun with FSL_FAULTS_SEED={KILL_SEED})"
    assert status == {"signal": signal.SIGKILL, "exit": None}, f"run not killed: {status} {why}"
    # where the kill landed: the last completed epoch's checkpoint (none before the first), intact
    done_epochs = (at - 1) // steps_per_epoch(method) if kind == "step" else at - 1
    if done_epochs:
        assert torch.load(out / "last.pt", weights_only=False)["epoch"] == done_epochs, why
    else:
        assert not (out / "last.pt").exists(), why
    if kind == "save":
        assert temp_files(out), f"the kill mid-write should have left a temp file {why}"

    resumed = train(train_cfg(out, method=method), train_data=synthetic())  # loads the checkpoint cleanly
    ref = reference_runs(method)
    assert resumed.resumed_from_epoch == done_epochs, why
    assert not temp_files(out) and not [p for p in out.rglob(".*")], f"stray files after resume {why}"
    assert sum(h["steps"] for h in ref.history) == EPOCHS * steps_per_epoch(method)  # the kill-point range
    assert _losses(resumed.history) == _losses(ref.history), why
    from safetensors.torch import load_file

    a = load_file(str(ref.model_dir / "model.safetensors"))
    b = load_file(str(resumed.model_dir / "model.safetensors"))
    assert a.keys() == b.keys() and resumed.train_id == ref.train_id
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs {why}"
    ea, eb = _eval(ref.export_dir), _eval(resumed.export_dir)
    for ra, rb in zip(ea, eb):
        assert (ra.readout, ra.protocol) == (rb.readout, rb.protocol)
        assert np.array_equal(ra.accuracy, rb.accuracy), f"{ra.readout} {ra.protocol.key} {why}"


# ---------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_losses(tmp_path, reference_runs):
    from fsl_lsskd.train import train

    ref = reference_runs("ce")
    again = train(train_cfg(tmp_path / "again"), train_data=synthetic())
    other = train(train_cfg(tmp_path / "seed1", seed=1), train_data=synthetic())
    assert _losses(again.history) == _losses(ref.history)
    assert [h["train_loss"] for h in other.history] != [h["train_loss"] for h in ref.history]


@pytest.fixture
def splits_copy(tmp_path, monkeypatch):
    import shutil

    from fsl_lsskd.data import splits as sp

    copy = tmp_path / "splits"
    shutil.copytree(REPO / "splits", copy)
    monkeypatch.setattr(sp, "splits_dir", lambda: copy)
    return copy


def test_split_file_verified_at_every_load_even_from_cache(ws, fake_cifar, splits_copy):
    from fsl_lsskd.data import get_dataset
    from fsl_lsskd.errors import DataError

    get_dataset("cifar_fs", archive=fake_cifar).load_split("test")  # decoded and cached
    f = splits_copy / "cifar_fs" / "test.txt"
    original = f.read_text()
    f.write_text(original.replace("fox", "wolf"))
    with pytest.raises(DataError, match=r"splits/cifar_fs/test.txt was modified"):
        get_dataset("cifar_fs", archive=fake_cifar).load_split("test")  # the cache entry exists
    failing(ws, *_evaluate_args(fake_cifar, ws / "ev"), fragments=["splits/cifar_fs/test.txt was modified",
                                                                   "git checkout"])
    f.write_text(original)
    assert len(get_dataset("cifar_fs", archive=fake_cifar).load_split("test")) == 80


def test_episode_file_verified_at_every_load(splits_copy):
    from fsl_lsskd.errors import DataError
    from fsl_lsskd.eval.episodes import load_episodes
    from fsl_lsskd.protocol import EpisodeProtocol

    args = ("tiny_imagenet", "test", (150,) * 40, EpisodeProtocol(5, 1, 15, 10))
    first = load_episodes(*args)
    assert first.source.startswith("splits/episodes/")
    path = splits_copy / first.source[len("splits/"):]
    original = path.read_bytes()
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(DataError, match="was modified"):
        load_episodes(*args)
    path.write_bytes(original)
    again = load_episodes(*args)
    assert np.array_equal(first.images, again.images)


def test_experiment_created_by_another_machine_first_is_reused(tmp_path, monkeypatch):
    """Shards on different machines share no file lock: when another machine creates the experiment between
    our lookup and our create (the race seen on PostgreSQL), the store uses that experiment instead of failing
    with RESOURCE_ALREADY_EXISTS."""
    from mlflow.tracking import MlflowClient

    from fsl_lsskd.record import Store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    other = MlflowClient(tracking_uri=uri)
    store = Store(MlflowClient(tracking_uri=uri))
    real_get = store.client.get_experiment_by_name
    calls = {"n": 0}

    def get_then_race(name):
        calls["n"] += 1
        if calls["n"] <= 2:  # both of our lookups miss; the other machine creates it right after
            if calls["n"] == 2:
                other.create_experiment(name)
            return None
        return real_get(name)

    monkeypatch.setattr(store.client, "get_experiment_by_name", get_then_race)
    eid = store.experiment_id("fsl-bench/grid")
    assert eid == other.get_experiment_by_name("fsl-bench/grid").experiment_id
    assert calls["n"] == 3
