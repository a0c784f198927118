"""Training-time checks of a backbone, handed to the training engine: few-shot accuracy on validation
episodes and base-class accuracy on held-out training images.

:func:`fewshot_validator` scores ProtoNet on the standard (published) val-split episodes of a protocol
through :func:`fsl_lsskd.eval.evaluate`, so checkpoint monitoring uses the test-time protocol.
:func:`base_accuracy` is the seed papers' metric (top-1 on held-out base-class images): the method's own
classifier when it has one, else the nearest class mean of the training features (episodic methods, whose
backbone has no base-class head). Both return percent.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..inputs import InputSpec
from ..protocol import EpisodeProtocol


def fewshot_validator(val_split, protocol: EpisodeProtocol, mean: Sequence[float], std: Sequence[float],
                      image_size: int, device="cpu", own_readout: Optional[str] = None
                      ) -> Callable[[nn.Module], Dict[str, float]]:
    """``validate(backbone) -> metrics`` on ``val_split``: ``val_fewshot_acc`` and ``val_fewshot_ci95`` (ProtoNet
    on the frozen features, percent and points, every method), plus ``val_<own_readout>_acc``/``_ci95`` when the
    method has a readout of its own (MAML's ``maml_finetune``: the validation its paper uses; ``backbone`` is then
    the method's export, which carries the method, :meth:`fsl_lsskd.methods.maml.MAML.export_backbone`)."""
    from .scoring import evaluate

    readouts = ["protonet"] + ([own_readout] if own_readout else [])

    def validate(backbone: nn.Module) -> Dict[str, float]:
        res = evaluate(backbone, val_split, protocols=[protocol], readouts=readouts, mean=mean, std=std,
                       image_size=image_size, device=device, cache=False)
        out = {"val_fewshot_acc": float(res[0].mean), "val_fewshot_ci95": float(res[0].ci95)}
        for r in res[1:]:
            out[f"val_{r.readout}_acc"] = float(r.mean)
            out[f"val_{r.readout}_ci95"] = float(r.ci95)
        return out

    return validate


@torch.no_grad()
def class_logits(net: nn.Module, images: np.ndarray, mean: Sequence[float], std: Sequence[float],
                 device="cpu", batch_size: int = 512) -> torch.Tensor:
    """``net`` outputs (float32, CPU) for uint8 ``[N, H, W, 3]`` images normalised with ``mean``/``std`` at
    their own size (:meth:`fsl_lsskd.inputs.InputSpec.prepare`; the images are at the training size already)."""
    spec = InputSpec(mean, std)
    outs = []
    for i in range(0, len(images), batch_size):
        x = spec.prepare(images[i:i + batch_size], device)
        outs.append(net(x.contiguous(memory_format=torch.channels_last)).float().cpu())
    return torch.cat(outs) if outs else torch.zeros(0)


def base_accuracy(method, heldout, train=None, mean: Sequence[float] = (0.5,) * 3,
                  std: Sequence[float] = (0.25,) * 3, device="cpu") -> Optional[float]:
    """Top-1 accuracy (%) of held-out base-class images ``heldout`` (:class:`SplitData`): the method's base
    classifier when its backbone has one (``num_classes`` outputs), else the nearest class mean of the
    L2-normalised training features of ``train`` (None when neither is available)."""
    if heldout is None or len(heldout) == 0:
        return None
    was = method.training
    method.eval()
    try:
        out = class_logits(method.backbone, heldout.images, mean, std, device)
        if out.ndim == 2 and out.shape[1] == method.num_classes and not getattr(method, "episodic", False):
            pred = out.argmax(1).numpy()
        elif train is not None and len(train):
            feats = nn.functional.normalize(class_logits(method.backbone, train.images, mean, std, device), dim=1)
            labels = torch.as_tensor(np.asarray(train.labels))
            centroids = torch.zeros(method.num_classes, feats.shape[1]).index_add_(0, labels, feats)
            centroids = nn.functional.normalize(centroids / torch.bincount(labels, minlength=method.num_classes)
                                                .clamp_min(1).unsqueeze(1), dim=1)
            pred = (nn.functional.normalize(out, dim=1) @ centroids.T).argmax(1).numpy()
        else:
            return None
    finally:
        method.train(was)
    return 100.0 * float((pred == np.asarray(heldout.labels)).mean())
