"""Progress with an ETA: the lines written when stderr is not a terminal (a log file, SLURM), and a training run
whose log shows it is alive while it runs, not at the end."""
from __future__ import annotations

import logging
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
from fsl_lsskd.errors import ConfigError
from fsl_lsskd.progress import Progress, format_seconds, mode, track

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli_walk import _ctrl_c_reaches_child  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STAMP = r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] "


@pytest.fixture
def lines(caplog, monkeypatch):
    monkeypatch.setenv("FSL_BENCH_PROGRESS", "lines")
    monkeypatch.delenv("FSL_BENCH_PROGRESS_INTERVAL", raising=False)
    caplog.set_level(logging.INFO, logger="fsl_lsskd.progress")

    def get():
        return [r.getMessage() for r in caplog.records if r.name == "fsl_lsskd.progress"]
    return get


def test_lines_give_count_rate_and_eta_then_done(lines):
    with Progress(4, "epoch 1/2", "batch", interval=0) as bar:
        for _ in range(4):
            bar.update(1, loss=2.5)
    got = lines()
    assert got[0].startswith("epoch 1/2: 0/4 batches (0%)"), got
    assert got[1].startswith("epoch 1/2: 1/4 batches (25%), loss=2.5, ") and "ETA " in got[1], got
    assert got[-1].startswith("epoch 1/2: 4/4 batches (100%)") and got[-1].endswith("done"), got
    assert len(got) == 5  # the start and one per update; nothing repeated at close


def test_lines_are_rate_limited_and_inner_steps_stay_quiet(lines):
    with Progress(1000, "features x test", "image", interval=3600) as bar:
        for _ in range(1000):
            bar.update(1)
    assert len(lines()) == 2, lines()  # the start and the end, none in between
    for _ in track(range(1000), "scoring x test", "episode", interval=3600, announce=False, leave=False):
        pass
    assert len(lines()) == 2, lines()  # a short inner step writes nothing


def test_resumed_steps_count_only_this_process_in_the_rate(lines):
    bar = Progress(10, "training", "epoch", initial=8, interval=0, rate=False)
    assert bar.eta() is None  # nothing done here yet: no rate to extrapolate
    bar.update(1)
    assert bar.eta() is not None and bar.eta() >= 0
    assert "9/10 epochs (90%)" in lines()[-1]


def test_off_and_unknown_modes(monkeypatch, lines):
    monkeypatch.setenv("FSL_BENCH_PROGRESS", "off")
    with Progress(3, "x", interval=0) as bar:
        bar.update(3)
    assert lines() == []
    monkeypatch.setenv("FSL_BENCH_PROGRESS", "loud")
    with pytest.raises(ConfigError, match="bars, lines, off"):
        mode()
    monkeypatch.setenv("FSL_BENCH_PROGRESS", "lines")
    monkeypatch.setenv("FSL_BENCH_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ConfigError, match="FSL_BENCH_PROGRESS_INTERVAL"):
        Progress(3, "x")


def test_format_seconds():
    assert format_seconds(0) == "0:00:00" and format_seconds(3725.4) == "1:02:05"
    assert format_seconds(2 * 86400 + 61) == "2 days, 0:01:01"


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory) -> Path:
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar"), per_class_train=8, per_class_test=4, seed=3)


def test_evaluate_shows_feature_extraction_and_scoring_in_a_log(cifar_archive, monkeypatch):
    monkeypatch.setenv("FSL_BENCH_PROGRESS", "lines")
    monkeypatch.setenv("FSL_BENCH_PROGRESS_INTERVAL", "0")
    res = CliRunner().invoke(main, ["evaluate", "--untrained", "--backbone", "conv4", "--dataset", "cifar_fs",
                                    "--data", f"cifar_fs={cifar_archive}", "--image-size", "32", "--n-shot", "1",
                                    "--n-query", "3", "--n-episodes", "20", "--readouts", "protonet,logreg"])
    assert res.exit_code == 0, res.output
    progress = [line for line in res.stderr.splitlines() if re.match(STAMP, line)]
    assert any("features cifar_fs test: " in line and " images (" in line for line in progress), progress
    scoring = [line for line in progress if "scoring cifar_fs test: " in line]
    assert scoring and "40/40 episodes (100%)" in scoring[-1], progress  # 20 episodes x 2 readouts
    assert any("ETA" in line for line in scoring), scoring


def test_a_training_log_shows_epochs_and_batches_with_eta_while_it_runs(tmp_path, cifar_archive):
    """stderr to a file (not a terminal), as `fsl-bench train ... > log 2>&1` or a SLURM job: the first lines and
    an epoch's line are in the file while the process is still training (flushed per line, not at exit)."""
    log = tmp_path / "train.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), FSL_BENCH_PROGRESS_INTERVAL="0", PYTHONUNBUFFERED="")
    env.pop("FSL_BENCH_PROGRESS", None)
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "fsl_lsskd.cli", "train", "--method", "ce",
                                 "--data", f"cifar_fs={cifar_archive}", "--epochs", "200", "--batch-size", "32",
                                 "--val-n-episodes", "0", "--no-mlflow", "--no-export", "--out", str(tmp_path / "run")],
                                cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                preexec_fn=_ctrl_c_reaches_child)  # the SIGINT below ends it even under `pytest &`
        try:
            deadline = time.time() + 300
            while not re.search(r"seed 0: 1/200 epochs", log.read_text()):
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            assert proc.poll() is None, "the epoch line must be in the log while training, not at the end"
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:  # never leave a training behind
                proc.kill()
                proc.wait()
                raise
    text = [line for line in log.read_text().splitlines() if line.strip()]
    assert re.match(STAMP + r"training ce conv4 cifar_fs seed 0: loading the data", text[0]), text[:3]
    assert any(re.match(STAMP + r"decoding cifar_fs train \(64 classes\) from .* into the cache", line)
               for line in text), text[:4]  # the first use of the archive: its one-time decode is announced
    start = next(line for line in text if "0/200 epochs" in line)
    assert re.match(STAMP + r"training ce conv4 cifar_fs seed 0: 0/200 epochs \(0%\)", start), start
    batch = next(line for line in text if "epoch 1/200: " in line)
    assert re.match(STAMP + r"epoch 1/200: \d+/\d+ batches \(\d+%\), loss=[\d.]+, \d+ img/s, .*ETA", batch), batch
    epoch = next(line for line in text if "seed 0: 1/200 epochs" in line)
    assert re.match(STAMP + r"training ce conv4 cifar_fs seed 0: 1/200 epochs \(0%\), loss=[\d.]+, "
                            r"(base_acc=[\d.]+, )?\d+ img/s, \d+:\d\d:\d\d elapsed, ETA \d+:\d\d:\d\d", epoch), epoch
    assert text.index(start) < text.index(batch) < text.index(epoch)
