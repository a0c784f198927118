"""The edge column: ONNX parity on real (generated, official-format) images, int8 calibrated on training images
only, the load guard under an artificial load, latency records with machine and threads, `fsl-bench export
--int8 --measure` and `fsl-bench edge` end to end (exit 2 under load without --allow-load)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fsl_lsskd.cli import main
from fsl_lsskd.data.fake import write_fake_cifar100
from fsl_lsskd.inputs import InputSpec

MEAN, STD = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)
SPEC = InputSpec(MEAN, STD, 32)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Generated CIFAR-FS (official CIFAR-100 archive layout; 8 images per class) and its train/test splits."""
    from fsl_lsskd.data import get_dataset

    root = tmp_path_factory.mktemp("edgedata")
    archive = write_fake_cifar100(root, per_class_train=6, per_class_test=2, seed=5)
    ds = get_dataset("cifar_fs", archive=archive, cache_dir=root / "cache")
    return {"archive": archive, "train": ds.load_split("train"), "test": ds.load_split("test")}


@pytest.fixture(scope="module")
def files(tmp_path_factory, data):
    """A seeded Conv-4 export (what `fsl-bench train` writes), its fp32 ONNX and int8 ONNX (calibrated on 24
    training images), with the calibration reader."""
    from fsl_lsskd.backbones import create_backbone
    from fsl_lsskd.checkpoint import export_backbone
    from fsl_lsskd.edge.onnx_export import export_onnx
    from fsl_lsskd.edge.quantize import TrainSplitCalibrationReader, calibration_rows, quantize_int8

    out = tmp_path_factory.mktemp("edgefiles")
    torch.manual_seed(0)
    net = create_backbone("conv4", num_classes=0, image_size=32).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them into the convolutions matters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    export_backbone(net, "conv4", 32, out, extra={"method": "ce", "dataset": "cifar_fs", "mean": list(MEAN),
                                                  "std": list(STD)})
    fp32 = export_onnx(net, 32, out / "backbone.onnx")
    rows = calibration_rows(len(data["train"]), 24, seed=3)
    reader = TrainSplitCalibrationReader(data["train"], rows, SPEC, batch_size=10)
    passed = []
    real_next = reader.get_next

    def spy():  # what ONNX Runtime's calibrator actually receives
        batch = real_next()
        if batch is not None:
            passed.append(batch["images"].copy())
        return batch

    reader.get_next = spy
    int8 = quantize_int8(out / "backbone.onnx", out / "backbone_int8.onnx", reader)
    return {"dir": out, "net": net, "fp32": fp32, "int8": int8, "reader": reader, "rows": rows, "passed": passed}


# ------------------------------------------------------------------------------------------------ ONNX parity
def test_onnx_export_matches_pytorch_on_real_images_at_any_batch(files, data):
    from fsl_lsskd.edge.onnx_export import PARITY_RTOL, OnnxBackbone, parity

    images = data["test"].images[:64]
    res = parity(files["net"], files["dir"] / "backbone.onnx", images, SPEC)
    assert res["n_images"] == 64 and res["ok"], res
    assert res["max_rel_diff"] < PARITY_RTOL and res["max_abs_diff"] < PARITY_RTOL * res["max_abs_reference"]
    assert res["max_abs_reference"] > 0.01  # the features are not all ~0: the bound means something
    ob = OnnxBackbone(files["dir"] / "backbone.onnx")
    for b in (1, 3, 17):  # the batch dimension is dynamic
        x = SPEC.prepare(data["train"].images[:b]).contiguous()
        with torch.inference_mode():
            ref = files["net"](x).numpy()
        out = ob(x).numpy()
        assert out.shape == (b, 64) and np.abs(out - ref).max() <= PARITY_RTOL * np.abs(ref).max()
    assert files["fp32"]["num_features"] == 64 and files["fp32"]["bytes"] > 100_000


def test_parity_reports_a_wrong_model(files, data, tmp_path):
    """The check can fail: another network's ONNX file is not 'ok' against this one."""
    from fsl_lsskd.backbones import create_backbone
    from fsl_lsskd.edge.onnx_export import export_onnx, parity

    torch.manual_seed(1)
    other = create_backbone("conv4", num_classes=0, image_size=32).eval()
    export_onnx(other, 32, tmp_path / "other.onnx")
    res = parity(files["net"], tmp_path / "other.onnx", data["test"].images[:8], SPEC)
    assert not res["ok"] and res["max_rel_diff"] > 1e-2


# ------------------------------------------------------------------------------------- int8 calibration data
def test_int8_calibration_sees_training_images_only(files, data):
    from fsl_lsskd.edge.quantize import image_sha256

    train, test, reader, rows = data["train"], data["test"], files["reader"], files["rows"]
    train_sha = {image_sha256(im) for im in train.images}
    test_sha = {image_sha256(im) for im in test.images}
    assert not train_sha & test_sha  # the splits are told apart by content, so the check below can fail
    assert reader.given_rows == [int(r) for r in rows] and len(rows) == 24
    assert set(reader.given_sha256) <= train_sha and not set(reader.given_sha256) & test_sha
    # what the quantiser received is exactly the prepared training rows, and no test image prepared the same way
    passed = np.concatenate(files["passed"])
    assert np.array_equal(passed, SPEC.prepare(train.images[rows]).contiguous().numpy())
    test_x = SPEC.prepare(test.images).contiguous().numpy().reshape(len(test), -1)
    flat = passed.reshape(len(passed), -1)
    assert not any((np.abs(test_x - p).max(axis=1) == 0).any() for p in flat)
    info = files["int8"]
    assert info["calibration"]["split"] == "train" and info["calibration"]["n_images"] == 24
    assert info["quant_format"] == "QDQ" and info["per_channel"] and info["bytes"] < files["fp32"]["bytes"] / 2


def test_calibration_refuses_any_split_but_train(data):
    from fsl_lsskd.edge.quantize import TrainSplitCalibrationReader
    from fsl_lsskd.errors import DataError

    with pytest.raises(DataError, match="training images only"):
        TrainSplitCalibrationReader(data["test"], [0, 1], SPEC)
    with pytest.raises(DataError, match="index"):
        TrainSplitCalibrationReader(data["train"], [len(data["train"])], SPEC)


def test_int8_model_runs_and_stays_close_to_fp32(files, data):
    from fsl_lsskd.edge.onnx_export import OnnxBackbone

    x = SPEC.prepare(data["test"].images[:32]).contiguous()
    f32 = OnnxBackbone(files["dir"] / "backbone.onnx")(x).numpy()
    i8 = OnnxBackbone(files["dir"] / "backbone_int8.onnx")(x).numpy()
    assert i8.shape == f32.shape and np.isfinite(i8).all()
    cos = (f32 * i8).sum(1) / (np.linalg.norm(f32, axis=1) * np.linalg.norm(i8, axis=1))
    assert cos.min() > 0.9  # quantised, not broken


# -------------------------------------------------------------------------------------------------- load guard
def test_load_guard_decision():
    from fsl_lsskd.edge.guard import BUSY_MAX, SPREAD_MAX, LoadReading

    def reading(share, spread):
        return LoadReading(share, 1.0, spread, 0.0, 2, 1.0).decide()

    assert not reading(0.02, 1.05).under_load and not reading(None, 1.05).under_load
    busy = reading(BUSY_MAX + 0.1, 1.05)
    assert busy.under_load and "other processes took" in busy.reasons[0]
    noisy = reading(0.0, SPREAD_MAX + 0.5)
    assert noisy.under_load and "probe varied" in noisy.reasons[0]


def test_others_share_subtracts_the_measuring_processes():
    from fsl_lsskd.edge.guard import busy_share, others_share

    hz = os.sysconf("SC_CLK_TCK")
    # 2 cores, 1 s: 1.5 core-seconds busy of which 1.0 was ours -> others took 0.5 of 2 core-seconds
    assert others_share((0, 0), (int(1.5 * hz), 2 * hz), own_cpu_s=1.0, wall_s=1.0, cores=2) == pytest.approx(0.25)
    assert others_share((0, 0), (hz, 2 * hz), own_cpu_s=1.2, wall_s=1.0, cores=2) == 0.0
    assert busy_share((10, 100), (60, 200)) == pytest.approx(0.5)


def _busy_loops(n: int):
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _stop(procs):
    for p in procs:  # by pid, each one this test started
        p.kill()
    for p in procs:
        p.wait(timeout=30)


def test_load_guard_trips_under_an_artificial_load():
    from fsl_lsskd.edge.guard import BUSY_MAX, cpu_ticks, read_load

    if cpu_ticks() is None:
        pytest.skip("no /proc/stat")
    procs = _busy_loops(min(os.cpu_count() or 1, 32))
    try:
        time.sleep(0.5)
        reading = read_load(window_s=0.5)
    finally:
        _stop(procs)
    assert reading.under_load and reading.reasons
    assert reading.busy_share > BUSY_MAX and reading.cores == os.cpu_count()


# ----------------------------------------------------------------------------------------------------- latency
def test_latency_records_carry_machine_threads_and_load(files, data):
    from fsl_lsskd.edge.latency import ENGINES, LatencySettings, measure_latency

    d = files["dir"]
    inputs = SPEC.prepare(data["test"].images[:3]).contiguous().numpy()
    settings = LatencySettings(threads=(1,), batch_sizes=(1, 3), warmup=1, runs=12, max_seconds=2.0, window_s=0.2)
    res = measure_latency({"pytorch_fp32": d, "ort_fp32": d / "backbone.onnx", "ort_int8": d / "backbone_int8.onnx"},
                          inputs, settings, allow_load=True)
    recs = res["records"]
    assert [(r["engine"], r["batch"]) for r in recs] == [(e, b) for e in ENGINES for b in (1, 3)]
    for r in recs:
        m = r["machine"]
        assert m["cpu_model"] and m["cores"] >= 1 and m["torch"] == torch.__version__.split("+")[0]
        assert m["onnxruntime"] not in ("", "not installed")
        assert r["threads"] == 1 and r["threads_effective"] == 1 and r["inter_op_threads"] == 1
        assert 1 <= r["n_runs"] <= 12 and r["p50_ms"] > 0 and math.isnan(r["p99_ms"])  # p99 needs 100 runs
        assert r["load_ms"] > 0 and r["peak_rss_mb"] >= r["rss_baseline_mb"] > 0 and r["memory_method"]
        assert isinstance(r["under_load"], bool) and r["others_busy_share"] is not None
    assert {"before", "after"} <= set(res["guard"]) and res["under_load"] == any(r["under_load"] for r in recs)


def test_latency_refuses_to_time_on_a_busy_machine(files, monkeypatch):
    from fsl_lsskd.edge import latency
    from fsl_lsskd.edge.guard import LoadReading, MachineBusy

    busy = LoadReading(0.9, 1.0, 4.0, 2.0, 2, 1.0).decide()
    monkeypatch.setattr(latency, "read_load", lambda **kw: busy)
    monkeypatch.setattr(latency, "run_worker", lambda *a, **k: pytest.fail("timed on a busy machine"))
    with pytest.raises(MachineBusy, match="--allow-load"):
        latency.measure_latency({"ort_fp32": files["dir"] / "backbone.onnx"}, np.zeros((1, 3, 32, 32), np.float32),
                                latency.LatencySettings(threads=(1,), batch_sizes=(1,)))


def test_thread_and_batch_options():
    from fsl_lsskd.edge.latency import parse_batch_sizes, parse_threads, usable_cores
    from fsl_lsskd.errors import ConfigError

    assert parse_threads("1,all") == tuple(dict.fromkeys((1, usable_cores())))
    assert parse_batch_sizes("1,64,1") == (1, 64)
    for bad in ("0", "x", ""):
        with pytest.raises(ConfigError):
            parse_threads(bad)
    with pytest.raises(ConfigError):
        parse_batch_sizes("1,-2")


# -------------------------------------------------------------------------------------------------------- CLI
def test_export_int8_and_accuracy_from_the_command_line(files, data, tmp_path):
    out = tmp_path / "edge"
    res = cli("export", files["dir"], "--out", out, "--int8", "--archive", data["archive"], "--calibration-images",
              16, "--measure", "accuracy", "--n-shot", 1, "--n-query", 2, "--n-episodes", 15, "--readouts",
              "protonet")
    assert res.exit_code == 0, res.output
    for name in ("backbone.safetensors", "backbone.json", "backbone.onnx", "backbone_int8.onnx", "edge.json"):
        assert (out / name).is_file(), name
    rep = json.loads((out / "edge.json").read_text())
    assert rep["parity"]["ok"] and "cifar_fs/test" in rep["parity"]["images"]
    assert rep["int8"]["calibration"]["split"] == "train" and rep["int8"]["calibration"]["n_images"] == 16
    accs = {r["engine"]: r for r in rep["accuracy"]["records"]}
    assert set(accs) == {"pytorch_fp32", "ort_fp32", "ort_int8"} and accs["ort_int8"]["n_episodes"] == 15
    assert accs["ort_fp32"]["diff_vs_pytorch"] == pytest.approx(0.0, abs=1.0)
    assert "diff_ci95" in accs["ort_int8"] and "ONNX Runtime int8" in res.output
    with np.load(out / "edge_accuracy.npz") as z:
        assert z["ort_int8/5w1s2q/protonet"].shape == (15,)


def test_export_int8_without_data_names_the_fix(files, tmp_path):
    res = cli("export", files["dir"], "--out", tmp_path / "x", "--int8")
    assert res.exit_code == 2 and "--archive" in res.output and "training images" in res.output
    res = cli("export", files["dir"], "--out", tmp_path / "y", "--measure", "speed")
    assert res.exit_code == 2 and "latency, accuracy" in res.output


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_fsl_bench_edge_end_to_end(tmp_path, store, data, monkeypatch):
    """A tiny benchmark trained with `fsl-bench run`; `fsl-bench edge` publishes md/csv/figure and a child run on
    a quiet machine (the guard's readings made quiet here: this test's machine may be busy), and stops with exit
    code 2 naming --allow-load under a real artificial load."""
    from fsl_lsskd.edge import guard, latency
    from fsl_lsskd.record import open_store

    bench = tmp_path / "tiny.yaml"
    bench.write_text(textwrap.dedent(f"""
        name: tiny
        description: "edge test grid."
        datasets: [cifar_fs]
        data: {{cifar_fs: {{archive: {data['archive']}}}}}
        backbones: [conv4]
        methods: [ce]
        seeds: [0]
        image_size: 32
        train: {{epochs: 1, batch_size: 64, validation: null, heldout: 0.0}}
        eval: {{split: test, n_shot: [1], n_query: 2, n_episodes: 12, readouts: [protonet]}}
    """))
    res = cli("run", bench, "--out", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    opts = ["--threads", "1", "--batch-sizes", "1,2", "--runs", 10, "--warmup", 1, "--max-seconds", 1,
            "--calibration-images", 16, "--readouts", "protonet"]
    # 1) under an artificial load, without --allow-load: exit 2, nothing published
    procs = _busy_loops(min(os.cpu_count() or 1, 32))
    try:
        time.sleep(0.5)
        res = cli("edge", bench, "--out", tmp_path / "busy", *opts)
    finally:
        _stop(procs)
    assert res.exit_code == 2 and "--allow-load" in res.output and "busy" in res.output, res.output
    assert not (tmp_path / "busy").exists() or not any((tmp_path / "busy").iterdir())
    # 2) quiet: published without --allow-load
    quiet = guard.LoadReading(0.01, 1.0, 1.02, 0.1, os.cpu_count() or 1, 0.1).decide()
    monkeypatch.setattr(guard, "read_load", lambda **kw: quiet)
    monkeypatch.setattr(latency, "read_load", lambda **kw: quiet)
    monkeypatch.setattr(latency, "others_share", lambda *a, **k: 0.0)
    res = cli("edge", bench, "--out", tmp_path / "results", *opts)
    assert res.exit_code == 0, res.output
    out = tmp_path / "results"
    md = (out / "tiny_edge.md").read_text()
    assert "## Model files" in md and "## Latency at batch 1, 1 thread (ms)" in md and "Load guard: quiet" in md
    assert "| ce | conv4 | cifar_fs | ONNX Runtime int8 |" in md
    assert "| ce | conv4 | cifar_fs | 5w1s2q | protonet |" in md
    rows = (out / "tiny_edge.csv").read_text().splitlines()
    header = rows[0].split(",")
    kinds = [r.split(",")[header.index("kind")] for r in rows[1:]]
    assert kinds.count("latency") == 3 * 2 and kinds.count("accuracy") == 3  # engines x batch sizes; engines
    assert all(r.split(",")[header.index("cpu_model")] for r in rows[1:])
    assert (out / "tiny_edge_accuracy_latency.png").stat().st_size > 0
    assert (out / "tiny_edge_accuracy_latency.pdf").stat().st_size > 0
    st = open_store(create=False)
    (training,) = st.trainings().values()
    (edge_run,) = st.edge_runs([training.train_id])[training.train_id]
    assert edge_run.data.tags["mlflow.parentRunId"] == training.run_id
    assert edge_run.data.tags["fsl.status"] == "complete" and edge_run.data.tags["fsl.under_load"] == "false"
    assert edge_run.data.metrics["latency_ort_int8_b1_t1_p50_ms"] > 0
    names = {a.path for a in st.client.list_artifacts(edge_run.info.run_id)}
    assert {"backbone.onnx", "backbone_int8.onnx", "edge.json", "edge_accuracy.npz"} <= names
    # the store's scores and tables are untouched by the edge run
    assert len(st.scores()) == 1 and cli("table", bench, "--out", tmp_path / "tables").exit_code == 0


def test_edge_tables_aggregate_seeds_with_their_spread(tmp_path):
    """Two seeds of one method: latency is the median of the seeds' percentiles with their range, the int8
    difference is paired per episode with a seed-aware interval and its per-seed range; the CSV keeps each seed."""
    from fsl_lsskd.report.edge_tables import EdgeCell, interval, render_csv, render_markdown, write_figure

    machine = {"cpu_model": "Test CPU", "cores": 2, "torch": "x", "onnxruntime": "y"}
    rng = np.random.default_rng(0)
    cells = []
    for seed, (p50, drop) in enumerate(((0.20, 0.0), (0.30, -2.0))):
        ref = rng.choice([60.0, 80.0, 100.0], size=40)
        i8 = ref + np.where(np.arange(40) < 20, drop, 0.0)
        lat = [{"engine": e, "label": e, "batch": 1, "threads": 1, "p50_ms": p50 * k, "p90_ms": p50 * k * 1.2,
                "p99_ms": float("nan"), "n_runs": 50, "load_ms": 5.0, "rss_delta_mb": 3.0, "under_load": False,
                "machine": machine} for e, k in (("pytorch_fp32", 3), ("ort_fp32", 1), ("ort_int8", 0.6))]
        acc = [{"engine": e, "precision": "fp32", "protocol": "5w1s15q", "readout_label": "protonet",
                "accuracy": float(a.mean()), "accuracy_ci95": 1.0, "n_episodes": 40, "episodes": "generated"}
               for e, a in (("pytorch_fp32", ref), ("ort_fp32", ref), ("ort_int8", i8))]
        report = {"model": {"params": 1000, "flops": 2e6}, "machine": machine,
                  "files": {"pytorch": {"bytes": 4096}, "onnx_fp32": {"bytes": 4096}, "onnx_int8": {"bytes": 1024}},
                  "parity": {"max_abs_diff": 1e-6, "max_rel_diff": 1e-7, "ok": True},
                  "int8": {"calibration": {"n_images": 64, "split": "train"}},
                  "latency": {"records": lat}, "accuracy": {"records": acc}, "under_load": False}
        arrays = {"pytorch_fp32/5w1s15q/protonet": ref, "ort_fp32/5w1s15q/protonet": ref,
                  "ort_int8/5w1s15q/protonet": i8}
        cells.append(EdgeCell("lsskd", "lsskd", "conv4", "tiny_imagenet", seed, f"t{seed}", report, arrays))
    md = render_markdown(cells, "t", "caption")
    assert "| lsskd | conv4 | tiny_imagenet | ort_int8 | 0.150 (0.120–0.180) |" in md  # median and range
    assert "| n/a |" in md  # p99 of 50 runs is not published
    row = [line for line in md.splitlines() if line.startswith("| lsskd | conv4 | tiny_imagenet | 5w1s15q |")][0]
    diffs = np.stack([c.arrays["ort_int8/5w1s15q/protonet"] - c.arrays["pytorch_fp32/5w1s15q/protonet"]
                      for c in cells])
    m, lo, hi = interval(diffs)
    assert m == pytest.approx(-0.5) and lo < m < hi
    assert f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]" in row and "-1.00 … +0.00" in row
    lines = render_csv(cells).splitlines()
    assert len(lines) == 1 + 2 * (3 + 3) and all("Test CPU" in line for line in lines[1:])
    assert len(write_figure(cells, tmp_path / "x_edge")) == 2
