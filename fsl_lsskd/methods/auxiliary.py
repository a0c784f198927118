"""Auxiliary branches and rotation expansion shared by LSSKD, HSAKD and BYOT.

Branch ``l`` = ``branch_tail(backbone, l)`` (fresh copy of the stages after ``l``; an extra last-width
stride-1 stage for the last one) + GAP + ``Linear(C_final, out)`` (winycg/HSAKD models/resnet.py;
/work/shared/reference/method.md §1.2). Rotation expansion: HSAKD train_student_cifar.py."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from ..backbones import branch_tail, forward_stages, stage_indices, stage_info


def num_stages(backbone: nn.Module) -> int:
    return len(stage_indices(backbone))


def final_width(backbone: nn.Module) -> int:
    return int(stage_info(backbone)[stage_indices(backbone)[-1]]["num_chs"])


class AuxBranch(nn.Module):
    """Feature extractor (``branch_tail``) + global average pooling + linear classifier.

    ``forward(x) -> (logits, pooled)``; ``pooled`` is the pre-FC feature (BYOT/LSSKD feature-L2 terms)."""

    def __init__(self, backbone: nn.Module, stage: int, out_features: int, seed: Optional[int] = None) -> None:
        super().__init__()
        self.stage = int(stage)
        self.features = branch_tail(backbone, stage, seed=seed)
        self.fc = nn.Linear(final_width(backbone), int(out_features))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        pooled = self.features(x).mean(dim=(2, 3))
        return self.fc(pooled), pooled


def build_branches(backbone: nn.Module, out_features: int, stages: Optional[List[int]] = None,
                   seed: Optional[int] = None) -> nn.ModuleList:
    """One :class:`AuxBranch` per stage (all stages by default)."""
    stages = list(range(num_stages(backbone))) if stages is None else list(stages)
    return nn.ModuleList(AuxBranch(backbone, l, out_features, None if seed is None else seed + l) for l in stages)


def rotate_expand(images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Expand ``B`` images to ``4B``: row ``4i+k`` is ``rot90(images[i], k)`` over (H, W), joint label
    ``4*y_i + k`` (winycg/HSAKD train_student_cifar.py: ``torch.stack([torch.rot90(x, k, (2, 3)) for k in
    range(4)], 1).view(-1, C, H, W)``; ``targets*4 + k``). Needs square images."""
    b, c, h, w = images.shape
    if h != w:
        raise ValueError(f"rotation expansion needs square images, got {h}x{w}")
    x = torch.stack([torch.rot90(images, k, (2, 3)) for k in range(4)], dim=1).reshape(4 * b, c, h, w)
    y = torch.stack([labels * 4 + k for k in range(4)], dim=1).reshape(-1)
    return x, y


def run_with_branches(backbone: nn.Module, branches: nn.ModuleList, x: torch.Tensor):
    """One backbone pass + every branch: ``(final_logits, [aux_logits], [aux_pooled])``."""
    maps, logits = forward_stages(backbone, x)
    outs = [br(maps[br.stage]) for br in branches]
    return logits, [o[0] for o in outs], [o[1] for o in outs]
