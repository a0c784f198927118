"""Episodic evaluator: episodes, classifiers, CI, feature cache, CLI errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fsl_lsskd.data.base import SplitData
from fsl_lsskd.errors import ProtocolError
from fsl_lsskd.eval._episodes import (EPISODE_SEED, PUBLISHED_EPISODES, VARIANTS, episode_relpath,
                                      generate_episodes, load_episodes, read_episode_file)
from fsl_lsskd.eval.base import mean_ci


def _check_valid(ep, counts):
    E, W, K = ep.images.shape
    for e in range(E):
        cls = ep.classes[e].astype(int)
        assert len(set(cls)) == W
        for w in range(W):
            img = ep.images[e, w].astype(int)
            assert len(set(img)) == K  # distinct -> support and query disjoint
            assert img.max() < counts[cls[w]]


def test_episodes_deterministic_and_valid():
    counts = [30, 25, 40, 22, 31, 28, 26]
    a = generate_episodes(3, 5, 2, 15, 50, counts)
    b = generate_episodes(3, 5, 2, 15, 50, counts)
    c = generate_episodes(4, 5, 2, 15, 50, counts)
    assert np.array_equal(a.classes, b.classes) and np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    assert a.classes.dtype == np.int16 and a.images.dtype == np.uint16
    _check_valid(a, counts)
    # prefix property: the first N of a longer run equal a run of N
    d = generate_episodes(3, 5, 2, 15, 20, counts)
    assert np.array_equal(a.head(20).images, d.images)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_published_files_match_manifest_and_regenerate(variant):
    from fsl_lsskd.data.splits import verified_path

    dataset, name = variant
    for split, counts in VARIANTS[variant].items():
        for shot in (1, 5):
            rel = episode_relpath(dataset, name, split, 5, shot, 15, PUBLISHED_EPISODES)
            ep, meta = read_episode_file(verified_path(rel))  # sha256 checked against MANIFEST.json
            assert meta["seed"] == EPISODE_SEED and tuple(meta["counts"]) == counts
            regen = generate_episodes(EPISODE_SEED, 5, shot, 15, PUBLISHED_EPISODES, counts)
            assert np.array_equal(ep.classes, regen.classes) and np.array_equal(ep.images, regen.images)
    # validity on one file (full check is slow-ish)
    _check_valid(ep.head(200), counts)


def test_load_episodes_published_and_generated(caplog):
    ep = load_episodes("tiny_imagenet", "test", (150,) * 40, n_shot=5, n_episodes=100)
    assert ep.source.startswith("splits/episodes/tiny_imagenet-sub100/") and len(ep) == 100
    with caplog.at_level("WARNING"):
        g = load_episodes("tiny_imagenet", "test", (149,) * 40, n_shot=5, n_episodes=10)
    assert g.source == "generated" and "not" in caplog.text.lower() or "no published" in caplog.text
    with pytest.raises(ProtocolError, match="c1"):
        load_episodes("x", "test", (30, 10, 30, 30, 30, 30), n_shot=5, class_names=list("abcdef")[:0] or
                      ["c0", "c1", "c2", "c3", "c4", "c5"])
    with pytest.raises(ProtocolError, match="6-way"):
        load_episodes("x", "test", (30,) * 5, n_way=6)


def test_ci_matches_hand_computation():
    acc = np.array([0.2, 0.4, 0.6, 0.8, 1.0])
    m, h = mean_ci(acc)
    # hand: mean .6, sd(ddof=1) = sqrt(0.1) = .316228, sem = .141421, t(0.975, 4) = 2.776445
    assert m == pytest.approx(0.6)
    assert h == pytest.approx(math.sqrt(0.1) / math.sqrt(5) * 2.7764451051977987, rel=1e-9)


def test_protonet_known_answer():
    from fsl_lsskd.eval.protonet import ProtoNetEvaluator

    # 2 classes in 2-d; class 0 around +x, class 1 around +y; one query of class 1 lies nearer +x -> wrong
    feats = np.array([[1, 0.1], [1, -0.1],      # class 0 support
                      [0.1, 1], [-0.1, 1],      # class 1 support
                      [1, 0.2], [0.3, 1],       # queries: class 0 right, class 1 right
                      [0.9, 0.3], [1, 0.5]], dtype=np.float32)  # class 0 right, class 1 query wrong
    rows = np.array([[[0, 1, 4, 6], [2, 3, 5, 7]]])
    acc = ProtoNetEvaluator().evaluate_episodes(feats, rows, n_shot=2)
    assert acc.tolist() == [0.75]


def _features(seed=0, C=12, N=40, D=64, sep=0.35):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(C, 1, D)) * sep + rng.normal(size=(C, N, D))).reshape(-1, D).astype(np.float32)


@pytest.mark.parametrize("shot", [1, 5])
def test_logreg_batched_matches_sklearn(shot):
    from fsl_lsskd.eval.logreg import LogRegEvaluator
    from fsl_lsskd.eval.logreg_batched import LogRegBatchedEvaluator, fit_logreg_batched

    feats = _features()
    ep = generate_episodes(1, 5, shot, 15, 40, [40] * 12)
    rows = ep.rows(np.arange(12) * 40)
    a = LogRegEvaluator().evaluate_episodes(feats, rows, shot)
    b = LogRegBatchedEvaluator().evaluate_episodes(feats, rows, shot)
    assert abs(a.mean() - b.mean()) < 0.005
    # same optimum as sklearn's objective (tight tolerance): compare weights on one episode
    from sklearn.linear_model import LogisticRegression

    from fsl_lsskd.eval.base import l2_normalize

    x = l2_normalize(feats[rows[0, :, :shot].reshape(-1)].astype(np.float64))
    y = np.repeat(np.arange(5), shot)
    ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(x, y)
    W, bias = fit_logreg_batched(torch.from_numpy(x)[None], torch.from_numpy(y)[None], 5)
    assert np.allclose(W[0].numpy(), ref.coef_, atol=1e-5)
    # intercepts agree up to a common shift (softmax invariance)
    d = bias[0].numpy() - ref.intercept_
    assert np.allclose(d - d.mean(), 0, atol=1e-5)


def _synthetic_split(C=8, N=24, size=16, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(C, 1, size, size, 3))
    imgs = np.clip(base + rng.integers(-40, 40, size=(C, N, size, size, 3)), 0, 255).astype(np.uint8)
    return SplitData(imgs.reshape(-1, size, size, 3), np.repeat(np.arange(C), N).astype(np.int64),
                     tuple(f"class{i}" for i in range(C)), "synthetic", "test", "")


def test_feature_cache_hit_does_not_forward(monkeypatch):
    from fsl_lsskd.eval import _features

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    calls = []
    real = _features.extract_features
    monkeypatch.setattr(_features, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    split = _synthetic_split()
    f1 = _features.split_features(net, split, (0.5,) * 3, (0.25,) * 3, 16, batch_size=64)
    f2 = _features.split_features(net, split, (0.5,) * 3, (0.25,) * 3, 16, batch_size=64)
    assert len(calls) == 1 and np.array_equal(f1, f2)
    _features.split_features(net, split, (0.5,) * 3, (0.25,) * 3, 12, batch_size=64)  # other size: new key
    assert len(calls) == 2


def test_folded_network_matches_and_untraceable_models_fall_back():
    from fsl_lsskd.backbones import create_backbone
    from fsl_lsskd.eval._features import inference_network

    torch.manual_seed(0)
    net = create_backbone("conv4", num_classes=0, image_size=32).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        folded = inference_network(net, x)
        assert folded is not net
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-4)

    class Branchy(torch.nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def forward(self, x):
            return x.mean((2, 3)) if x.sum() > 0 else -x.mean((2, 3))

    b = Branchy()
    with torch.inference_mode():
        assert inference_network(b, x) is b


def test_evaluate_end_to_end_synthetic():
    from fsl_lsskd.eval import evaluate

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    res = evaluate(net, _synthetic_split(), shots=(1, 5), n_episodes=40, n_query=10,
                   classifiers=("protonet", "logreg_batched", "logreg"))
    assert [(r.n_shot, r.classifier) for r in res][:3] == [(1, "protonet"), (1, "logreg_batched"), (1, "logreg")]
    five = [r for r in res if r.n_shot == 5]
    assert all(r.accuracies.shape == (40,) and r.mean > 0.5 for r in five)  # 20% chance


def _cli(args):
    from fsl_lsskd.cli import main

    return CliRunner().invoke(main, args)


@pytest.fixture
def fake_cifar(tmp_path):
    fake = pytest.importorskip("fsl_lsskd.data.fake")
    writer = getattr(fake, "write_cifar100", None) or getattr(fake, "make_cifar100", None)
    if writer is None:
        pytest.skip("fsl_lsskd.data.fake has no CIFAR-100 writer")
    return writer(tmp_path / "cifar-100-python.tar.gz")


def test_cli_errors_exit_2(tmp_path, shared_data):
    arch = str(shared_data / "cifar-100-python-partial-train1117-test916.tar.gz")
    base = ["evaluate", "--backbone", "conv4", "--untrained", "--dataset", "cifar_fs", "--archive", arch,
            "--split", "test", "--episodes", "5", "--classifiers", "protonet"]
    r = _cli(base + ["--way", "25"])
    assert r.exit_code == 2 and "25-way" in r.output, r.output
    r = _cli(base + ["--shots", "5", "--queries", "50"])
    assert r.exit_code == 2 and "shot+query" in r.output, r.output
    # checkpoint of another backbone
    from fsl_lsskd.backbones import create_backbone

    ck = tmp_path / "ck.pth"
    torch.save({"backbone": create_backbone("resnet12", num_classes=0).state_dict(),
                "meta": {"backbone": "resnet12", "image_size": 32}}, ck)
    r = _cli(["evaluate", "--backbone", "conv4", "--checkpoint", str(ck), "--dataset", "cifar_fs",
              "--archive", arch, "--episodes", "5"])
    assert r.exit_code == 2 and "does not match backbone 'conv4'" in r.output and "--backbone resnet12" in r.output
    r = _cli(base[:3] + ["--classifiers", "nope"] + base[4:])
    assert r.exit_code == 2


@pytest.mark.slow
def test_logreg_batched_vs_sklearn_real_tiny_imagenet(shared_data):
    """Real Tiny ImageNet (subset) test features from a randomly initialised conv4: batched logreg within
    0.5 pt of scikit-learn over 300 published episodes per shot."""
    from fsl_lsskd.data import get_dataset
    from fsl_lsskd.eval import evaluate
    from fsl_lsskd.eval._checkpoint import create_backbone

    ds = get_dataset("tiny_imagenet", archive=shared_data / "tiny-imagenet-200-sub100.zip")
    split = ds.load_split("test")
    torch.manual_seed(0)
    net = create_backbone("conv4", image_size=32)
    res = evaluate(net, split, shots=(1, 5), n_episodes=300, classifiers=("logreg_batched", "logreg"),
                   mean=ds.mean, std=ds.std, image_size=32)
    for i in (0, 2):
        assert res[i].episodes_source.startswith("splits/episodes/tiny_imagenet-sub100")
        assert abs(res[i].mean - res[i + 1].mean) < 0.005, (res[i].summary(), res[i + 1].summary())


def test_load_backbone_formats(tmp_path):
    import json

    from safetensors.torch import save_file

    from fsl_lsskd.errors import CheckpointError
    from fsl_lsskd.eval._checkpoint import create_backbone, load_backbone

    torch.manual_seed(1)
    net = create_backbone("conv4", image_size=32)
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(sd, str(tmp_path / "backbone.safetensors"))
    (tmp_path / "backbone.json").write_text(json.dumps({"name": "conv4", "image_size": 32}))
    m1, meta = load_backbone(None, tmp_path / "backbone.safetensors")  # name from the sidecar
    assert meta["backbone"] == "conv4" and all(torch.equal(m1.state_dict()[k], v) for k, v in sd.items())
    torch.save({"model": {f"backbone.{k}": v for k, v in sd.items()}, "meta": {"backbone": "conv4",
                "image_size": 32, "method": "ce"}}, tmp_path / "last.pt")
    m2, _ = load_backbone(None, tmp_path / "last.pt")
    assert all(torch.equal(m2.state_dict()[k], v) for k, v in sd.items())
    bad = dict(sd)
    k0 = next(iter(bad))
    bad[k0] = bad[k0][:1]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_backbone("conv4", tmp_path / "bad.pth")
