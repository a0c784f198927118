"""ResNet-12, the few-shot standard backbone (Lee et al. 2019, MetaOptNet, kjunelee/MetaOptNet
``models/ResNet12_embedding.py``; Tian et al. 2020, RFS, WangYueFt/rfs ``models/resnet.py:resnet12``).

Four residual blocks; each = 3 x (conv3x3-BN-LeakyReLU 0.1) with a 1x1 conv+BN shortcut, LeakyReLU after the
add, then max-pool 2. Widths 64-160-320-640 (640-d pooled embedding, ~12.4 M parameters); the narrow variant
``resnet12_narrow`` (32-80-160-320) is for CPU profiles. DropBlock is not implemented; ``drop_rate`` (default
0) is plain dropout on the pooled embedding. Registered in timm: ``timm.create_model("resnet12")``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ..registry import BACKBONES
from .base import StagedNet, init_weights


class ResNet12Block(nn.Module):
    """RFS ``BasicBlock``: 3 x conv3x3-BN(-LeakyReLU), 1x1 conv+BN shortcut, LeakyReLU, max-pool."""

    def __init__(self, in_chs: int, out_chs: int, pool: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.conv3 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.act = nn.LeakyReLU(0.1)
        self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, 1, 0, bias=False), nn.BatchNorm2d(out_chs))
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x)
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.pool(self.act(x + shortcut))


class ResNet12(StagedNet):
    """ResNet-12 (MetaOptNet / RFS); feature_info: layer1..4 at reductions 2, 4, 8, 16."""

    stage_names = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, widths: Sequence[int] = (64, 160, 320, 640), num_classes: int = 0, in_chans: int = 3,
                 drop_rate: float = 0.0, global_pool: str = "avg", **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"ResNet12 got unexpected arguments {sorted(kwargs)}")
        widths = tuple(int(w) for w in widths)
        if len(widths) != 4:
            raise ValueError(f"ResNet12 needs 4 widths, got {widths}")
        self.widths = widths
        self.feature_info = []
        prev = in_chans
        for i, (name, w) in enumerate(zip(self.stage_names, widths)):
            setattr(self, name, ResNet12Block(prev, w))
            self.feature_info.append(dict(num_chs=w, reduction=2 ** (i + 1), module=name))
            prev = w
        self._init_head(widths[-1], num_classes, global_pool, drop_rate)
        init_weights(self)

    def make_extra_stage(self) -> nn.Module:
        return ResNet12Block(self.widths[-1], self.widths[-1], pool=False)


def _cfg(**kw):
    return dict(url="", num_classes=0, input_size=(3, 32, 32), pool_size=(2, 2), crop_pct=1.0,
                interpolation="bilinear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                first_conv="layer1.conv1", classifier="fc", **kw)


default_cfgs = generate_default_cfgs({
    "resnet12.untrained": _cfg(),
    "resnet12_narrow.untrained": _cfg(),
})


def _create(variant: str, pretrained: bool, **kwargs) -> ResNet12:
    return build_model_with_cfg(ResNet12, variant, pretrained,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)


@register_model
def resnet12(pretrained: bool = False, **kwargs) -> ResNet12:
    """ResNet-12 64-160-320-640, 640-d embedding (MetaOptNet/RFS few-shot standard)."""
    return _create("resnet12", pretrained, **kwargs)


@register_model
def resnet12_narrow(pretrained: bool = False, **kwargs) -> ResNet12:
    """ResNet-12 narrow 32-80-160-320, 320-d embedding (CPU profiles)."""
    kwargs.setdefault("widths", (32, 80, 160, 320))
    return _create("resnet12_narrow", pretrained, **kwargs)


BACKBONES.register("resnet12")(resnet12)
BACKBONES.register("resnet12_narrow")(resnet12_narrow)
