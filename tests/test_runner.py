"""`fsl-bench run` / `table` end to end on generated CIFAR-FS-format data: train once and score many, resume,
kills between and inside cells (real SIGKILL), failures, teachers, shards sharing one store, published tables."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fsl_lsskd.cli import main
from fsl_lsskd.data.fake import write_fake_cifar100

REPO = Path(__file__).resolve().parent.parent

# A kill switch for a subprocess run: FSLTEST_KILL="<point>:<method>" SIGKILLs the process
#   between:<m>  right after the cell of method m finished training (before any later cell)
#   train:<m>    at the start of m's second epoch (its first epoch's resume state is written)
#   score:<m>    after m is trained, before its first score is recorded
DRIVER = textwrap.dedent("""
    import os, signal, sys
    point, method = os.environ["FSLTEST_KILL"].split(":")
    from fsl_lsskd.bench import runner
    from fsl_lsskd.registry import METHODS

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    cls = METHODS.get(method)
    real_train, real_start, real_write = runner.train_cell, cls.on_epoch_start, runner.write_score

    def train_cell(bench, cell, *a, **k):
        out = real_train(bench, cell, *a, **k)
        if point == "between" and cell.method == method:
            die()
        return out

    def on_epoch_start(self, epoch):
        if point == "train" and epoch == 1:
            die()
        return real_start(self, epoch)

    def write_score(store, training, wanted, res, dataset=None):
        if point == "score" and training.identity.get("method") == method:
            die()
        return real_write(store, training, wanted, res, dataset)

    runner.train_cell, cls.on_epoch_start, runner.write_score = train_cell, on_epoch_start, write_score
    from fsl_lsskd.cli import main
    main(sys.argv[1:])
""")


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory) -> Path:
    # 8 images per class: enough for 1-shot 5-query episodes on the 20 test classes
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar"), per_class_train=6, per_class_test=2, seed=11)


def write_bench(path: Path, archive: Path, methods=("ce", "pskd"), seeds=(0,), epochs=2, extra: str = "",
                n_shot="[1]", readouts="[protonet, logreg_batched]", heldout=0.0) -> Path:
    path.write_text(textwrap.dedent(f"""
        name: {path.stem}
        description: "test grid"
        datasets: [cifar_fs]
        data: {{cifar_fs: {{archive: {archive}}}}}
        backbones: [conv4]
        methods: [{", ".join(methods)}]
        seeds: [{", ".join(map(str, seeds))}]
        image_size: 32
        train: {{epochs: {epochs}, batch_size: 32, validation: null, heldout: {heldout}}}
        eval: {{split: test, n_shot: {n_shot}, n_query: 5, n_episodes: 40, readouts: {readouts}}}
    """) + extra)
    return path


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def training_runs():
    """train id -> list of (run id, status tag) of every training run in the store."""
    from fsl_lsskd.record import open_store

    st = open_store(create=False)
    out = {}
    runs = st._search("tags.`fsl.kind` = 'train'")
    for r in runs:
        out.setdefault(r.data.tags["fsl.train_id"], []).append((r.info.run_id, r.data.tags.get("fsl.status")))
    return out


def score_count() -> int:
    from fsl_lsskd.record import open_store

    return len(open_store(create=False).scores())


def killed_run(bench: Path, point: str, tmp_path: Path) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, FSLTEST_KILL=point)
    proc = subprocess.run([sys.executable, str(driver), "run", str(bench), "--out", str(tmp_path / "runs")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc


def artifact_hashes(root: Path):
    """sha256 of every model/export file under ``root`` (the store's artifacts)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*.safetensors")}


def summary_line(output: str) -> str:
    return [line for line in output.splitlines() if line.startswith("summary:")][-1]


def test_train_once_score_many(tmp_path, store, cifar_archive):
    """Adding a readout and a second shot count trains nothing and writes no checkpoint: the new columns appear
    in the table; changing one method's epochs retrains that method's cells only; changing `epochs` all."""
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive)
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    assert "2 trained, 0 resumed, 0 re-scored, 0 reused" in summary_line(res.output)
    runs = training_runs()
    assert len(runs) == 2 and all(len(v) == 1 and v[0][1] == "complete" for v in runs.values())
    assert score_count() == 4 and not any((tmp_path / "runs").rglob("*.pt"))  # nothing stored twice
    weights = artifact_hashes(tmp_path / "mlruns")
    # a second invocation changes nothing
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert "0 trained, 0 resumed, 0 re-scored, 2 reused" in summary_line(res.output) and training_runs() == runs
    # add a readout and a protocol
    write_bench(tmp_path / "grid.yaml", cifar_archive, n_shot="[1, 2]",
                readouts="[protonet, logreg_batched, {readout: logreg_batched, C: 0.5}]")
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    assert "0 trained, 0 resumed, 2 re-scored, 0 reused" in summary_line(res.output)
    assert "; 8 new scores" in summary_line(res.output)  # (1 + 1 shot) x 3 readouts - 2 existing, per cell
    assert training_runs() == runs and artifact_hashes(tmp_path / "mlruns") == weights
    res = cli("table", bench, "--out", tmp_path / "results")
    assert res.exit_code == 0, res.output
    md = (tmp_path / "results" / "grid_appendix.md").read_text()
    assert "cifar_fs 5w2s5q logreg_batched(C=0.5)" in md and "| pskd | conv4 |" in md
    # one method's budget: only its cells retrain
    write_bench(tmp_path / "grid.yaml", cifar_archive, extra="method_overrides: {pskd: {epochs: 1}}\n")
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert "1 trained, 0 resumed, 0 re-scored, 1 reused" in summary_line(res.output), res.output
    # the global budget: every cell's identity changes; pskd at 1 epoch is the cell just trained above
    write_bench(tmp_path / "grid.yaml", cifar_archive, epochs=1)
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert "1 trained, 0 resumed, 0 re-scored, 1 reused" in summary_line(res.output), res.output


def test_run_table_and_determinism(tmp_path, store, cifar_archive):
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, readouts="[protonet, logreg_batched], base: true",
                        heldout=0.25, methods=("ce", "pskd", "pskd_topk"),
                        extra="variants: {pskd_topk: {method: pskd, settings: {store_layout: topk, store_top_k: 5}}}\n")
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    res = cli("table", bench, "--out", tmp_path / "results")
    assert res.exit_code == 0, res.output
    md = (tmp_path / "results" / "grid_appendix.md").read_text()
    assert "40 episodes" in md and "seeds [0]" in md and "Cells found: 3/3" in md
    assert "| pskd | conv4 |" in md and "Paired difference to `ce`" in md and "Calibration" in md
    assert "Base classes (held-out images" in md
    # the ablation row is paired with its own method (not only with the baseline), base top-1 included
    variant = md.split("Variant effects")[1].split("\n\n")[1].splitlines()
    assert len(variant) == 3 and variant[2].startswith(
        "| pskd_topk − pskd (store_layout: topk, store_top_k: 5) | conv4 | ") and variant[2].count("seeds ") == 3
    assert "cifar_fs base top-1" in variant[0]
    csv = (tmp_path / "results" / "grid.csv").read_text().splitlines()
    assert csv[0].startswith("method,backbone,train_data,target,protocol,readout") and len(csv) >= 1 + 3 * 2
    for ext in ("tex", "png", "pdf"):
        assert list((tmp_path / "results").glob(f"*.{ext}"))
    first = {p.name: p.read_bytes() for p in (tmp_path / "results").glob("*.*")}  # tables and figures, PDFs too
    time.sleep(1.1)  # a PDF creation date would differ
    assert cli("table", bench, "--out", tmp_path / "results").exit_code == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "results").glob("*.*")} == first
    res = cli("table", bench, "--out", tmp_path / "b", "--baseline", "ce", "--baseline", "pskd")
    md = (tmp_path / "b" / "grid_appendix.md").read_text()
    assert res.exit_code == 0 and "--baseline ce --baseline pskd`" in md.splitlines()[0]
    pskd_part = md.split("Paired difference to `pskd`")[1]
    assert "| ce | conv4 | " in pskd_part and "| pskd | conv4 | " not in pskd_part.split("Calibration")[0]
    res = cli("table", bench, "--out", tmp_path / "c", "--baseline", "cee")
    assert res.exit_code == 2 and "Did you mean 'ce'" in res.output and not (tmp_path / "c").exists()
    res = cli("table", bench, "--out", tmp_path / "d", "--baseline", "byot")  # registered, not in this grid
    assert res.exit_code == 2 and "methods present: ce, pskd" in res.output


def test_reading_commands_never_create_a_store(tmp_path, cifar_archive, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive)
    res = cli("table", bench, "--out", tmp_path / "results")
    assert res.exit_code == 2 and "no MLflow store at" in res.output and "MLFLOW_TRACKING_URI" in res.output
    res = cli("run", bench, "--dry-run")
    assert res.exit_code == 0 and "store: none yet" in res.output and "2 to train" in res.output
    assert not (tmp_path / "mlflow.db").exists()


def test_run_filters_fractions_and_per_row_seeds(tmp_path, store, cifar_archive):
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, seeds=(0, 1),
                        extra="fractions: [0.5, 1.0]\nmethod_seeds: {pskd: [0]}\n")
    res = cli("run", bench, "--dry-run")
    assert res.exit_code == 0 and "6 to train" in res.output  # ce 2 seeds x 2 fractions, pskd 1 seed x 2
    res = cli("run", bench, "--dry-run", "--fractions", "0.5", "--methods", "ce")  # pskd filtered out: valid
    labels = [line.split()[1] for line in res.output.splitlines() if line.startswith("  ") and "/seed" in line]
    assert res.exit_code == 0, res.output
    assert sorted(labels) == ["ce/conv4/cifar_fs@50%/seed0", "ce/conv4/cifar_fs@50%/seed1"]
    res = cli("run", bench, "--dry-run", "--seeds", "1")  # pskd has no seed 1: no pskd cell, no error
    assert res.exit_code == 0 and "2 to train" in res.output and "pskd/" not in res.output
    res = cli("run", bench, "--dry-run", "--methods", "pskd", "--seeds", "1")  # an empty selection says why
    assert res.exit_code == 2 and "the selection has no cells: pskd has seeds 0 only (`method_seeds`" in res.output
    res = cli("run", bench, "--dry-run", "--seeds", " ")
    assert res.exit_code == 2 and "--seeds ' ' selects nothing" in res.output
    res = cli("run", bench, "--dry-run", "--fractions", "0.3")
    assert res.exit_code == 2 and "--fractions 0.3 not in" in res.output and "0.5, 1.0" in res.output
    res = cli("run", bench, "--dry-run", "--fractions", "half")
    assert res.exit_code == 2 and "expected shares of the base images" in res.output
    plain = write_bench(tmp_path / "plain.yaml", cifar_archive)
    res = cli("run", plain, "--dry-run", "--fractions", "0.5")
    assert res.exit_code == 2 and "has no `fractions`" in res.output
    assert not (tmp_path / "runs").exists()


def test_kill_between_cells_loses_nothing_and_repeats_nothing(tmp_path, store, cifar_archive):
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive)
    killed_run(bench, "between:ce", tmp_path)
    before = training_runs()
    assert len(before) == 1 and list(before.values())[0][0][1] == "complete"
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    after = training_runs()
    assert len(after) == 2 and all(len(v) == 1 for v in after.values())  # none lost, none twice
    (ce_id,) = before
    assert after[ce_id] == before[ce_id]
    assert "1 trained, 0 resumed, 1 re-scored, 0 reused" in summary_line(res.output)  # ce: scored now


def test_kill_inside_training_resumes_the_same_run_to_the_same_numbers(tmp_path, store, cifar_archive,
                                                                        monkeypatch):
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive)
    killed_run(bench, "train:pskd", tmp_path)
    runs = training_runs()
    (pskd_id,) = [k for k, v in runs.items() if v[0][1] != "complete"]
    killed_run_id = runs[pskd_id][0][0]
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    assert "0 trained, 1 resumed" in summary_line(res.output)
    runs = training_runs()
    assert runs[pskd_id] == [(killed_run_id, "complete")]  # the killed cell's own run, resumed
    from fsl_lsskd.record import open_store

    st = open_store(create=False)
    hist = st.client.get_metric_history(killed_run_id, "train_loss")
    assert sorted(m.step for m in hist) == [1, 2]  # each epoch logged once
    resumed = {r.tags["fsl.label"]: r.metrics["accuracy"] for r in st.scores([pskd_id]).values()}
    loss = st.client.get_run(killed_run_id).data.metrics["train_loss"]
    other = tmp_path / "straight"  # an uninterrupted run of the same grid (another store): the same results
    other.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other / 'mlflow.db'}")
    monkeypatch.chdir(other)
    assert cli("run", bench, "--out", other / "runs").exit_code == 0
    st2 = open_store(create=False)
    assert {r.tags["fsl.label"]: r.metrics["accuracy"] for r in st2.scores([pskd_id]).values()} == resumed
    assert st2.client.get_run(st2.training(pskd_id).run_id).data.metrics["train_loss"] == loss


def test_kill_before_scores_are_recorded_never_publishes_half_a_cell(tmp_path, store, cifar_archive):
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive)
    killed_run(bench, "score:pskd", tmp_path)
    res = cli("table", bench, "--out", tmp_path / "results")
    assert res.exit_code == 0, res.output
    md = (tmp_path / "results" / "grid_appendix.md").read_text()
    assert "| pskd |" not in md  # trained but not scored: no row
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    assert "0 trained, 0 resumed, 1 re-scored, 1 reused" in summary_line(res.output)  # no epoch re-trained
    assert all(len(v) == 1 and v[0][1] == "complete" for v in training_runs().values())


def test_a_crashing_cell_is_reported_and_the_grid_goes_on(tmp_path, store, cifar_archive, monkeypatch):
    from fsl_lsskd.methods.pskd import PSKD

    def boom(self, batch, epoch):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(PSKD, "training_step", boom)
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("pskd", "ce"), epochs=1)
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert res.exit_code == 1
    assert "simulated crash" in res.output and "1 cell(s) failed" in res.output
    statuses = sorted(v[0][1] or "-" for v in training_runs().values())
    assert statuses == ["complete", "running"]


def test_teacher_cells_train_first_and_come_from_the_store(tmp_path, store, cifar_archive):
    from fsl_lsskd.checkpoint import load_method
    from fsl_lsskd.bench.config import load_benchmark
    from fsl_lsskd.bench.grid import expand, with_teachers
    from fsl_lsskd.bench.runner import DataCache, Plan, teacher_model_dir
    from fsl_lsskd.record import open_store

    bench_path = write_bench(tmp_path / "kdgrid.yaml", cifar_archive, methods=("kd",), epochs=1)
    res = cli("run", bench_path, "--dry-run")
    assert res.exit_code == 0 and "teacher" in res.output and "taught by" in res.output, res.output
    res = cli("run", bench_path, "--out", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    bench = load_benchmark(bench_path)
    cells = with_teachers(expand(bench))
    assert [c.method for c in cells] == ["ce", "kd"] and cells[0].role == "teacher"
    plan = Plan(bench, cells, DataCache(bench))
    assert plan.identity[cells[1].key]["teacher"] == plan.tid(cells[0])  # the student's identity holds it
    runs = training_runs()
    assert all(v[0][1] == "complete" for v in runs.values()) and len(runs) == 2
    path = teacher_model_dir(open_store(create=False), plan.tid(cells[0]), tmp_path / "elsewhere")
    assert load_method(path).num_classes == 64
    res = cli("table", bench_path, "--out", tmp_path / "results")
    assert res.exit_code == 0, res.output
    appendix = (tmp_path / "results" / f"{bench_path.stem}_appendix.md").read_text()
    assert "| ce (teacher) | conv4 |" in appendix and "| kd | conv4 |" in appendix


def test_shards_keep_teachers_with_students_and_partition_the_grid(tmp_path, cifar_archive):
    from fsl_lsskd.bench.config import load_benchmark
    from fsl_lsskd.bench.grid import _group_key, expand, shard, with_teachers

    bench = load_benchmark(write_bench(tmp_path / "g.yaml", cifar_archive, methods=("ce", "kd", "pskd"),
                                       seeds=(0, 1, 2)))
    cells = expand(bench)
    parts = [shard(cells, f"{i}/3") for i in (1, 2, 3)]
    assert sorted(map(str, (c.key for p in parts for c in p))) == sorted(map(str, (c.key for c in cells)))
    for p in parts:
        keys = {c.key for c in p}
        for c in p:
            if c.method == "kd":
                assert c.teacher.key in keys  # the ce teacher of the same seed is in the same shard
        assert {c.key for c in with_teachers(p)} == keys  # no teacher-only cell needed: ce is in the grid
    assert len({_group_key(c) for c in cells}) == 6  # {ce,kd} x 3 seeds + pskd x 3


def test_concurrent_shards_on_one_sqlite_store_run_every_cell_once(tmp_path, store, cifar_archive):
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("ce",), seeds=(0, 1, 2, 3), epochs=1)
    procs = [subprocess.Popen([sys.executable, "-m", "fsl_lsskd.cli", "run", str(bench), "--shard", f"{i}/2",
                               "--out", str(tmp_path / "runs")], cwd=tmp_path, env=dict(os.environ),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (1, 2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    runs = training_runs()
    assert len(runs) == 4 and all(v == [(v[0][0], "complete")] for v in runs.values())
    res = cli("run", bench, "--dry-run")
    assert "4 cells: 4 trained, 0 to train; 0 scores to compute" in res.output, res.output


def test_overlapping_invocations_without_shards_run_every_cell_once(tmp_path, store, cifar_archive):
    """Two users start the same grid on one machine without --shard: the per-cell claim makes the second
    process pass over a cell the first is training (and vice versa) instead of training it again."""
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("ce",), seeds=(0, 1, 2, 3), epochs=1)
    from fsl_lsskd.record import open_store

    open_store()  # creates the store first: both processes then start training at once
    procs = [subprocess.Popen([sys.executable, "-m", "fsl_lsskd.cli", "run", str(bench), "--out",
                               str(tmp_path / "runs")], cwd=tmp_path, env=dict(os.environ),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    runs = training_runs()
    assert len(runs) == 4 and all(v == [(v[0][0], "complete")] for v in runs.values()), runs
    trained = [sum(line.split()[1:2] == ["trained"] for line in o.splitlines()) for o in outs]
    assert sum(trained) == 4, outs  # between them the processes trained every cell once


@pytest.mark.slow
def test_shards_through_an_mlflow_server_on_loopback(tmp_path, cifar_archive, monkeypatch):
    """What several machines would use: an MLflow tracking server with a database backend (here sqlite,
    served on 127.0.0.1) and proxied artifacts; two shards and the table talk to it over HTTP."""
    from servers import mlflow_server

    monkeypatch.chdir(tmp_path)
    with mlflow_server(tmp_path, f"sqlite:///{tmp_path / 'srv.db'}") as uri:
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


def test_recorded_metrics_match_the_episode_arrays(tmp_path, store, cifar_archive):
    """What the table reads (per-episode arrays of a score run) agrees with the run's summary metrics, in %."""
    from fsl_lsskd.record import open_store

    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("ce",), epochs=1)
    assert cli("run", bench, "--out", tmp_path / "runs").exit_code == 0
    st = open_store(create=False)
    for rec in st.scores().values():
        arrays = st.score_arrays(rec, {})
        assert arrays["accuracy"].shape == (40,)
        assert rec.metrics["accuracy"] == pytest.approx(arrays["accuracy"].mean(), abs=1e-6)
        assert 0 <= rec.metrics["ece"] <= 100 and arrays["reliability"].shape == (40, 16, 3)


def test_cross_domain_targets_fixed_runs_overrides_and_finetune(tmp_path, store, cifar_archive):
    """A benchmark scores its backbones on other datasets' test classes: Omniglot's official runs (their own
    fixed 20-way 1-shot protocol), a Tiny ImageNet-format target with a per-target n_query (protocols it cannot
    host are skipped with a note), and the image-level `finetune` readout on the first N episodes."""
    from fsl_lsskd.data.fake import write_fake_tiny_imagenet
    from fsl_lsskd.data.fake_omniglot import write_fake_omniglot_runs

    runs = write_fake_omniglot_runs(tmp_path)
    tiny = write_fake_tiny_imagenet(tmp_path, per_class_train=2, per_class_val=1)  # 3 images per class
    extra = textwrap.dedent(f"""
        data:
          cifar_fs: {{archive: {cifar_archive}}}
          omniglot_runs: {{archive: {runs}}}
          tiny_imagenet: {{archive: {tiny}}}
        eval:
          split: test
          n_shot: [1, 5]
          n_query: 2
          n_episodes: 40
          readouts: [protonet, {{readout: finetune, steps: 2}}]
          image_episodes: 3
          datasets: [cifar_fs, omniglot_runs, tiny_imagenet]
          targets: {{tiny_imagenet: {{n_query: 1}}, omniglot_runs: {{readouts: [protonet]}}}}
    """)
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("ce",), epochs=1)
    text = bench.read_text()
    text = text[:text.index("data:")] + text[text.index("backbones:"):text.index("eval:")] + extra
    bench.write_text(text)
    res = cli("run", bench, "--out", tmp_path / "runs", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "tiny_imagenet test: cannot host 5w5s1q" in res.output
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    from fsl_lsskd.record import open_store

    scores = open_store(create=False).scores().values()
    keys = sorted((r.identity["target"]["dataset"], r.identity["protocol"]["n_way"], r.identity["protocol"]["n_shot"],
                   r.identity["protocol"]["n_query"], r.identity["readout"], len(r.metrics) > 0) for r in scores)
    assert {k[:5] for k in keys} == {("cifar_fs", 5, s, 2, r) for s in (1, 5) for r in ("protonet", "finetune")} | \
        {("omniglot_runs", 20, 1, 1, "protonet")} | \
        {("tiny_imagenet", 5, 1, 1, r) for r in ("protonet", "finetune")}
    res = cli("table", bench, "--out", tmp_path / "results")
    assert res.exit_code == 0, res.output
    md = (tmp_path / "results" / "grid_appendix.md").read_text()
    for col in ("omniglot_runs 20w1s1q protonet", "tiny_imagenet 5w1s1q finetune(steps=2)", "cifar_fs 5w5s2q protonet"):
        assert col in md, md
    assert "omniglot_runs 20w1s1q finetune" not in md  # eval.targets.omniglot_runs.readouts
    # a target whose test split cannot host any of its protocols is refused up front, naming the fix
    bench.write_text(text.replace("{tiny_imagenet: {n_query: 1}", "{tiny_imagenet: {n_query: 3}"))
    res = cli("run", bench, "--out", tmp_path / "runs", "--dry-run")
    assert res.exit_code == 2 and "eval: {targets: {tiny_imagenet: {n_query: N}}}" in res.output, res.output


def test_run_downloads_a_missing_dataset_first_and_dry_run_fetches_nothing(tmp_path, store, cifar_archive,
                                                                            monkeypatch):
    """`data: {cifar_fs: {download: true}}` on a machine without the archive: the dry run says it will be
    downloaded and fetches nothing; the run fetches it (checksummed), then trains and scores."""
    import hashlib

    from fsl_lsskd.data import sources

    calls = []
    monkeypatch.setattr(sources, "fetch", lambda url, dest: calls.append(url) or Path(dest).write_bytes(
        cifar_archive.read_bytes()))
    monkeypatch.setattr("fsl_lsskd.data.cifar_fs.MD5", hashlib.md5(cifar_archive.read_bytes()).hexdigest())
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("ce",), epochs=1)
    bench.write_text(bench.read_text().replace(f"{{archive: {cifar_archive}}}",
                                               f"{{data_root: {tmp_path / 'dl'}, download: true}}"))
    res = cli("run", bench, "--dry-run")
    assert res.exit_code == 0, res.output
    assert "not on this machine yet; `fsl-bench run` downloads it first" in res.output and calls == []
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    assert len(calls) == 1 and "1 trained" in summary_line(res.output)
    assert (tmp_path / "dl" / "cifar-100-python.tar.gz").is_file()


def test_publish_rebuild_tables_from_results_and_reproduce_a_published_number(tmp_path, store, cifar_archive):
    """`fsl-bench publish` writes every cell's backbone and per-episode scores with a manifest; the tables built
    from those files alone equal the store's; `evaluate --checkpoint` on a published file gives its number."""
    import json

    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("ce", "pskd"), seeds=(0, 1), epochs=1,
                        readouts="[protonet, logreg_batched], base: true", heldout=0.25)
    assert cli("run", bench, "--out", tmp_path / "runs").exit_code == 0
    res = cli("publish", bench, "--out", tmp_path / "pub")
    assert res.exit_code == 0 and "published 4 cells" in res.output, res.output
    manifest = json.loads((tmp_path / "pub" / "MANIFEST.json").read_text())
    names = sorted(p.name for p in (tmp_path / "pub").iterdir())
    assert "ce-conv4-seed0.safetensors" in names and "pskd-conv4-seed1.scores.npz" in names
    assert len(manifest["cells"]) == 4 and manifest["published_at_commit"]
    text = (tmp_path / "pub" / "MANIFEST.json").read_text()  # no path of the machine that trained the cells
    assert str(tmp_path) not in text and "run.out_dir" not in text, text[:2000]
    assert all(e["params"]["run.archive"] == Path(cifar_archive).name for e in manifest["cells"])
    entry = next(e for e in manifest["cells"] if e["stem"] == "pskd-conv4-seed1")
    assert entry["train_id"] and entry["tags"]["fsl.identity"] and len(entry["scores"]) == 3
    assert cli("table", bench, "--out", tmp_path / "from_store").exit_code == 0
    res = cli("table", bench, "--out", tmp_path / "from_files", "--from-results", tmp_path / "pub")
    assert res.exit_code == 0, res.output
    for ext in ("md", "csv", "tex"):
        a = (tmp_path / "from_store" / f"grid.{ext}").read_text().splitlines()
        b = (tmp_path / "from_files" / f"grid.{ext}").read_text().splitlines()
        if ext == "md":  # the first line says where the numbers came from
            assert "from the MLflow store" in a[0] and "from published files in" in b[0]
            a, b = a[1:], b[1:]
        assert a == b, ext
    # one published number, reproduced from the published file alone
    score = next(s for s in entry["scores"] if s["tags"]["fsl.readout"] == "protonet")
    res = cli("evaluate", "--checkpoint", tmp_path / "pub" / "pskd-conv4-seed1.safetensors", "--dataset",
              "cifar_fs", "--archive", cifar_archive, "--n-shot", "1", "--n-query", "5", "--n-episodes", "40",
              "--readouts", "protonet", "--out", tmp_path / "ev")
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "ev" / "summary.json").read_text())["results"][0]
    assert again["accuracy"] == pytest.approx(score["metrics"]["accuracy"], abs=1e-9)
    # a changed file is refused
    npz = tmp_path / "pub" / "ce-conv4-seed0.scores.npz"
    npz.write_bytes(npz.read_bytes()[:-10])
    res = cli("table", bench, "--out", tmp_path / "x", "--from-results", tmp_path / "pub")
    assert res.exit_code == 2 and "differs from MANIFEST.json" in res.output, res.output


def test_publish_ships_the_maml_model_and_evaluate_reproduces_maml_finetune(tmp_path, store, cifar_archive):
    """A cell scored by a readout that needs the whole trained method (maml_finetune: backbone *and* head) is
    published with its model directory, listed in the manifest with its sha256; `evaluate --checkpoint` on
    that directory reproduces the published maml_finetune number. An exported backbone alone is refused with
    a message naming the model directory."""
    import json

    extra = textwrap.dedent("""
        method_overrides:
          maml: {n_way: 5, n_shot: 1, n_query: 2, episodes_per_epoch: 4, inner_steps: 1, test_inner_steps: 2}
    """)
    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("ce", "maml"), epochs=1,
                        readouts="[protonet], extra_readouts: {maml: [maml_finetune]}",
                        extra=extra)
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    pub = tmp_path / "pub"
    assert cli("publish", bench, "--out", pub).exit_code == 0
    manifest = json.loads((pub / "MANIFEST.json").read_text())
    files = {e["stem"]: e["files"] for e in manifest["cells"]}
    assert "maml-conv4-seed0.model/model.safetensors" in files["maml-conv4-seed0"]
    assert "maml-conv4-seed0.model/model.json" in files["maml-conv4-seed0"]
    assert not any(".model/" in name for name in files["ce-conv4-seed0"])  # protonet needs the backbone only
    assert not (pub / "ce-conv4-seed0.model").exists()
    text = (pub / "maml-conv4-seed0.model" / "model.json").read_text()
    assert str(tmp_path) not in text  # no path of the machine that trained it
    entry = next(e for e in manifest["cells"] if e["stem"] == "maml-conv4-seed0")
    score = next(s for s in entry["scores"] if s["tags"]["fsl.readout"] == "maml_finetune")
    args = ["evaluate", "--dataset", "cifar_fs", "--archive", cifar_archive, "--n-shot", "1", "--n-query", "5",
            "--n-episodes", "40", "--readouts", "maml_finetune"]
    res = cli(*args, "--checkpoint", pub / "maml-conv4-seed0.model", "--out", tmp_path / "ev")
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "ev" / "summary.json").read_text())["results"][0]
    assert again["accuracy"] == pytest.approx(score["metrics"]["accuracy"], abs=1e-9)
    res = cli(*args, "--checkpoint", pub / "maml-conv4-seed0.safetensors")
    assert res.exit_code == 2, res.output
    assert f"not an exported backbone: pass --checkpoint {pub / 'maml-conv4-seed0.model'}" in res.output
    # the table rebuilt from the published files checks the model's sha256 too
    (pub / "maml-conv4-seed0.model" / "model.json").write_text(text + " ")
    res = cli("table", bench, "--out", tmp_path / "x", "--from-results", pub)
    assert res.exit_code == 2 and "differs from MANIFEST.json" in res.output, res.output


def test_publish_adds_seeds_trained_with_another_store(tmp_path, store, cifar_archive, monkeypatch):
    """Publishing into a directory that already publishes some cells keeps them (sha256 checked) and adds the
    store's: seeds trained in another session, with another store, join the published ones; the tables built
    from the directory then rest on every seed. A published file that changed is refused, not dropped."""
    import json

    bench = write_bench(tmp_path / "grid.yaml", cifar_archive, methods=("ce",), seeds=(0, 1, 2), epochs=1,
                        readouts="[protonet]")
    pub = tmp_path / "pub"
    assert cli("run", bench, "--seeds", "0,1", "--out", tmp_path / "runs").exit_code == 0
    assert cli("publish", bench, "--out", pub).exit_code == 0
    first = json.loads((pub / "MANIFEST.json").read_text())
    seed0 = (pub / "ce-conv4-seed0.scores.npz").read_bytes()
    # a second store that holds only seed 2
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    assert cli("run", bench, "--seeds", "2", "--out", tmp_path / "runs2").exit_code == 0
    res = cli("publish", bench, "--out", pub)
    assert res.exit_code == 0 and "published 3 cells" in res.output, res.output
    manifest = json.loads((pub / "MANIFEST.json").read_text())
    assert [e["stem"] for e in manifest["cells"]] == ["ce-conv4-seed0", "ce-conv4-seed1", "ce-conv4-seed2"]
    assert manifest["cells"][:2] == first["cells"] and (pub / "ce-conv4-seed0.scores.npz").read_bytes() == seed0
    res = cli("table", bench, "--out", tmp_path / "t", "--from-results", pub)
    assert res.exit_code == 0, res.output
    csv = (tmp_path / "t" / "grid.csv").read_text().splitlines()
    assert csv[1].split(",")[6] == "3", csv[:2]  # the seeds column: 3 seeds
    (pub / "ce-conv4-seed1.safetensors").write_bytes(b"changed")
    res = cli("publish", bench, "--out", pub)
    assert res.exit_code == 2 and "differs from MANIFEST.json" in res.output, res.output
