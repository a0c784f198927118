"""Contract tests of fsl_lsskd.backbones: timm registration, timm model API, stage helpers, stage tails."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from fsl_lsskd.backbones import (stage_tail, create_backbone, embedding_dim, forward_stages, stage_indices,
                                 stage_info, stage_modules)
from fsl_lsskd.errors import ConfigError, UnknownNameError
from fsl_lsskd.registry import BACKBONES

OURS = ["resnet12", "resnet12_narrow", "conv4", "resnet18_cifar"]
TIMM_CNNS = ["resnet18"]
# Depthwise-conv nets are slow on the 2-core CPU (several s per fwd+bwd at batch 2): full contract in the slow
# set; the default run checks EfficientNet's adaptation in test_efficientnet_adapted_to_32 (eval only).
SLOW = [pytest.param(n, marks=pytest.mark.slow) for n in ("efficientnet_b0", "mobilenetv3_small_100")]
EMBED = {"efficientnet_b0": 1280, "resnet12": 640, "resnet12_narrow": 320, "conv4": 64, "resnet18_cifar": 512, "resnet18": 512,
         "mobilenetv3_small_100": 1024}
STAGE_CHS = {"efficientnet_b0": [24, 40, 112, 320], "resnet12": [64, 160, 320, 640], "resnet12_narrow": [32, 80, 160, 320], "conv4": [64] * 4,
             "resnet18_cifar": [64, 128, 256, 512], "resnet18": [64, 128, 256, 512],
             "mobilenetv3_small_100": [16, 24, 48, 576]}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _x(size, n=2):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_registered_in_timm_and_backbones_registry():
    assert set(OURS) <= set(BACKBONES.names())
    for name in OURS:
        assert timm.is_model(name)
        doc = BACKBONES.get(name).__doc__.strip().splitlines()[0]
        assert len(doc) > 10  # `fsl-bench ls` prints this line


def test_param_counts_match_references():
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(create_backbone("resnet12")) == 12_424_320  # RFS/MetaOptNet ResNet-12, 12.4 M
    assert n(create_backbone("conv4")) == 113_088  # Conv-4 with conv bias, 113 k


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", OURS + TIMM_CNNS + SLOW)
def test_forward_backward_and_stage_shapes(name, size):
    model = create_backbone(name, num_classes=5, image_size=size)
    x = _x(size)
    maps, logits = forward_stages(model, x)
    assert logits.shape == (2, 5)
    infos = [stage_info(model)[i] for i in stage_indices(model)]
    assert [m.shape[1] for m in maps] == [d["num_chs"] for d in infos] == STAGE_CHS[name]
    for m, d in zip(maps, infos):
        assert m.shape[-2:] == (size // d["reduction"], size // d["reduction"]), (d, m.shape)
    assert maps[-1].shape[-1] >= 2  # small-input adaptation: final map never 1x1
    (logits.square().mean() + sum(m.mean() for m in maps)).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # logits of forward_stages == plain forward (same train-mode BN on the same batch)
    with torch.no_grad():
        model.eval()
        _, lg = forward_stages(model, x)
        assert torch.allclose(lg, model(x), atol=1e-5)


@pytest.mark.parametrize("name", OURS + ["resnet18"] + SLOW)
def test_embedding_and_reset_classifier(name):
    model = create_backbone(name, num_classes=0).eval()
    x = _x(32)
    with torch.no_grad():
        assert model(x).shape == (2, EMBED[name]) == (2, embedding_dim(model))
        if name in OURS or name == "resnet18":
            assert model.num_features == EMBED[name]
        assert model.num_classes == 0
        model.reset_classifier(7)
        assert model.num_classes == 7 and isinstance(model.get_classifier(), nn.Linear)
        assert model(x).shape == (2, 7)
        model.reset_classifier(0)
        assert model(x).shape == (2, EMBED[name])


@pytest.mark.parametrize("name", OURS + ["resnet18"])
def test_stage_tail_shape_contract(name):
    model = create_backbone(name, num_classes=0, image_size=32)
    maps, _ = forward_stages(model, _x(32))
    final = maps[-1].shape[1:]
    for l in range(len(maps)):
        tail = stage_tail(model, l, seed=0)
        assert isinstance(tail, nn.Sequential)
        assert tail(maps[l]).shape[1:] == final, (name, l)
        # fresh copy: no parameter shared with the backbone
        ids = {id(p) for p in model.parameters()}
        assert not any(id(p) in ids for p in tail.parameters())
    with pytest.raises(ConfigError):
        stage_tail(model, len(maps))


def test_stage_tail_is_reinitialised_and_seeded():
    model = create_backbone("conv4")
    with torch.no_grad():
        for p in model.layer2.parameters():
            p.fill_(0.5)
    tail = stage_tail(model, 0, seed=3)
    assert not torch.equal(tail[0][0].weight, model.layer2[0].weight)  # fresh, not the trained weights
    assert torch.equal(tail[0][1].weight, torch.ones(64))  # BN weight 1
    assert torch.equal(tail[0][0].weight, stage_tail(model, 0, seed=3)[0][0].weight)


@pytest.mark.parametrize("name", OURS + ["resnet18"])
def test_stage_modules_are_the_modules_whose_outputs_forward_stages_returns(name):
    model = create_backbone(name).eval()
    mods = stage_modules(model)
    assert len(mods) == 4
    captured = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(out)) for m in mods]
    with torch.no_grad():
        maps, _ = forward_stages(model, _x(32))
    for h in hooks:
        h.remove()
    assert len(captured) == 4
    for a, b in zip(maps, captured):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", OURS)
def test_timm_features_only(name):
    fm = timm.create_model(name, features_only=True, pretrained=False)
    model = create_backbone(name)
    infos = [stage_info(model)[i] for i in stage_indices(model)]
    assert fm.feature_info.channels() == [d["num_chs"] for d in infos]
    assert fm.feature_info.reduction() == [d["reduction"] for d in infos]
    with torch.no_grad():
        feats = fm(_x(32))
    assert [f.shape[1:] for f in feats] == [(d["num_chs"], 32 // d["reduction"], 32 // d["reduction"])
                                            for d in infos]


@pytest.mark.parametrize("name", ["resnet12_narrow", "conv4", "resnet18_cifar"])
def test_timm_roundtrip_and_state_dict(name, tmp_path):
    import fsl_lsskd.backbones  # noqa: F401  (registration happens on import)

    a = timm.create_model(name, pretrained=False, num_classes=5).eval()
    assert a.num_classes == 5 and a.pretrained_cfg["input_size"] == (3, 32, 32)
    torch.save(a.state_dict(), tmp_path / "w.pt")
    b = timm.create_model(name, pretrained=False, num_classes=5)
    b.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    b.eval()
    x = _x(32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_forward_intermediates_index_semantics():
    m = create_backbone("conv4").eval()
    x = _x(32)
    with torch.no_grad():
        last2 = m.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape[-1] for t in last2] == [4, 2]
        final, feats = m.forward_intermediates(x, indices=[0], stop_early=True)
        assert final.shape[-1] == 16 and len(feats) == 1


def test_channels_last_and_seed():
    a = create_backbone("resnet12_narrow", seed=7).eval()
    b = create_backbone("resnet12_narrow", seed=7, channels_last=True).eval()
    assert b.layer1.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = _x(32)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x.contiguous(memory_format=torch.channels_last)), atol=1e-4)
    state = torch.random.get_rng_state()
    create_backbone("conv4", seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_init_like_references():
    m = create_backbone("resnet12_narrow")
    assert torch.equal(m.layer1.bn1.weight, torch.ones(32)) and torch.equal(m.layer1.bn1.bias, torch.zeros(32))
    w = m.layer3.conv2.weight  # kaiming normal, fan_out: std = sqrt(2 / (160*9))
    assert abs(w.std().item() - (2 / (160 * 9)) ** 0.5) < 0.005


def test_errors_name_the_fix():
    with pytest.raises(UnknownNameError) as e:
        create_backbone("resnet13")
    assert "resnet12" in str(e.value) and "timm.list_models" in str(e.value)
    with pytest.raises(ConfigError, match="CNN"):
        create_backbone("vit_tiny_patch16_224", image_size=32)
    with pytest.raises(ConfigError, match="pretrained"):
        create_backbone("resnet18", pretrained=True)


def test_efficientnet_adapted_to_32():
    m = create_backbone("efficientnet_b0", num_classes=3, image_size=32).eval()
    assert [d["reduction"] for d in stage_info(m)] == [1, 1, 2, 4, 8]
    with torch.no_grad():
        maps, logits = forward_stages(m, _x(32))
    assert [t.shape[-1] for t in maps] == [32, 16, 8, 4] and logits.shape == (2, 3)
    with torch.no_grad():
        assert stage_tail(m, 3)(maps[3]).shape == maps[-1].shape


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_100"])
def test_stage_tail_depthwise_cnns(name):
    m = create_backbone(name, image_size=32).eval()
    with torch.no_grad():
        maps, _ = forward_stages(m, _x(32))
        for l in range(len(maps)):
            assert stage_tail(m, l)(maps[l]).shape == maps[-1].shape


def test_conv4_pool_before_relu_trains_bit_identically_to_the_paper_order():
    """Conv-4 runs each block as conv-BN-pool-ReLU (ReLU on 4x fewer elements); the paper's conv-BN-ReLU-pool is
    the same function with the same gradients, so a few SGD steps from the same weights give bit-identical
    weights, and the state-dict keys are the ones published weights have."""
    import copy

    from torch import nn

    torch.manual_seed(0)
    ours = create_backbone("conv4", num_classes=10, image_size=32, channels_last=True)
    paper = copy.deepcopy(ours)
    for name in ours.stage_names:
        seq = getattr(paper, name)
        assert isinstance(seq[2], nn.MaxPool2d) and isinstance(seq[3], nn.ReLU)
        seq[2], seq[3] = seq[3], seq[2]  # back to conv-BN-ReLU-pool
    assert list(ours.state_dict()) == list(paper.state_dict()) and "layer4.1.running_var" in ours.state_dict()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    x[:, :, :4] = -5.0  # whole pooling windows below zero: ties at 0 after the ReLU in the paper's order
    y = torch.randint(0, 10, (16,), generator=g)
    for model in (ours, paper):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), paper.state_dict().values()))
