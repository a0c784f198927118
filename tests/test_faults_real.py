"""Faults made for real, not patched: a full disk (a small tmpfs) under ``--out`` and under the MLflow store, a store
in a read-only directory (a read-only bind mount), SIGTERM and SIGKILL during ``fsl-bench run``. Each fault ends in
one line naming what is wrong (exit 2, 143), no traceback, nothing corrupted, runs in a state that says what
happened (KILLED or FAILED, never left RUNNING), and the same command resumes.

The mounts need root with mount permission (a CI container or a developer machine as root); elsewhere those
tests skip, saying so."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fsl_lsskd.data.fake import write_fake_cifar100

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory) -> Path:
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar"), per_class_train=6, per_class_test=2, seed=11)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """A new SQLite store with MLflow's tables, made once (its schema migrations take seconds), copied per test."""
    from fsl_lsskd.record import open_store

    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
        open_store()
    return db


@pytest.fixture
def store(tmp_path, empty_store, monkeypatch) -> str:
    """This test's store: a copy of :func:`empty_store`."""
    import shutil

    (tmp_path / "store").mkdir()
    db = tmp_path / "store" / "mlflow.db"
    shutil.copyfile(empty_store, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    return f"sqlite:///{db}"


def write_bench(path: Path, archive: Path, epochs: int = 1) -> Path:
    path.write_text(textwrap.dedent(f"""
        name: {path.stem}
        datasets: [cifar_fs]
        data: {{cifar_fs: {{archive: {archive}}}}}
        backbones: [conv4]
        methods: [ce]
        seeds: [0]
        image_size: 32
        train: {{epochs: {epochs}, batch_size: 32, validation: null, heldout: 0.0}}
        eval: {{split: test, n_shot: [1], n_query: 1, n_episodes: 10, readouts: [protonet]}}
    """))
    return path


def cli(*args):
    """In this process (no interpreter start-up): for the steps whose output is not under test."""
    from click.testing import CliRunner

    from fsl_lsskd.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def fsl(*args, cwd: Path, env=None, timeout=300) -> subprocess.CompletedProcess:
    """In a process of its own: what a user sees on stdout and stderr, logging included."""
    return subprocess.run([sys.executable, "-m", "fsl_lsskd.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env or dict(os.environ))


def one_line_error(proc: subprocess.CompletedProcess, *fragments) -> str:
    """The command failed with exit 2 and a single ``error:`` line (no traceback, no logged SQL) naming
    ``fragments``; returns that line."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Traceback" not in text and "[SQL" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    for f in fragments:
        assert str(f) in errors[0], f"{f!r} not in {errors[0]!r}"
    return errors[0]


def runs(uri: str, kind: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(ids, f"tags.`fsl.kind` = '{kind}'")]


# ------------------------------------------------------------------------------------------------- mounts
def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here (`mount {' '.join(args)}`: {proc.stderr.strip() or proc.returncode}); this "
                    f"test needs root with mount permission")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs at ``tmp_path/disk``, unmounted at the end; ``fill(disk, leave_kib)`` leaves that much free."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk))
    yield disk
    _umount(disk)


def fill(disk: Path, leave_kib: int) -> Path:
    st = os.statvfs(disk)
    n = st.f_bfree * st.f_frsize - leave_kib * 1024
    filler = disk / "filler"
    with open(filler, "ab") as fh:
        fh.write(b"\0" * max(0, n))
    return filler


def test_full_disk_under_out_is_one_line_and_the_same_command_resumes(tmp_path, small_disk, cifar_archive, store):
    uri = store  # on a disk with room
    bench = write_bench(tmp_path / "full.yaml", cifar_archive)
    filler = fill(small_disk, 64)  # the cell's resume state (~170 KB) does not fit
    proc = fsl("run", bench, "--out", small_disk, cwd=tmp_path)
    line = one_line_error(proc, "cannot write", small_disk, "no space left on the device holding", "KiB free)",
                          "--out")
    assert "Free disk space there" in line
    assert not list(small_disk.rglob("*.tmp")) and not list(small_disk.rglob("last.pt"))  # no partial file
    (train_run,) = runs(uri, "train")
    (invocation,) = runs(uri, "invocation")
    assert train_run.info.status == "FAILED" and invocation.info.status == "FAILED"  # not left RUNNING
    filler.unlink()
    res = cli("run", bench, "--out", small_disk)
    assert res.exit_code == 0 and "1 trained" in res.output, res.output
    (train_run,) = runs(uri, "train")  # the failed run was continued in, not doubled
    assert train_run.info.status == "FINISHED" and train_run.data.tags["fsl.status"] == "complete"


def test_full_disk_under_the_cache_is_one_line(tmp_path, small_disk, cifar_archive):
    """numpy's writer reports a full disk as ``OSError("N requested and M written")``, without an errno."""
    fill(small_disk, 256)  # the decoded train split (~1.2 MB) does not fit
    env = dict(os.environ, FSL_BENCH_CACHE=str(small_disk))
    proc = fsl("data", "prepare", "cifar_fs", "--archive", cifar_archive, cwd=tmp_path, env=env)
    one_line_error(proc, f"cannot write {small_disk / 'data' / 'cifar_fs'}", "no space left on the device holding",
                   "free)", "$FSL_BENCH_CACHE")
    assert [p.name for p in small_disk.rglob("*") if p.is_file()] == ["filler"]  # no partial .npy or temp file


def test_full_disk_under_the_store_is_one_line(tmp_path, small_disk, cifar_archive, empty_store, monkeypatch):
    import shutil

    uri = f"sqlite:///{small_disk / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    bench = write_bench(tmp_path / "store.yaml", cifar_archive)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    shutil.copyfile(empty_store, small_disk / "mlflow.db")  # a new store, then the disk fills
    filler = fill(small_disk, 8)
    proc = fsl("run", bench, "--out", tmp_path / "runs", cwd=tmp_path, env=env)
    one_line_error(proc, f"cannot write the MLflow store {uri} (MLFLOW_TRACKING_URI): no space left on the device "
                         f"holding {small_disk} (", "KiB free)", "point MLFLOW_TRACKING_URI at a store on another disk")
    filler.unlink()
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert res.exit_code == 0 and "1 trained" in res.output, res.output


def test_read_only_store_is_read_without_the_write_lock(tmp_path, cifar_archive, empty_store, monkeypatch):
    """A finished store in a directory mounted read-only (as a store copied to a read-only share): ``table`` and
    ``run --dry-run`` read it; ``run`` says it cannot write it and names MLFLOW_TRACKING_URI."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root (and root ignores chmod)")
    share = tmp_path / "share"
    share.mkdir()
    bench = write_bench(share / "ro.yaml", cifar_archive)
    import shutil

    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the default ./mlflow.db of the share, as `fsl-bench run` leaves it
    monkeypatch.chdir(share)
    shutil.copyfile(empty_store, share / "mlflow.db")
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    assert (share / "mlflow.db").is_file() and (share / "mlflow.db.lock").is_file()
    _mount("--bind", str(share), str(share))
    try:
        _mount("-o", "remount,bind,ro", str(share))
        with pytest.raises(OSError):
            (share / "probe").write_text("x")
        res = cli("table", bench, "--out", tmp_path / "results")
        assert res.exit_code == 0 and "| ce | 1 |" in res.output, res.output  # the headline
        assert "| ce | conv4 |" in (tmp_path / "results" / f"{bench.stem}_appendix.md").read_text()
        res = cli("run", bench, "--dry-run")
        assert res.exit_code == 0 and "(trained, scored)" in res.output, res.output
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # mlflow.set_tracking_uri sets it
        proc = fsl("run", bench, "--out", tmp_path / "runs", cwd=share, env=env)
        one_line_error(proc, f"cannot write the MLflow store {share / 'mlflow.db'}", "is read-only",
                       "table, run --dry-run", "point MLFLOW_TRACKING_URI at the copy")
    finally:
        _umount(share)


# --------------------------------------------------------------------------------------------- run states
def _wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def test_sigterm_ends_the_runs_as_killed_and_the_same_command_resumes(tmp_path, cifar_archive, store):
    uri = store
    bench = write_bench(tmp_path / "term.yaml", cifar_archive, epochs=30)
    proc = subprocess.Popen([sys.executable, "-m", "fsl_lsskd.cli", "run", str(bench), "--out", str(tmp_path / "runs")],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: list((tmp_path / "runs").glob("cells/*/run/last.pt")), proc)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out
    assert "terminated (SIGTERM)" in out and "resume with:" in out and "Traceback" not in out, out
    (invocation,) = runs(uri, "invocation")
    (train_run,) = runs(uri, "train")
    assert invocation.info.status == "KILLED" and train_run.info.status == "KILLED"


KILL_AT_FIRST_EPOCH = textwrap.dedent("""
    import os, signal, sys
    from fsl_lsskd.registry import METHODS
    cls = METHODS.get("ce")
    def on_epoch_start(self, epoch):
        os.kill(os.getpid(), signal.SIGKILL)  # killed before its first epoch's resume state is written
    cls.on_epoch_start = on_epoch_start
    from fsl_lsskd.cli import main
    main(sys.argv[1:])
""")


def test_a_cell_killed_before_its_first_epoch_is_continued_in_the_same_run(tmp_path, cifar_archive, store):
    uri = store
    bench = write_bench(tmp_path / "kill.yaml", cifar_archive)
    (tmp_path / "driver.py").write_text(KILL_AT_FIRST_EPOCH)
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), "run", str(bench), "--out",
                           str(tmp_path / "runs")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    (killed,) = runs(uri, "train")
    (old_invocation,) = runs(uri, "invocation")
    assert killed.info.status == "RUNNING" and old_invocation.info.status == "RUNNING"  # what SIGKILL leaves
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert res.exit_code == 0 and "1 trained" in res.output, res.output
    (train_run,) = runs(uri, "train")  # one run for the training id: the killed one, continued
    assert train_run.info.run_id == killed.info.run_id
    assert train_run.info.status == "FINISHED" and train_run.data.tags["fsl.status"] == "complete"
    states = {r.info.run_id: r.info.status for r in runs(uri, "invocation")}
    assert states[old_invocation.info.run_id] == "KILLED" and sorted(states.values()) == ["FINISHED", "KILLED"]


def test_runs_left_running_by_a_dead_process_are_closed_as_killed(store):
    """A training run with epochs logged (not continued in: its metrics would repeat) is ended as KILLED."""
    from fsl_lsskd.record import KIND_TRAIN, TAG_KIND, TAG_TRAIN_ID, open_store

    store = open_store()
    eid = store.experiment_id("fsl-bench/t")
    make = [store.client.create_run(eid, tags={TAG_KIND: KIND_TRAIN, TAG_TRAIN_ID: "abc"}).info.run_id
            for _ in range(3)]
    store.client.set_terminated(make[0], "FAILED")
    assert store.close_unfinished("abc", keep=make[2]) == [make[1]]
    assert [store.client.get_run(r).info.status for r in make] == ["FAILED", "KILLED", "RUNNING"]
