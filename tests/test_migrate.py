"""A store written in record format 1 (fsl-bench before train-once-score-many) is refused with a message naming
`fsl-bench store migrate`; after migration the same grid reuses every cell whose training did not change (CE,
whose weights the current code reproduces up to float rounding) and retrains the others (PS-KD: its training changed)."""
from __future__ import annotations

import sqlite3
from collections import Counter
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fsl_lsskd.cli import main

FIXTURE = Path(__file__).resolve().parent / "data" / "legacy_store_v1.zip"

BENCH = textwrap.dedent("""
    name: legacy_v1
    datasets: [tiny_imagenet]
    data: {tiny_imagenet: {generate: [4, 2]}}
    backbones: [conv4]
    methods: [ce, pskd]
    seeds: [0]
    image_size: 32
    train: {epochs: 1, batch_size: 64, validation: null}
    eval: {split: test, n_shot: [1], n_query: 3, n_episodes: 20, readouts: [protonet, logreg_batched]}
""")


@pytest.fixture
def legacy_store(tmp_path, monkeypatch):
    with zipfile.ZipFile(FIXTURE) as z:
        z.extractall(tmp_path)
    db = tmp_path / "mlflow.db"
    con = sqlite3.connect(db)
    for table, col in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
        con.execute(f"update {table} set {col} = replace({col}, 'LEGACY_ROOT', ?)", (str(tmp_path),))
    con.commit()
    con.close()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    (tmp_path / "legacy_v1.yaml").write_text(BENCH)
    return tmp_path


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_legacy_store_is_refused_then_migrated_and_reused(legacy_store):
    from safetensors.torch import load_file

    from fsl_lsskd.record import open_store

    bench = legacy_store / "legacy_v1.yaml"
    for args in (("run", bench, "--out", legacy_store / "runs"), ("table", bench, "--out", legacy_store / "r")):
        res = cli(*args)
        assert res.exit_code == 2 and "record format 1" in res.output and "fsl-bench store migrate" in res.output, \
            res.output
    assert not (legacy_store / "runs").exists()
    res = cli("store", "migrate", "--dry-run")
    assert res.exit_code == 0 and "would convert 2 cell(s)" in res.output, res.output
    res = cli("store", "migrate")
    assert res.exit_code == 0 and "converted 2 cell(s)" in res.output, res.output
    assert "ce/conv4/tiny_imagenet/seed0" in res.output and "retrained by the next run" in res.output  # pskd
    assert "nothing to migrate" in cli("store", "migrate").output
    store = open_store(create=False)
    migrated = {r.identity["method"]: r for r in store.trainings().values()}
    assert set(migrated) == {"ce", "pskd"} and migrated["pskd"].identity["method_version"] == 1
    res = cli("run", bench, "--out", legacy_store / "runs")
    assert res.exit_code == 0, res.output
    summary = [line for line in res.output.splitlines() if line.startswith("summary:")][0]
    assert "1 trained, 0 resumed, 1 re-scored, 0 reused" in summary, res.output  # pskd trained, ce re-scored
    ce_line = [line for line in res.output.splitlines() if line.startswith("ce/conv4")][0]
    assert " rescored " in ce_line
    res = cli("table", bench, "--out", legacy_store / "r")
    assert res.exit_code == 0, res.output
    appendix = next((legacy_store / "r").glob("*_appendix.md")).read_text()  # every column, one row per method
    assert "| ce | conv4 |" in appendix and "| pskd | conv4 |" in appendix

    # the reuse is honest: today's code trains CE on the same data to the migrated weights, up to float rounding.
    # The fixture was trained on another CPU: float sums differ between CPU vendors and kernels as they do between
    # thread counts, and 1 epoch of SGD with BatchNorm carries the difference into every weight. Measured on one
    # machine: 1 vs 2 threads moved each tensor by at most 0.6 % of its largest magnitude, another seed by ~100 %.
    # Stated tolerance: 5 % of each tensor's largest magnitude (+1e-6 for the conv biases BatchNorm cancels, ~1e-9).
    from fsl_lsskd.bench.config import load_benchmark
    from fsl_lsskd.bench.grid import expand, training_config
    from fsl_lsskd.train.engine import train

    b = load_benchmark(bench)
    ce_cell = [c for c in expand(b) if c.method == "ce"][0]
    cfg = training_config(b, ce_cell, legacy_store / "fresh")
    threads = torch.get_num_threads()
    try:
        res = train(cfg.__class__(**{**cfg.__dict__, "mlflow": False, "num_threads": 2}))
    finally:
        torch.set_num_threads(threads)
    assert res.train_id == migrated["ce"].train_id
    old = load_file(str(store.fetch_dir(migrated["ce"].run_id, "model", legacy_store / "dl") / "model.safetensors"))
    new = load_file(str(res.model_dir / "model.safetensors"))
    assert old.keys() == new.keys()
    for k in old:
        assert old[k].shape == new[k].shape and old[k].dtype == new[k].dtype, k
        if not old[k].is_floating_point():  # counters (num_batches_tracked): exact
            assert torch.equal(old[k], new[k]), k
            continue
        scale = float(old[k].abs().max())
        diff = float((new[k] - old[k]).abs().max())
        assert diff <= 0.05 * scale + 1e-6, f"{k}: max |new - old| = {diff:.3g}, largest |old| = {scale:.3g}"


KEYS_FIXTURE = Path(__file__).resolve().parent / "data" / "keys_store_v2.zip"
KEYS_BENCH = Path(__file__).resolve().parent / "data" / "keys_v2.yaml"


@pytest.fixture
def keys_store(tmp_path, monkeypatch):
    """The record-format-2 store of tests/data/keys_store_v2.zip, written before fsl.cell_key/fsl.measure."""
    with zipfile.ZipFile(KEYS_FIXTURE) as z:
        z.extractall(tmp_path)
    db = tmp_path / "mlflow.db"
    con = sqlite3.connect(db)
    for table, col in (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("params", "value")):
        con.execute(f"update {table} set {col} = replace({col}, 'KEYS_ROOT', ?)", (str(tmp_path),))
    con.commit()
    con.close()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    (tmp_path / "keys_v2.yaml").write_text(KEYS_BENCH.read_text())
    return tmp_path


def test_migrate_backfills_the_keys_of_a_store_the_old_code_wrote(keys_store):
    """`fsl-bench store migrate` tags the old code's training runs with their cell keys and score runs with their
    measure keys (the keys today's writer tags), once: a second migration changes nothing. The tables read the same
    before and after (before, the keys come from the identities), and today's runner finds every training and
    score the benchmark asks for: nothing to train or score."""
    from fsl_lsskd.bench.config import load_benchmark
    from fsl_lsskd.bench.grid import expand, with_teachers
    from fsl_lsskd.bench.measures import bench_cell_key, measures
    from fsl_lsskd.record import KIND_SCORE, KIND_TRAIN, TAG_CELL_KEY, TAG_KIND, TAG_MEASURE, open_store

    bench_path = keys_store / "keys_v2.yaml"
    st = open_store(create=False)
    assert len(st.runs_without(KIND_TRAIN, TAG_CELL_KEY)) == 2 and len(st.runs_without(KIND_SCORE, TAG_MEASURE)) == 16
    res = cli("table", bench_path, "--out", keys_store / "before")
    assert res.exit_code == 0, res.output
    res = cli("store", "migrate", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "would tag 2 training run(s) with fsl.cell_key and 16 score run(s) with fsl.measure" in res.output
    assert len(st.runs_without(KIND_SCORE, TAG_MEASURE)) == 16  # a dry run changes nothing
    res = cli("store", "migrate")
    assert res.exit_code == 0 and "tagged 2 training run(s) with fsl.cell_key and 16 score run(s)" in res.output, \
        res.output
    res = cli("store", "migrate")
    assert res.exit_code == 0 and "nothing to migrate" in res.output, res.output

    bench = load_benchmark(bench_path)
    cells = with_teachers(expand(bench))
    runs = {k: st._search(f"tags.`{TAG_KIND}` = '{k}'") for k in (KIND_TRAIN, KIND_SCORE)}
    assert {r.data.tags[TAG_CELL_KEY] for r in runs[KIND_TRAIN]} == {bench_cell_key(bench, c) for c in cells}
    tagged = Counter(r.data.tags[TAG_MEASURE] for r in runs[KIND_SCORE])
    assert tagged == {m.key: 2 for m in measures(bench, cells[0])}  # the same 8 measures for CE and KD

    res = cli("table", bench_path, "--out", keys_store / "after")
    assert res.exit_code == 0, res.output
    written = sorted((keys_store / "before").glob("keys_v2*.*"))
    assert any(p.suffix == ".csv" for p in written)
    for before in written:
        if before.suffix in (".md", ".tex", ".csv"):
            skip = 0 if before.suffix == ".csv" else 1  # the provenance line
            assert before.read_text().splitlines()[skip:] == \
                (keys_store / "after" / before.name).read_text().splitlines()[skip:], before.name
    res = cli("run", bench_path, "--dry-run")
    assert res.exit_code == 0 and "0 to train; 0 scores to compute" in res.output, res.output
    res = cli("run", bench_path, "--out", keys_store / "runs")  # nothing to do: no model artifact is fetched
    assert res.exit_code == 0 and "0 trained, 0 resumed, 0 re-scored, 2 reused" in res.output, res.output
    ce_line = next(line for line in res.output.splitlines() if line.startswith("ce/conv4"))
    assert "cifar_fs 5w1s3q protonet=" in ce_line  # the target with its own episode count is in the summary
