"""CE and PS-KD losses on hand-computed values; the prediction store."""
from __future__ import annotations

import math

import pytest
import torch

from fsl_lsskd.methods._stores import PredictionStore
from fsl_lsskd.methods.base import Batch
from fsl_lsskd.methods.ce import CE, CEConfig, CELoss
from fsl_lsskd.methods.pskd import PSKD, PSKDConfig, SoftTargetCrossEntropy, pskd_alpha, pskd_targets


def test_ce_loss_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), 0.0]])
    labels = torch.tensor([1, 1])
    # p(y=1) = 3/4 and 1/3 -> mean(-log) = (log(4/3) + log 3) / 2
    expected = (math.log(4 / 3) + math.log(3)) / 2
    assert CELoss()(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_rfs_defaults():
    c = CEConfig()
    assert (c.lr, c.momentum, c.weight_decay, c.batch_size, c.epochs) == (0.05, 0.9, 5e-4, 64, 100)
    assert [round(f * c.epochs) for f in c.lr_milestones] == [60, 80]
    p = PSKDConfig()
    assert (p.lr, p.nesterov, p.batch_size, p.epochs, p.alpha_T) == (0.1, True, 128, 300, 0.8)
    assert [round(f * p.epochs) for f in p.lr_milestones] == [150, 225]


def test_pskd_alpha_schedule():
    assert pskd_alpha(0.8, 0, 4) == pytest.approx(0.2)
    assert pskd_alpha(0.8, 1, 4) == pytest.approx(0.4)
    assert pskd_alpha(0.8, 3, 4) == pytest.approx(0.8)  # last epoch reaches alpha_T
    assert pskd_alpha(0.8, 0, 300) == pytest.approx(0.8 / 300)


def test_pskd_target_mixing_and_loss():
    labels = torch.tensor([0, 2])
    prev = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
    t = pskd_targets(labels, prev, 0.4, 3)
    expected = torch.tensor([[0.6 + 0.2, 0.1, 0.1], [0.04, 0.08, 0.6 + 0.28]])
    torch.testing.assert_close(t, expected)
    assert torch.allclose(t.sum(1), torch.ones(2))
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]])
    # row 0: uniform -> log 3; row 1: log_softmax = [log(2/4), log(1/4), log(1/4)]
    row1 = -(0.04 * math.log(0.5) + 0.08 * math.log(0.25) + 0.88 * math.log(0.25))
    assert SoftTargetCrossEntropy()(logits, t).item() == pytest.approx((math.log(3) + row1) / 2, rel=1e-6)


def test_prediction_store_roundtrip_and_default():
    s = PredictionStore(5, (3,), dtype=torch.float16)
    onehot = torch.eye(3)[torch.tensor([0, 1])]
    got = s.get(torch.tensor([1, 3]), default=onehot)
    torch.testing.assert_close(got, onehot)  # unseen rows -> default
    s.put(torch.tensor([3]), torch.tensor([[0.25, 0.5, 0.25]]))
    got = s.get(torch.tensor([1, 3]), default=onehot)
    torch.testing.assert_close(got, torch.tensor([[1.0, 0, 0], [0.25, 0.5, 0.25]]))
    assert s.seen.tolist() == [False, False, False, True, False]
    sd = s.state_dict()
    assert set(sd) == {"values", "seen"} and sd["values"].dtype == torch.float16
    multi = PredictionStore(4, (4, 8))
    multi.put(torch.tensor([2]), torch.ones(1, 4, 8))
    assert multi.get(torch.tensor([2])).shape == (1, 4, 8)


class _Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_pskd_step_uses_onehot_then_stored_predictions():
    torch.manual_seed(0)
    m = PSKD(_Lin(), 3, 6, PSKDConfig(epochs=2))
    b = Batch(torch.randn(2, 4), torch.tensor([0, 1]), torch.tensor([4, 1]))
    m.on_epoch_start(0)
    assert m.alpha == pytest.approx(0.4)
    out = m.training_step(b, 0)
    # epoch 0: store empty -> targets one-hot -> plain CE
    assert out["loss"].item() == pytest.approx(torch.nn.functional.cross_entropy(m(b.images), b.labels).item(),
                                               rel=1e-5)
    m.on_step_end(b, 0)
    probs = torch.softmax(m(b.images), 1)
    torch.testing.assert_close(m.store.get(b.index), probs.detach())
    m.on_epoch_start(1)
    out = m.training_step(b, 1)
    tgt = 0.2 * torch.eye(3)[b.labels] + 0.8 * probs.detach()
    expected = torch.sum(-tgt * torch.log_softmax(m(b.images), 1), 1).mean()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert "store.values" in m.state_dict()


def test_ce_training_step():
    m = CE(_Lin(), 3, 6)
    b = Batch(torch.randn(2, 4), torch.tensor([0, 2]), torch.tensor([0, 1]))
    out = m.training_step(b, 0)
    assert set(out) == {"loss", "ce"} and out["loss"].requires_grad
