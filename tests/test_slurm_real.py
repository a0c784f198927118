"""`fsl-bench run --launcher slurm` on a real SLURM cluster: a throw-away one-node cluster on loopback
(munged, slurmctld and slurmd with their ports, state, spool and logs in a temporary directory; see
``servers.slurm_cluster``). Every cell of a grid (a real job array) must be trained once and scored; a job
cancelled with ``scancel`` while it trains resumes on the next run into the same training run; a wrong
partition, a missing sbatch, resources beyond the node and a job that can never start are errors with exit code
2 that say why. (Arrays chained by ``--dependency`` for teachers are checked on the submission in
test_launch.py: a real student job would add a round of job start-up to this test.)

Runs where SLURM and MUNGE are installed (``bash tools/install_slurm.sh``) and the tests run as root; skipped
otherwise. The cancel-and-resume test is also marked slow (two rounds of job start-up). The daemons are stopped by
their process ids when the module's tests end, passed or failed."""
from __future__ import annotations

import logging
import subprocess
import sys
import threading
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


def _cancel_after_first_epochs(out: Path, report: list, stop: threading.Event) -> None:
    """Once every cell that started has its first epoch's resume state, ``scancel`` every job (what a user
    does); ``report`` gets the jobs that were running."""
    while not stop.wait(0.2):
        dirs = _cell_dirs(out)
        if dirs and all((d / "run" / "last.pt").exists() for d in dirs):
            jobs = squeue("%i", "%T")
            report.extend(job for job, state in jobs if state == "RUNNING")
            subprocess.run(["scancel", *sorted({job.split("_")[0] for job, _ in jobs})], check=True, timeout=30)
            return


def _job_logs_say_each_line_once(logs) -> list:
    """submitit's own lines go through the job's logging, to the .err log only, once."""
    done = [p for p in logs if "Job completed successfully" in p.read_text()]
    for p in done:
        assert p.read_text().count("Job completed successfully") == 1, p.read_text()
        assert "Job completed successfully" not in p.with_suffix(".out").read_text()
    return done


@pytest.mark.slurm
@skip_without_slurm
def test_grid_on_slurm_trains_every_cell_once_and_scores_it(slurm_env, tmp_path, cifar_archive):
    """A grid of two cells as one real job array: both trained once (one complete training run per training id)
    and scored, the job id printed at the default verbosity, each job log line once, nothing left RUNNING."""
    from fsl_lsskd.record import open_store

    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("ce", "pskd"), epochs=1,
                        readouts="[protonet]")
    out = tmp_path / "runs"
    t0 = time.time()
    res = cli("run", bench, "--out", out, "--launcher", "slurm", *FIT)
    took = time.time() - t0
    assert res.exit_code == 0, res.output
    assert "2 trained, 0 resumed, 0 re-scored, 0 reused, 0 failed" in summary_line(res.output), res.output
    submitted = [line for line in res.output.splitlines() if line.startswith("submitted ")]
    assert len(submitted) == 1 and "submitted 2 cells as SLURM job" in submitted[0], res.output
    array = submitted[0].split("SLURM job ")[1].split()[0]
    assert sorted(job for job, in squeue("%i")) == [f"{array}_0", f"{array}_1"]  # one array, two tasks
    runs = training_runs()
    assert len(runs) == 2 and all(len(v) == 1 and v[0][1] == "complete" for v in runs.values()), runs
    assert not [(name, status) for name, status, _ in all_runs() if status == "RUNNING"], all_runs()
    assert len(open_store(create=False).scores()) == 2  # the 1-shot protocol's protonet score, per cell
    assert len(_job_logs_say_each_line_once(sorted((out / "jobs" / "grid").glob("*_log.err")))) == 2
    print(f"\nSLURM grid of 2 cells: {took:.1f} s")


@pytest.mark.slow
@pytest.mark.slurm
@skip_without_slurm
def test_grid_on_slurm_cancelled_then_resumed_trains_every_cell_once(slurm_env, tmp_path, cifar_archive):
    """A grid submitted as one job array; ``scancel`` once every started cell has finished an epoch (the run
    reports the cells failed, exit 1), then the same command again. Every cell ends with exactly one training
    run, complete and scored; the cancelled cells resume into their run; nothing is left RUNNING. Slow: two
    rounds of job start-up (about 90 s on a busy 2-core machine)."""
    from fsl_lsskd.record import open_store

    epochs = 5  # time to cancel a cell after its first epoch (the test cluster's KillWait is 1 s)
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("ce", "pskd"), epochs=epochs,
                        readouts="[protonet]")
    out = tmp_path / "runs"
    args = ("run", bench, "--out", out, "--launcher", "slurm", *FIT)
    t0 = time.time()
    running: list = []
    stop = threading.Event()
    watcher = threading.Thread(target=_cancel_after_first_epochs, args=(out, running, stop), daemon=True)
    watcher.start()
    try:
        res = cli(*args)
    finally:
        stop.set()
        watcher.join(timeout=60)
    assert running, res.output
    assert res.exit_code == 1, res.output
    assert "ended without a result (CANCELLED)" in res.output and "Traceback" not in res.output, res.output
    started = len(_cell_dirs(out))
    assert [s for _, s, tags in all_runs() if tags.get("fsl.kind") == "train"] == ["RUNNING"] * started

    res = cli(*args)  # the same command again
    took = time.time() - t0
    assert res.exit_code == 0, res.output
    line = summary_line(res.output)
    assert f"{2 - started} trained, {started} resumed, 0 re-scored, 0 reused, 0 failed" in line, res.output
    runs = training_runs()
    assert len(runs) == 2 and all(len(v) == 1 and v[0][1] == "complete" for v in runs.values()), runs
    assert not [(name, status) for name, status, _ in all_runs() if status == "RUNNING"], all_runs()
    st = open_store(create=False)
    for rec in st.trainings().values():  # no epoch twice in the record; the resumed runs went on to the end
        steps = [m.step for m in st.client.get_metric_history(rec.run_id, "train_loss")]
        assert len(steps) == len(set(steps)) and max(steps) == epochs, steps
    assert len(st.scores()) == 2
    logs = sorted((out / "jobs" / "grid").glob("*_log.err"))
    assert len([p for p in logs if "resuming" in p.read_text()]) == started, [p.name for p in logs]
    assert len(_job_logs_say_each_line_once(logs)) == 2
    print(f"\nSLURM grid of 2 cells, cancelled and resumed: {took:.1f} s")


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


def _cancel_when_pending(seconds: float, stop: threading.Event) -> None:
    """Once a job has been pending for ``seconds``, ``scancel`` it."""
    since = None
    while not stop.wait(0.2):
        pending = [job for job, state in squeue("%i", "%T") if state == "PENDING"]
        if pending and since is None:
            since = time.time()
        if since is not None and time.time() - since >= seconds:
            subprocess.run(["scancel", *sorted({j.split("_")[0] for j in pending})], check=True, timeout=30)
            return


@pytest.mark.slurm
@skip_without_slurm
def test_slurm_job_waiting_for_a_drained_node_is_reported_once_and_waited_for(slurm_env, tmp_path,
                                                                               cifar_archive):
    """A job pending because its node is drained (``ReqNodeNotAvail``, which an administrator lifts) is
    reported once with the reason and a hint, and the run keeps waiting: here until the job is cancelled."""
    bench = write_bench(tmp_path / "one.yaml", cifar_archive, methods=("ce",), epochs=1)
    drain = ["scontrol", "update", "nodename=localhost"]
    subprocess.run(drain + ["state=drain", "reason=fsl-bench test"], check=True, timeout=30)
    stop = threading.Event()
    watcher = threading.Thread(target=_cancel_when_pending, args=(4.0, stop), daemon=True)
    watcher.start()
    try:
        res = cli("run", bench, "--launcher", "slurm", *FIT)
    finally:
        stop.set()
        watcher.join(timeout=60)
        subprocess.run(drain + ["state=resume"], check=True, timeout=30)
    assert res.exit_code == 1 and "ended without a result (CANCELLED)" in res.output, res.output
    told = [line for line in res.output.splitlines() if "is pending (" in line]
    assert len(told) == 1 and "down, drained or reserved" in told[0], res.output  # read 3 times, told once
    assert "error:" not in res.output  # not a configuration error: it may resolve
