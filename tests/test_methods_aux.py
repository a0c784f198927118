"""Methods with auxiliary classifiers and teachers: byot, lsskd, kd, hsakd (+ hsakd_teacher)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsl_lsskd.backbones import create_backbone
from fsl_lsskd.errors import ConfigError
from fsl_lsskd.methods import losses as L
from fsl_lsskd.methods.auxiliary import rotate_expand
from fsl_lsskd.methods.base import Batch
from fsl_lsskd.registry import METHODS


C = 4
SIZE = 16  # every registered few-shot backbone pools 4x: 16 -> 1x1, fast on 2 cores


def make(name, backbone="conv4", teacher=None, num_samples=8, **overrides):
    cls = METHODS.get(name)
    torch.manual_seed(0)
    cfg = cls.config_cls(**overrides)
    return cls(create_backbone(backbone, num_classes=C, image_size=SIZE), C, num_samples, cfg, teacher)


def batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(b, 3, SIZE, SIZE, generator=g), torch.arange(b) % C, torch.arange(b) + 2)


# ---------------------------------------------------------------- pure losses, hand-computed

def test_soft_cross_entropy_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax = [0.25, 0.75]
    target = torch.tensor([[0.5, 0.5]])
    expect = -(0.5 * np.log(0.25) + 0.5 * np.log(0.75))
    assert L.soft_cross_entropy(logits, target).item() == pytest.approx(expect, rel=1e-6)


def test_kd_kl_hand():
    s = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 2 * math.log(3.0)], [0.0, 0.0]])  # /tau=2 -> p_t=[.25,.75] and [.5,.5]
    kl_row0 = 0.25 * np.log(0.25 / 0.5) + 0.75 * np.log(0.75 / 0.5)
    expect = 4.0 * (kl_row0 + 0.0) / 2  # tau^2 * batchmean
    assert L.kd_kl(s, t, 2.0).item() == pytest.approx(expect, rel=1e-5)


def test_hinton_kd_hand():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[0.0, 2 * math.log(3.0)]])
    y = torch.tensor([1])
    ce = np.log(2.0)
    kl = 4.0 * (0.25 * np.log(0.5) + 0.75 * np.log(1.5))
    total, ce_t, kl_t = L.hinton_kd(s, t, y, alpha=0.9, tau=2.0)
    assert ce_t.item() == pytest.approx(ce, rel=1e-6)
    assert kl_t.item() == pytest.approx(kl, rel=1e-5)
    assert total.item() == pytest.approx(0.1 * ce + 0.9 * kl, rel=1e-5)


def test_feature_l2_hand():
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert L.feature_l2(a, b).item() == pytest.approx((1 + 4 + 1) / 2)


def test_alpha_schedule_and_softening():
    assert L.alpha_schedule(0.8, 0, 10) == pytest.approx(0.08)
    assert L.alpha_schedule(0.8, 4, 10) == pytest.approx(0.4)
    assert L.alpha_schedule(0.8, 9, 10) == pytest.approx(0.8)
    assert L.alpha_schedule(0.8, 20, 10) == pytest.approx(0.8)
    out = L.softened_targets(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.2, 0.8]]), 0.5)
    assert torch.allclose(out, torch.tensor([[0.6, 0.4]]))


def test_rotate_expand_layout():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    y = torch.tensor([2, 7])
    xr, yr = rotate_expand(x, y)
    assert xr.shape == (8, 3, 5, 5)
    for i in range(2):
        for k in range(4):
            assert torch.equal(xr[4 * i + k], torch.rot90(x[i], k, (1, 2)))
            assert yr[4 * i + k].item() == 4 * y[i].item() + k
    with pytest.raises(ValueError):
        rotate_expand(torch.zeros(1, 3, 4, 5), torch.zeros(1, dtype=torch.long))


# ---------------------------------------------------------------- LSSKD store semantics

def test_lsskd_store_semantics():
    m = make("lsskd", epochs=10)  # auto layout on this small set: dense stores, the values are the stored rows
    m.on_epoch_start(0)
    assert m.alpha == pytest.approx(0.08)
    b = batch()
    # first visit: stored rows unseen -> targets are one-hot whatever alpha is
    m.alpha = 0.5
    out = m.training_step(b, 0)
    x, joint = rotate_expand(b.images, b.labels)
    with torch.no_grad():
        from fsl_lsskd.methods.auxiliary import run_with_aux_classifiers
        logits, aux, _ = run_with_aux_classifiers(m.backbone, m.aux_classifiers, x)
    assert out["ls_final"].item() == pytest.approx(F.cross_entropy(logits[0::4], b.labels).item(), rel=1e-5)
    hard_aux = sum(F.cross_entropy(q, joint) for q in aux)
    assert out["ls_aux"].item() == pytest.approx(hard_aux.item(), rel=1e-5)
    assert not bool(m.final_store.seen.any())  # written only after the optimiser step
    m.on_step_end(b, 0)
    assert m.final_store.seen.tolist() == [i in b.index.tolist() for i in range(8)]
    p_fin = F.softmax(logits[0::4], 1)
    assert torch.allclose(m.final_store.values[b.index], p_fin, atol=1e-6)
    p_aux0 = F.softmax(aux[0], 1).view(3, 4, 4 * C)
    assert m.aux_stores[0].values.dtype == torch.float16
    assert torch.allclose(m.aux_stores[0].values[b.index].float(), p_aux0, atol=1e-3)
    # later: targets mix one-hot and the stored predictions (same weights -> same logits)
    out2 = m.training_step(b, 1)
    onehot = F.one_hot(b.labels, C).float()
    exp_fin = L.soft_cross_entropy(logits[0::4], 0.5 * onehot + 0.5 * p_fin)
    assert out2["ls_final"].item() == pytest.approx(exp_fin.item(), rel=1e-5)
    joint_oh = F.one_hot(joint, 4 * C).float()
    exp_aux = sum(L.soft_cross_entropy(q, 0.5 * joint_oh + 0.5 * m.aux_stores[l].values[b.index].float().view(12, -1))
                  for l, q in enumerate(aux))
    assert out2["ls_aux"].item() == pytest.approx(exp_aux.item(), rel=1e-4)
    assert out2["ls_aux"].item() != pytest.approx(hard_aux.item(), rel=1e-3)
    assert set(m.state_dict()) >= {"final_store.values", "final_store.seen", "aux_stores.0.values"}


def test_lsskd_optional_terms():
    m = make("lsskd", xlayer_kl=True, feat_l2=True)
    m.on_epoch_start(0)
    out = m.training_step(batch(), 0)
    assert {"ls_final", "ls_aux", "xlayer_kl", "feat", "loss"} <= set(out)
    expect = out["ls_final"] + out["ls_aux"] + 1.0 * out["xlayer_kl"] + 0.03 * out["feat"]
    assert out["loss"].item() == pytest.approx(expect.item(), rel=1e-5)
    assert "xlayer_kl" not in make("lsskd").training_step(batch(), 0)


# ---------------------------------------------------------------- export, training steps, teachers

@pytest.mark.parametrize("backbone", ["conv4", "resnet12_narrow"])
@pytest.mark.parametrize("name", ["lsskd", "byot", "hsakd_teacher"])
def test_export_has_plain_backbone_param_count(name, backbone):
    m = make(name, backbone)
    plain = create_backbone(backbone, num_classes=0, image_size=SIZE)
    n = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert n(m) > n(m.backbone)  # branches exist during training
    exported = m.export_backbone()
    assert n(exported) == n(plain)
    assert exported(torch.randn(2, 3, SIZE, SIZE)).shape == (2, plain.num_features)


def test_hsakd_export_param_count():
    t = make("hsakd_teacher")
    m = make("hsakd", teacher=t)
    plain = create_backbone("conv4", num_classes=0, image_size=SIZE)
    assert sum(p.numel() for p in m.export_backbone().parameters()) == sum(p.numel() for p in plain.parameters())


def _check_step(m, b):
    m.train()
    m.on_epoch_start(0)
    out = m.training_step(b, 0)
    assert "loss" in out and len(out) >= 3
    for k, v in out.items():
        assert torch.isfinite(v).all(), k
    out["loss"].backward()
    m.on_step_end(b, 0)
    bb = [p.grad for p in m.backbone.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in bb)
    assert any(g.abs().sum() > 0 for g in bb)
    if hasattr(m, "aux_classifiers"):
        br = [p.grad for p in m.aux_classifiers.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in br)
    return out


@pytest.mark.parametrize("backbone", ["conv4", "resnet12_narrow"])
def test_training_step_every_method(backbone):
    b = batch()
    teacher = make("hsakd_teacher", backbone)
    out = _check_step(teacher, b)
    assert {"ce", "aux_ce"} <= set(out)
    teacher.zero_grad()
    teacher.eval()
    out = _check_step(make("hsakd", backbone, teacher=teacher), b)
    assert {"ce", "aux_kl", "kl"} <= set(out)
    assert all(p.grad is None for p in teacher.parameters())
    out = _check_step(make("kd", backbone, teacher=make("ce", backbone)), b)
    assert {"ce", "kl"} <= set(out)
    assert out["loss"].item() == pytest.approx(0.1 * out["ce"].item() + 0.9 * out["kl"].item(), rel=1e-5)
    for head in ("connector", "stages"):
        out = _check_step(make("byot", backbone, head=head), b)
        assert {"ce", "aux_ce", "kd_kl", "kd_soft_ce", "feat_hint"} <= set(out)
    out = _check_step(make("lsskd", backbone), b)
    assert {"ls_final", "ls_aux"} <= set(out)


def test_teacher_validation():
    with pytest.raises(ConfigError, match="teacher"):
        make("kd")
    with pytest.raises(ConfigError, match="teacher"):
        make("hsakd")
    with pytest.raises(ConfigError, match="hsakd_teacher"):
        make("hsakd", teacher=make("ce"))
    t = make("hsakd_teacher")
    del t.aux_classifiers[-1]
    with pytest.raises(ConfigError, match="stages"):
        make("hsakd", teacher=t)
    other = METHODS.get("ce")(create_backbone("conv4", num_classes=C + 1, image_size=SIZE), C + 1, 8)
    with pytest.raises(ConfigError, match="same dataset"):
        make("kd", teacher=other)
    with pytest.raises(ConfigError, match="feat_weights"):
        make("byot", feat_weights=(0.03,))


def test_defaults_cite_sources():
    for name in ("lsskd", "byot", "kd", "hsakd", "hsakd_teacher"):
        cls = METHODS.get(name)
        assert cls.__module__.startswith("fsl_lsskd.methods.")
        assert cls.config_cls.__doc__ and "." in cls.config_cls.__doc__
    assert METHODS.get("kd").config_cls().tau == 4.0 and METHODS.get("kd").config_cls().alpha == 0.9
    cfg = METHODS.get("byot").config_cls()
    assert (cfg.ce_weight, cfg.kd_weight, cfg.tau, cfg.feat_weights) == (0.7, 0.3, 3.0, (0.03, 0.03, 0.0))
    cfg = METHODS.get("lsskd").config_cls()
    assert (cfg.alpha_T, cfg.tau, cfg.xlayer_kl, cfg.feat_l2, cfg.lambda_kl, cfg.lambda_feat) == \
        (0.8, 3.0, False, False, 1.0, 0.03)


def test_placeholder_teacher_rebuilds_but_cannot_train():
    # checkpoint.build_method passes nn.Identity() to rebuild a student's architecture for evaluation
    for name in ("kd", "hsakd"):
        m = make(name, teacher=torch.nn.Identity())
        assert sum(p.numel() for p in m.export_backbone().parameters()) == \
            sum(p.numel() for p in create_backbone("conv4", num_classes=0, image_size=SIZE).parameters())
        with pytest.raises(ConfigError, match="--teacher"):
            m.training_step(batch(), 0)


# ---------------------------------------------------------------- fidelity to the reference code (issue values)

def test_byot_feature_hint_is_mmrazor_l2_dist():
    """mmrazor L2Loss(normalize=False, dist=True), weight 0.03: w * sqrt(sum over batch and dims of (f-t)^2)."""
    w = 0.03
    assert w * L.feature_l2_dist(torch.tensor([[3.0]]), torch.tensor([[0.0]])).item() == pytest.approx(0.09)
    assert w * L.feature_l2_dist(torch.eye(2), torch.zeros(2, 2)).item() == pytest.approx(0.0424, abs=5e-5)
    # the former form (mean over the batch of ||f - t||^2) gives 0.27 and 0.03 on the same inputs
    assert w * L.feature_l2(torch.tensor([[3.0]]), torch.tensor([[0.0]])).item() == pytest.approx(0.27)
    assert w * L.feature_l2(torch.eye(2), torch.zeros(2, 2)).item() == pytest.approx(0.03)


def test_byot_connector_head_and_logged_soft_terms():
    m = make("byot")
    assert m.config.head == "connector" and m.config.feat_loss == "dist"
    assert all(hasattr(a, "attention") and hasattr(a, "scala") for a in m.aux_classifiers)
    stages = make("byot", head="stages")
    assert not hasattr(stages.aux_classifiers[0], "attention")
    out = m.training_step(batch(), 0)
    # the logged KL is a KL; the soft cross-entropy differs from it by tau^2 x the teacher's entropy per head
    with torch.no_grad():
        logits = m.backbone(batch().images)
        p = F.softmax(logits / 3.0, 1)
        h = -(p * torch.log(p)).sum(1).mean() * 9.0
    assert (out["kd_soft_ce"] - out["kd_kl"]).item() == pytest.approx(3 * h.item(), rel=1e-4)


def test_lsskd_aux_rotation_reduction_factor_is_four():
    b = batch()
    mean = make("lsskd").training_step(b, 0)
    summed = make("lsskd", aux_rotation_reduction="sum_rotations").training_step(b, 0)
    assert summed["ls_aux"].item() == pytest.approx(4 * mean["ls_aux"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="aux_rotation_reduction"):
        make("lsskd", aux_rotation_reduction="sum")


def test_lsskd_topk_store_rebuilds_targets():
    m = make("lsskd", store_layout="topk", store_top_k=3)
    assert m.aux_stores[0].top_k == 3 and m.final_store.top_k == 3  # C=4 classes, 4C=16 joint classes
    assert make("lsskd").aux_stores[0].top_k == 0  # auto: dense while the stores fit the budget
    tiny_budget = make("lsskd", store_budget_mb=1e-3, store_top_k=3)
    assert tiny_budget.aux_stores[0].top_k == 3 and tiny_budget.final_store.top_k == 3  # auto beyond the budget
    b = batch()
    m.training_step(b, 0)
    m.on_step_end(b, 0)
    rows = m.aux_stores[0].get(b.index)
    assert rows.shape == (3, 4, 16) and torch.allclose(rows.sum(-1), torch.ones(3, 4), atol=3e-3)
