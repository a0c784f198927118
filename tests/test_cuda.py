"""The CUDA path: device placement of the data path, prediction stores, teacher, autocast and scoring (features and readouts).

Marked ``cuda``; every test skips without a CUDA GPU (``pytest -m cuda`` on a GPU machine runs them). Each
compares with the CPU result where the two should agree, so a tensor left on the wrong device or a
precision that silently falls back fails here."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import _cfg, _split  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine (torch.cuda."
                                                                       "is_available() is False)")]


def test_loader_batches_on_the_gpu_match_the_cpu():
    from fsl_lsskd.train import TrainLoader

    data = _split(per_class=20)
    batches = {}
    for device in ("cpu", "cuda"):
        loader = TrainLoader(data.images, data.labels, (0.5,) * 3, (0.25,) * 3, batch_size=16, seed=3, device=device)
        batches[device] = list(loader.epoch_batches(1))
    for a, b in zip(batches["cpu"], batches["cuda"]):
        assert b.images.device.type == "cuda" and b.labels.device.type == "cuda"
        torch.testing.assert_close(b.images.cpu(), a.images, rtol=0, atol=1e-6)
        assert torch.equal(b.labels.cpu(), a.labels) and torch.equal(b.index.cpu(), a.index)


@pytest.mark.parametrize("method", ["ce", "pskd", "byot", "lsskd", "protonet"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_methods_train_on_cuda_at_every_precision(tmp_path, method, precision):
    from fsl_lsskd.train import train

    res = train(_cfg(tmp_path, f"{method}-{precision}", method=method, device="cuda", precision=precision,
                     epochs=2), train_data=_split(n_classes=6, per_class=24))
    assert res.finished and np.isfinite(res.history[-1]["train_loss"])
    assert res.identity["precision"] == precision and res.history[-1]["images_per_s"] > 0


def test_prediction_store_stays_on_the_method_device():
    from fsl_lsskd.methods.stores import PredictionStore

    for top_k in (0, 3):
        store = PredictionStore(10, (8,), top_k=top_k).to("cuda")
        rows = torch.softmax(torch.randn(4, 8, device="cuda"), 1)
        idx = torch.tensor([1, 3, 5, 7])  # indices may come from the CPU sampler
        store.put(idx, rows)
        got = store.get(idx.cuda())
        assert got.device.type == "cuda"
        if top_k == 0:
            torch.testing.assert_close(got, rows)


def test_teacher_trained_on_cpu_teaches_on_cuda(tmp_path):
    from fsl_lsskd.train import train

    data = _split(per_class=16)
    teacher = train(_cfg(tmp_path, "teacher", epochs=1, export=True), train_data=data)
    student = train(_cfg(tmp_path, "student", method="kd", device="cuda", precision="bf16", epochs=1,
                         teacher=str(teacher.model_dir)), train_data=data)
    assert student.finished and np.isfinite(student.history[-1]["train_loss"])


def test_scoring_on_cuda_matches_cpu(tmp_path):
    from fsl_lsskd.backbones import create_backbone
    from fsl_lsskd.eval import evaluate

    torch.manual_seed(0)
    net = create_backbone("conv4", num_classes=0, image_size=16).eval()
    split = _split(n_classes=8, per_class=24, split="test")
    kw = dict(protocols=["5w1s10q_40", "5w5s10q_40"], cache=False, image_size=16,
              readouts=["protonet", "logreg_batched", {"readout": "finetune", "steps": 5, "max_episodes": 4}])
    cpu = evaluate(net, split, device="cpu", **kw)
    gpu = evaluate(net.cuda(), split, device="cuda", **kw)
    for a, b in zip(cpu, gpu):
        assert a.key == b.key
        assert abs(a.mean - b.mean) < 1.0, (a.key, a.mean, b.mean)  # float rounding may flip a rare query
