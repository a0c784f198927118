"""Training engine: data path, resume exactness, divergence, limited data, MLflow, export, config mismatch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fsl_lsskd.data.base import SplitData
from fsl_lsskd.errors import ConfigError, TrainingDiverged
from fsl_lsskd.train import TrainConfig, TrainLoader, train
from fsl_lsskd.train.checkpoint import create_backbone, load_backbone, load_method
from fsl_lsskd.train.engine import limited_fraction, milestones, prepare_data


def _backbone() -> str:
    try:
        create_backbone("conv4", num_classes=0, image_size=16)
        return "conv4"
    except Exception:  # backbone registry not there yet
        return "test_resnet"


BACKBONE = _backbone()


def _split(n_classes=4, per_class=10, size=16, split="train", seed=0) -> SplitData:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    # class-dependent mean colour so the task is learnable
    base = (labels[:, None, None, None] * 60 + 20).astype(np.int64)
    imgs = np.clip(base + rng.integers(-20, 20, (len(labels), size, size, 3)), 0, 255).astype(np.uint8)
    return SplitData(imgs, labels, tuple(f"c{i}" for i in range(n_classes)), "synthetic", split, f"syn{seed}")


def _cfg(tmp_path, name="run", **kw) -> TrainConfig:
    base = dict(method="ce", backbone=BACKBONE, dataset="synthetic", image_size=16, epochs=3, batch_size=8,
                out_dir=str(tmp_path / name), val_episodes=0, mlflow=False, export=False, heldout=0.1)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------- loader
def test_loader_crop_flip_normalise_and_seeding():
    x = torch.randint(0, 256, (6, 5, 5, 3), dtype=torch.uint8)
    loader = TrainLoader(x.numpy(), np.arange(6), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), batch_size=3, padding=2,
                         flip=False, seed=1)
    u8 = loader.images[:6]
    g = torch.Generator().manual_seed(0)
    out = loader.augment(u8, generator=g)
    assert out.shape == (6, 3, 5, 5) and out.is_contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    off = torch.randint(0, 5, (2, 6), generator=g)
    padded = torch.nn.functional.pad(u8.float(), (2, 2, 2, 2))
    for i in range(6):  # each output is the padded image's window at its offset, normalised
        win = padded[i, :, off[0, i]:off[0, i] + 5, off[1, i]:off[1, i] + 5]
        torch.testing.assert_close(out[i], (win / 255 - 0.5) / 0.25)
    flipper = TrainLoader(x.numpy(), np.arange(6), (0.5,) * 3, (0.25,) * 3, padding=0, flip=True)
    f = flipper.augment(flipper.images, generator=torch.Generator().manual_seed(3))
    plain = flipper.normalize(flipper.images)
    for i in range(6):
        assert torch.equal(f[i], plain[i]) or torch.equal(f[i], plain[i].flip(2))
    # an epoch is a pure function of (seed, epoch): same batches twice, different epochs differ
    a = [b.index.tolist() for b in loader.epoch_batches(2)]
    b = [b.index.tolist() for b in loader.epoch_batches(2)]
    c = [b.index.tolist() for b in loader.epoch_batches(3)]
    assert a == b and a != c and sorted(sum(a, [])) == list(range(6))


def test_milestones_fractions():
    from fsl_lsskd.methods.ce import CEConfig

    assert milestones(CEConfig()) == [60, 80]
    assert milestones(CEConfig(epochs=5)) == [3, 4]


# ------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("method", ["ce", "pskd"])
def test_kill_and_resume_gives_identical_weights(tmp_path, method):
    data = _split()
    straight = train(_cfg(tmp_path, "a", method=method), train_data=data)
    calls = []
    progress = lambda done, total, metrics: calls.append((done, total, "train_loss" in metrics))  # noqa: E731
    part = train(_cfg(tmp_path, "b", method=method), train_data=data, stop_after_epoch=2,  # "killed" after 2
                 on_epoch=progress)
    assert len(part.history) == 2
    resumed = train(_cfg(tmp_path, "b", method=method), train_data=data, on_epoch=progress)
    assert resumed.resumed_from_epoch == 2
    # progress: a start call with the epochs done (none, then the resumed 2), then one call per epoch
    assert calls == [(0, 3, False), (1, 3, True), (2, 3, True), (2, 3, True), (3, 3, True)]
    sa = torch.load(straight.checkpoint, weights_only=False)
    sb = torch.load(resumed.checkpoint, weights_only=False)
    assert sa["epoch"] == sb["epoch"] == 3
    assert sa["model"].keys() == sb["model"].keys()
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert sa["scheduler"] == sb["scheduler"]
    if method == "pskd":
        assert bool(sb["model"]["store.seen"].all())


def test_resume_with_different_config_names_keys(tmp_path):
    data = _split()
    train(_cfg(tmp_path, "r", epochs=2), train_data=data, stop_after_epoch=1)
    with pytest.raises(ConfigError) as exc:
        train(_cfg(tmp_path, "r", epochs=2, seed=5, method_overrides={"lr": "0.1"}), train_data=data)
    msg = str(exc.value)
    assert "seed" in msg and "method.lr" in msg and "last.pt" in msg


def test_nan_loss_stops_with_epoch_and_step(tmp_path, monkeypatch):
    from fsl_lsskd.methods.ce import CE

    real = CE.training_step

    def poisoned(self, batch, epoch):
        out = real(self, batch, epoch)
        self._calls = getattr(self, "_calls", 0) + 1
        if epoch == 1 and self._calls == 5 + 2:  # 4 batches in epoch 0 (36 rows // 8); step 2 of epoch 1
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(CE, "training_step", poisoned)
    with pytest.raises(TrainingDiverged, match=r"epoch 1 step 2"):
        train(_cfg(tmp_path, "nan", batch_size=9), train_data=_split())


def test_limited_fraction_counts_are_stratified_and_seeded():
    labels = np.repeat(np.arange(5), 12)
    for frac, k in ((0.25, 3), (0.5, 6), (0.75, 9), (1.0, 12)):
        idx = limited_fraction(labels, frac, seed=0)
        assert np.bincount(labels[idx], minlength=5).tolist() == [k] * 5
    assert np.array_equal(limited_fraction(labels, 0.5, 0), limited_fraction(labels, 0.5, 0))
    assert not np.array_equal(limited_fraction(labels, 0.5, 0), limited_fraction(labels, 0.5, 1))
    # heldout rows are excluded before the fraction: 20 per class, 10 % held out -> 18, half -> 9
    data = _split(per_class=20)
    prep = prepare_data(_cfg(None or __import__("pathlib").Path("/tmp"), fraction=0.5), train_data=data)
    assert prep.train.class_counts().tolist() == [9] * 4
    assert prep.heldout.class_counts().tolist() == [2] * 4


# ------------------------------------------------------------------------------------------- mlflow + export
def test_mlflow_run_contents_and_export(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    data = _split(per_class=25)
    val = _split(n_classes=5, per_class=20, split="val", seed=1)
    cfg = _cfg(tmp_path, "ml", method="pskd", epochs=2, mlflow=True, export=True, val_episodes=10,
               experiment="t-exp", method_overrides={"alpha_T": "0.5"})
    res = train(cfg, train_data=data, val_data=val)
    import mlflow

    run = mlflow.get_run(res.run_id)
    p = run.data.params
    assert p["method"] == "pskd" and p["seed"] == "0" and p["method_config.alpha_T"] == "0.5"
    assert p["method_config.epochs"] == "2" and p["backbone"] == BACKBONE
    tags = run.data.tags
    for k in ("method", "backbone", "dataset", "seed", "git_commit"):
        assert k in tags
    client = mlflow.tracking.MlflowClient()
    for key in ("train_loss", "train_pskd_ce", "lr", "images_per_s", "heldout_base_acc", "val_fewshot_acc"):
        hist = client.get_metric_history(res.run_id, key)
        assert sorted(m.step for m in hist) == [0, 1], key
    arts = {a.path for a in client.list_artifacts(res.run_id)}
    assert {"config.json", "checkpoint", "export", "training_curves.png"} <= arts
    assert {a.path for a in client.list_artifacts(res.run_id, "export")} == {"export/backbone.safetensors",
                                                                            "export/backbone.json"}
    assert (tmp_path / "mlflow.db").exists()

    # export round trip: timm loads it; parameter count equals create_backbone(name, num_classes=0)'s
    import timm

    report = json.loads(res.backbone.with_suffix(".json").read_text())
    ref = create_backbone(BACKBONE, num_classes=0, image_size=16)
    n_ref = sum(p.numel() for p in ref.parameters())
    assert report["params"] == n_ref and report["flops"] > 0 and report["latency_ms_cpu_b1"] > 0
    net = timm.create_model(BACKBONE, pretrained=False, num_classes=0, checkpoint_path=str(res.backbone))
    assert sum(p.numel() for p in net.parameters()) == n_ref
    exported, meta = load_backbone(res.backbone)
    trained = load_method(res.checkpoint).export_backbone()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), trained(x))
        torch.testing.assert_close(net.eval()(x), trained(x))
    assert meta["method"] == "pskd"


def test_export_cli_and_train_help(tmp_path):
    from click.testing import CliRunner

    from fsl_lsskd.cli import main

    data = _split()
    res = train(_cfg(tmp_path, "e", epochs=1), train_data=data)
    r = CliRunner().invoke(main, ["export", str(res.checkpoint), "--out", str(tmp_path / "exp"),
                                  "--latency-runs", "3"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "exp" / "backbone.safetensors").is_file()
    assert json.loads((tmp_path / "exp" / "backbone.json").read_text())["name"] == BACKBONE
    r = CliRunner().invoke(main, ["train", "--help"])
    assert r.exit_code == 0 and "Example:" in r.output
    r = CliRunner().invoke(main, ["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_bench_train_smoke():
    from fsl_lsskd.train.bench import run_train_bench

    res = run_train_bench(_split(per_class=8), (0.5,) * 3, (0.25,) * 3, backbone=BACKBONE, image_size=16,
                          batch_size=8, steps=2, warmup=1, workers=(0,), methods=("no_such_method",))
    assert res["ours_images_per_s"] > 0 and res["reference_images_per_s"]["workers=0"] > 0
    assert res["speedup_vs_best_reference"] > 0 and res["methods"] == {}
    assert set(res["data_only_ms_per_batch"]) == {"ours", "reference workers=0"}
    assert res["data_only_speedup_vs_best_reference"] > 0


def test_tracking_nested_child_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    import mlflow

    from fsl_lsskd import tracking

    mlflow.set_experiment("grid")
    with mlflow.start_run(run_name="parent") as parent:
        with tracking.start_run("grid", run_name="child", tags={"method": "ce"}) as child:
            tracking.log_metrics({"a/b": 1.0}, step=0)
    got = mlflow.get_run(child.info.run_id)
    assert got.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert got.data.tags["method"] == "ce" and got.data.metrics["a_b"] == 1.0
    with tracking.start_run("grid", run_name="c2", parent_run_id=parent.info.run_id) as c2:
        pass
    assert mlflow.get_run(c2.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
