"""ResNet-18 for small images (He et al. 2016 CIFAR variant as in kuangliu/pytorch-cifar and
winycg/HSAKD ``models/resnet.py``): timm ``ResNet`` with a 3x3 stride-1 stem conv and no max-pool, so
32x32 inputs end at 4x4. ``feature_info`` reductions are divided by 4 (act1 1, layer1 1, layer2 2, layer3 4,
layer4 8). Registered in timm: ``timm.create_model("resnet18_cifar")``.
"""
from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn


from ..registry import BACKBONES


class ResNetCifar(ResNet):
    """timm ResNet with a 3x3 stride-1 stem and no max-pool (small-image ResNet)."""

    # forward_stages: the 4 residual stages (feature index 0 is the stem at the same resolution as layer1).
    fsl_stage_indices = (1, 2, 3, 4)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        in_chans = kwargs.get("in_chans", 3)
        stem_chs = self.conv1.out_channels
        self.conv1 = nn.Conv2d(in_chans, stem_chs, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()
        for info in self.feature_info:
            info["reduction"] = max(1, info["reduction"] // 4)


default_cfgs = generate_default_cfgs({
    "resnet18_cifar.untrained": dict(url="", num_classes=0, input_size=(3, 32, 32), pool_size=(4, 4),
                                     crop_pct=1.0, interpolation="bilinear", mean=(0.485, 0.456, 0.406),
                                     std=(0.229, 0.224, 0.225), first_conv="conv1", classifier="fc"),
})


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """ResNet-18 with 3x3 stride-1 stem, no max-pool (small images), 512-d embedding."""
    kwargs = dict(dict(block=BasicBlock, layers=(2, 2, 2, 2)), **kwargs)
    return build_model_with_cfg(ResNetCifar, "resnet18_cifar", pretrained,
                                feature_cfg=dict(out_indices=(1, 2, 3, 4)), **kwargs)


BACKBONES.register("resnet18_cifar")(resnet18_cifar)
