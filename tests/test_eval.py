"""Scoring: episodes, readouts, CI, calibration, feature cache, CLI errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fsl_lsskd.data.base import SplitData
from fsl_lsskd.errors import ConfigError, ProtocolError
from fsl_lsskd.eval.base import EpisodeInputs, mean_ci
from fsl_lsskd.eval.episodes import (EPISODE_SEED, VARIANTS, episode_relpath, generate_episodes, load_episodes,
                                     published_protocols, read_episode_file)
from fsl_lsskd.inputs import InputSpec
from fsl_lsskd.protocol import EpisodeProtocol


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
    p = EpisodeProtocol(5, 2, 15, 50, seed=3)
    a, b = generate_episodes(p, counts), generate_episodes(p, counts)
    c = generate_episodes(p.replace(seed=4), counts)
    assert np.array_equal(a.classes, b.classes) and np.array_equal(a.images, b.images) and a.sha256 == b.sha256
    assert not np.array_equal(a.images, c.images) and a.sha256 != c.sha256
    assert a.classes.dtype == np.int16 and a.images.dtype == np.uint16
    _check_valid(a, counts)
    # prefix property: the first N of a longer run equal a run of N
    d = generate_episodes(p.replace(n_episodes=20), counts)
    assert np.array_equal(a.head(20).images, d.images)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_published_files_match_manifest_and_regenerate(variant):
    from fsl_lsskd.data.splits import verified_path

    dataset, name = variant
    n_files = 0
    for split, counts in VARIANTS[variant].items():
        for protocol in published_protocols(split, counts):
            ep, meta = read_episode_file(verified_path(episode_relpath(dataset, name, split, protocol)))
            assert meta["seed"] == EPISODE_SEED and tuple(meta["counts"]) == counts
            regen = generate_episodes(protocol, counts)
            assert np.array_equal(ep.classes, regen.classes) and np.array_equal(ep.images, regen.images)
            n_files += 1
    # 5-way 1/5-shot on val and test; the way/shot curves (3 ways x 5 shots, less the two) on test
    assert n_files == 2 + 2 + 13
    _check_valid(ep.head(100), counts)


def test_load_episodes_published_and_generated(caplog):
    ep = load_episodes("tiny_imagenet", "test", (150,) * 40, EpisodeProtocol(5, 5, 15, 100))
    assert ep.source.startswith("splits/episodes/tiny_imagenet-sub100/") and len(ep) == 100
    assert len(ep.sha256) == 64  # the published file's sha256
    curve = load_episodes("tiny_imagenet", "test", (150,) * 40, EpisodeProtocol(20, 10, 15, 600))
    assert curve.source.endswith("test_20w10s15q_600.npz")
    with caplog.at_level("INFO"):
        g = load_episodes("tiny_imagenet", "test", (149,) * 40, EpisodeProtocol(5, 5, 15, 10))
    assert g.source == "generated" and "no published episodes" in caplog.text
    with pytest.raises(ProtocolError, match="c1"):
        load_episodes("x", "test", (30, 10, 30, 30, 30, 30), EpisodeProtocol(5, 5, 15, 10),
                      ["c0", "c1", "c2", "c3", "c4", "c5"])
    with pytest.raises(ProtocolError, match="6-way"):
        load_episodes("x", "test", (30,) * 5, EpisodeProtocol(6, 1, 15, 10))


def test_protocol_value_parses_and_checks():
    p = EpisodeProtocol.parse("5w1s15q_600")
    assert p == EpisodeProtocol(5, 1, 15, 600) and p.key == "5w1s15q" and p.images_per_class == 16
    assert EpisodeProtocol.parse({"n_way": 10, "n_shot": 5}) == EpisodeProtocol(10, 5, 15, 2000)
    for bad in ({"n_way": 1}, {"n_shot": 0}, {"nway": 5}):
        with pytest.raises(ProtocolError):
            EpisodeProtocol.parse(bad)
    with pytest.raises(ProtocolError, match="expected e.g. 5w1s15q"):
        EpisodeProtocol.parse("five-way")


def test_ci_matches_hand_computation():
    acc = np.array([0.2, 0.4, 0.6, 0.8, 1.0])
    m, h = mean_ci(acc)
    # hand: mean .6, sd(ddof=1) = sqrt(0.1) = .316228, sem = .141421, t(0.975, 4) = 2.776445
    assert m == pytest.approx(0.6)
    assert h == pytest.approx(math.sqrt(0.1) / math.sqrt(5) * 2.7764451051977987, rel=1e-9)


def test_protonet_known_answer():
    from fsl_lsskd.eval.protonet import ProtoNetReadout

    # 2 classes in 2-d; class 0 around +x, class 1 around +y; one query of class 1 lies nearer +x -> wrong
    feats = np.array([[1, 0.1], [1, -0.1],      # class 0 support
                      [0.1, 1], [-0.1, 1],      # class 1 support
                      [1, 0.2], [0.3, 1],       # queries: class 0 right, class 1 right
                      [0.9, 0.3], [1, 0.5]], dtype=np.float32)  # class 0 right, class 1 query wrong
    rows = np.array([[[0, 1, 4, 6], [2, 3, 5, 7]]])
    out = ProtoNetReadout().predict(EpisodeInputs(rows=rows, n_shot=2, features=feats))
    assert out.correct.tolist() == [0.75]
    # probabilities: softmax of negative squared distances to the normalised prototypes (temperature 1)
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    protos = np.stack([f[[0, 1]].mean(0), f[[2, 3]].mean(0)])
    q = f[[4, 6, 5, 7]]  # class-major queries
    logits = -((q[:, None] - protos[None]) ** 2).sum(-1)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(out.probs[0], p, rtol=1e-5)


def test_calibration_hand_computed_case():
    """4 predictions, confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 1.0 (right): bins of width 1/15; ECE
    = (2/4)|0.5-0.9| + (1/4)|1-0.6| + (1/4)|1-1.0| = 0.2 + 0.1 + 0 = 0.3; NLL and Brier by hand."""
    from fsl_lsskd.eval.calibration import bin_stats, brier, ece_from_bins, nll, pooled_ece

    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [1.0, 0.0]])
    labels = np.array([0, 1, 1, 0])
    assert ece_from_bins(bin_stats(probs, labels)) == pytest.approx(0.3)
    assert pooled_ece(probs, labels) == pytest.approx(0.3, abs=1e-6)  # torchmetrics agrees
    eps = np.finfo(np.float64).eps
    assert nll(probs, labels) == pytest.approx(-(np.log(0.9) + np.log(0.1) + np.log(0.6) + np.log(1 - eps)) / 4)
    assert brier(probs, labels) == pytest.approx((0.02 + 1.62 + 0.32 + 0.0) / 4)
    from sklearn.metrics import brier_score_loss, log_loss

    assert nll(probs, labels) == pytest.approx(log_loss(labels, probs))
    assert brier(probs, labels) == pytest.approx(brier_score_loss(labels, probs[:, 1]) * 2)


def _features(seed=0, C=12, N=40, D=64, sep=0.35):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(C, 1, D)) * sep + rng.normal(size=(C, N, D))).reshape(-1, D).astype(np.float32)


@pytest.mark.parametrize("shot", [1, 5])
def test_logreg_batched_matches_sklearn(shot):
    from fsl_lsskd.eval.logreg import LogRegReadout
    from fsl_lsskd.eval.logreg_batched import LogRegBatchedReadout, fit_logreg_batched

    feats = _features()
    ep = generate_episodes(EpisodeProtocol(5, shot, 15, 40, seed=1), [40] * 12)
    rows = ep.rows(np.arange(12) * 40)
    inputs = EpisodeInputs(rows=rows, n_shot=shot, features=feats)
    a, b = LogRegReadout().predict(inputs), LogRegBatchedReadout().predict(inputs)
    assert abs(a.correct.mean() - b.correct.mean()) < 0.005
    assert np.abs(a.probs - b.probs).max() < 1e-3  # same optimum: same probabilities
    from sklearn.linear_model import LogisticRegression

    from fsl_lsskd.eval.base import l2_normalize

    x = l2_normalize(feats[rows[0, :, :shot].reshape(-1)].astype(np.float64))
    y = np.repeat(np.arange(5), shot)
    ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(x, y)
    W, bias = fit_logreg_batched(torch.from_numpy(x)[None], torch.from_numpy(y)[None], 5)
    assert np.allclose(W[0].numpy(), ref.coef_, atol=1e-5)
    d = bias[0].numpy() - ref.intercept_  # intercepts agree up to a common shift (softmax invariance)
    assert np.allclose(d - d.mean(), 0, atol=1e-5)


def _synthetic_split(C=8, N=24, size=16, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(C, 1, size, size, 3))
    imgs = np.clip(base + rng.integers(-40, 40, size=(C, N, size, size, 3)), 0, 255).astype(np.uint8)
    return SplitData(imgs.reshape(-1, size, size, 3), np.repeat(np.arange(C), N).astype(np.int64),
                     tuple(f"class{i}" for i in range(C)), "synthetic", "test", "")


def test_feature_cache_hit_does_not_forward(monkeypatch):
    from fsl_lsskd.eval import features

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    calls = []
    real = features.extract_features
    monkeypatch.setattr(features, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    split = _synthetic_split()
    f1 = features.split_features(net, split, InputSpec(image_size=16), batch_size=64)
    f2 = features.split_features(net, split, InputSpec(image_size=16), batch_size=64)
    assert len(calls) == 1 and np.array_equal(f1, f2)
    features.split_features(net, split, InputSpec(image_size=12), batch_size=64)  # other size: new key
    assert len(calls) == 2


def test_folded_network_matches_and_untraceable_models_fall_back():
    from fsl_lsskd.backbones import create_backbone
    from fsl_lsskd.eval.features import inference_network

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
    res = evaluate(net, _synthetic_split(), protocols=["5w1s10q_40", "5w5s10q_40"],
                   readouts=("protonet", "logreg_batched", "logreg"))
    assert [(r.protocol.n_shot, r.readout) for r in res][:3] == [(1, "protonet"), (1, "logreg_batched"),
                                                                 (1, "logreg")]
    five = [r for r in res if r.protocol.n_shot == 5]
    assert all(r.accuracy.shape == (40,) and r.mean > 50 for r in five)  # percent; 20% chance
    assert all(r.nll is not None and r.reliability.shape == (40, 16, 3) and 0 <= r.ece <= 100 for r in res)


def test_support_augmentation_setting_is_deterministic_and_changes_support():
    from fsl_lsskd.eval import evaluate

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    split = _synthetic_split()
    kw = dict(protocols=["5w1s10q_20"], cache=False)
    plain = evaluate(net, split, readouts=["protonet"], **kw)[0]
    aug = [evaluate(net, split, readouts=[{"readout": "protonet", "n_aug_support": 3}], **kw)[0] for _ in range(2)]
    assert aug[0].label == "protonet(n_aug_support=3)" and aug[0].settings["n_aug_support"] == 3
    np.testing.assert_array_equal(aug[0].accuracy, aug[1].accuracy)  # seeded per episode
    assert not np.allclose(aug[0].nll, plain.nll)  # the prototypes came from augmented copies


def test_readout_specs_identities_and_errors():
    from fsl_lsskd.eval.scoring import ReadoutSpec, score_id, scoring_identity
    from fsl_lsskd.errors import UnknownNameError

    a = ReadoutSpec.parse("logreg_batched")
    b = ReadoutSpec.parse({"readout": "logreg_batched", "C": 1.0})
    c = ReadoutSpec.parse({"readout": "logreg_batched", "C": 0.5})
    assert a == b and a != c and c.label == "logreg_batched(C=0.5)"
    p = EpisodeProtocol(5, 1, 15, 2000)
    target = {"dataset": "d", "split": "test", "fingerprint": "f", "image_size": 32}
    ids = {score_id(scoring_identity("t", target, p, "e", spec)) for spec in (a, c)}
    ids.add(score_id(scoring_identity("t", target, p.replace(n_shot=5), "e", a)))
    ids.add(score_id(scoring_identity("t2", target, p, "e", a)))
    assert len(ids) == 4
    with pytest.raises(UnknownNameError, match="Valid readouts"):
        ReadoutSpec.parse("protonett")
    with pytest.raises(ConfigError, match="no setting 'temp'"):
        ReadoutSpec.parse({"readout": "protonet", "temp": 2})
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        ReadoutSpec.parse({"readout": "protonet", "temperature": 0})


def _cli(args):
    from fsl_lsskd.cli import main

    return CliRunner().invoke(main, args)


def test_cli_errors_exit_2(tmp_path, shared_data):
    arch = str(shared_data / "cifar-100-python-partial-train1117-test916.tar.gz")
    base = ["evaluate", "--backbone", "conv4", "--untrained", "--dataset", "cifar_fs", "--archive", arch,
            "--split", "test", "--n-episodes", "5", "--readouts", "protonet"]
    r = _cli(base + ["--n-way", "25"])
    assert r.exit_code == 2 and "25-way" in r.output, r.output
    r = _cli(base + ["--n-shot", "5", "--n-query", "50"])
    assert r.exit_code == 2 and "n_shot + n_query" in r.output, r.output
    from fsl_lsskd.backbones import create_backbone

    ck = tmp_path / "ck.pth"
    torch.save({"backbone": create_backbone("resnet12", num_classes=0).state_dict(),
                "meta": {"backbone": "resnet12", "image_size": 32}}, ck)
    r = _cli(["evaluate", "--backbone", "conv4", "--checkpoint", str(ck), "--dataset", "cifar_fs",
              "--archive", arch, "--n-episodes", "5", "--n-shot", "1", "--n-query", "5"])
    assert r.exit_code == 2 and "does not match backbone 'conv4'" in r.output and "--backbone resnet12" in r.output
    r = _cli(base[:-2] + ["--readouts", "nope"])
    assert r.exit_code == 2 and "Valid readouts" in r.output
    r = _cli(base + ["--image-size", "8", "--n-query", "5"])
    assert r.exit_code == 2 and "smallest input it takes is 16x16" in r.output, r.output


@pytest.mark.slow
def test_logreg_batched_vs_sklearn_real_tiny_imagenet(shared_data):
    """Real Tiny ImageNet (subset) test features from a randomly initialised conv4: batched logreg within
    0.5 pt of scikit-learn over 300 published episodes per shot."""
    from fsl_lsskd.backbones import create_backbone
    from fsl_lsskd.data import get_dataset
    from fsl_lsskd.eval import evaluate

    ds = get_dataset("tiny_imagenet", archive=shared_data / "tiny-imagenet-200-sub100.zip")
    split = ds.load_split("test")
    torch.manual_seed(0)
    net = create_backbone("conv4", image_size=32)
    res = evaluate(net, split, protocols=["5w1s15q_300", "5w5s15q_300"], readouts=("logreg_batched", "logreg"),
                   mean=ds.mean, std=ds.std, image_size=32)
    for i in (0, 2):
        assert res[i].episodes_source.startswith("splits/episodes/tiny_imagenet-sub100")
        assert abs(res[i].mean - res[i + 1].mean) < 0.5, (res[i].summary(), res[i + 1].summary())


def test_load_backbone_formats(tmp_path):
    import json

    from safetensors.torch import save_file

    from fsl_lsskd.backbones import create_backbone
    from fsl_lsskd.checkpoint import load_backbone
    from fsl_lsskd.errors import CheckpointError

    torch.manual_seed(1)
    net = create_backbone("conv4", image_size=32)
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(sd, str(tmp_path / "backbone.safetensors"))
    (tmp_path / "backbone.json").write_text(json.dumps({"name": "conv4", "image_size": 32}))
    m1, meta = load_backbone(tmp_path / "backbone.safetensors")  # name from the sidecar
    assert meta["backbone"] == "conv4" and all(torch.equal(m1.state_dict()[k], v) for k, v in sd.items())
    m1b, _ = load_backbone(tmp_path)  # the directory
    assert all(torch.equal(m1b.state_dict()[k], v) for k, v in sd.items())
    torch.save({"model": {f"backbone.{k}": v for k, v in sd.items()}, "meta": {"backbone": "conv4",
                "image_size": 32, "method": "ce"}}, tmp_path / "last.pt")
    m2, _ = load_backbone(tmp_path / "last.pt")
    assert all(torch.equal(m2.state_dict()[k], v) for k, v in sd.items())
    bad = dict(sd)
    k0 = next(iter(bad))
    bad[k0] = bad[k0][:1]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_backbone(tmp_path / "bad.pth", "conv4")
