"""Opening a file from a stranger never runs code (issue 26, "Loading never executes code").

Each hostile file below holds an object whose unpickling runs ``touch MARKER`` through ``os.system``; the first
test shows that it does run when the file is unpickled the ordinary way. Every entry point that opens a
checkpoint or a CIFAR-100 pickle must refuse such a file with exit code 2 (or the matching UserError), name the
global it asked for and the formats that are safe, and leave no marker behind.
"""
from __future__ import annotations

import ast
import io
import os
import pickle
import re
import shlex
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fsl_lsskd.cli import main
from fsl_lsskd.data.fake import write_fake_cifar100

REPO = Path(__file__).resolve().parent.parent
SAFE = "safetensors"  # every checkpoint refusal names the safe formats


class Payload:
    """Unpickling this runs ``touch <marker>`` (what a crafted checkpoint or dataset pickle does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture
def ws(tmp_path, monkeypatch) -> Path:
    """Working directory with its own MLflow store; ``ws/MARKER`` must never appear."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    yield tmp_path
    assert not (tmp_path / "MARKER").exists(), "a hostile file ran its code"


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory) -> Path:
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar"), per_class_train=3, per_class_test=1, seed=5)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(res, *fragments):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output, res.output
    for f in fragments:
        assert str(f) in res.output, f"{f!r} not in: {res.output}"
    return res.output


# ----------------------------------------------------------------------------------------------- checkpoints
def _conv4_state() -> dict:
    from fsl_lsskd.backbones import create_backbone

    return create_backbone("conv4", num_classes=0, image_size=32).state_dict()


def hostile_checkpoint(path: Path, marker: Path, kind: str = "training") -> Path:
    """A ``torch.save`` file that looks like what fsl-bench reads, with the payload inside.

    ``training``: a training checkpoint (``model`` + ``meta``) whose meta holds the payload; ``state_dict``: a plain
    ``{"state_dict": ...}`` with the payload beside the tensors; ``legacy``: the same in torch's pre-1.6 (non-zip)
    format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = _conv4_state()
    if kind == "training":
        obj = {"model": {f"backbone.{k}": v for k, v in weights.items()}, "epoch": 1,
               "meta": {"method": "ce", "backbone": "conv4", "image_size": 32, "note": Payload(marker)}}
    else:
        obj = {"state_dict": weights, "best_acc": Payload(marker)}
    torch.save(obj, path, _use_new_zipfile_serialization=kind != "legacy")
    return path


def test_the_hostile_files_do_run_code_when_unpickled_unsafely(tmp_path, fake_cifar):
    """The payloads are real: an ordinary unpickler runs them (so the refusals below are not vacuous)."""
    for kind in ("training", "state_dict", "legacy"):
        marker = tmp_path / f"ran-{kind}"
        torch.load(hostile_checkpoint(tmp_path / f"{kind}.pth", marker, kind), weights_only=False)
        assert marker.is_file(), kind
    marker = tmp_path / "ran-cifar"
    with tarfile.open(hostile_cifar(tmp_path / "c", fake_cifar, "meta", marker)) as tar:
        pickle.loads(tar.extractfile("cifar-100-python/meta").read(), encoding="bytes")
    assert marker.is_file()


@pytest.mark.parametrize("kind", ["training", "state_dict", "legacy"])
@pytest.mark.parametrize("where", ["file", "DIR/last.pt"])
def test_evaluate_refuses_a_hostile_checkpoint(ws, fake_cifar, kind, where):
    ckpt = hostile_checkpoint(ws / "in" / ("last.pt" if where == "DIR/last.pt" else "evil.pth"), ws / "MARKER", kind)
    arg = ckpt.parent if where == "DIR/last.pt" else ckpt
    out = refused(cli("evaluate", "--backbone", "conv4", "--checkpoint", arg, "--dataset", "cifar_fs", "--archive",
                      fake_cifar, "--n-shot", "1", "--n-query", "2", "--n-episodes", "5", "--out", ws / "ev"),
                  f"refused to open {ckpt}", "posix.system", "could run code", SAFE)
    assert not (ws / "ev").exists(), out


@pytest.mark.parametrize("where", ["file", "DIR/last.pt", "DIR/backbone.pth"])
def test_export_refuses_a_hostile_checkpoint(ws, where):
    name = {"file": "evil.pth", "DIR/last.pt": "last.pt", "DIR/backbone.pth": "backbone.pth"}[where]
    ckpt = hostile_checkpoint(ws / "in" / name, ws / "MARKER", "training" if name == "last.pt" else "state_dict")
    refused(cli("export", ckpt if where == "file" else ckpt.parent, "--out", ws / "x"),
            f"refused to open {ckpt}", "posix.system", SAFE)
    assert not (ws / "x").exists()


def test_train_refuses_a_hostile_resume_checkpoint(ws, fake_cifar):
    """``--out DIR`` whose ``last.pt`` (resumed by the engine) is hostile; the file is left as it was."""
    ckpt = hostile_checkpoint(ws / "run" / "last.pt", ws / "MARKER")
    before = ckpt.read_bytes()
    refused(cli("train", "--dataset", "cifar_fs", "--archive", fake_cifar, "--epochs", "1", "--batch-size", "64",
                "--val-n-episodes", "0", "--no-mlflow", "--out", ws / "run"),
            f"refused to open {ckpt}", "posix.system", SAFE)
    assert ckpt.read_bytes() == before and sorted(p.name for p in (ws / "run").iterdir()) == ["last.pt"]


def test_edge_report_refuses_a_hostile_export(ws):
    """``fsl-bench edge`` runs :func:`edge_report` on each cell's export fetched from the store; an export
    directory holding a hostile ``backbone.pth`` instead of ``backbone.safetensors`` is refused."""
    from fsl_lsskd.edge.report import edge_report
    from fsl_lsskd.errors import UnsafeCheckpointError

    ckpt = hostile_checkpoint(ws / "export" / "backbone.pth", ws / "MARKER", "state_dict")
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        edge_report(ckpt.parent, ws / "edge", measure=())


@pytest.mark.parametrize("loader", ["load_backbone", "load_method", "read_training_state", "read_state"])
@pytest.mark.parametrize("kind", ["training", "state_dict", "legacy"])
def test_library_loaders_refuse_a_hostile_checkpoint(ws, loader, kind):
    from fsl_lsskd import checkpoint
    from fsl_lsskd.errors import UnsafeCheckpointError

    ckpt = hostile_checkpoint(ws / "in" / "last.pt", ws / "MARKER", kind)
    with pytest.raises(UnsafeCheckpointError) as err:
        getattr(checkpoint, loader)(ckpt)
    msg = str(err.value)
    assert f"refused to open {ckpt}" in msg and "posix.system" in msg and SAFE in msg, msg


def test_checkpoints_this_tool_writes_still_load(tmp_path):
    """A resume state (``last.pt``, with the scheduler's Counter), its model directory and export load safely;
    a plain tensors-only ``.pth`` does too."""
    from fsl_lsskd.checkpoint import load_backbone, load_method, read_training_state
    from fsl_lsskd.data.base import SplitData
    from fsl_lsskd.train import TrainConfig, train

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    images = np.clip(labels[:, None, None, None] * 60 + rng.integers(0, 20, (40, 16, 16, 3)), 0, 255).astype(np.uint8)
    data = SplitData(images, labels, tuple(f"c{i}" for i in range(4)), "synthetic", "train", "hostile-syn")
    cfg = TrainConfig(method="ce", backbone="conv4", dataset="synthetic", image_size=16, epochs=2, batch_size=8,
                      out_dir=str(tmp_path / "run"), validation=None, mlflow=False, export=True, seed=0)
    part = train(cfg, train_data=data, stop_after_epoch=1)
    state = read_training_state(part.out_dir / "last.pt")
    assert state["epoch"] == 1 and type(state["scheduler"]["milestones"]).__name__ == "Counter"
    assert load_backbone(part.out_dir / "last.pt")[1]["method"] == "ce"
    assert load_method(part.out_dir / "last.pt").training is False
    done = train(cfg, train_data=data)  # resumes from that last.pt
    assert done.resumed_from_epoch == 1 and done.train_id == part.train_id
    assert load_backbone(done.export_dir)[1]["backbone"] == "conv4"
    torch.save(_conv4_state(), tmp_path / "plain.pth")
    assert load_backbone(tmp_path / "plain.pth", "conv4")[0].training is False


# ---------------------------------------------------------------------------------------------- CIFAR-100
def hostile_cifar(out_dir: Path, fake: Path, member: str, marker: Path, folder: bool = False) -> Path:
    """A copy of the fake CIFAR-100 archive (or its extracted folder) whose ``member`` pickle holds the payload
    beside its ordinary content."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fake) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    name = f"cifar-100-python/{member}"
    doc = pickle.loads(members[name], encoding="bytes")
    doc[b"batch_label" if member != "meta" else b"coarse_label_names"] = Payload(marker)
    members[name] = pickle.dumps(doc, protocol=2)
    if folder:
        for n, data in members.items():
            (out_dir / n).parent.mkdir(parents=True, exist_ok=True)
            (out_dir / n).write_bytes(data)
        return out_dir / "cifar-100-python"
    dest = out_dir / "cifar-100-python.tar.gz"
    with tarfile.open(dest, "w:gz") as tar:
        for n, data in members.items():
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest


CIFAR_REFUSAL = ("is not an official CIFAR-100 pickle", "it asks for posix.system", "refused without running it")


@pytest.mark.parametrize("member", ["meta", "train", "test"])
def test_evaluate_refuses_a_hostile_cifar_archive(ws, fake_cifar, member):
    bad = hostile_cifar(ws / "data", fake_cifar, member, ws / "MARKER")
    refused(cli("evaluate", "--backbone", "conv4", "--untrained", "--dataset", "cifar_fs", "--archive", bad,
                "--n-shot", "1", "--n-query", "2", "--n-episodes", "5", "--out", ws / "ev"),
            str(bad), f"member {member!r}", *CIFAR_REFUSAL)
    assert not (ws / "ev").exists()


@pytest.mark.parametrize("member", ["meta", "train", "test"])
@pytest.mark.parametrize("command", ["verify", "prepare"])
def test_data_commands_refuse_a_hostile_cifar_archive(ws, fake_cifar, member, command):
    from fsl_lsskd.utils import cache_dir

    bad = hostile_cifar(ws / "data", fake_cifar, member, ws / "MARKER")
    refused(cli("data", command, "cifar_fs", "--archive", bad), str(bad), f"member {member!r}", *CIFAR_REFUSAL)
    assert not [p for p in cache_dir().rglob("*") if p.is_file()]


def test_a_hostile_extracted_cifar_folder_is_refused(ws, fake_cifar):
    root = hostile_cifar(ws / "data", fake_cifar, "train", ws / "MARKER", folder=True)
    refused(cli("data", "verify", "cifar_fs", "--data-root", root), "member 'train'", *CIFAR_REFUSAL)


def test_first_per_class_refuses_a_hostile_cifar_archive(ws, fake_cifar):
    from fsl_lsskd.data.fake import first_per_class
    from fsl_lsskd.errors import DataError

    for member in ("meta", "train"):
        bad = hostile_cifar(ws / member, fake_cifar, member, ws / "MARKER")
        with pytest.raises(DataError, match="it asks for posix.system"):
            first_per_class(bad, 1, ws / "cut" / member)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_cifar_unpickler_refuses_every_protocol_and_any_other_codec(tmp_path, protocol):
    from fsl_lsskd.data.cifar_fs import read_cifar_pickle
    from fsl_lsskd.errors import DataError

    with pytest.raises(DataError, match="it asks for posix.system"):
        read_cifar_pickle(pickle.dumps({b"x": Payload(tmp_path / "m")}, protocol=protocol), "meta", "src")
    with pytest.raises(DataError, match=r"it asks for (__builtin__|builtins)\.eval"):  # protocol < 3: __builtin__
        read_cifar_pickle(pickle.dumps({b"x": eval}, protocol=protocol), "meta", "src")
    assert not (tmp_path / "m").exists()
    with pytest.raises(pickle.UnpicklingError, match="latin1"):  # a DataError "corrupt" in CifarFS
        read_cifar_pickle(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x06\x00\x00\x00base64\x86R.", "m", "s")


def _same_as_pickle_loads(archive: Path) -> set:
    """Read every member of ``archive`` with the restricted unpickler and with ``pickle.loads``: the same
    content. Returns the numpy module names the pickles use."""
    from fsl_lsskd.data.cifar_fs import read_cifar_pickle

    seen = set()
    with tarfile.open(archive) as tar:
        for m in tar:
            if not m.isfile():
                continue
            blob = tar.extractfile(m).read()
            seen |= set(re.findall(rb"numpy\.?_?core\.multiarray", blob))
            ours, theirs = read_cifar_pickle(blob, m.name, archive), pickle.loads(blob, encoding="bytes")
            assert ours.keys() == theirs.keys()
            for k in ours:
                same = np.array_equal(ours[k], theirs[k]) if isinstance(ours[k], np.ndarray) else ours[k] == theirs[k]
                assert same, (archive, m.name, k)
    return seen


def test_generated_cifar_pickles_read_as_before(fake_cifar):
    """fake.py's files, written by numpy 2 (``numpy._core``, bytes as ``_codecs.encode``)."""
    assert _same_as_pickle_loads(fake_cifar) == {b"numpy._core.multiarray"}


def test_real_cifar_pickles_read_as_before(shared_data):
    """The real (partial) official archive, written by numpy 1 (``numpy.core``)."""
    archives = sorted(shared_data.glob("cifar-100-python*.tar.gz"))
    if not archives:
        pytest.skip("no CIFAR-100 archive in the shared data")
    for archive in archives:
        assert _same_as_pickle_loads(archive) == {b"numpy.core.multiarray"}


# ------------------------------------------------------------------------------------------ no other unpickler
UNPICKLERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads", "joblib.load",
              "cloudpickle.load", "cloudpickle.loads", "marshal.load", "marshal.loads", "yaml.load", "yaml.unsafe_load",
              "shelve.open"}


def _dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_the_package_has_no_other_unpickler():
    """Every ``torch.load`` is the one in :func:`fsl_lsskd.checkpoint.torch_load` (``weights_only=True``); every
    ``np.load`` passes ``allow_pickle=False``; nothing else unpickles (the CIFAR reader subclasses
    ``pickle.Unpickler`` and is checked above)."""
    found = []
    for path in sorted((REPO / "fsl_lsskd").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            kw = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
            where = f"{rel}:{node.lineno}: {name}"
            if name in UNPICKLERS:
                found.append(where)
            elif name == "torch.load" and (kw.get("weights_only") is not True or rel != "fsl_lsskd/checkpoint.py"):
                found.append(f"{where} (use fsl_lsskd.checkpoint.torch_load)")
            elif name in ("np.load", "numpy.load") and kw.get("allow_pickle") is not False:
                found.append(f"{where} without allow_pickle=False")
    assert not found, "\n".join(found)
