"""Conv-4 (Vinyals et al. 2016; Snell et al. 2017, jakesnell/prototypical-networks ``protonets/models/few_shot.py``):
4 x [conv3x3 64 - BN - ReLU - max-pool 2] (run as conv - BN - max-pool - ReLU: the same function and gradients,
bit for bit, see :func:`conv_block`).

The original flattens the last map (84x84 input -> 5x5x64 = 1600-d embedding). Here the embedding is the
global average pool of the last map (64-d) so any input size works; ``num_features`` = 64. ~113 k parameters.
Registered in timm: ``timm.create_model("conv4")``.
"""
from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ..registry import BACKBONES
from .base import StagedNet, init_weights


def conv_block(in_chs: int, out_chs: int, pool: bool = True) -> nn.Sequential:
    """conv3x3 - BN - ReLU - max-pool 2, run as conv - BN - max-pool - ReLU: max-pooling and ReLU commute exactly
    (ReLU is monotonic), so outputs, gradients and whole trainings are bit-identical
    (``tests/test_backbones.py``), and the ReLU and its backward touch 4x fewer elements (a Conv-4 CE training step
    1.06x faster on 1 CPU thread, docs/performance.md). No parameter moves: the state-dict keys are the same."""
    if not pool:
        return nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, 1, 1), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True))
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, 1, 1), nn.BatchNorm2d(out_chs), nn.MaxPool2d(2),
                         nn.ReLU(inplace=True))


class Conv4(StagedNet):
    """Conv-4; feature_info: layer1..4 at reductions 2, 4, 8, 16; GAP embedding (original: flatten)."""

    stage_names = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, width: int = 64, num_classes: int = 0, in_chans: int = 3, drop_rate: float = 0.0,
                 global_pool: str = "avg", **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"Conv4 got unexpected arguments {sorted(kwargs)}")
        self.width = int(width)
        self.feature_info = []
        prev = in_chans
        for i, name in enumerate(self.stage_names):
            setattr(self, name, conv_block(prev, self.width))
            self.feature_info.append(dict(num_chs=self.width, reduction=2 ** (i + 1), module=name))
            prev = self.width
        self._init_head(self.width, num_classes, global_pool, drop_rate)
        init_weights(self)

    def make_extra_stage(self) -> nn.Module:
        return conv_block(self.width, self.width, pool=False)


default_cfgs = generate_default_cfgs({
    "conv4.untrained": dict(url="", num_classes=0, input_size=(3, 32, 32), pool_size=(2, 2), crop_pct=1.0,
                            interpolation="bilinear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                            first_conv="layer1.0", classifier="fc"),
})


@register_model
def conv4(pretrained: bool = False, **kwargs) -> Conv4:
    """Conv-4 (4 x conv64-BN-ReLU-pool, Snell et al. 2017), 64-d GAP embedding."""
    return build_model_with_cfg(Conv4, "conv4", pretrained,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)


BACKBONES.register("conv4")(conv4)
