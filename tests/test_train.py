"""Training engine: data path, resume exactness, divergence, limited data, precision, MLflow record, export."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fsl_lsskd.backbones import create_backbone
from fsl_lsskd.checkpoint import load_backbone, load_method, read_training_state
from fsl_lsskd.data.base import SplitData
from fsl_lsskd.data.limited import stratified_fraction
from fsl_lsskd.errors import ConfigError, TrainingDiverged
from fsl_lsskd.protocol import EpisodeProtocol
from fsl_lsskd.train import TrainConfig, TrainLoader, train
from fsl_lsskd.train.engine import milestones, prepare_data

BACKBONE = "conv4"


def _split(n_classes=4, per_class=10, size=16, split="train", seed=0) -> SplitData:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    # class-dependent mean colour so the task is learnable
    base = (labels[:, None, None, None] * 60 + 20).astype(np.int64)
    imgs = np.clip(base + rng.integers(-20, 20, (len(labels), size, size, 3)), 0, 255).astype(np.uint8)
    return SplitData(imgs, labels, tuple(f"c{i}" for i in range(n_classes)), "synthetic", split, f"syn{seed}")


def _cfg(tmp_path, name="run", **kw) -> TrainConfig:
    base = dict(method="ce", backbone=BACKBONE, dataset="synthetic", image_size=16, epochs=3, batch_size=8,
                out_dir=str(tmp_path / name), validation=None, mlflow=False, export=False, heldout=0.1)
    base.update(kw)
    return TrainConfig(**base)


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


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
    assert len(part.history) == 2 and not part.finished and (tmp_path / "b" / "last.pt").is_file()
    if method == "pskd":  # every sample is trained on and stored every epoch (the short last batch is kept)
        state = read_training_state(tmp_path / "b" / "last.pt")
        assert bool(state["model"]["store.seen"].all())
    resumed = train(_cfg(tmp_path, "b", method=method), train_data=data, on_epoch=progress)
    assert resumed.resumed_from_epoch == 2 and resumed.train_id == straight.train_id
    # progress: a start call with the epochs done (none, then the resumed 2), then one call per epoch
    assert calls == [(0, 3, False), (1, 3, True), (2, 3, True), (2, 3, True), (3, 3, True)]
    wa, wb = _weights(straight.model_dir), _weights(resumed.model_dir)
    assert wa.keys() == wb.keys() and not any(k.startswith("store.") for k in wa)  # stores are training state
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # a finished run keeps weights and export only: the resume state is gone
    assert not (tmp_path / "b" / "last.pt").exists()
    again = train(_cfg(tmp_path, "b", method=method), train_data=data)
    assert again.already_finished and again.train_id == straight.train_id


def test_resume_with_different_config_names_keys(tmp_path):
    data = _split()
    train(_cfg(tmp_path, "r", epochs=2), train_data=data, stop_after_epoch=1)
    with pytest.raises(ConfigError) as exc:
        train(_cfg(tmp_path, "r", epochs=2, seed=5, method_overrides={"lr": "0.1"}), train_data=data)
    msg = str(exc.value)
    assert "seed" in msg and "method_config.lr" in msg and "last.pt" in msg


def test_training_identity_holds_what_determines_the_weights(tmp_path):
    from fsl_lsskd.train.config import train_id, training_identity

    base = _cfg(tmp_path)
    tid = train_id(training_identity(base, "fp"))
    same = [dict(device="cpu:0"), dict(out_dir="elsewhere"), dict(archive="/x/y.zip"), dict(num_threads=1),
            dict(validation=EpisodeProtocol(5, 1, 15, 10)), dict(mlflow=True), dict(run_name="r")]
    for change in same:
        assert train_id(training_identity(_cfg(tmp_path, **change), "fp")) == tid, change
    differ = [dict(seed=1), dict(epochs=4), dict(batch_size=4), dict(image_size=24), dict(fraction=0.5),
              dict(heldout=0.2), dict(method="pskd"), dict(precision="bf16"), dict(method_overrides={"lr": 0.1}),
              dict(backbone="resnet12_narrow")]
    ids = {train_id(training_identity(_cfg(tmp_path, **change), "fp")) for change in differ}
    assert len(ids | {tid}) == len(differ) + 1
    assert train_id(training_identity(base, "other data")) != tid


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
    with pytest.raises(TrainingDiverged, match=r"epoch 2 step 2"):
        train(_cfg(tmp_path, "nan", batch_size=9), train_data=_split())


def test_limited_fraction_is_hsakds_stratified_shuffle_split():
    """HSAKD: StratifiedShuffleSplit(test_size=1-r, random_state=0): 10 classes x 10 images at r=0.25 keep 25
    images (2 or 3 per class), not 20; the subset does not depend on the training seed."""
    labels = np.repeat(np.arange(10), 10)
    idx = stratified_fraction(labels, 0.25)
    assert len(idx) == 25 and set(np.bincount(labels[idx], minlength=10)) <= {2, 3}
    from sklearn.model_selection import StratifiedShuffleSplit

    ref, _ = next(StratifiedShuffleSplit(n_splits=1, test_size=0.75, random_state=0).split(np.zeros(100), labels))
    assert np.array_equal(idx, np.sort(ref))
    assert np.array_equal(stratified_fraction(labels, 1.0), np.arange(100))
    # heldout rows are excluded before the fraction: 20 per class, 10 % held out -> 18, half -> 9
    data = _split(per_class=20)
    prep = prepare_data(_cfg(__import__("pathlib").Path("/tmp"), fraction=0.5), train_data=data)
    assert prep.train.class_counts().tolist() == [9] * 4
    assert prep.heldout.class_counts().tolist() == [2] * 4


def test_bf16_precision_trains_on_cpu(tmp_path):
    res = train(_cfg(tmp_path, "bf16", precision="bf16", epochs=2), train_data=_split())
    assert res.finished and np.isfinite(res.history[-1]["train_loss"])
    assert res.identity["precision"] == "bf16"
    fp32 = train(_cfg(tmp_path, "fp32", epochs=2), train_data=_split())
    assert fp32.train_id != res.train_id


# ------------------------------------------------------------------------------------------- mlflow + export
def test_mlflow_record_and_export(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    data = _split(per_class=25)
    val = _split(n_classes=5, per_class=20, split="val", seed=1)
    cfg = _cfg(tmp_path, "ml", method="pskd", epochs=2, mlflow=True, export=True,
               validation=EpisodeProtocol(5, 5, 15, 10), experiment="fsl-bench/t-exp",
               method_overrides={"alpha_T": "0.5"})
    res = train(cfg, train_data=data, val_data=val)
    from fsl_lsskd.record import open_store

    store = open_store(create=False)
    rec = store.training(res.train_id)
    assert rec is not None and rec.run_id == res.run_id and rec.identity == res.identity
    p = rec.params
    assert p["identity.method"] == "pskd" and p["identity.seed"] == "0"
    assert p["identity.method_config.alpha_T"] == "0.5" and p["identity.method_config.epochs"] == "2"
    for k in ("fsl.method", "fsl.backbone", "fsl.dataset", "fsl.seed", "fsl.git_commit", "fsl.train_id"):
        assert k in rec.tags
    for key in ("train_loss", "train_pskd_ce", "lr", "images_per_s", "heldout_base_acc", "val_fewshot_acc"):
        hist = store.client.get_metric_history(res.run_id, key)
        assert sorted(m.step for m in hist) == [1, 2], key  # epochs count from 1
    acc = [m.value for m in store.client.get_metric_history(res.run_id, "val_fewshot_acc")]
    assert all(1.0 < a <= 100.0 for a in acc)  # percent
    arts = {a.path for a in store.client.list_artifacts(res.run_id)}
    assert {"config.json", "model", "export", "training_curves.png"} <= arts and "checkpoint" not in arts
    assert {a.path for a in store.client.list_artifacts(res.run_id, "export")} == {"export/backbone.safetensors",
                                                                                  "export/backbone.json"}
    report = json.loads((res.export_dir / "backbone.json").read_text())
    ref = create_backbone(BACKBONE, num_classes=0, image_size=16)
    assert report["params"] == sum(p.numel() for p in ref.parameters()) and report["flops"] > 0
    assert report["train_id"] == res.train_id and report["mean"] == [0.5, 0.5, 0.5]
    exported, meta = load_backbone(res.export_dir)
    trained = load_method(res.model_dir).export_backbone()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), trained(x))
    assert meta["method"] == "pskd"


def test_export_load_with_runs_verbatim_in_a_fresh_interpreter(tmp_path):
    """The export's ``load_with`` snippet, run from the export directory in a fresh interpreter, yields the model
    (nothing imported beforehand: the few-shot backbones register when fsl_lsskd.backbones is imported)."""
    res = train(_cfg(tmp_path, "e", epochs=1, export=True), train_data=_split())
    report = json.loads((res.export_dir / "backbone.json").read_text())
    code = report["load_with"] + "; import torch; print(model(torch.zeros(1, 3, 16, 16)).shape[-1])"
    out = subprocess.run([sys.executable, "-c", code], cwd=res.export_dir, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "64"


def test_export_cli_and_train_help(tmp_path):
    from click.testing import CliRunner

    from fsl_lsskd.cli import main

    res = train(_cfg(tmp_path, "e", epochs=1), train_data=_split())
    r = CliRunner().invoke(main, ["export", str(res.model_dir), "--out", str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "exp" / "backbone.safetensors").is_file()
    assert json.loads((tmp_path / "exp" / "backbone.json").read_text())["name"] == BACKBONE
    r = CliRunner().invoke(main, ["train", "--help"])
    assert r.exit_code == 0 and "Example:" in r.output
    r = CliRunner().invoke(main, ["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_perf_train_reference_smoke():
    from fsl_lsskd.train.perf import run_train_bench

    res = run_train_bench(_split(per_class=8), (0.5,) * 3, (0.25,) * 3, backbone=BACKBONE, image_size=16,
                          batch_size=8, steps=2, warmup=1, workers=(0,), methods=("no_such_method",))
    assert res["ours_images_per_s"] > 0 and res["reference_images_per_s"]["workers=0"] > 0
    assert res["speedup_vs_best_reference"] > 0 and res["methods"] == {}
    assert set(res["data_only_ms_per_batch"]) == {"ours", "reference workers=0"}
    assert res["data_only_speedup_vs_best_reference"] > 0


def test_an_epoch_checkpointed_but_not_logged_is_logged_on_resume(tmp_path, monkeypatch):
    """An epoch's checkpoint is written before its metrics reach MLflow: a job preempted between the two resumes
    after an epoch its record lacks. The resumed run logs it, so every epoch is in the record once."""
    from fsl_lsskd.record import Store, open_store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    data = _split()
    real_log = Store.log_metrics
    calls = []

    def preempted_after_checkpoint(self, run_id, metrics, step):
        calls.append(step)
        if step == 2:
            raise KeyboardInterrupt  # SIGUSR2/SIGTERM between save_training_state and log_metrics of epoch 2
        return real_log(self, run_id, metrics, step)

    monkeypatch.setattr(Store, "log_metrics", preempted_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, "b", mlflow=True), train_data=data)
    monkeypatch.setattr(Store, "log_metrics", real_log)
    resumed = train(_cfg(tmp_path, "b", mlflow=True), train_data=data)
    assert resumed.resumed_from_epoch == 2 and resumed.finished
    steps = [step for step, _ in open_store(create=False).metric_history(resumed.run_id, "train_loss")]
    assert sorted(steps) == [1, 2, 3], steps
