"""Multi-process training through torchrun (DistributedDataParallel, gloo on CPU): 2 processes with the
global batch of 1 process give the same loss trajectory, weights and prediction stores; a failing rank
ends the whole run with its error instead of a hang.

The 2-process runs happen in subprocesses (``python -m torch.distributed.run --standalone``) that import
this module as their driver (:func:`driver_main`), so both sides build exactly the same data and configs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

from fsl_lsskd.data.base import SplitData
from fsl_lsskd.errors import UserError
from fsl_lsskd.train import TrainConfig, TrainLoader, train
from fsl_lsskd.train import engine

TESTS = Path(__file__).resolve().parent
NPROC = 2
# 36 training rows (4 classes x 9 after the 10 % held out), global batch 12 -> 3 steps an epoch, 6 rows a rank,
# every row visited every epoch (so every store row is written)
BATCH = 12
# SGD, not MAML's default Adam: conv biases before BatchNorm have a zero gradient up to float noise, and Adam
# scales that noise up to lr-sized steps, so 1 and 2 processes drift apart by ~lr there (the maths is the same)
MAML_SET = {"n_way": "2", "n_shot": "1", "n_query": "2", "meta_batch_size": "2", "episodes_per_epoch": "4",
            "inner_steps": "1", "optimizer": "sgd", "lr": "0.01"}
CASES: Dict[str, dict] = {  # all run by default but SLOW_CASES (lsskd, maml, kd: -m slow)
    "ce": dict(method="ce"),
    "pskd": dict(method="pskd"),
    # lr 0.01: at its default 0.05 LSSKD's loss (~12) rises on this toy set, and that unstable regime amplifies
    # the 1e-7 summation-order differences to ~3e-5 in the loss (1e-7 again at lr 0.001)
    "lsskd": dict(method="lsskd", method_overrides={"lr": "0.01"}),
    "pskd_resume": dict(method="pskd", _resume=True),  # stopped after epoch 1, resumed: same as "pskd"
    "ce_nosync": dict(method="ce", sync_bn=False),  # per-rank BatchNorm: must NOT match 1 process
    "maml": dict(method="maml", method_overrides=MAML_SET),
    "protonet": dict(method="protonet", method_overrides={"n_way": "2", "n_shot": "1", "n_query": "2",
                                                           "episodes_per_epoch": "4"}),  # refused on 2 processes
    "ce_bs9": dict(method="ce", batch_size=9),  # refused: 9 does not split over 2 processes
    "kd": dict(method="kd"),  # a frozen teacher on every rank (teacher: see slow_root)
}
# 1-process vs 2-process: the same maths in another float summation order (DDP averages two half-batch
# gradients, SyncBatchNorm adds two partial sums): measured loss differences 5e-8 (ce) to 7e-7 (kd) relative,
# weights within 1e-5; per-rank BatchNorm (sync_bn off) moves the loss by ~1e-1. The tolerances sit between.
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4


def split(n_classes: int = 4, per_class: int = 10, size: int = 16, seed: int = 0) -> SplitData:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    base = (labels[:, None, None, None] * 60 + 20).astype(np.int64)
    imgs = np.clip(base + rng.integers(-20, 20, (len(labels), size, size, 3)), 0, 255).astype(np.uint8)
    return SplitData(imgs, labels, tuple(f"c{i}" for i in range(n_classes)), "synthetic", "train", f"syn{seed}")


def case_cfg(name: str, root: Path, **kw) -> TrainConfig:
    base = dict(backbone="conv4", dataset="synthetic", image_size=16, epochs=2, batch_size=BATCH,
                out_dir=str(Path(root) / name), validation=None, mlflow=False, export=False, heldout=0.1)
    base.update({k: v for k, v in CASES[name].items() if not k.startswith("_")})
    if base["method"] == "kd":  # the teacher: a CE run beside the run roots (slow_root)
        base["teacher"] = str(Path(root).parent / "teacher" / "model")
    base.update(kw)
    return TrainConfig(**base)


def run_case(name: str, root: Path, **kw) -> dict:
    """Train case ``name``; the history, this rank's final method state (weights + stores), or the error."""
    captured = {}
    real = engine._run_epoch

    def spy(cfg, method, *a, **k):
        captured["method"] = method
        return real(cfg, method, *a, **k)

    engine._run_epoch = spy
    try:
        if CASES[name].get("_resume"):  # "killed" after epoch 1; the next call resumes from last.pt
            train(case_cfg(name, root, **kw), train_data=split(), stop_after_epoch=1)
        res = train(case_cfg(name, root, **kw), train_data=split())
    except UserError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        engine._run_epoch = real
    state = {k: v.detach().cpu().clone() for k, v in captured["method"].state_dict().items()}
    return {"history": res.history, "state": state, "rank": res.rank, "world_size": res.world_size,
            "model_exists": (Path(res.model_dir) / "model.safetensors").is_file(),
            "resumed_from_epoch": res.resumed_from_epoch}


SLOW_CASES = ("lsskd", "maml", "kd")


def sync_bn_errors() -> Dict[str, float]:
    """Under torchrun: the CPU SyncBatchNorm layers on this rank's half of a batch vs plain BatchNorm on the
    whole batch (output, input gradient, summed parameter gradients, running statistics); max abs errors."""
    import torch.distributed as dist
    from timm.layers import BatchNormAct2d

    from fsl_lsskd.train.distributed import convert_sync_batchnorm, process_group

    errs: Dict[str, float] = {}
    with process_group("cpu") as ctx:
        for name, make in (("bn2d", lambda: torch.nn.BatchNorm2d(6)),
                           ("bn2d_cumulative", lambda: torch.nn.BatchNorm2d(6, momentum=None)),
                           ("bn_act_silu", lambda: BatchNormAct2d(6, act_layer=torch.nn.SiLU))):
            g = torch.Generator().manual_seed(5)
            x = torch.randn(8, 6, 5, 5, generator=g) * 3 + 1
            w = torch.randn(8, 6, 5, 5, generator=g)
            ref, bn = make(), make()
            with torch.no_grad():
                for m in (ref, bn):
                    m.weight.copy_(torch.linspace(0.5, 1.5, 6))
                    m.bias.copy_(torch.linspace(-1, 1, 6))
            convert_sync_batchnorm(bn, torch.device("cpu"))
            sl = slice(ctx.rank * 4, (ctx.rank + 1) * 4)
            xr, xs = x.clone().requires_grad_(True), x[sl].clone().requires_grad_(True)
            for _ in range(2):  # twice: the running statistics' update rule too
                yr, ys = ref(xr), bn(xs)
            (yr * w).sum().backward()
            (ys * w[sl]).sum().backward()
            gw, gb = bn.weight.grad.clone(), bn.bias.grad.clone()
            dist.all_reduce(gw)
            dist.all_reduce(gb)
            errs[name] = max(float((ys - yr[sl]).abs().max()), float((xs.grad - xr.grad[sl]).abs().max()),
                             float((gw - ref.weight.grad).abs().max()), float((gb - ref.bias.grad).abs().max()),
                             float((bn.running_mean - ref.running_mean).abs().max()),
                             float((bn.running_var - ref.running_var).abs().max()))
            assert type(bn).__name__.startswith("CPUSync")
    return errs


def driver_main(argv: List[str]) -> None:
    """Entry of the torchrun subprocesses: ``cases ROOT NAME...`` or ``fail ROOT``."""
    mode, root = argv[0], Path(argv[1])
    rank = int(os.environ["RANK"])
    if mode == "cases":
        torch.save(sync_bn_errors(), root / f"syncbn.rank{rank}.pt")
        for name in argv[2:]:
            torch.save(run_case(name, root), root / f"{name}.rank{rank}.pt")
        return
    from fsl_lsskd.errors import TrainingDiverged
    from fsl_lsskd.methods.ce import CE

    real, fault = CE.training_step, ["nan"]

    def poisoned(self, batch, epoch):
        out = real(self, batch, epoch)
        self._calls = getattr(self, "_calls", 0) + 1
        if rank == 1 and self._calls == 3 + 2:  # epoch 1, step 1 (3 steps an epoch), on rank 1 only
            if fault[0] == "crash":
                raise RuntimeError("injected failure on rank 1")
            out["loss"] = out["loss"] * float("nan")
        return out

    CE.training_step = poisoned
    # 1) a NaN loss on rank 1 only: EVERY rank must raise TrainingDiverged at the same step
    try:
        train(case_cfg("ce", root / "nan", epochs=3), train_data=split())
    except TrainingDiverged as exc:
        print(f"rank {rank} stopped: TrainingDiverged: {exc}", flush=True)
    # 2) rank 1 crashes alone (uncaught): its process exits, torchrun ends rank 0 and exits non-zero
    fault[0] = "crash"
    train(case_cfg("ce", root / "crash", epochs=3), train_data=split())
    print(f"rank {rank} finished a run that should have failed", flush=True)


DRIVER = f"""import sys
sys.path.insert(0, {str(TESTS)!r})
import test_distributed
test_distributed.driver_main(sys.argv[1:])
"""


def torchrun(args: List[str], cwd: Path, timeout: float = 240.0, env=None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 ARGS`` in its own session; on timeout
    the whole session (launcher + workers) is killed and the test fails (a hang)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}"] + args
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s (hang?):\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


# ------------------------------------------------------------------------------------------- fixtures
def _launch_cases(root: Path, names) -> Dict[str, List[dict]]:
    """``names`` trained by ONE torchrun launch of 2 processes (amortises the ~10 s start): name -> [rank0, rank1]."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "driver.py").write_text(DRIVER)
    env = dict(os.environ, FSL_BENCH_CACHE=str(root / "cache"), OMP_NUM_THREADS="1")
    res = torchrun([str(root / "driver.py"), "cases", str(root)] + list(names), cwd=root, env=env)
    assert res.returncode == 0, res.stdout[-6000:]
    return {n: [torch.load(root / f"{n}.rank{r}.pt", weights_only=False) for r in range(NPROC)]
            for n in list(names) + ["syncbn"]}


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory) -> Dict[str, List[dict]]:
    return _launch_cases(tmp_path_factory.mktemp("ddp"), [n for n in CASES if n not in SLOW_CASES])


@pytest.fixture(scope="module")
def slow_root(tmp_path_factory) -> Path:
    """Holds ``teacher/model`` (1 process, CE) for the kd runs under ``one/`` and ``two/``."""
    root = tmp_path_factory.mktemp("ddp_slow")
    train(case_cfg("ce", root, out_dir=str(root / "teacher")), train_data=split())
    return root


@pytest.fixture(scope="module")
def two_proc_slow(slow_root) -> Dict[str, List[dict]]:
    return _launch_cases(slow_root / "two", SLOW_CASES)


@pytest.fixture(scope="module")
def one_proc(tmp_path_factory) -> Dict[str, dict]:
    root = tmp_path_factory.mktemp("single")
    return {n: run_case(n, root) for n in ("ce", "pskd")}


@pytest.fixture(scope="module")
def one_proc_slow(slow_root) -> Dict[str, dict]:
    return {n: run_case(n, slow_root / "one") for n in SLOW_CASES}


def _max_rel(a: List[float], b: List[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def _losses(run: dict, key: str = "train_loss") -> List[float]:
    return [h[key] for h in run["history"]]


# ------------------------------------------------------------------------------------------- tests
def test_loader_slices_union_is_the_one_process_batch():
    data = split()
    x, y = data.images[:36], data.labels[:36]
    one = TrainLoader(x, y, (0.5,) * 3, (0.25,) * 3, batch_size=BATCH, seed=3)
    parts = [TrainLoader(x, y, (0.5,) * 3, (0.25,) * 3, batch_size=BATCH, seed=3, rank=r, world_size=3)
             for r in range(3)]
    for epoch in (0, 1):
        full = list(one.epoch_batches(epoch))
        shards = [list(p.epoch_batches(epoch)) for p in parts]
        assert len(full) == 3 and all(len(s) == 3 for s in shards)
        for i, b in enumerate(full):
            # same rows, same order, and the SAME augmentation (crop offsets + flips drawn for the global batch)
            assert torch.equal(torch.cat([s[i].index for s in shards]), b.index)
            assert torch.equal(torch.cat([s[i].images for s in shards]), b.images)
            assert torch.equal(torch.cat([s[i].labels for s in shards]), b.labels)


def test_batch_that_does_not_split_names_the_fix():
    from fsl_lsskd.errors import ConfigError

    data = split()
    with pytest.raises(ConfigError, match=r"--batch-size 8 or 10"):
        TrainLoader(data.images, data.labels, (0.5,) * 3, (0.25,) * 3, batch_size=9, world_size=2).check_shardable()
    with pytest.raises(ConfigError, match=r"training set has 40 images"):  # a single short batch of 40 rows
        TrainLoader(data.images, data.labels, (0.5,) * 3, (0.25,) * 3, batch_size=66, world_size=3).check_shardable()
    TrainLoader(data.images, data.labels, (0.5,) * 3, (0.25,) * 3, batch_size=66, world_size=2).check_shardable()


def _check_match(name: str, ranks: List[dict], single: dict) -> None:
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world_size"] == NPROC
    assert ranks[0]["model_exists"] and single["world_size"] == 1
    # every rank returns rank 0's history (global metrics, validation included)
    assert ranks[0]["history"] == ranks[1]["history"]
    loss2, loss1 = _losses(ranks[0]), _losses(single)
    assert len(loss2) == len(loss1) == 2
    assert loss1[0] != loss1[1]
    for key in ranks[0]["history"][0]:
        if key.startswith("train_"):  # every logged term is the global one (atol: MAML's losses reach ~1e-4)
            np.testing.assert_allclose(_losses(ranks[0], key), _losses(single, key), rtol=LOSS_RTOL, atol=1e-6,
                                       err_msg=key)
    n1 = [h["images_per_s"] * h["epoch_time_s"] for h in single["history"]]
    n2 = [h["images_per_s"] * h["epoch_time_s"] for h in ranks[0]["history"]]
    np.testing.assert_allclose(n2, n1, rtol=1e-6)  # images/s counts the global batch
    if "heldout_base_acc" in single["history"][0]:
        assert "heldout_base_acc" in ranks[1]["history"][0]  # rank 0 validated, rank 1 got its metrics
    s0, s1, s = ranks[0]["state"], ranks[1]["state"], single["state"]
    assert s0.keys() == s.keys()
    for k in s:
        if name == "maml" and ("running_" in k or "num_batches_tracked" in k):
            continue  # per-task BatchNorm: the running statistics are those of rank 0's tasks (documented)
        # DDP keeps the ranks' weights identical; stores are all-gathered: identical too
        assert torch.equal(s0[k], s1[k]), k
        if s[k].is_floating_point():
            # fp16 stores (LSSKD's auxiliary ones) round at ~5e-4: a last-bit flip is not a mismatch
            atol = 2e-3 if s[k].dtype == torch.float16 else WEIGHT_ATOL
            torch.testing.assert_close(s0[k].float(), s[k].float(), atol=atol, rtol=1e-3, msg=k)
        else:
            assert torch.equal(s0[k], s[k]), k


@pytest.mark.parametrize("name", ["ce", "pskd"])
def test_two_processes_match_one_process(two_proc, one_proc, name):
    _check_match(name, two_proc[name], one_proc[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_CASES)
def test_two_processes_match_one_process_slow(two_proc_slow, one_proc_slow, name):
    _check_match(name, two_proc_slow[name], one_proc_slow[name])


def _check_stores(ranks: List[dict], single: dict, stores: List[str]) -> None:
    s0, s1, s = ranks[0]["state"], ranks[1]["state"], single["state"]
    for st in stores:
        assert bool(s0[f"{st}.seen"].all()), f"{st}: a row no rank wrote"
        assert torch.equal(s0[f"{st}.values"], s1[f"{st}.values"]), st
        assert torch.equal(s0[f"{st}.seen"], s1[f"{st}.seen"]), st
        v0, v = s0[f"{st}.values"].float(), s[f"{st}.values"].float()
        if f"{st}.indices" in s0:  # a top-k store: the kept classes are the same; their mass <= 1
            assert torch.equal(s0[f"{st}.indices"], s1[f"{st}.indices"]), st
            assert float(v0.sum(-1).max()) <= 1.01 and float(v0.sum(-1).min()) > 0.1, st
        else:
            assert float(v0.sum(-1).min()) > 0.99  # rows are probability vectors, not left zero
        # fp16 auxiliary stores round at ~5e-4
        torch.testing.assert_close(v0, v, atol=2e-3 if s0[f"{st}.values"].dtype == torch.float16 else 1e-4,
                                   rtol=0, msg=st)


def test_gathered_pskd_store_is_full_and_identical(two_proc, one_proc):
    _check_stores(two_proc["pskd"], one_proc["pskd"], ["store"])


@pytest.mark.slow
def test_gathered_lsskd_stores_are_full_and_identical(two_proc_slow, one_proc_slow):
    _check_stores(two_proc_slow["lsskd"], one_proc_slow["lsskd"], ["final_store", "aux_stores.0", "aux_stores.3"])


def test_cpu_sync_batchnorm_equals_whole_batch_batchnorm(two_proc):
    """torch.nn.SyncBatchNorm refuses CPU tensors in torch 2.14; our replacement must give what one process
    computes on the whole batch: outputs, gradients and running statistics (plain, cumulative, timm BN+act)."""
    for r in range(NPROC):
        errs = two_proc["syncbn"][r]
        assert set(errs) == {"bn2d", "bn2d_cumulative", "bn_act_silu"}
        assert max(errs.values()) < 1e-5, errs


def test_resume_on_two_processes_replays_exactly(two_proc):
    """Every rank reads rank 0's checkpoint (weights, optimiser, stores) and continues as if never stopped."""
    straight, resumed = two_proc["pskd"], two_proc["pskd_resume"]
    for r in range(NPROC):
        assert resumed[r]["resumed_from_epoch"] == 1 and len(resumed[r]["history"]) == 2
        for key in ("train_loss", "train_pskd_ce", "train_alpha"):
            assert _losses(resumed[r], key) == _losses(straight[r], key), key
        for k, v in straight[r]["state"].items():
            assert torch.equal(resumed[r]["state"][k], v), k


def test_without_sync_bn_per_rank_statistics_differ(two_proc, one_proc):
    """The comparison above can fail: per-process BatchNorm (6-image slices) moves the losses far outside the
    tolerance, while the weights still agree across the 2 ranks (DDP)."""
    off = two_proc["ce_nosync"]
    assert _max_rel(_losses(off[0]), _losses(one_proc["ce"])) > 10 * LOSS_RTOL
    for k, v in off[0]["state"].items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, off[1]["state"][k]), k


def test_refusals_name_the_fix(two_proc):
    for r in two_proc["protonet"]:
        assert "ConfigError" in r["error"] and "one process" in r["error"], r["error"]
    for r in two_proc["ce_bs9"]:
        assert "ConfigError" in r["error"] and "--batch-size 8 or 10" in r["error"], r["error"]


def test_a_failing_rank_ends_the_run_with_its_error(tmp_path):
    """One launch, two runs: a NaN loss on rank 1 stops both ranks with TrainingDiverged; then an exception on
    rank 1 alone ends the whole launch with a non-zero exit and the message (the timeout catches a hang)."""
    (tmp_path / "driver.py").write_text(DRIVER)
    res = torchrun([str(tmp_path / "driver.py"), "fail", str(tmp_path)], cwd=tmp_path, timeout=150)
    out = res.stdout
    for r in range(NPROC):
        msg = f"rank {r} stopped: TrainingDiverged: ce: loss is nan at epoch 2 step 1 on rank 1 of 2"
        assert msg in out, out[-4000:]
    assert res.returncode != 0 and "injected failure on rank 1" in out, out[-4000:]
    assert "finished a run that should have failed" not in out


@pytest.mark.slow
def test_cli_under_torchrun(tmp_path, monkeypatch):
    """The user's command: ``torchrun ... -m fsl_lsskd.cli train`` on a fake CIFAR-FS archive, MLflow + export."""
    from fsl_lsskd.data.fake import write_fake_cifar100

    archive = write_fake_cifar100(tmp_path / "data", per_class_train=4, per_class_test=1, seed=0)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    env = dict(os.environ, FSL_BENCH_CACHE=str(tmp_path / "c"))
    res = torchrun(["-m", "fsl_lsskd.cli", "train", "--method", "pskd", "--backbone", "conv4", "--dataset",
                    "cifar_fs", "--archive", str(archive), "--image-size", "16", "--epochs", "1", "--batch-size",
                    "32", "--val-n-episodes", "0", "--out", str(tmp_path / "run"), "--experiment", "fsl-bench/ddp"],
                   cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stdout[-4000:]
    assert res.stdout.count("training id:") == 1  # one report, from rank 0
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "export" / "backbone.safetensors").is_file()
    meta = json.loads((tmp_path / "run" / "model" / "model.json").read_text())
    assert meta["world_size"] == 2
    import mlflow

    runs = mlflow.search_runs(experiment_names=["fsl-bench/ddp"], output_format="list")
    assert len(runs) == 1 and runs[0].data.params["world_size"] == "2"  # rank 0 alone talks to MLflow
    assert json.loads((tmp_path / "run" / "export" / "backbone.json").read_text())["name"] == "conv4"
