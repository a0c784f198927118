"""`fsl-bench run --launcher local`: cells as submitit jobs, teachers before students, requeue resumes.

The SLURM path shares everything but the executor; what only SLURM does (arrays, ``--dependency``) is checked on
the submission parameters, since no cluster is at hand."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsl_lsskd.data.fake import write_fake_cifar100

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_runner import cli, summary_line, training_runs, write_bench  # noqa: E402


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory) -> Path:
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar"), per_class_train=6, per_class_test=2, seed=11)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _run_times():
    """train id -> (method, start ms, end ms) of every finished training run."""
    from fsl_lsskd.record import open_store

    st = open_store(create=False)
    return {r.data.tags["fsl.train_id"]: (r.data.tags.get("fsl.row"), r.info.start_time, r.info.end_time)
            for r in st._search("tags.`fsl.kind` = 'train'")}


def test_local_launcher_runs_teachers_first_and_every_cell_once(tmp_path, store, cifar_archive):
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("ce", "kd", "lsskd"), epochs=1,
                        extra="launcher: {local: {parallel: 2}}\n")
    res = cli("run", bench, "--out", tmp_path / "runs", "--launcher", "local")
    assert res.exit_code == 0, res.output
    assert "3 trained, 0 resumed, 0 re-scored, 0 reused, 0 failed" in summary_line(res.output)
    runs = training_runs()
    assert len(runs) == 3 and all(len(v) == 1 and v[0][1] == "complete" for v in runs.values())
    times = {row: (start, end) for row, start, end in _run_times().values()}
    assert times["kd"][0] >= times["ce"][1]  # the student started after its teacher's run ended
    logs = sorted((tmp_path / "runs" / "jobs" / "grid").glob("*_log.err"))
    assert len(logs) == 3 and all("Job completed successfully" in p.read_text() for p in logs)
    # 2 jobs at once share the CPUs: each trains with half of them (at least 1 thread)
    from fsl_lsskd.utils import process_threads

    assert all(f"(attempt 1, torch threads: {process_threads(2)})" in p.read_text() for p in logs)
    from fsl_lsskd.record import open_store as _open  # the threads are recorded with each training run

    assert {r.data.params["torch_threads"] for r in _open(create=False)._search("tags.`fsl.kind` = 'train'")} \
        == {str(process_threads(2))}
    # the finished LSSKD cell's files (its run directory is gone; its artifacts) are a few times a CE cell's
    assert not any((tmp_path / "runs" / "cells").glob("*/run"))
    from fsl_lsskd.record import open_store

    st = open_store(create=False)
    sizes = {}
    for rec in st.trainings().values():
        root = Path(st.client.get_run(rec.run_id).info.artifact_uri.replace("file://", ""))
        sizes[rec.identity["method"]] = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert sizes["lsskd"] <= 4 * sizes["ce"], sizes
    # a second invocation submits nothing
    res = cli("run", bench, "--out", tmp_path / "runs", "--launcher", "local")
    assert "0 trained, 0 resumed, 0 re-scored, 3 reused" in summary_line(res.output), res.output
    assert len(list((tmp_path / "runs" / "jobs" / "grid").glob("*_log.err"))) == 3


def _job_tasks(folder: Path):
    """pids of submitit task processes (``python -m submitit.core._submit FOLDER``) of ``folder``."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmd and str(folder).encode() in cmd:
            out.append(int(proc.name))
    return out


def test_preempted_job_is_requeued_and_resumes_from_its_last_epoch(tmp_path, store, cifar_archive):
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("ce",), epochs=40)
    proc = subprocess.Popen([sys.executable, "-m", "fsl_lsskd.cli", "run", str(bench), "--out",
                             str(tmp_path / "runs"), "--launcher", "local"], cwd=tmp_path, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    folder = (tmp_path / "runs" / "jobs" / "grid").resolve()
    try:
        deadline = time.time() + 240
        while not list((tmp_path / "runs" / "cells").glob("*/run/last.pt")):  # one epoch is done
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        tasks = _job_tasks(folder)
        assert len(tasks) == 1
        os.kill(tasks[0], signal.SIGUSR2)  # what SLURM sends before preempting a job
        out = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "1 resumed" in summary_line(out) or "1 trained" in summary_line(out), out
    log = next(folder.glob("*_log.err")).read_text()
    assert "Caught signal SIGUSR2" in log and "requeued; it resumes from its last epoch" in log, log[-3000:]
    resumed = [line for line in log.splitlines() if "resuming" in line and "from epoch" in line]
    assert resumed and int(resumed[0].rsplit(" ", 1)[1]) >= 1, log[-3000:]
    runs = training_runs()
    assert len(runs) == 1 and [s for _, s in next(iter(runs.values()))] == ["complete"]  # one run, continued
    from fsl_lsskd.record import open_store

    st = open_store(create=False)
    rec = next(iter(st.trainings().values()))
    steps = [m.step for m in st.client.get_metric_history(rec.run_id, "train_loss")]
    assert sorted(set(steps)) == list(range(1, 41)), steps  # every epoch once in the record


FAKE_SBATCH = """#!/bin/sh
# records the submission script and answers like sbatch
n=$(ls "$FAKE_SLURM_DIR" | wc -l)
for last; do :; done
cp "$last" "$FAKE_SLURM_DIR/sub$n.sh"
echo "Submitted batch job $((1000 + n))"
"""


def test_slurm_submission_arrays_dependencies_and_resources(tmp_path, store, cifar_archive, monkeypatch):
    """Without a cluster (a stand-in sbatch records what it is given): one array per dependency level with the
    benchmark's resources and --slurm overrides, students after their teachers' jobs, and clear errors."""
    from fsl_lsskd.bench.config import load_benchmark
    from fsl_lsskd.bench.grid import expand, with_teachers
    from fsl_lsskd.bench.launch import TrainJob, apply_options, dependency_levels, make_launcher

    bench = load_benchmark(write_bench(tmp_path / "g.yaml", cifar_archive, methods=("ce", "kd", "pskd"),
                                       seeds=(0, 1), extra="launcher: {slurm: {partition: gpu, gpus_per_node: 1, "
                                                           "timeout_min: 600}}\n"))
    levels = dependency_levels(with_teachers(expand(bench)))
    assert [sorted(c.row for c in lv) for lv in levels] == [["ce", "ce", "pskd", "pskd"], ["kd", "kd"]]
    spec = apply_options(bench.launcher.slurm, ["timeout_min=30", "account=proj"])
    assert spec.timeout_min == 30 and spec.partition == "gpu" and spec.additional == {"account": "proj"}
    nothing = tmp_path / "no-slurm"  # a PATH without sbatch, whether or not this machine has SLURM
    nothing.mkdir()
    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(nothing))
    res = cli("run", tmp_path / "g.yaml", "--launcher", "slurm")
    assert res.exit_code == 2 and "needs SLURM's sbatch and srun" in res.output, res.output

    bindir, recorded = tmp_path / "bin", tmp_path / "recorded"
    bindir.mkdir()
    recorded.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", "#!/bin/sh\nexit 0\n")):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{path}")  # the fakes first: a real sbatch comes later
    import shutil

    assert shutil.which("sbatch") == str(bindir / "sbatch")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(recorded))
    launcher = make_launcher("slurm", bench, ["mem_gb=64", "account=proj"])
    jobs = launcher.submit_slurm(levels, lambda c: TrainJob(bench, c, str(tmp_path / "runs"), "sqlite:///x.db",
                                                            str(tmp_path)), tmp_path / "jobs")
    scripts = [(recorded / f"sub{i}.sh").read_text() for i in range(2)]
    assert "#SBATCH --array=0-3%4" in scripts[0] and "#SBATCH --array=0-1%2" in scripts[1]
    for text in scripts:
        for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --mem=64GB",
                     "#SBATCH --time=600", "#SBATCH --account=proj"):
            assert line in text, text
    assert "--dependency" not in scripts[0] and "#SBATCH --dependency=afterany:1000_0:1000_1" in scripts[1]
    assert sorted(j.job_id for _, j in jobs.values()) == ["1000_0", "1000_1", "1000_2", "1000_3", "1001_0",
                                                          "1001_1"]
    res = cli("run", tmp_path / "g.yaml", "--slurm", "mem_gb=lots", "--launcher", "slurm")
    assert res.exit_code == 2 and "expected an integer" in res.output, res.output
    res = cli("run", tmp_path / "g.yaml", "--slurm", "mem_gb=8")
    assert res.exit_code == 2 and "use it with --launcher slurm" in res.output, res.output


def test_parallel_sets_how_many_local_jobs_run_at_once_and_their_threads(tmp_path, store, cifar_archive):
    """--parallel N overrides launcher.local.parallel; each of N jobs gets CPUs/N threads (at least 1), one job
    at a time and SLURM jobs keep torch's default; --parallel without --launcher local is an error (exit 2)."""
    from fsl_lsskd.bench.config import load_benchmark
    from fsl_lsskd.bench.launch import make_launcher
    from fsl_lsskd.utils import process_threads

    bench_file = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("ce",), epochs=1)
    bench = load_benchmark(bench_file)
    assert make_launcher("local", bench).job_threads() is None  # parallel 1: torch's default
    launcher = make_launcher("local", bench, parallel=3)
    assert launcher.local.parallel == 3 and launcher.job_threads() == process_threads(3)
    assert process_threads(3) == max(1, len(os.sched_getaffinity(0)) // 3) and process_threads(10 ** 6) == 1
    res = cli("run", bench_file, "--parallel", "2")
    assert res.exit_code == 2 and "use it with --launcher local" in res.output, res.output
    res = cli("run", bench_file, "--launcher", "local", "--parallel", "0")
    assert res.exit_code == 2 and "--parallel" in res.output, res.output
