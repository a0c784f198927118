"""`fsl-bench run --launcher slurm` on a real SLURM cluster: a throw-away one-node cluster on loopback
(munged, slurmctld and slurmd with their ports, state, spool and logs in a temporary directory; see
``servers.slurm_cluster``). Every cell of a grid with a teacher must be trained once (real job arrays chained by
``--dependency``) and scored; a job cancelled with ``scancel`` while it trains resumes on the next run into the
same training run; a wrong partition, a missing sbatch, resources beyond the node and a job that can never start
are errors with exit code 2 that say why.

Runs where SLURM and MUNGE are installed (``bash tools/install_slurm.sh``) and the tests run as root; skipped
otherwise. The daemons are stopped by their process ids when the module's tests end, passed or failed."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsl_lsskd.data.fake import write_fake_cifar100

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import slurm_cluster, slurm_missing  # noqa: E402
from test_runner import cli, summary_line, training_runs, write_bench  # noqa: E402

skip_without_slurm = pytest.mark.skipif(slurm_missing() is not None, reason=str(slurm_missing()))
# small jobs: two fit the node at once whatever its size; the test partition's MaxTime is 60 min
FIT = ("--slurm", "partition=debug", "--slurm", "cpus_per_task=1", "--slurm", "mem_gb=1", "--slurm",
       "timeout_min=30")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with slurm_cluster(tmp_path_factory.mktemp("slurm"), max_time_min=60) as c:
        yield c


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory) -> Path:
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar"), per_class_train=6, per_class_test=2, seed=11)


@pytest.fixture
def slurm_env(cluster, tmp_path, monkeypatch):
    """This test's store and working directory, and the cluster's SLURM_CONF for the CLI and its jobs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    return cluster


def squeue(*fields: str) -> list:
    """Every job the cluster still holds (ended ones included), as tuples of ``fields`` (squeue's % codes)."""
    out = subprocess.run(["squeue", "-h", "-r", "--states=all", "-o", "|".join(fields)], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return [tuple(line.split("|")) for line in out.splitlines() if line.strip()]


def all_runs():
    """Every run of the store: (run name, MLflow status, tags)."""
    from fsl_lsskd.record import open_store

    st = open_store(create=False)
    exps = [e.experiment_id for e in st.client.search_experiments()]
    return [(r.info.run_name, r.info.status, r.data.tags) for r in st.client.search_runs(exps, max_results=1000)]


def test_submitit_warnings_are_printed_once():
    """submitit's logger has two handlers of its own and propagates to ours: after the launcher is made, a
    submitit warning reaches the terminal once (no cluster needed)."""
    code = ("import logging, sys; logging.basicConfig(level=logging.WARNING, stream=sys.stderr); "
            "import submitit; from fsl_lsskd.bench.launch import route_submitit_logging; "
            "route_submitit_logging(); logging.getLogger('submitit').warning('MARK-once'); "
            "logging.getLogger('submitit').info('MARK-info')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout + proc.stderr).count("MARK-once") == 1, (proc.stdout, proc.stderr)
    assert "MARK-info" not in proc.stdout + proc.stderr  # its info follows our level (warnings by default)


def _cell_dirs(out: Path):
    return [d for d in (out / "cells").glob("*") if d.is_dir()]


@pytest.mark.slurm
@skip_without_slurm
def test_grid_on_slurm_cancelled_then_resumed_trains_every_cell_once(slurm_env, tmp_path, cifar_archive):
    """A grid with a teacher (an array of two cells, then the student's job after it): ``scancel`` once every
    started cell has finished an epoch, then the same command again. Every cell ends with exactly one training
    run, complete and scored; the cancelled cells resume into their run; nothing is left RUNNING."""
    from fsl_lsskd.record import open_store

    epochs = 5  # the teacher and PS-KD: time to cancel them after their first epoch (KillWait is 1 s); KD: 1
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("ce", "pskd", "kd"), epochs=epochs,
                        extra="method_overrides: {kd: {epochs: 1}}\n")
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "fsl_lsskd.cli", "run", str(bench), "--out", str(out), "--launcher", "slurm", *FIT]
    t0 = time.time()
    first = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (_cell_dirs(out) and all((d / "run" / "last.pt").exists() for d in _cell_dirs(out))):
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.2)
        running = [job for job, state in squeue("%i", "%T") if state == "RUNNING"]
        assert running, squeue("%i", "%T", "%r")
        subprocess.run(["scancel", *sorted({j.split("_")[0] for j, _ in squeue("%i", "%T")})], check=True,
                       timeout=30)
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 1, stdout[-3000:] + stderr[-3000:]
    submitted = [line for line in stdout.splitlines() if line.startswith("submitted ")]
    assert len(submitted) == 2 and "submitted 2 cell(s) as SLURM job" in submitted[0], stdout  # default verbosity
    array = submitted[0].split("SLURM job ")[1].split()[0]
    assert f"after jobs {array}" in submitted[1], submitted
    assert "ended without a result (CANCELLED)" in stdout, stdout
    assert "Traceback" not in stderr, stderr
    started = len(_cell_dirs(out))
    assert [s for _, s, tags in all_runs() if tags.get("fsl.kind") == "train"] == ["RUNNING"] * started

    res = cli(*cmd[3:])  # the same command again
    took = time.time() - t0
    assert res.exit_code == 0, res.output
    line = summary_line(res.output)
    assert f"{3 - started} trained, {started} resumed, 0 re-scored, 0 reused, 0 failed" in line, res.output
    runs = training_runs()
    assert len(runs) == 3 and all(len(v) == 1 and v[0][1] == "complete" for v in runs.values()), runs
    assert not [(name, status) for name, status, _ in all_runs() if status == "RUNNING"], all_runs()
    st = open_store(create=False)
    for rec in st.trainings().values():  # no epoch twice in the record; the resumed runs went on to the end
        steps = [m.step for m in st.client.get_metric_history(rec.run_id, "train_loss")]
        assert len(steps) == len(set(steps)) and max(steps) == (1 if rec.identity["method"] == "kd" else epochs)
    assert len(st.scores()) == 3 * 2  # 2 readouts of the 1-shot protocol per cell
    logs = sorted((out / "jobs" / "grid").glob("*_log.err"))
    resumed = [p for p in logs if "resuming" in p.read_text()]
    assert len(resumed) == started, [p.name for p in logs]
    # each line of a job's log once: submitit's own lines go through the job's logging, to .err only
    done = [p for p in logs if "Job completed successfully" in p.read_text()]
    assert len(done) == 3, [p.name for p in logs]
    for p in done:
        assert p.read_text().count("Job completed successfully") == 1
        assert "Job completed successfully" not in p.with_suffix(".out").read_text()
    # complete: a third run submits nothing
    res = cli("run", bench, "--out", out, "--launcher", "slurm", *FIT[0:2])
    assert res.exit_code == 0 and "0 trained, 0 resumed, 0 re-scored, 3 reused" in summary_line(res.output)
    assert "submitted" not in res.output
    print(f"\nSLURM grid of 3 cells, cancelled and resumed: {took:.1f} s")


@pytest.mark.slurm
@skip_without_slurm
def test_slurm_config_errors_exit_2_with_the_reason(slurm_env, tmp_path, cifar_archive, monkeypatch, caplog):
    """A wrong partition (sbatch's words), no sbatch on PATH, more CPUs than the node has, and a job that can
    never start (its time limit above the partition's MaxTime) each end the run with exit 2 and the fix; the
    stuck job is cancelled. Unset resources are fitted to the node."""
    bench = write_bench(tmp_path / "one.yaml", cifar_archive, methods=("ce",), epochs=1)
    known = {job for job, in squeue("%i")}
    res = cli("run", bench, "--launcher", "slurm", "--slurm", "partition=nope")
    assert res.exit_code == 2, res.output
    assert "sbatch refused the job submission: invalid partition specified: nope" in res.output, res.output
    assert f"partitions here: {slurm_env.partition}" in res.output and "Traceback" not in res.output

    res = cli("run", bench, "--launcher", "slurm", "--slurm", f"cpus_per_task={slurm_env.cpus + 1}")
    assert res.exit_code == 2, res.output
    assert (f"cpus_per_task={slurm_env.cpus + 1}: no node of the default partition {slurm_env.partition} has "
            f"that many CPUs (most: {slurm_env.cpus})") in res.output, res.output
    assert {job for job, in squeue("%i")} == known  # nothing was submitted

    with monkeypatch.context() as m:
        empty = tmp_path / "nothing"
        empty.mkdir()
        m.setenv("PATH", str(empty))
        res = cli("run", bench, "--launcher", "slurm")
    assert res.exit_code == 2 and "needs SLURM's sbatch and srun on PATH" in res.output, res.output

    # the default time limit (240 min) is above the partition's MaxTime (60): pending for ever, so stopped
    caplog.set_level(logging.WARNING, logger="fsl_lsskd.bench.launch")
    res = cli("run", bench, "--launcher", "slurm", "--slurm", f"partition={slurm_env.partition}")
    assert res.exit_code == 2, res.output
    assert "cannot start: it is pending with reason PartitionTimeLimit" in res.output, res.output
    assert "lower timeout_min" in res.output and "Cancelled the jobs left" in res.output
    assert f"partition {slurm_env.partition} allows at most 1:00:00" in res.output, res.output
    (job, state, cpus, mem, limit), = [j for j in squeue("%i", "%T", "%C", "%m", "%l") if j[0] not in known]
    assert state == "CANCELLED" and limit == "4:00:00", (job, state, limit)
    # unset cpus_per_task and mem_gb: 4 CPUs and 16 GB, or what the node has, with a warning
    want_cpus, want_mem = min(4, slurm_env.cpus), min(16, slurm_env.mem_mb // 1024)
    assert (int(cpus), mem) == (want_cpus, f"{want_mem}G"), (cpus, mem)
    assert ("using cpus_per_task=" in caplog.text) == (slurm_env.cpus < 4), caplog.text
    assert ("using mem_gb=" in caplog.text) == (slurm_env.mem_mb // 1024 < 16), caplog.text
    assert not [r for r in all_runs() if r[1] == "RUNNING"]
