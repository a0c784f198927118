"""Episodic meta-learners: learn2learn task sampling (seeded, layout), ProtoNet loss, MAML adaptation,
the learn2learn import shim."""
from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch
from torch import nn

from fsl_lsskd.deps import MissingDependencyError, require_learn2learn
from fsl_lsskd.methods.episodic import EpisodeSampler, split_tasks
from fsl_lsskd.methods.base import Batch
from fsl_lsskd.methods.maml import FOMAML, MAML, MAMLConfig, adapt_and_predict
from fsl_lsskd.methods.protonet import ProtoNet, ProtoNetConfig, prototype_logits
from fsl_lsskd.registry import METHODS


class TinyBackbone(nn.Module):
    """A timm-like feature extractor: ``num_features``, ``reset_classifier``; conv + BN so MAML's
    transductive BatchNorm path is exercised."""

    def __init__(self, in_chs: int = 3, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.num_features = width
        self.fc = nn.Linear(width, 7)

    def reset_classifier(self, num_classes: int = 0) -> None:
        self.fc = nn.Identity() if num_classes == 0 else nn.Linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class IdentityBackbone(nn.Module):
    """Features = the flattened input (for the ProtoNet hand computation)."""

    num_features = 3 * 1 * 1

    def reset_classifier(self, num_classes: int = 0) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class FakeLoader:
    """The engine's TrainLoader surface used by episodic methods. Image ``i`` has every pixel equal to
    ``i % 256`` and row ``i`` is stored in ``rowid`` so tests can check the index column."""

    def __init__(self, n_classes: int = 8, per_class: int = 12, size: int = 4) -> None:
        n = n_classes * per_class
        self.labels = torch.arange(n_classes).repeat_interleave(per_class)
        self.images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
        self.augment_calls = 0

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255.0

    def augment(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        assert isinstance(generator, torch.Generator)
        self.augment_calls += 1
        return x.float() / 255.0


# ---------------------------------------------------------------- learn2learn shim


def test_missing_learn2learn_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "learn2learn", None)
    with pytest.raises(MissingDependencyError, match=r"bash tools/install_learn2learn\.sh") as info:
        require_learn2learn()
    assert "tools/setup.sh" in str(info.value)
    # methods stay constructible (plugin discovery must not need learn2learn); sampling reports the fix
    method = ProtoNet(TinyBackbone(), num_classes=8, num_samples=96, config=ProtoNetConfig(n_way=2, n_shot=1, n_query=1))
    with pytest.raises(MissingDependencyError, match="install_learn2learn"):
        next(iter(method.iter_batches(FakeLoader(), epoch=0)))


def test_registered():
    assert METHODS.get("protonet") is ProtoNet
    assert METHODS.get("maml") is MAML and METHODS.get("fomaml") is FOMAML
    assert all(METHODS.get(n).episodic for n in ("protonet", "maml", "fomaml"))


# ---------------------------------------------------------------- task sampling


def _draw(sampler, n):
    return [sampler.sample() for _ in range(n)]


def test_taskset_episodes_reproducible_and_global_random_untouched():
    loader = FakeLoader()
    random.seed(1234)
    before = random.getstate()
    a = _draw(EpisodeSampler(loader.images, loader.labels, 3, 2, 2, seed=7, epoch=0), 4)
    assert random.getstate() == before  # the global stream is not advanced or reseeded
    random.random()  # the caller using `random` between episodes must not change the episodes
    s = EpisodeSampler(loader.images, loader.labels, 3, 2, 2, seed=7, epoch=0)
    b = [s.sample()]
    random.seed(99)
    b += _draw(s, 3)
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    other_epoch = _draw(EpisodeSampler(loader.images, loader.labels, 3, 2, 2, seed=7, epoch=1), 4)
    other_seed = _draw(EpisodeSampler(loader.images, loader.labels, 3, 2, 2, seed=8, epoch=0), 4)
    rows = lambda eps: torch.cat([e[2] for e in eps])  # noqa: E731
    assert not torch.equal(rows(a), rows(other_epoch))
    assert not torch.equal(rows(a), rows(other_seed))


def _check_task(loader, x, y, rows, n_way, n_shot, n_query):
    ns = n_way * n_shot
    assert x.shape == (n_way * (n_shot + n_query), 3, 4, 4)
    assert torch.equal(y[:ns], torch.arange(n_way).repeat_interleave(n_shot))
    assert torch.equal(y[ns:], torch.arange(n_way).repeat_interleave(n_query))
    # index column = the dataset rows the images came from
    assert torch.allclose(x[:, 0, 0, 0], (rows % 256).float() / 255.0)
    assert len(set(rows.tolist())) == len(rows)  # support and query disjoint, no repeats
    base = loader.labels[rows]
    for c in range(n_way):  # one base class per episode label, in support and query alike
        assert len(set(base[y == c].tolist())) == 1
    assert len(set(base.tolist())) == n_way


def test_iter_batches_layout_protonet():
    loader = FakeLoader()
    cfg = ProtoNetConfig(n_way=3, n_shot=2, n_query=2, episodes_per_epoch=5)
    method = ProtoNet(TinyBackbone(), num_classes=8, num_samples=96, config=cfg)
    batches = list(method.iter_batches(loader, epoch=0))
    assert len(batches) == 5 and loader.augment_calls == 0  # papers: no augmentation by default
    for b in batches:
        assert isinstance(b, Batch) and b.images.dtype == torch.float32
        _check_task(loader, b.images, b.labels, b.index, 3, 2, 2)
    again = list(method.iter_batches(loader, epoch=0))
    assert all(torch.equal(p.index, q.index) for p, q in zip(batches, again))
    aug = ProtoNet(TinyBackbone(), 8, 96, config=ProtoNetConfig(n_way=3, n_shot=2, n_query=2, episodes_per_epoch=2,
                                                                augment=True))
    list(aug.iter_batches(loader, epoch=0))
    assert loader.augment_calls == 2


def test_iter_batches_layout_maml_meta_batch():
    loader = FakeLoader()
    cfg = MAMLConfig(n_way=2, n_shot=1, n_query=3, episodes_per_epoch=5, meta_batch_size=2)
    method = MAML(TinyBackbone(), num_classes=8, num_samples=96, config=cfg)
    batches = list(method.iter_batches(loader, epoch=3))
    assert [len(b.images) // cfg.task_size for b in batches] == [2, 2, 1]  # 5 tasks, meta-batch 2
    for b in batches:
        tasks = split_tasks(b.images, b.labels, 2, 1, 3)
        for t, (sx, sy, qx, qy) in enumerate(tasks):
            sl = slice(t * cfg.task_size, (t + 1) * cfg.task_size)
            _check_task(loader, b.images[sl], b.labels[sl], b.index[sl], 2, 1, 3)


def test_sampler_rejects_impossible_episode():
    from fsl_lsskd.errors import ProtocolError

    loader = FakeLoader(n_classes=4, per_class=3)
    with pytest.raises(ProtocolError, match="lower n_shot/n_query"):
        EpisodeSampler(loader.images, loader.labels, 2, 2, 2)
    with pytest.raises(ProtocolError, match="lower n_way"):
        EpisodeSampler(loader.images, loader.labels, 5, 1, 1)


# ---------------------------------------------------------------- ProtoNet


def test_protonet_episode_loss_matches_hand_computation():
    n_way, n_shot, n_query = 2, 2, 2
    sf = np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0],      # class 0
                   [1.0, -1.0, 0.5], [3.0, 0.0, 1.5]])    # class 1
    qf = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0],      # class 0 queries
                   [2.0, -0.5, 1.0], [0.5, 2.0, 0.0]])    # class 1 queries
    sy = np.array([0, 0, 1, 1])
    qy = np.array([0, 0, 1, 1])
    protos = np.stack([sf[sy == k].mean(0) for k in range(n_way)])
    d2 = ((qf[:, None, :] - protos[None]) ** 2).sum(-1)
    logits = -d2
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -logp[np.arange(4), qy].mean()
    expected_acc = (logits.argmax(1) == qy).mean()

    images = torch.tensor(np.concatenate([sf, qf]), dtype=torch.float32).view(8, 3, 1, 1)
    labels = torch.tensor(np.concatenate([sy, qy]))
    cfg = ProtoNetConfig(n_way=n_way, n_shot=n_shot, n_query=n_query)
    method = ProtoNet(IdentityBackbone(), num_classes=4, num_samples=8, config=cfg)
    out = method.training_step(Batch(images, labels, torch.arange(8)), epoch=0)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert out["query_acc"].item() == pytest.approx(expected_acc)
    assert torch.allclose(prototype_logits(torch.tensor(sf), torch.tensor(sy), torch.tensor(qf), 2),
                          torch.tensor(logits))


def test_protonet_step_trains_backbone():
    loader = FakeLoader()
    cfg = ProtoNetConfig(n_way=3, n_shot=2, n_query=2, episodes_per_epoch=1)
    method = ProtoNet(TinyBackbone(), num_classes=8, num_samples=96, config=cfg)
    batch = next(iter(method.iter_batches(loader, 0)))
    out = method.training_step(batch, 0)
    out["loss"].backward()
    assert method.backbone.conv.weight.grad is not None and method.backbone.conv.weight.grad.abs().sum() > 0
    assert isinstance(method.export_backbone().fc, nn.Identity)


# ---------------------------------------------------------------- MAML


def _tiny_task(seed: int = 0, n_way: int = 3, n_shot: int = 2, n_query: int = 2):
    g = torch.Generator().manual_seed(seed)
    k = n_shot + n_query
    centres = torch.randn(n_way, 3, 1, 1, generator=g) * 2
    x = centres.repeat_interleave(k, 0) + 0.3 * torch.randn(n_way * k, 3, 6, 6, generator=g)
    y = torch.arange(n_way).repeat_interleave(k)
    sup = torch.cat([torch.arange(c * k, c * k + n_shot) for c in range(n_way)])
    qry = torch.cat([torch.arange(c * k + n_shot, (c + 1) * k) for c in range(n_way)])
    return torch.cat([x[sup], x[qry]]), torch.cat([y[sup], y[qry]])


def _maml(cls=MAML, **kw):
    torch.manual_seed(0)
    cfg = MAMLConfig(n_way=3, n_shot=2, n_query=2, meta_batch_size=2, **kw)
    return cls(TinyBackbone(), num_classes=8, num_samples=96, config=cfg)


def test_maml_adaptation_step_lowers_support_loss():
    method = _maml(inner_lr=0.05, inner_steps=1)
    x, y = _tiny_task()
    sx, sy, qx, _ = split_tasks(x, y, 3, 2, 2)[0]
    logits, before, after = adapt_and_predict(method.meta_model(), sx, sy, qx, steps=1)
    assert logits.shape == (6, 3)
    assert after.item() < before.item()


@pytest.mark.parametrize("cls", [MAML, FOMAML])
def test_maml_training_step_meta_gradient(cls):
    method = _maml(cls, inner_lr=0.05, inner_steps=2)
    x1, y1 = _tiny_task(1)
    x2, y2 = _tiny_task(2)
    batch = Batch(torch.cat([x1, x2]), torch.cat([y1, y2]), torch.arange(24))
    out = method.training_step(batch, 0)
    assert set(out) >= {"loss", "query_acc", "support_loss_before", "support_loss_after"}
    # transductive BN in train mode; clones share the running-stat buffers, so they still track the data
    assert method.backbone.bn.running_mean.abs().sum() > 0
    assert out["support_loss_after"] < out["support_loss_before"]
    out["loss"].backward()
    for p in list(method.backbone.parameters()) + list(method.head.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert method.head.weight.grad.abs().sum() > 0


def test_second_order_differs_from_first_order():
    grads = []
    for cls in (MAML, FOMAML):
        method = _maml(cls, inner_lr=0.1, inner_steps=2)
        x, y = _tiny_task(3)
        method.training_step(Batch(x, y, torch.arange(12)), 0)["loss"].backward()
        grads.append(method.backbone.conv.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_finetune_predict_leaves_model_untouched():
    method = _maml(inner_lr=0.1, test_inner_steps=5)
    x, y = _tiny_task(4)
    sx, sy, qx, qy = split_tasks(x, y, 3, 2, 2)[0]
    state = {k: v.clone() for k, v in method.state_dict().items()}
    logits = method.finetune_predict(sx, sy, qx)
    assert logits.shape == (6, 3)
    assert all(torch.equal(v, method.state_dict()[k]) for k, v in state.items())


# ---------------------------------------------------------------- engine loader and readouts


def test_episodes_from_engine_trainloader():
    from fsl_lsskd.train.loader import TrainLoader

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(6).repeat_interleave(10)
    images = torch.randint(0, 256, (60, 8, 8, 3), generator=g, dtype=torch.uint8)
    loader = TrainLoader(images.numpy(), labels.numpy(), mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), seed=3)
    cfg = ProtoNetConfig(n_way=3, n_shot=2, n_query=3, episodes_per_epoch=2)
    method = ProtoNet(TinyBackbone(), num_classes=6, num_samples=60, config=cfg)
    b = next(iter(method.iter_batches(loader, epoch=0)))
    assert torch.allclose(b.images, loader.normalize(loader.images[b.index]))
    assert torch.equal(b.labels[:6], torch.arange(3).repeat_interleave(2))
    # the run seed (loader.seed) changes the episode stream
    other = TrainLoader(images.numpy(), labels.numpy(), mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), seed=4)
    rows = lambda ld: torch.cat([x.index for x in method.iter_batches(ld, 0)])  # noqa: E731
    assert torch.equal(rows(loader), rows(loader)) and not torch.equal(rows(loader), rows(other))
    out = method.training_step(b, 0)
    assert torch.isfinite(out["loss"])


def test_maml_finetune_readout():
    from fsl_lsskd.errors import ConfigError
    from fsl_lsskd.eval.base import EpisodeInputs
    from fsl_lsskd.registry import READOUTS

    cls = READOUTS.get("maml_finetune")
    assert cls.needs_images and not cls.needs_features
    method = _maml(inner_lr=0.1, test_inner_steps=3)
    g = np.random.default_rng(0)
    images = g.integers(0, 256, (30, 6, 6, 3), dtype=np.uint8)  # 6 classes x 5 images, class-major
    rows = np.stack([np.stack([c * 5 + g.permutation(5) for c in g.permutation(6)[:3]]) for _ in range(4)])
    readout = cls(cls.build_config({"max_episodes": 2}))
    assert readout.episode_limit() == 2
    kw = dict(rows=rows[:2], n_shot=2, images=images, mean=(0.5,) * 3, std=(0.25,) * 3, image_size=8)
    out = readout.predict(EpisodeInputs(method=lambda: method, **kw))
    assert out.correct.shape == (2,) and ((out.correct >= 0) & (out.correct <= 1)).all()
    assert out.probs.shape == (2, 3 * 3, 3) and np.allclose(out.probs.sum(-1), 1, atol=1e-5)
    # a MAML method passed as the `backbone` works too; a bare backbone is refused, naming the fix
    out2 = readout.predict(EpisodeInputs(backbone=method, **kw))
    assert np.array_equal(out.correct, out2.correct)
    with pytest.raises(ConfigError, match="maml/fomaml cell"):
        readout.predict(EpisodeInputs(backbone=TinyBackbone(), **kw))


def test_maml_finetune_prepares_images_as_every_readout(monkeypatch):
    """The MAML readout feeds the method the input contract's images: resized with the rounded antialiased
    resize (no longer the unrounded one) and normalised as the frozen features are, bit for bit."""
    from fsl_lsskd.eval.base import EpisodeInputs
    from fsl_lsskd.inputs import InputSpec
    from fsl_lsskd.registry import READOUTS

    method = _maml(inner_lr=0.1, test_inner_steps=1)
    seen = []
    real = method.finetune_predict
    monkeypatch.setattr(method, "finetune_predict",
                        lambda xs, ys, xq, **k: seen.append((xs, xq)) or real(xs, ys, xq, **k))
    g = np.random.default_rng(1)
    images = g.integers(0, 256, (30, 12, 12, 3), dtype=np.uint8)
    rows = np.stack([np.stack([c * 5 + g.permutation(5) for c in g.permutation(6)[:3]]) for _ in range(2)])
    spec = InputSpec((0.4, 0.5, 0.6), (0.2, 0.25, 0.3), 8)
    READOUTS.get("maml_finetune")().predict(EpisodeInputs(rows=rows, n_shot=2, images=images, method=lambda: method,
                                                          mean=spec.mean, std=spec.std, image_size=8))
    assert len(seen) == 2
    for (xs, xq), r in zip(seen, rows):
        want = spec.prepare(images[np.concatenate([r[:, :2].reshape(-1), r[:, 2:].reshape(-1)])])
        assert torch.equal(torch.cat([xs, xq]), want)


@pytest.mark.parametrize("name", ["protonet", "maml"])
def test_engine_trains_episodic_method_and_maml_model_scores(tmp_path, name):
    """One short epoch through the real engine (Adam, episodes from iter_batches), then the finished model is
    rebuilt with load_method; for MAML the maml_finetune readout fine-tunes it. The base-class accuracy of an
    episodic method is the nearest class mean of its features (it has no base classifier)."""
    from fsl_lsskd.checkpoint import load_method
    from fsl_lsskd.data.base import SplitData
    from fsl_lsskd.eval.base import EpisodeInputs
    from fsl_lsskd.registry import READOUTS
    from fsl_lsskd.train.config import TrainConfig
    from fsl_lsskd.train.engine import train

    g = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 8)
    colour = (labels[:, None, None, None] * 40 + 20)
    images = np.clip(colour + g.integers(-10, 10, (48, 16, 16, 3)), 0, 255).astype(np.uint8)
    split = SplitData(images, labels, tuple(f"c{i}" for i in range(6)), "fake", "train", "fp")
    sets = {"n_way": "3", "n_shot": "1", "n_query": "2", "episodes_per_epoch": "4"}
    if name == "maml":
        sets.update(inner_steps="1", test_inner_steps="2")
    cfg = TrainConfig(method=name, backbone="conv4", dataset="fake", image_size=16, epochs=1, heldout=0.25,
                      validation=None, mlflow=False, export=False, out_dir=str(tmp_path / "run"),
                      method_overrides=sets)
    res = train(cfg, train_data=split, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert res.history[0]["steps"] == (4 if name == "protonet" else 2)
    assert np.isfinite(res.history[0]["train_loss"])
    assert res.history[0]["heldout_base_acc"] > 100 / 6  # nearest class mean on colour classes: above chance
    method = load_method(res.model_dir)
    assert type(method) is METHODS.get(name)
    if name == "maml":
        rows = np.stack([np.stack([c * 8 + g.permutation(8)[:3] for c in (0, 2, 4)]) for _ in range(3)])
        out = READOUTS.get("maml_finetune")().predict(EpisodeInputs(
            rows=rows, n_shot=1, images=images, method=lambda: method, mean=(0.5,) * 3, std=(0.25,) * 3,
            image_size=16))
        assert out.correct.shape == (3,)


def test_engine_validates_maml_with_its_own_readout(tmp_path):
    """MAML is validated every epoch with maml_finetune (its paper's meta-test) beside ProtoNet on the frozen
    features; a method without a readout of its own logs ProtoNet alone."""
    from fsl_lsskd.data.base import SplitData
    from fsl_lsskd.eval.validation import fewshot_validator
    from fsl_lsskd.protocol import EpisodeProtocol
    from fsl_lsskd.train.config import TrainConfig
    from fsl_lsskd.train.engine import epoch_postfix, train

    g = np.random.default_rng(1)
    labels = np.repeat(np.arange(6), 8)
    images = np.clip(labels[:, None, None, None] * 40 + 20 + g.integers(-10, 10, (48, 16, 16, 3)), 0, 255)
    train_split = SplitData(images.astype(np.uint8), labels, tuple(f"c{i}" for i in range(6)), "fake", "train", "fp")
    val_split = SplitData(images[:24].astype(np.uint8), labels[:24], tuple(f"c{i}" for i in range(3)), "fake", "val",
                          "fpv")
    proto = EpisodeProtocol(n_way=3, n_shot=1, n_query=2, n_episodes=4)
    assert METHODS.get("maml").own_readout == "maml_finetune" and METHODS.get("protonet").own_readout is None
    sets = {"n_way": "3", "n_shot": "1", "n_query": "2", "episodes_per_epoch": "2", "inner_steps": "1",
            "test_inner_steps": "2"}
    cfg = TrainConfig(method="maml", backbone="conv4", dataset="fake", image_size=16, epochs=1, heldout=0.25,
                      validation=proto, mlflow=False, export=False, out_dir=str(tmp_path / "run"),
                      method_overrides=sets)
    validator = fewshot_validator(val_split, proto, (0.5,) * 3, (0.25,) * 3, 16, own_readout="maml_finetune")
    h = train(cfg, train_data=train_split, mean=(0.5,) * 3, std=(0.25,) * 3, validator=validator).history[0]
    for key in ("val_fewshot_acc", "val_maml_finetune_acc", "val_maml_finetune_ci95"):
        assert key in h, (key, h)
    assert 0.0 <= h["val_maml_finetune_acc"] <= 100.0 and h["val_maml_finetune_ci95"] >= 0.0
    assert epoch_postfix(h)["val_maml_finetune"] == h["val_maml_finetune_acc"]
    plain = fewshot_validator(val_split, proto, (0.5,) * 3, (0.25,) * 3, 16)
    from fsl_lsskd.backbones import create_backbone

    assert set(plain(create_backbone("conv4", num_classes=0).eval())) == {"val_fewshot_acc", "val_fewshot_ci95"}


def test_evaluate_untrained_method_scores_the_initial_weights_of_training(tmp_path):
    """`evaluate --untrained --method maml --seed S` scores exactly the weights `train --seed S` starts from
    (maml_finetune needs the whole method); --method without --untrained and an unknown method are exit 2."""
    from click.testing import CliRunner

    from fsl_lsskd.cli import main
    from fsl_lsskd.data.fake import write_fake_cifar100
    from fsl_lsskd.eval import cli as eval_cli
    from fsl_lsskd.train.config import TrainConfig, build_method_config
    from fsl_lsskd.train.engine import initial_method

    archive = write_fake_cifar100(tmp_path, per_class_train=6, per_class_test=4, seed=3)
    base = ["evaluate", "--dataset", "cifar_fs", "--archive", str(archive), "--n-episodes", "2", "--n-shot", "1",
            "--n-query", "1", "--no-cache", "--backbone", "conv4", "--image-size", "32"]
    seen = {}
    real = eval_cli._initial_method

    def spy(*a, **k):
        seen["method"] = real(*a, **k)
        return seen["method"]

    eval_cli._initial_method = spy
    try:
        r = CliRunner().invoke(main, base + ["--untrained", "--method", "maml", "--seed", "3", "--set",
                                             "test_inner_steps=1", "--readouts", "protonet,maml_finetune"])
    finally:
        eval_cli._initial_method = real
    assert r.exit_code == 0, r.output
    assert "maml_finetune" in r.output and "training seed 3's initial weights" in r.output
    cfg = TrainConfig(method="maml", backbone="conv4", image_size=32, seed=3,
                      method_overrides={"test_inner_steps": "1"})
    want = initial_method(cfg, build_method_config(METHODS.get("maml").config_cls, cfg), 64, 0).state_dict()
    got = seen["method"].state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert seen["method"].config.test_inner_steps == 1
    r = CliRunner().invoke(main, base + ["--method", "maml", "--checkpoint", str(archive)])
    assert r.exit_code == 2 and "--untrained" in r.output, r.output
    r = CliRunner().invoke(main, base + ["--untrained", "--method", "mamll"])
    assert r.exit_code == 2 and "maml" in r.output and "Traceback" not in r.output, r.output


def test_maml_zeroing_trick_head_is_a_prototype_classifier_after_one_step():
    """head: zero (Kao et al., ICLR 2022): the head starts every task at zero, so the first inner step leaves the
    backbone as it is (no gradient reaches it through a zero head) and sets the head to inner_lr/N * sum_i
    (onehot_i - 1/n_way) f_i: query logits are inner_lr/n_way * f_q . (mean_c - mean of all support features)."""
    from fsl_lsskd.errors import ConfigError

    assert "head" not in MAMLConfig().identity_dict()  # the paper's default keeps every existing identity
    assert MAMLConfig(head="zero").identity_dict()["head"] == "zero"
    with pytest.raises(ConfigError, match="normal, xavier, zero"):
        MAMLConfig(head="random")
    from fsl_lsskd.methods.settings import method_config

    with pytest.raises(ConfigError, match=r"inner_lr='abc' is not a valid float$"):
        method_config(MAMLConfig, "maml", {"inner_lr": "abc"})
    lr = 0.5
    method = _maml(inner_lr=lr, inner_steps=1, head="zero")
    assert method.head.weight.abs().sum() == 0 and method.head.bias.abs().sum() == 0
    x, y = _tiny_task()
    sx, sy, qx, _ = split_tasks(x, y, 3, 2, 2)[0]
    logits, _, _ = adapt_and_predict(method.meta_model(), sx, sy, qx, steps=1)
    method.train()
    fs, fq = method.backbone(sx).detach(), method.backbone(qx).detach()
    means = torch.stack([fs[sy == c].mean(0) for c in range(3)])
    want = lr / 3 * fq @ (means - fs.mean(0)).T
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)
    # an optimiser's update of the head is discarded before the next outer step and at meta-test
    with torch.no_grad():
        method.head.weight.add_(1.0)
    batch = Batch(torch.cat([x, x]), torch.cat([y, y]), torch.arange(24))
    method.training_step(batch, 0)
    assert method.head.weight.abs().sum() == 0
    with torch.no_grad():
        method.head.weight.add_(1.0)
    torch.testing.assert_close(method.finetune_predict(sx, sy, qx, steps=1, inner_lr=lr), want, rtol=1e-5,
                               atol=1e-6)


def test_zero_episodes_per_epoch_keeps_the_initial_weights(tmp_path, caplog):
    """episodes_per_epoch: 0 is a reference row: no step is taken, the run validates and exports exactly the weights
    training seed S starts from (what `evaluate --untrained --method maml --seed S` scores)."""
    from fsl_lsskd.checkpoint import load_method
    from fsl_lsskd.data.base import SplitData
    from fsl_lsskd.errors import ConfigError
    from fsl_lsskd.train.config import TrainConfig, build_method_config
    from fsl_lsskd.train.engine import initial_method, train

    with pytest.raises(ConfigError, match="episodes_per_epoch must be >= 0"):
        MAMLConfig(episodes_per_epoch=-1)
    g = np.random.default_rng(2)
    labels = np.repeat(np.arange(6), 8)
    split = SplitData(g.integers(0, 255, (48, 16, 16, 3)).astype(np.uint8), labels, tuple(f"c{i}" for i in range(6)),
                      "fake", "train", "fp")
    sets = {"n_way": "3", "n_shot": "1", "n_query": "2", "episodes_per_epoch": "0", "head": "zero"}
    cfg = TrainConfig(method="maml", backbone="conv4", dataset="fake", image_size=16, epochs=1, heldout=0.25, seed=4,
                      validation=None, mlflow=False, export=False, out_dir=str(tmp_path / "run"),
                      method_overrides=sets)
    res = train(cfg, train_data=split, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert res.history[0]["steps"] == 0
    assert "takes no training step (episodes_per_epoch: 0)" in caplog.text
    got = load_method(res.model_dir).state_dict()
    want = initial_method(cfg, build_method_config(MAMLConfig, cfg), 6, 36).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # BatchNorm statistics too


def test_maml_head_initialisations_share_every_other_draw():
    """head: normal / xavier / zero differ in the head alone: the backbone's weights are the same draws, the Xavier
    head has Xavier-uniform's bound sqrt(6 / (fan_in + fan_out)), the bias is zero."""
    nets = {h: _maml(head=h) for h in ("normal", "xavier", "zero")}
    for h in ("xavier", "zero"):
        a, b = nets["normal"].backbone.state_dict(), nets[h].backbone.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    w = nets["xavier"].head.weight
    bound = (6.0 / (w.shape[0] + w.shape[1])) ** 0.5
    assert w.abs().max() <= bound and w.std() < nets["normal"].head.weight.std()
    assert all(n.head.bias.abs().sum() == 0 for n in nets.values())
