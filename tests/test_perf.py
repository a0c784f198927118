"""The performance tools (`fsl-bench perf train/eval/data`): their tables, ratios and options, and that the
settings they compare train the same losses. Nothing here asserts a time."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fsl_lsskd.backbones import create_backbone
from fsl_lsskd.cli import main
from fsl_lsskd.train import TrainLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import BACKBONE, _split  # noqa: E402


def test_perf_train_table_counts_flops_and_ratios():
    """Every (threads, backbone, method) cell is timed, FLOPs per image are the counted ones (LSSKD's 4 rotated
    copies and auxiliary classifiers cost more than CE's step), and the ratios are consistent (no timing asserted)."""
    from fsl_lsskd.train.perf import format_throughput, run_throughput, synthetic_split

    res = run_throughput(synthetic_split(64, 16, num_classes=4), (0.5,) * 3, (0.25,) * 3, backbones=(BACKBONE,),
                         methods=("ce", "lsskd"), image_size=16, batch_size=8, steps=1, warmup=0, repeats=2,
                         threads=(1, 2, 1))
    cells = {(r["threads"], r["method"]): r for r in res["cells"]}
    assert len(cells) == 4 and all(len(r["images_per_s_samples"]) == 2 for r in cells.values())
    t1 = cells[(1, "ce")]
    assert t1["flops_per_image"] > 0 and t1["flops_vs_ce"] == 1.0 and t1["time_vs_ce"] == 1.0
    ls = cells[(1, "lsskd")]
    assert ls["flops_vs_ce"] > 4  # 4 rotated copies through the backbone, plus the auxiliary classifiers
    assert ls["time_over_flop_ratio"] == pytest.approx(ls["time_vs_ce"] / ls["flops_vs_ce"])
    assert ls["peak_share"] == pytest.approx(ls["images_per_s"] * ls["flops_per_image"] / 1e9 / res["peak_gflops"])
    assert res["peak_gflops"] > 0 and len(res["peaks"]) == 2
    lines = format_throughput(res)
    assert lines[0].startswith("fp32 matmul peak") and sum(f" {BACKBONE} " in line for line in lines) == 4
    assert any(line.startswith("prediction stores: lsskd ") for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ce", "lsskd"])
def test_compiled_training_step_gives_the_eager_losses(method, tmp_path, monkeypatch):
    """`fsl-bench perf train --compile`: the compiled step (inductor fuses and reorders float operations) gives
    the eager step's losses from the same seed within float tolerance: 1e-5 relative for the first two steps,
    1e-3 after (slow: the compilation takes minutes on a CPU). Training does not compile (docs/performance.md)."""
    from fsl_lsskd.registry import METHODS
    from fsl_lsskd.train.engine import build_optimizer
    from fsl_lsskd.train.perf import compiled_training_step

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    data = _split(per_class=8)
    losses = {}
    for mode in ("eager", "compile"):
        torch.manual_seed(0)
        cls = METHODS.get(method)
        m = cls(create_backbone(BACKBONE, num_classes=4, image_size=16), 4, len(data), cls.config_cls())
        m = m.to(memory_format=torch.channels_last)
        opt = build_optimizer(m, m.config)
        step = compiled_training_step(m) if mode == "compile" else m.training_step
        loader = TrainLoader(data.images, data.labels, (0.5,) * 3, (0.25,) * 3, batch_size=8, seed=0)
        losses[mode] = []
        for batch in list(loader.epoch_batches(0))[:3]:
            out = step(batch, 0)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            m.on_step_end(batch, 0)
            losses[mode].append(float(out["loss"]))
    # the same weights give the same loss; later steps drift as float sums reassociated by the compiler are
    # amplified by large early updates (LSSKD's third step: 2e-4 relative here)
    np.testing.assert_allclose(losses["compile"][:2], losses["eager"][:2], rtol=1e-5)
    np.testing.assert_allclose(losses["compile"], losses["eager"], rtol=1e-3)


def test_perf_train_times_episodic_methods_on_their_own_tasks():
    """ProtoNet and MAML are timed on their tasks (iter_batches), not on the mini-batches of CE, which their
    training_step cannot take: every image of a task counts (FLOPs per image > 0, one cell each)."""
    from fsl_lsskd.train.perf import run_throughput, synthetic_split

    res = run_throughput(synthetic_split(100, 16, num_classes=5), (0.5,) * 3, (0.25,) * 3, backbones=(BACKBONE,),
                         methods=("ce", "protonet", "maml"), image_size=16, batch_size=8, steps=1, warmup=0,
                         repeats=1, threads=(1,))
    cells = {r["method"]: r for r in res["cells"]}
    assert set(cells) == {"ce", "protonet", "maml"}
    assert cells["maml"]["flops_vs_ce"] > cells["protonet"]["flops_vs_ce"] > 0  # adaptation steps cost more
    r = CliRunner().invoke(main, ["perf", "train", "--synthetic", "1000", "--methods", "ce,maml"])
    assert r.exit_code == 2 and "pass --synthetic 1280" in r.output, r.output


def test_perf_train_cli_on_synthetic_images(tmp_path):

    out = tmp_path / "perf.json"
    r = CliRunner().invoke(main, ["perf", "train", "--synthetic", "32", "--backbones", BACKBONE, "--methods", "ce",
                                  "--image-size", "16", "--batch-size", "8", "--steps", "1", "--warmup", "0",
                                  "--repeats", "1", "--threads", "1", "--json-out", str(out)])
    assert r.exit_code == 0, r.output
    assert "% peak" in r.output and json.loads(out.read_text())["cells"][0]["method"] == "ce"
    r = CliRunner().invoke(main, ["perf", "train", "--synthetic", "32", "--methods", "nope"])
    assert r.exit_code == 2 and "nope" in r.output


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory) -> Path:
    from fsl_lsskd.data.fake import write_fake_cifar100

    return write_fake_cifar100(tmp_path_factory.mktemp("cifar"), per_class_train=4, per_class_test=2, seed=3)


def test_perf_eval_reports_extraction_and_each_readout(fake_cifar, tmp_path):
    import torch

    out = tmp_path / "eval.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # --threads 1 below must not outlive the command (it made later tests train at 1)
    try:
        r = CliRunner().invoke(main, ["perf", "eval", "--dataset", "cifar_fs", "--archive", str(fake_cifar),
                                      "--backbone", BACKBONE, "--split", "test", "--n-shot", "1", "--n-query", "5",
                                      "--n-episodes", "4", "--no-baseline", "--threads", "1", "--out", str(out)])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    assert "feature extraction:" in r.output and "x extraction" in r.output
    rep = json.loads(out.read_text())["extraction_vs_readouts"]
    assert rep["extract"]["images"] > 0 and rep["extract"]["seconds"] > 0
    assert [(x["readout"], x["n_shot"], x["episodes"]) for x in rep["readouts"]] == [("protonet", 1, 4),
                                                                                     ("logreg_batched", 1, 4)]


def test_perf_eval_refuses_a_readout_that_is_not_frozen_feature(fake_cifar):
    r = CliRunner().invoke(main, ["perf", "eval", "--dataset", "cifar_fs", "--archive", str(fake_cifar),
                                  "--n-shot", "1", "--n-query", "5", "--n-episodes", "4", "--no-baseline",
                                  "--readouts", "finetune"])
    assert r.exit_code == 2 and "not a frozen-feature readout" in r.output, r.output
    r = CliRunner().invoke(main, ["perf", "eval", "--readouts", "nope"])
    assert r.exit_code == 2 and "nope" in r.output, r.output


def test_former_names_still_work_with_one_deprecation_line(fake_cifar, caplog):
    """`fsl-bench bench ...` and `--episodes` keep working for a release, each with one warning naming the new
    spelling; `bench` is hidden from `fsl-bench --help`."""
    import logging

    top = CliRunner().invoke(main, ["--help"]).output
    assert " perf " in top and " bench " not in top
    with caplog.at_level(logging.WARNING):
        r = CliRunner().invoke(main, ["bench", "eval", "--dataset", "cifar_fs", "--archive", str(fake_cifar),
                                      "--backbone", BACKBONE, "--n-shot", "1", "--n-query", "5", "--episodes", "3",
                                      "--no-baseline",
                                      "--readouts", "protonet"])
    assert r.exit_code == 0, r.output
    assert "protonet            1        3" in r.output  # --episodes 3 was taken as --n-episodes 3
    warned = [rec.getMessage() for rec in caplog.records if "deprecated" in rec.getMessage()]
    assert warned == ["`fsl-bench bench` is deprecated and will be removed: use `fsl-bench perf`",
                      "--episodes is deprecated and will be removed: use --n-episodes"]


@pytest.mark.parametrize("command, given, expected", [("train", None, "PASSIVE"), ("perf", None, "PASSIVE"),
                                                     ("train", "ACTIVE", "ACTIVE"), ("edge", None, None)])
def test_training_commands_make_waiting_openmp_threads_sleep_unless_told_otherwise(command, given, expected):
    """`OMP_WAIT_POLICY=PASSIVE` is set for training and scoring commands before any of them imports torch
    (OpenMP reads it once); a policy the user set is kept; `edge` (latency workers) is left as configured."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = (f"import os, sys; from fsl_lsskd.cli import main; main.main([{command!r}, '--help'], "
            "standalone_mode=False); print('POLICY', os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, text=True, capture_output=True, timeout=120).stdout
    assert f"POLICY {expected} False" in out, out


def test_perf_train_times_concurrent_trainings_as_separate_processes():
    """--processes 2: each (backbone, method) also runs as 2 worker processes at once, each with CPUs/2 threads,
    on the same split; their images are summed over the common wall time, and the row's ratios are taken against
    CE's row with the same processes (no timing asserted)."""
    from fsl_lsskd.train.perf import format_throughput, run_throughput, synthetic_split
    from fsl_lsskd.utils import process_threads

    res = run_throughput(synthetic_split(64, 16, num_classes=4), (0.5,) * 3, (0.25,) * 3, backbones=(BACKBONE,),
                         methods=("ce", "lsskd"), image_size=16, batch_size=8, steps=2, warmup=1, repeats=2,
                         processes=(1, 2))
    rows = {(r["processes"], r["method"]): r for r in res["cells"]}
    assert set(rows) == {(1, "ce"), (1, "lsskd"), (2, "ce"), (2, "lsskd")}
    two = rows[(2, "lsskd")]
    assert two["threads"] == process_threads(2) and len(two["images_per_s_samples"]) == 2
    assert all(v > 0 for v in two["images_per_s_samples"])
    assert two["flops_per_image"] == rows[(1, "lsskd")]["flops_per_image"]
    assert two["store_bytes_per_sample"] == rows[(1, "lsskd")]["store_bytes_per_sample"] > 0
    assert two["time_vs_ce"] == pytest.approx(rows[(2, "ce")]["images_per_s"] / two["images_per_s"])
    lines = format_throughput(res)
    assert lines[1].split()[:2] == ["procs", "threads"] and "procs > 1" in lines[-1]


def test_an_interrupted_concurrent_measurement_leaves_no_worker_and_no_files(tmp_path, monkeypatch):
    """Ctrl-C (or a failure) while the worker processes of --processes run: they are killed at once, and the
    split's temporary arrays are removed."""
    import tempfile

    from fsl_lsskd.train import perf

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    started = []

    def interrupted(self, n):
        started.extend(proc for proc, _err in self.procs)
        raise KeyboardInterrupt

    monkeypatch.setattr(perf._Concurrent, "steps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        perf.run_throughput(perf.synthetic_split(64, 16, num_classes=4), (0.5,) * 3, (0.25,) * 3,
                            backbones=(BACKBONE,), methods=("ce",), image_size=16, batch_size=8, steps=1, warmup=0,
                            repeats=1, processes=(2,))
    assert len(started) == 2 and all(proc.poll() is not None for proc in started)
    assert not list(tmp_path.glob("fsl-bench-perf-*"))


@pytest.mark.parametrize("args, message", [(["--processes", "0"], "--processes must be integers >= 1"),
                                           (["--processes", "x"], "--processes must be comma-separated integers"),
                                           (["--processes", "1,99999"], "--processes 99999: this process may use")])
def test_perf_train_refuses_bad_process_counts(args, message):
    res = CliRunner().invoke(main, ["perf", "train", "--synthetic", "64", *args])
    assert res.exit_code == 2 and message in res.output, res.output


_MMAPPED_BYTES = """
import ctypes, os, sys
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                             "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
from fsl_lsskd.cli import main
main.main([sys.argv[1], "--help"], standalone_mode=False)
from fsl_lsskd.utils import malloc_setting
before = libc.mallinfo2().hblkhd
block = libc.malloc(64 << 20)  # a 64 MiB buffer, like one LSSKD activation map of a batch
print("MMAPPED", libc.mallinfo2().hblkhd - before, "SETTING", malloc_setting(), "torch" in sys.modules)
"""


def _glibc_with_mallinfo2() -> bool:
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
@pytest.mark.parametrize("command, env, retained", [
    ("train", {}, True), ("perf", {}, True), ("evaluate", {}, True), ("table", {}, False), ("edge", {}, False),
    ("train", {"FSL_BENCH_MALLOC": "system"}, False), ("train", {"MALLOC_MMAP_THRESHOLD_": "131072"}, False),
    ("train", {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}, False)])
def test_training_commands_keep_freed_memory_for_the_next_step(command, env, retained):
    """Training and scoring commands make glibc's malloc serve large buffers from its heap and keep them when
    freed (no mmap/munmap and page faults per step, utils.retain_freed_memory), before torch is imported; a
    64 MiB block then takes no mmap. FSL_BENCH_MALLOC=system or glibc's own MALLOC_* / GLIBC_TUNABLES settings
    leave malloc as configured, and other commands do not touch it."""
    import os
    import subprocess

    full = {k: v for k, v in os.environ.items()
            if k not in ("FSL_BENCH_MALLOC", "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}
    full.update(env, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.run([sys.executable, "-c", _MMAPPED_BYTES, command], env=full, text=True, capture_output=True,
                          timeout=120)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MMAPPED"))
    _, mmapped, _, rest = line.split(" ", 3)
    setting, torch_imported = rest.rsplit(" ", 1)
    assert torch_imported == "False", line  # set before torch is imported (and --help imports none)
    if retained:
        assert int(mmapped) == 0 and setting == "retained", line
    else:
        assert int(mmapped) >= 64 << 20 and setting.startswith("system"), line


@pytest.mark.parametrize("method", ["lsskd", "hsakd_teacher"])
def test_rotated_batch_keeps_the_channels_last_layout_and_the_losses(method, monkeypatch):
    """The 4B rotated rows of LSSKD/HSAKD are channels_last like CE's batch (rotate_expand); a few optimiser steps
    give the losses of the former contiguous-NCHW expansion from the same seed, within float tolerance."""
    import fsl_lsskd.methods.auxiliary as aux
    from fsl_lsskd.registry import METHODS
    from fsl_lsskd.train.engine import build_optimizer

    data = _split(per_class=8)
    loader = TrainLoader(data.images, data.labels, (0.5,) * 3, (0.25,) * 3, batch_size=8, seed=0)
    batches = list(loader.epoch_batches(0))[:3]
    x, _ = aux.rotate_expand(batches[0].images, batches[0].labels)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    new = aux.rotate_expand

    def former(images, labels):  # the expansion before: a contiguous NCHW batch
        x, y = new(images, labels)
        return x.contiguous(), y

    losses = {}
    for name, fn in (("former", former), ("channels_last", new)):
        monkeypatch.setattr(sys.modules[METHODS.get(method).__module__], "rotate_expand", fn)
        torch.manual_seed(0)
        cls = METHODS.get(method)
        m = cls(create_backbone(BACKBONE, num_classes=4, image_size=16), 4, len(data), cls.config_cls())
        m = m.to(memory_format=torch.channels_last)
        opt = build_optimizer(m, m.config)
        losses[name] = []
        for batch in batches:
            out = m.training_step(batch, 0)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            m.on_step_end(batch, 0)
            losses[name].append(float(out["loss"]))
    np.testing.assert_allclose(losses["channels_last"], losses["former"], rtol=1e-5)
