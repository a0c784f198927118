"""CE and PS-KD losses on hand-computed values; the prediction store."""
from __future__ import annotations

import math

import pytest
import torch

from fsl_lsskd.methods.stores import PredictionStore
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


def test_topk_store_keeps_the_largest_probabilities_and_their_mass():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(6, 50) * 3, dim=1)
    s = PredictionStore(6, (50,), top_k=5)
    s.put(torch.arange(6), probs)
    got = s.get(torch.arange(6))
    top = torch.topk(probs, 5, dim=1)
    # the kept entries (to float16 precision), the rest share the remaining mass evenly: rows sum to 1
    torch.testing.assert_close(got.gather(1, top.indices), top.values, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got.sum(1), torch.ones(6), atol=2e-3, rtol=0)
    rest = (1 - top.values.sum(1, keepdim=True)) / 45
    mask = torch.ones_like(probs, dtype=torch.bool).scatter_(1, top.indices, False)
    torch.testing.assert_close(got[mask].view(6, 45), rest.expand(6, 45), atol=2e-3, rtol=1e-2)
    assert s.bytes_per_sample == 5 * 2 + 5 * 2 + 1  # float16 values + int16 indices + seen flag
    assert PredictionStore(6, (50,)).bytes_per_sample == 50 * 4 + 1
    aux = PredictionStore(3, (4, 40), top_k=4)  # LSSKD layout: one top-k per rotation row
    aux.put(torch.arange(3), torch.softmax(torch.randn(3, 4, 40), -1))
    assert aux.get(torch.arange(3)).shape == (3, 4, 40) and set(aux.state_dict()) == {"values", "indices", "seen"}


def test_store_methods_train_and_store_every_sample_every_epoch(tmp_path):
    """N=10, batch 4: the engine keeps the short last batch for store methods, so row 9 is trained on and stored
    in epoch 0 and gets a softened target in epoch 1 (dropping it would give it a one-hot target)."""
    import numpy as np

    from fsl_lsskd.data.base import SplitData
    from fsl_lsskd.train import TrainConfig
    from fsl_lsskd.train.engine import build_run, prepare_data

    rng = np.random.default_rng(0)
    data = SplitData(rng.integers(0, 255, (10, 16, 16, 3)).astype(np.uint8), np.repeat(np.arange(2), 5),
                     ("a", "b"), "synthetic", "train", "f")
    cfg = TrainConfig(method="pskd", dataset="synthetic", image_size=16, epochs=2, batch_size=4, heldout=0.0,
                      validation=None, mlflow=False, out_dir=str(tmp_path))
    method, mcfg, loader = build_run(cfg, prepare_data(cfg, train_data=data))
    batches = list(loader.epoch_batches(0))
    assert [len(b.index) for b in batches] == [4, 4, 2]
    method.on_epoch_start(0)
    for b in batches:
        method.training_step(b, 0)
        method.on_step_end(b, 0)
    assert bool(method.store.seen.all())
    method.on_epoch_start(1)  # row 9's epoch-1 target, as training_step forms it: softened, not one-hot
    label9 = torch.tensor([int(data.labels[9])])
    previous = method.store.get(torch.tensor([9]), default=torch.nn.functional.one_hot(label9, 2).float())
    target = pskd_targets(label9, previous, method.alpha, 2)
    assert method.alpha > 0 and 0.0 < float(target.max()) < 1.0 and torch.allclose(target.sum(1), torch.ones(1))
    ce_loader = build_run(cfg.__class__(**{**cfg.__dict__, "method": "ce"}), prepare_data(cfg, train_data=data))[2]
    assert [len(b.index) for b in ce_loader.epoch_batches(0)] == [4, 4]  # RFS drops it
