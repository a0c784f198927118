"""A new user's walk through the CLI: Ctrl-C, `ls`, a dry run on missing data, what a first run prints."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fsl_lsskd.cli import main
from fsl_lsskd.data.fake import write_fake_cifar100

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_runner import summary_line, write_bench  # noqa: E402


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory) -> Path:
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar"), per_class_train=6, per_class_test=2, seed=5)


def _fsl(args, cwd, **kw):
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{Path(cwd) / 'mlflow.db'}")
    return subprocess.Popen([sys.executable, "-m", "fsl_lsskd.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _ctrl_c_reaches_child() -> None:
    """A job started in the background by a non-interactive shell (``pytest ... &``, ``nohup``) inherits SIGINT
    ignored (POSIX), and Python then installs no KeyboardInterrupt handler: the child would never see the Ctrl-C
    this test sends. Give it the default disposition, as a terminal's foreground job has."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_exits_130_with_the_cells_state_and_the_command_that_resumes(tmp_path, cifar_archive):
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("ce",), epochs=30)
    proc = _fsl(["run", bench, "--out", tmp_path / "runs"], tmp_path, preexec_fn=_ctrl_c_reaches_child)
    deadline = time.time() + 240
    while not list((tmp_path / "runs" / "cells").glob("*/run/last.pt")):  # an epoch is done
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "Aborted!" not in err, err
    assert "interrupted: 0 cells trained and 0 of 1 scored in this run" in err and "resumes from it" in err, err
    assert "ce/conv4/cifar_fs/seed0: training" in out, out  # not a terminal: a line per step, no silence
    resume = err.strip().splitlines()[-1]
    assert resume.startswith("resume with: ") and "run" in resume and str(bench) in resume, err
    proc = _fsl(["run", bench, "--out", tmp_path / "runs"], tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "1 resumed" in summary_line(out), out


def test_ls_prints_whole_sentences_without_markup():
    res = CliRunner().invoke(main, ["ls"])
    assert res.exit_code == 0
    entries = [line for line in res.output.splitlines() if line.startswith("  ")]
    assert len(entries) >= 20
    for line in entries:
        desc = line.split(None, 1)[1]
        assert not re.search(r"``|:class:|:func:|:mod:|`", desc), line
        assert desc.endswith((".", ")")), line  # the first sentence, whole


@pytest.mark.parametrize("key", ["archive", "data_root"])
def test_dry_run_says_when_the_data_does_not_exist(tmp_path, cifar_archive, key):
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive)
    missing = tmp_path / "nowhere" / ("cifar-100-python.tar.gz" if key == "archive" else "")
    bench.write_text(bench.read_text().replace(f"{{archive: {cifar_archive}}}", f"{{{key}: {missing}}}"))
    res = CliRunner().invoke(main, ["run", str(bench), "--dry-run"])
    assert res.exit_code == 2, res.output
    assert "nowhere" in res.output and "--data cifar_fs=PATH" in res.output, res.output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_a_first_run_prints_what_a_user_needs(tmp_path, cifar_archive):
    """No per-protocol episode warnings inside the progress bars, no resolved-config dump: the header, the
    cells' table, the summary. The details are in the log (-v)."""
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("ce",), epochs=1, n_shot="[1, 2]")
    proc = _fsl(["run", bench, "--out", tmp_path / "runs"], tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    text = out + err
    assert "resolved config" not in text and "no published episodes" not in text and "WARNING" not in text, text
    assert max(len(line) for line in out.splitlines()) < 400, out
    assert out.splitlines()[0].startswith("benchmark grid:") and "summary: 1 trained" in out
    steps = [line for line in out.splitlines() if line.startswith("[")]  # one line per step (stdout is a pipe)
    assert [line.split("] ", 1)[1].split(" (")[0].split(" in ")[0] for line in steps] == [
        "ce/conv4/cifar_fs/seed0: training", "ce/conv4/cifar_fs/seed0: trained", "ce/conv4/cifar_fs/seed0: scoring",
        "ce/conv4/cifar_fs/seed0: trained"], steps
    proc = _fsl(["-v", "run", bench, "--out", tmp_path / "runs", "--rerun"], tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "resolved config" in err, err[-3000:]
