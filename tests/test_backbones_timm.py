""""Any timm CNN" at 32x32 and 64x64: the contract every adapted timm family meets (forward, stage maps, branch
tails, an auxiliary-classifier training step), and the refusals (exit 2 naming the reason and an alternative) of
models that are not CNNs or cannot be adapted. The default run checks a representative subset of families; the
full matrix (>= 30 families) is marked slow (``pytest -m slow tests/test_backbones_timm.py``)."""
from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from fsl_lsskd.backbones import (stage_tail, check_image_size, create_backbone, embedding_dim, forward_stages,
                                 smallest_image_size, stage_indices, stage_info, tail_modules)
from fsl_lsskd.errors import ConfigError
from fsl_lsskd.methods.base import Batch
from fsl_lsskd.registry import METHODS

# One small variant per timm family (docs/design.md, "Backbones"). FAST: the default run (small, quick on 2 cores,
# with RegNet and GhostNet, whose strided shortcuts broke the old stem-only adaptation; RepVGG and Xception are
# checked by test_strided_shortcuts_change_with_their_main_path / test_xception_adapted and the slow set).
FAST = ["resnet10t", "regnetx_002", "mobilenetv3_small_050", "ghostnet_050", "dla46_c", "lcnet_035", "convnext_atto",
        "starnet_s050", "tinynet_e", "mobilenetv2_035"]
SLOW = ["repvgg_a0", "cs3darknet_s", "resnet18", "resnet18d", "skresnet18", "resnetv2_18", "regnety_002",
        "regnetz_005", "efficientnet_b0",
        "tf_efficientnet_b0", "mobilenetv4_conv_small", "xception41", "densenet121", "dpn48b",
        "hrnet_w18_small", "res2net50_14w_8s", "resnest14d", "rexnet_100", "mnasnet_050", "fbnetc_100", "mixnet_s",
        "hardcorenas_a", "cspresnet50", "darknet17", "ese_vovnet19b_dw", "selecsls42", "inception_v3", "gernet_s",
        "nf_regnet_b0", "hgnetv2_b0", "mobileone_s0", "repghostnet_050", "fastvit_t8", "repvit_m0_9",
        "inception_next_atto"]
MATRIX = FAST + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW]
# Stages whose successors are no chain of modules (taps inside a block, multi-resolution branches): their branch
# tail is the generic conv stack; every other (stage, family) tail is a copy of the backbone's own modules.
GENERIC_TAILS = {"xception41": {0, 1, 2}, "hrnet_w18_small": {0, 1, 2}, "selecsls42": {2}}

# Not CNNs: vision transformers, attention hybrids, MLP-mixers, recurrent token mixers.
NOT_CNNS = ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "coat_lite_mini", "levit_128s", "convit_tiny",
            "maxvit_pico_rw_256", "mixer_s32_224", "resmlp_12_224", "gmlp_ti16_224", "mobilevit_xxs",
            "mobilevitv2_050", "botnet26t_256", "efficientvit_b0", "edgenext_xx_small", "swin_tiny_patch4_window7_224",
            "sequencer2d_s", "mobilenetv4_hybrid_medium", "fastvit_sa12", "coatnet_nano_rw_224"]
C = 4


def _x(size, n=2, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _reduction(size, h):
    return 2 ** int(round(math.log2(size / h)))


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", MATRIX)
def test_timm_cnn_contract(name, size):
    model = create_backbone(name, num_classes=0, image_size=size, seed=0)
    x = _x(size)
    assert model(x).shape == (2, embedding_dim(model))  # pooled features, train mode, batch 2
    maps, pooled = forward_stages(model, x)
    idx = stage_indices(model)
    infos = [stage_info(model)[i] for i in idx]
    assert len(maps) == len(idx) >= 3 and pooled.shape == (2, embedding_dim(model))
    for m, d in zip(maps, infos):
        assert m.shape[1] == d["num_chs"] and _reduction(size, m.shape[-1]) == d["reduction"], (d, m.shape)
    final = maps[-1].shape[1:]
    assert final[-1] >= 2 and final[-2] >= 2  # never 1x1 at the adapted size
    # 4x4 like CIFAR ResNets at 32; 2x2 for Inception (valid convolutions) and SelecSLS (its head halves again)
    assert final[-1] == final[-2] == (2 if name in ("inception_v3", "selecsls42") else 4), final
    generic = GENERIC_TAILS.get(name, set())
    with torch.no_grad():
        for lvl in range(len(maps)):
            tail = stage_tail(model, lvl, seed=lvl)
            assert tail(maps[lvl]).shape[1:] == final, (name, lvl)
            if lvl < len(maps) - 1:
                assert (tail_modules(model, lvl) is None) == (lvl in generic), (name, lvl)
    # an auxiliary-classifier method (LSSKD: a classifier on every stage, rotations) trains one step
    model.reset_classifier(C)
    cls = METHODS.get("lsskd")
    method = cls(model, C, 8, cls.config_cls())
    method.train()
    method.on_epoch_start(0)
    out = method.training_step(Batch(x, torch.tensor([0, 1]), torch.tensor([0, 1])), 0)
    assert {"ls_final", "ls_aux"} <= set(out) and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.aux_classifiers.parameters())


@pytest.mark.parametrize("head", ["connector", "stages"])
def test_byot_on_a_cnn_with_a_head_conv(head):
    """BYOT's feature hint compares the shallow classifiers' pooled features with the last stage's (TinyNet /
    EfficientNet have a wider head conv after it: 160 vs 1280 channels)."""
    model = create_backbone("tinynet_e", num_classes=C, image_size=32, seed=0)
    cls = METHODS.get("byot")
    method = cls(model, C, 8, cls.config_cls(head=head))
    method.train()
    out = method.training_step(Batch(_x(32), torch.tensor([0, 1]), torch.tensor([0, 1])), 0)
    assert out["feat_hint"] > 0 and torch.isfinite(out["loss"])
    out["loss"].backward()


@pytest.mark.parametrize("name", ["resnet10t", "regnetx_002", "convnext_atto"])
def test_copied_tails_reproduce_the_backbone(name):
    """``tail_modules`` names the modules that map stage l's map to the last stage's: run with the backbone's own
    weights they give exactly its last map (what ``stage_tail`` copies and re-initialises)."""
    model = create_backbone(name, image_size=32, seed=0).eval()
    with torch.no_grad():
        maps, _ = forward_stages(model, _x(32, seed=5))
        for lvl in range(len(maps) - 1):
            y = maps[lvl]
            for n in tail_modules(model, lvl):
                y = model.get_submodule(n)(y)
            torch.testing.assert_close(y, maps[-1], rtol=1e-4, atol=1e-4)


def test_strided_shortcuts_change_with_their_main_path():
    """The cases that broke the stem-only adaptation (a stride-2 block's shortcut left at stride 2): RegNet's
    first block, RepVGG's 1x1 branch, GhostNet's depthwise shortcut, Xception's shortcut conv."""
    m = create_backbone("regnetx_002", image_size=32)
    assert m.s1.b1.conv2.conv.stride == m.s1.b1.downsample.conv.stride == (1, 1)  # both at stride 1
    assert m.s2.b1.conv2.conv.stride == m.s2.b1.downsample.conv.stride == (2, 2)  # later stages unchanged
    m64 = create_backbone("regnetx_002", image_size=64)
    assert m64.stem.conv.stride == (1, 1) and m64.s1.b1.downsample.conv.stride == (2, 2)
    m = create_backbone("repvgg_a0", image_size=64)
    blk = m.stages[0][0]
    assert blk.conv_kxk.conv.stride == blk.conv_1x1.conv.stride == (2, 2) and m.stem.conv_kxk.conv.stride == (1, 1)
    with torch.no_grad():
        for name in ("ghostnet_050", "repvgg_a0"):
            for size in (32, 64):
                maps, _ = forward_stages(create_backbone(name, image_size=size).eval(), _x(size, n=1))
                assert [t.shape[-1] for t in maps] == [32, 16, 8, 4]


@pytest.mark.slow
def test_xception_adapted():
    with torch.no_grad():
        for size in (32, 64):
            m = create_backbone("xception41", image_size=size).eval()
            maps, out = forward_stages(m, _x(size, n=1))
            assert [t.shape[-1] for t in maps] == [32, 16, 8, 4] and out.shape == (1, 2048)


def test_adaptation_keeps_resnet_as_before_and_is_cached():
    """ResNets keep the CIFAR-style adaptation (conv1 stride 1 and no max-pool at 32; conv1 stride 1 at 64), so
    their weights and earlier results stay valid; a second build reuses the verified plan."""
    from torch import nn

    m = create_backbone("resnet18", image_size=32)
    assert m.conv1.stride == (1, 1) and isinstance(m.maxpool, nn.Identity) and m.layer2[0].conv1.stride == (2, 2)
    m = create_backbone("resnet18", image_size=64)
    assert m.conv1.stride == (1, 1) and m.maxpool.stride == 2
    a, b = create_backbone("resnet18", seed=3).eval(), create_backbone("resnet18", seed=3).eval()
    assert [d["reduction"] for d in a.feature_info] == [1, 1, 2, 4, 8] == [d["reduction"] for d in b.feature_info]
    with torch.no_grad():
        assert torch.equal(a(_x(32)), b(_x(32)))
    big = create_backbone("resnet18", image_size=84)  # above 64: timm's model unchanged
    assert big.conv1.stride == (2, 2) and big.maxpool.stride == 2


def test_even_kernel_patchify_convs_keep_the_size():
    """ConvNeXt's 4x4 stride-4 stem at stride 1 (32x32) pads asymmetrically like padding='same'."""
    m = create_backbone("convnext_atto", image_size=32).eval()
    conv = m.stem[0]
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(_x(32, n=1), (1, 2, 1, 2)), conv.weight, conv.bias)
    with torch.no_grad():
        torch.testing.assert_close(conv(_x(32, n=1)), ref)
    m64 = create_backbone("convnext_atto", image_size=64)
    assert m64.stem[0].stride == (2, 2) and m64.stem[0].padding == (1, 1)  # 4x4 stride 2: exactly halves


@pytest.mark.parametrize("name", NOT_CNNS)
def test_not_cnns_refused(name):
    with pytest.raises(ConfigError, match="not a CNN") as e:
        create_backbone(name, image_size=32)
    assert "resnet18" in str(e.value) and "efficientnet_b0" in str(e.value)


def test_space_to_depth_stem_refused():
    with pytest.raises(ConfigError, match="space-to-depth") as e:
        create_backbone("tresnet_m", image_size=32)
    assert "resnet18" in str(e.value)


def test_image_size_checks():
    check_image_size("regnetx_002", 32)
    with pytest.raises(ConfigError, match="smallest input it takes is 16x16") as e:
        check_image_size("conv4", 8)
    assert "--image-size 16" in str(e.value)
    assert smallest_image_size("conv4") == 16
    with pytest.raises(ConfigError, match="not a CNN"):  # a refused model is reported as such, not as a size
        check_image_size("vit_tiny_patch16_224", 32)


@pytest.mark.parametrize("size", [2, 4])
def test_below_total_stride_refused_even_when_padding_lets_it_run(size):
    """regnetx_002 adapted to small inputs has total stride 8: a 2x2 or 4x4 image runs through its padded
    convolutions to a 1x1 map of padding (it used to "score" about chance); refused naming 8."""
    from fsl_lsskd.backbones._factory import total_stride

    assert total_stride(create_backbone("regnetx_002", image_size=32), 32) == 8
    with pytest.raises(ConfigError, match="smallest input it takes is 8x8") as e:
        check_image_size("regnetx_002", size)
    assert "total stride 8" in str(e.value)


def test_out_of_memory_is_reported_as_too_large_not_too_small(monkeypatch):
    from fsl_lsskd.backbones import _factory

    def no_memory(model, image_size, in_chans=3):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(_factory, "_forward_probe", no_memory)
    with pytest.raises(ConfigError, match="ran out of memory") as e:
        check_image_size("regnetx_002", 100000)
    assert "smaller --image-size" in str(e.value) and "smallest" not in str(e.value)


def _cli(*args):
    from fsl_lsskd.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory):
    from fsl_lsskd.data.fake import write_fake_cifar100

    return write_fake_cifar100(tmp_path_factory.mktemp("cifar"), per_class_train=6, per_class_test=2, seed=11)


def _evaluate(archive, *extra):
    return _cli("evaluate", "--dataset", "cifar_fs", "--archive", archive, "--n-episodes", "2", "--n-shot", "1",
                "--n-query", "1", "--readouts", "protonet", "--no-cache", *extra)


@pytest.mark.parametrize("name, why", [("vit_tiny_patch16_224", "not a CNN"), ("coat_lite_mini", "not a CNN"),
                                       ("levit_128s", "not a CNN"), ("convit_tiny", "not a CNN"),
                                       ("maxvit_pico_rw_256", "not a CNN"), ("mixer_s32_224", "not a CNN"),
                                       ("mobilevit_xxs", "not a CNN"), ("tresnet_m", "space-to-depth")])
def test_evaluate_refuses_with_exit_2(cifar_archive, name, why):
    r = _evaluate(cifar_archive, "--untrained", "--backbone", name, "--image-size", "32")
    assert r.exit_code == 2 and why in r.output and "resnet18" in r.output, r.output
    assert "Traceback" not in r.output


def test_evaluate_image_size_below_smallest_exit_2(cifar_archive, tmp_path):
    r = _evaluate(cifar_archive, "--untrained", "--backbone", "conv4", "--image-size", "8")
    assert r.exit_code == 2 and "smallest input it takes is 16x16" in r.output, r.output
    # with a checkpoint too, when --image-size differs from the size it was trained at
    ck = tmp_path / "ck.pth"
    torch.save({"backbone": create_backbone("conv4", num_classes=0).state_dict(),
                "meta": {"backbone": "conv4", "image_size": 32}}, ck)
    r = _evaluate(cifar_archive, "--checkpoint", ck, "--image-size", "8")
    assert r.exit_code == 2 and "smallest input it takes is 16x16" in r.output, r.output


def test_evaluate_runs_formerly_broken_family(cifar_archive):
    r = _evaluate(cifar_archive, "--untrained", "--backbone", "regnetx_002", "--image-size", "32")
    assert r.exit_code == 0, r.output
    assert "regnetx_002" in r.output and "1-shot" in r.output


def _bench(path, archive, backbones="[conv4]", image_size=32):
    path.write_text(f"name: {path.stem}\ndescription: test\ndatasets: [cifar_fs]\n"
                    f"data: {{cifar_fs: {{archive: {archive}}}}}\nbackbones: {backbones}\nmethods: [ce]\n"
                    f"seeds: [0]\nimage_size: {image_size}\n"
                    f"train: {{epochs: 1, batch_size: 8, validation: null}}\n"
                    f"eval: {{split: test, n_shot: [1], n_query: 1, n_episodes: 2, readouts: [protonet]}}\n")
    return path


def test_run_validates_backbones_at_the_image_size(cifar_archive, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    r = _cli("run", _bench(tmp_path / "small.yaml", cifar_archive, image_size=8), "--out", tmp_path / "runs")
    assert r.exit_code == 2 and "smallest input it takes is 16x16" in r.output and "small.yaml" in r.output, r.output
    r = _cli("run", _bench(tmp_path / "vit.yaml", cifar_archive, backbones="[conv4, vit_tiny_patch16_224]"),
             "--out", tmp_path / "runs")
    assert r.exit_code == 2 and "not a CNN" in r.output and "`backbones`" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "runs").exists()  # refused before anything ran
