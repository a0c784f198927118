"""Auxiliary classifiers and the rotation expansion shared by LSSKD, HSAKD and BYOT.

An auxiliary classifier ``l`` reads the output map of backbone stage ``l`` and classifies it: a feature
extractor (``stage_tail``: a freshly initialised copy of the stages after ``l``; one extra last-width,
stride-1 stage for the last one), global average pooling and a linear layer (winycg/HSAKD
``models/resnet.py``; docs/methods.md, "Auxiliary classifiers"). They exist during training only: every
method's :meth:`~fsl_lsskd.methods.base.Method.export_backbone` drops them. Rotation expansion: HSAKD
``train_student_cifar.py``."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from ..backbones import stage_tail, forward_stages, stage_indices, stage_info


def num_stages(backbone: nn.Module) -> int:
    return len(stage_indices(backbone))


def final_width(backbone: nn.Module) -> int:
    return int(stage_info(backbone)[stage_indices(backbone)[-1]]["num_chs"])


class AuxiliaryClassifier(nn.Module):
    """Feature extractor (``stage_tail`` of the backbone) + global average pooling + linear classifier.

    ``forward(stage_map [B, C_l, H_l, W_l]) -> (logits [B, out_features], pooled [B, C_final])``; ``pooled``
    is the pre-FC feature (BYOT/LSSKD feature-L2 terms)."""

    def __init__(self, backbone: nn.Module, stage: int, out_features: int, seed: Optional[int] = None) -> None:
        super().__init__()
        self.stage = int(stage)
        self.features = stage_tail(backbone, stage, seed=seed)
        self.fc = nn.Linear(final_width(backbone), int(out_features))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        pooled = self.features(x).mean(dim=(2, 3))
        return self.fc(pooled), pooled


def build_aux_classifiers(backbone: nn.Module, out_features: int, stages: Optional[List[int]] = None,
                          seed: Optional[int] = None) -> nn.ModuleList:
    """One :class:`AuxiliaryClassifier` per stage (every stage by default), each with ``out_features``
    outputs."""
    stages = list(range(num_stages(backbone))) if stages is None else list(stages)
    return nn.ModuleList(AuxiliaryClassifier(backbone, l, out_features, None if seed is None else seed + l)
                         for l in stages)


def rotate_expand(images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Expand ``B`` images ``[B, C, H, W]`` to ``4B``: row ``4i+k`` is ``rot90(images[i], k)`` over (H, W),
    joint label ``4*y_i + k`` (winycg/HSAKD train_student_cifar.py: ``torch.stack([torch.rot90(x, k, (2, 3))
    for k in range(4)], 1).view(-1, C, H, W)``; ``targets*4 + k``). A channels_last batch (the engine's) gives a
    channels_last expansion, so the backbone runs the 4B rows in the layout it runs CE's batch in (the values
    are the same either way). Raises ``ValueError`` for non-square images."""
    b, c, h, w = images.shape
    if h != w:
        raise ValueError(f"rotation expansion needs square images, got {h}x{w}")
    x = torch.stack([torch.rot90(images, k, (2, 3)) for k in range(4)], dim=1).reshape(4 * b, c, h, w)
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.stack([labels * 4 + k for k in range(4)], dim=1).reshape(-1)
    return x, y


def run_with_aux_classifiers(backbone: nn.Module, aux_classifiers: nn.ModuleList, x: torch.Tensor):
    """One backbone pass and every auxiliary classifier on its stage's map:
    ``(final_logits, [aux_logits], [aux_pooled])``."""
    maps, logits = forward_stages(backbone, x)
    outs = [aux(maps[aux.stage]) for aux in aux_classifiers]
    return logits, [o[0] for o in outs], [o[1] for o in outs]
