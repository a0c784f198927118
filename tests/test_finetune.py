"""The ``finetune`` readout: settings, the last-stage shortcut, steps=0 = ProtoNet, and a task that needs it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fsl_lsskd.data.base import SplitData
from fsl_lsskd.errors import ConfigError
from fsl_lsskd.eval.base import EpisodeInputs
from fsl_lsskd.eval.finetune import FinetuneReadout, LastStageSplit, last_stage_name
from fsl_lsskd.eval.protonet import ProtoNetReadout
from fsl_lsskd.eval.scoring import ReadoutSpec
from fsl_lsskd.inputs import InputSpec


def _split(C=6, N=20, size=16, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(C, 1, size, size, 3))
    imgs = np.clip(base + rng.integers(-60, 60, size=(C, N, size, size, 3)), 0, 255).astype(np.uint8)
    return SplitData(imgs.reshape(-1, size, size, 3), np.repeat(np.arange(C), N).astype(np.int64),
                     tuple(f"class{i}" for i in range(C)), "synthetic", "test", "")


def _rows(labels, n_way, n_shot, n_query, n_episodes, seed=0):
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    out = np.empty((n_episodes, n_way, n_shot + n_query), np.int64)
    for e in range(n_episodes):
        for w, c in enumerate(rng.choice(classes, n_way, replace=False)):
            out[e, w] = rng.choice(np.flatnonzero(labels == c), n_shot + n_query, replace=False)
    return out


def _inputs(backbone, split, rows, n_shot, features=None, size=16):
    return EpisodeInputs(rows=rows, n_shot=n_shot, features=features, images=split.images, backbone=backbone,
                         mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), image_size=size)


@pytest.mark.parametrize("name, size", [("conv4", 32), ("resnet12", 32), ("resnet18", 32)])
def test_last_stage_split_reproduces_the_network(name, size):
    from fsl_lsskd.backbones import create_backbone

    torch.manual_seed(0)
    net = create_backbone(name, num_classes=0, image_size=size).eval()
    stage = net.get_submodule(last_stage_name(net))
    split = LastStageSplit(net, stage)
    x = torch.randn(6, 3, size, size)
    assert split.verify(x)
    with torch.no_grad():
        torch.testing.assert_close(split.rest(split.prefix(x)), net(x), rtol=1e-4, atol=1e-5)


def test_steps_zero_is_protonet():
    from fsl_lsskd.backbones import create_backbone
    from fsl_lsskd.eval.features import extract_features

    torch.manual_seed(0)
    net = create_backbone("conv4", num_classes=0, image_size=16).eval()
    split = _split()
    rows = _rows(split.labels, 5, 2, 4, 6)
    feats = extract_features(net, split.images, InputSpec(image_size=16), fuse=False)
    proto = ProtoNetReadout().predict(_inputs(net, split, rows, 2, feats))
    ft = FinetuneReadout(FinetuneReadout.build_config({"steps": 0, "n_aug_support": 0})).predict(
        _inputs(net, split, rows, 2))
    np.testing.assert_array_equal(ft.correct, proto.correct)
    np.testing.assert_allclose(ft.probs, proto.probs, atol=1e-5)


class _ColourBlind(nn.Module):
    """A two-stage CNN whose frozen features see only brightness: stage 2 weighs the three colour channels
    equally, so a class defined by the dominant colour is invisible to any frozen readout (the features vary
    with brightness only) until stage 2 is fine-tuned."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Conv2d(3, 3, 1)
        self.layer2 = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.layer1.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.layer1.bias.zero_()
            self.layer2.weight.copy_(torch.tensor([1.0, 0.5, 2.0, 1.5]).view(4, 1, 1, 1).expand(4, 3, 1, 1))
            self.layer2.bias.copy_(torch.tensor([1.5, -1.0, 2.0, -0.5]))  # brightness turns features
        self.feature_info = [dict(num_chs=3, reduction=1, module="layer1"),
                             dict(num_chs=4, reduction=1, module="layer2")]
        self.num_features = 4

    def forward(self, x):
        return self.layer2(self.layer1(x)).mean((2, 3))


def _colour_split(N=30, size=16, seed=0):
    """3 classes: red-, green- or blue-dominant images of random brightness."""
    rng = np.random.default_rng(seed)
    imgs = []
    for c in range(3):
        for _ in range(N):
            level = rng.uniform(40, 120)
            img = np.full((size, size, 3), level) + rng.normal(0, 5, (size, size, 3))
            img[..., c] += 100
            imgs.append(np.clip(img, 0, 255))
    return SplitData(np.asarray(imgs, np.uint8), np.repeat(np.arange(3), N).astype(np.int64), ("r", "g", "b"),
                     "colours", "test", "")


def test_finetuning_beats_the_frozen_probe_on_a_task_that_needs_it():
    from fsl_lsskd.eval.features import extract_features
    from fsl_lsskd.eval.logreg import LogRegReadout

    split = _colour_split()
    rows = _rows(split.labels, 3, 5, 10, 8)
    net = _ColourBlind().eval()
    inputs = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), image_size=16)
    feats = extract_features(net, split.images, InputSpec(inputs["mean"], inputs["std"], 16), fuse=False)
    frozen = [r.predict(EpisodeInputs(rows=rows, n_shot=5, features=feats, **inputs)).correct.mean()
              for r in (ProtoNetReadout(), LogRegReadout())]
    cfg = FinetuneReadout.build_config({"steps": 100, "lr": 0.1, "backbone_lr": 0.1, "temperature": 0.1})
    tuned = FinetuneReadout(cfg).predict(EpisodeInputs(rows=rows, n_shot=5, images=split.images, backbone=net,
                                                       **inputs))
    assert max(frozen) < 0.5  # chance is 1/3: the frozen features carry no colour
    assert tuned.correct.mean() > 0.9, tuned.correct
    head_only = FinetuneReadout(FinetuneReadout.build_config(
        {"steps": 100, "lr": 0.1, "backbone_lr": 0.0, "temperature": 0.1})).predict(
        EpisodeInputs(rows=rows, n_shot=5, images=split.images, backbone=net, **inputs))
    assert head_only.correct.mean() < 0.5  # what helps is the last stage, not the head
    # the caller's backbone is untouched
    assert torch.equal(net.layer2.weight[:, 0], net.layer2.weight[:, 1])


def test_finetune_is_deterministic_and_bounded_by_max_episodes():
    from fsl_lsskd.backbones import create_backbone
    from fsl_lsskd.eval import evaluate

    torch.manual_seed(0)
    net = create_backbone("conv4", num_classes=0, image_size=16).eval()
    split = _split()
    spec = {"readout": "finetune", "steps": 3, "max_episodes": 4}
    a, b = (evaluate(net, split, protocols=["5w1s5q_10"], readouts=[spec], cache=False, image_size=16)[0]
            for _ in range(2))
    assert a.n_episodes == 4 and a.label == "finetune(steps=3)"
    np.testing.assert_array_equal(a.accuracy, b.accuracy)
    np.testing.assert_array_equal(a.nll, b.nll)
    assert a.reliability.shape == (4, 16, 3)


def test_finetune_settings_errors():
    for bad, msg in [({"steps": -1}, "steps must be >= 0"), ({"momentum": 1.0}, "momentum"),
                     ({"batch_size": 0}, "batch_size"), ({"temperature": 0}, "temperature"),
                     ({"lr_head": 1}, "no setting 'lr_head'")]:
        with pytest.raises(ConfigError, match=msg):
            ReadoutSpec.parse({"readout": "finetune", **bad})
    with pytest.raises(ConfigError, match="feature_info"):
        FinetuneReadout().predict(_inputs(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1),
                                                        nn.Flatten()), _split(), _rows(_split().labels, 2, 1, 1, 1),
                                          1))
