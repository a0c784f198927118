"""`fsl-bench run` / `table` end to end on generated CIFAR-FS-format data: resume, kills between and inside
cells (real SIGKILL), failures, teachers, shards sharing one store, determinism of the published tables."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fsl_lsskd.cli import main
from fsl_lsskd.data.fake import write_fake_cifar100

REPO = Path(__file__).resolve().parent.parent

# A kill switch for a subprocess run: FSLTEST_KILL="<point>:<method>" SIGKILLs the process
#   between:<m>  right after the cell of method m is marked complete
#   train:<m>    at the start of m's second epoch (its first epoch is checkpointed)
#   eval:<m>     after m is trained and exported, before its results are logged and the cell marked complete
DRIVER = textwrap.dedent("""
    import os, signal, sys
    point, method = os.environ["FSLTEST_KILL"].split(":")
    from fsl_lsskd.bench import runner
    from fsl_lsskd.eval import _core
    from fsl_lsskd.train import engine

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    from fsl_lsskd import plugins
    from fsl_lsskd.registry import METHODS

    plugins.import_submodules("fsl_lsskd.methods")
    cls = METHODS.get(method)
    real_cell, real_start, real_eval = runner.run_cell, cls.on_epoch_start, _core.evaluate

    def run_cell(bench, cell, *a, **k):
        out = real_cell(bench, cell, *a, **k)
        if point == "between" and cell.method == method:
            die()
        return out

    def on_epoch_start(self, epoch):
        if point == "train" and epoch == 1:
            die()
        return real_start(self, epoch)

    def evaluate(*a, **k):
        if point == "eval" and os.environ.get("FSLTEST_CURRENT") == method:
            die()
        return real_eval(*a, **k)

    real_train = engine.train

    def train(cfg, **k):
        os.environ["FSLTEST_CURRENT"] = cfg.method
        return real_train(cfg, **k)

    runner.run_cell, cls.on_epoch_start, _core.evaluate, engine.train = run_cell, on_epoch_start, evaluate, train
    from fsl_lsskd.cli import main
    main(sys.argv[1:])
""")


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory) -> Path:
    # 8 images per class: enough for 1-shot 5-query episodes on the 20 test classes
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar"), per_class_train=6, per_class_test=2, seed=11)


def write_bench(path: Path, archive: Path, methods=("ce", "pskd"), seeds=(0,), epochs=2, extra: str = "") -> Path:
    path.write_text(textwrap.dedent(f"""
        name: {path.stem}
        description: "test grid"
        datasets: [cifar_fs]
        data: {{cifar_fs: {{archive: {archive}}}}}
        backbones: [conv4]
        methods: [{", ".join(methods)}]
        seeds: [{", ".join(map(str, seeds))}]
        image_size: 32
        train: {{epochs: {epochs}, batch_size: 32, val_episodes: 0, heldout: 0.0}}
        eval: {{split: test, shots: [1], n_query: 5, episodes: 40, classifiers: [protonet, logreg_batched]}}
    """) + extra)
    return path


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def cli(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res


def cell_runs(bench_name: str):
    """cell id -> list of (run id, status tag) of every child run in the store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(f"fsl-bench/{bench_name}")
    out = {}
    for r in client.search_runs([exp.experiment_id], filter_string="tags.`fsl.kind` = 'cell'", max_results=1000):
        out.setdefault(r.data.tags["fsl.cell_id"], []).append((r.info.run_id, r.data.tags.get("fsl.cell_status")))
    return out


def killed_run(bench: Path, point: str, tmp_path: Path) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, FSLTEST_KILL=point)
    proc = subprocess.run([sys.executable, str(driver), "run", str(bench), "--out", str(tmp_path / "runs")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc


def metric(run_id: str, key: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_run(run_id).data.metrics[key]


def test_run_resume_table_and_determinism(tmp_path, store, cifar_archive):
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive)
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    runs = cell_runs("grid")
    assert len(runs) == 2 and all(len(v) == 1 and v[0][1] == "complete" for v in runs.values())
    # a second invocation trains nothing: every cell is skipped and no run is added
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert res.exit_code == 0 and res.output.count("skipped") == 2, res.output
    first = next(iter(runs.values()))[0][0]  # a skipped cell's summary line shows its stored results
    assert f"5w1s.protonet={metric(first, 'eval.test.5w1s.protonet.acc'):.2f}" in res.output, res.output
    assert cell_runs("grid") == runs
    res = cli("table", bench, "--out", tmp_path / "results")
    assert res.exit_code == 0, res.output
    md = (tmp_path / "results" / "grid.md").read_text()
    assert "40 episodes" in md and "seeds [0]" in md and "Cells found: 2/2" in md
    assert "| pskd | conv4 |" in md and "Paired difference to `ce`" in md
    csv = (tmp_path / "results" / "grid.csv").read_text().splitlines()
    assert csv[0].startswith("method,backbone,dataset,shot,classifier") and len(csv) == 1 + 2 * 2
    for ext in ("tex", "png"):
        assert list((tmp_path / "results").glob(f"*.{ext}"))
    # the same store gives byte-identical tables
    first = {p.name: p.read_bytes() for p in (tmp_path / "results").glob("*.[mct]*")}
    assert cli("table", bench, "--out", tmp_path / "results").exit_code == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "results").glob("*.[mct]*")} == first
    # other baselines: one paired table each, named in the header's command; a wrong name changes nothing
    res = cli("table", bench, "--out", tmp_path / "b", "--baseline", "ce", "--baseline", "pskd")
    md = (tmp_path / "b" / "grid.md").read_text()
    assert res.exit_code == 0 and "--baseline ce --baseline pskd`" in md.splitlines()[0]
    pskd_part = md.split("Paired difference to `pskd`")[1]
    assert "| ce | conv4 | " in pskd_part and "| pskd | conv4 | " not in pskd_part
    res = cli("table", bench, "--out", tmp_path / "c", "--baseline", "cee")
    assert res.exit_code == 2 and "Did you mean 'ce'" in res.output and not (tmp_path / "c").exists()


def test_kill_between_cells_loses_nothing_and_repeats_nothing(tmp_path, store, cifar_archive):
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive)
    killed_run(bench, "between:ce", tmp_path)
    before = cell_runs("grid")
    assert len(before) == 1 and list(before.values())[0][0][1] == "complete"
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    after = cell_runs("grid")
    assert len(after) == 2 and all(len(v) == 1 for v in after.values())  # none lost, none twice
    (ce_id,) = before
    assert after[ce_id] == before[ce_id]


def test_kill_inside_training_resumes_the_same_run_to_the_same_numbers(tmp_path, store, cifar_archive,
                                                                        monkeypatch):
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive)
    killed_run(bench, "train:pskd", tmp_path)
    runs = cell_runs("grid")
    (pskd_id,) = [k for k, v in runs.items() if v[0][1] != "complete"]
    killed_run_id = runs[pskd_id][0][0]
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    runs = cell_runs("grid")
    assert runs[pskd_id] == [(killed_run_id, "complete")]  # the killed cell's own run, resumed
    from mlflow.tracking import MlflowClient

    hist = MlflowClient().get_metric_history(killed_run_id, "train_loss")
    assert sorted(m.step for m in hist) == [0, 1]  # each epoch logged once
    keys = ("eval.test.5w1s.protonet.acc", "eval.test.5w1s.logreg_batched.acc", "train_loss")
    resumed = {k: metric(killed_run_id, k) for k in keys}
    # an uninterrupted run of the same grid (another store) gives the same results to the last digit
    other = tmp_path / "straight"
    other.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other / 'mlflow.db'}")
    monkeypatch.chdir(other)
    assert cli("run", bench, "--out", other / "runs").exit_code == 0
    straight = cell_runs("grid")
    assert {k: metric(straight[pskd_id][0][0], k) for k in keys} == resumed


def test_kill_before_results_are_logged_never_publishes_half_a_cell(tmp_path, store, cifar_archive):
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive)
    killed_run(bench, "eval:pskd", tmp_path)
    (ckpt,) = [p for p in (tmp_path / "runs" / "grid").glob("*/last.pt")
               if "pskd" in (p.parent / "config.json").read_text()]
    mtime = ckpt.stat().st_mtime_ns
    res = cli("table", bench, "--out", tmp_path / "results")
    assert res.exit_code == 0, res.output
    md = (tmp_path / "results" / "grid.md").read_text()
    assert "Cells found: 1/2" in md and "| pskd |" not in md
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    assert ckpt.stat().st_mtime_ns == mtime  # no epoch re-trained: the checkpoint says training finished
    assert all(len(v) == 1 and v[0][1] == "complete" for v in cell_runs("grid").values())


def test_a_crashing_cell_is_reported_and_the_grid_goes_on(tmp_path, store, cifar_archive, monkeypatch):
    from fsl_lsskd.methods.pskd import PSKD

    def boom(self, batch, epoch):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(PSKD, "training_step", boom)
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("pskd", "ce"), epochs=1)
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert res.exit_code == 1
    assert "simulated crash" in res.output and "1 cell(s) failed" in res.output
    statuses = sorted(v[0][1] or "-" for v in cell_runs("grid").values())
    assert statuses == ["-", "complete"]


def test_teacher_cells_train_first_and_are_fetched_from_the_store(tmp_path, store, cifar_archive):
    import shutil

    from mlflow.tracking import MlflowClient

    from fsl_lsskd.bench.config import load_benchmark
    from fsl_lsskd.bench.grid import expand, with_teachers
    from fsl_lsskd.bench.runner import experiment_name, teacher_checkpoint
    from fsl_lsskd.train.checkpoint import load_method

    bench_path = write_bench(tmp_path / "kdgrid.yaml", cifar_archive, methods=("kd",), epochs=1)
    res = cli("run", bench_path, "--dry-run")
    assert res.exit_code == 0 and "(teacher)" in res.output and "taught by" in res.output, res.output
    res = cli("run", bench_path, "--out", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    bench = load_benchmark(bench_path)
    plan = with_teachers(expand(bench))
    assert [c.method for c in plan] == ["ce", "kd"] and plan[0].role == "teacher"
    runs = cell_runs("kdgrid")
    assert all(v[0][1] == "complete" for v in runs.values()) and len(runs) == 2
    # another machine (no local run directory) fetches the teacher's checkpoint from its MLflow run
    shutil.rmtree(tmp_path / "runs")
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment_name(bench))
    path = teacher_checkpoint(client, exp.experiment_id, plan[0], tmp_path / "runs" / bench.name)
    assert path == tmp_path / "runs" / bench.name / plan[0].id / "last.pt"
    assert load_method(path).num_classes == 64
    # the teacher row is published beside the student
    res = cli("table", bench_path, "--out", tmp_path / "results")
    assert res.exit_code == 0 and "| ce | conv4 |" in res.output and "| kd | conv4 |" in res.output


def test_shards_keep_teachers_with_students_and_partition_the_grid(tmp_path, cifar_archive):
    from fsl_lsskd.bench.config import load_benchmark
    from fsl_lsskd.bench.grid import _group_key, expand, shard, with_teachers

    bench = load_benchmark(write_bench(tmp_path / "g.yaml", cifar_archive, methods=("ce", "kd", "pskd"),
                                       seeds=(0, 1, 2)))
    cells = expand(bench)
    parts = [shard(cells, f"{i}/3") for i in (1, 2, 3)]
    assert sorted(c.id for p in parts for c in p) == sorted(c.id for c in cells)  # a partition
    for p in parts:
        ids = {c.id for c in p}
        for c in p:
            if c.method == "kd":
                assert c.teacher.id in ids  # the ce teacher of the same seed is in the same shard
        assert {c.id for c in with_teachers(p)} == ids  # no teacher-only cell needed: ce is in the grid
    assert len({_group_key(c) for c in cells}) == 6  # {ce,kd} x 3 seeds + pskd x 3


def test_concurrent_shards_on_one_sqlite_store_run_every_cell_once(tmp_path, store, cifar_archive):
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("ce",), seeds=(0, 1, 2, 3), epochs=1)
    env = dict(os.environ)
    procs = [subprocess.Popen([sys.executable, "-m", "fsl_lsskd.cli", "run", str(bench), "--shard", f"{i}/2",
                               "--out", str(tmp_path / "runs")], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (1, 2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    runs = cell_runs("grid")
    assert len(runs) == 4 and all(v == [(v[0][0], "complete")] for v in runs.values())
    res = cli("run", bench, "--dry-run")
    assert "4 cells, 4 complete" in res.output


def test_overlapping_invocations_without_shards_run_every_cell_once(tmp_path, store, cifar_archive):
    """Two users start the same grid on one machine without --shard: the per-cell claim makes the second
    process pass over a cell the first is training (and vice versa) instead of training it again."""
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("ce",), seeds=(0, 1, 2, 3), epochs=1)
    cli("run", bench, "--dry-run")  # creates the store first: both processes then start training at once
    procs = [subprocess.Popen([sys.executable, "-m", "fsl_lsskd.cli", "run", str(bench), "--out",
                               str(tmp_path / "runs")], cwd=tmp_path, env=dict(os.environ),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    runs = cell_runs("grid")
    assert len(runs) == 4 and all(v == [(v[0][0], "complete")] for v in runs.values()), runs
    trained = [sum(line.split()[1:2] == ["done"] for line in o.splitlines()) for o in outs]
    assert sum(trained) == 4, outs  # between them the processes trained every cell once
    res = cli("run", bench, "--dry-run")
    assert "4 cells, 4 complete" in res.output


@pytest.mark.slow
def test_shards_through_an_mlflow_server_on_loopback(tmp_path, cifar_archive, monkeypatch):
    """What several machines would use: an MLflow tracking server with a database backend (here sqlite,
    served on 127.0.0.1) and proxied artifacts; two shards and the table talk to it over HTTP."""
    import socket
    import time
    import urllib.request

    monkeypatch.chdir(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path / 'srv.db'}", "--artifacts-destination", str(tmp_path / "art"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(uri + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        bench = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("ce",), seeds=(0, 1), epochs=1)
        procs = [subprocess.Popen([sys.executable, "-m", "fsl_lsskd.cli", "run", str(bench), "--shard",
                                   f"{i}/2", "--out", str(tmp_path / f"runs{i}")], cwd=tmp_path,
                                  env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in (1, 2)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
        res = cli("table", bench, "--out", tmp_path / "results")
        assert res.exit_code == 0 and "Cells found: 2/2" in res.output, res.output
        assert not (tmp_path / "mlruns").exists()  # artifacts went through the server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_eval_metrics_match_the_logged_episode_files(tmp_path, store, cifar_archive):
    """What the table reads (per-episode .npy artifacts) agrees with the run's logged summary metrics."""
    import mlflow

    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("ce",), epochs=1)
    assert cli("run", bench, "--out", tmp_path / "runs").exit_code == 0
    (run_id,) = [v[0][0] for v in cell_runs("grid").values()]
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="eval/test_5w1s_protonet.npy",
                                                dst_path=str(tmp_path / "dl"))
    acc = np.load(local)
    assert acc.shape == (40,)
    assert metric(run_id, "eval.test.5w1s.protonet.acc") == pytest.approx(100 * acc.mean(), abs=1e-4)
