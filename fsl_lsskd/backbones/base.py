"""The few-shot backbones' shared pieces: weight init and :class:`StagedNet`, the timm model contract that
a staged few-shot backbone subclasses (registered with ``@register_model`` and ``BACKBONES.register``)."""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models._features import feature_take_indices
from torch import nn


def init_weights(module: nn.Module, generator: Optional[torch.Generator] = None) -> None:
    """Init as the references (MetaOptNet/RFS ``resnet12``, Snell et al. Conv-4): kaiming-normal
    (fan_out, relu) for convs, BN weight 1 / bias 0 (running stats reset), linear bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
                m.reset_running_stats()
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class StagedNet(nn.Module):
    """Base of the few-shot backbones: ``layer1..layerN`` stages (registered in forward order so timm's
    ``FeatureListNet`` works), then global average pooling and an optional linear classifier ``fc``.

    Implements timm's model contract: ``num_features``, ``num_classes``, ``feature_info``,
    ``forward_features``, ``forward_head(x, pre_logits)``, ``get_classifier``, ``reset_classifier``,
    ``forward_intermediates`` (same signature and index semantics as timm ``ResNet``).
    """

    stage_names: Tuple[str, ...] = ()
    # forward_stages: every residual/conv stage (there is no stem entry in feature_info).
    fsl_stage_indices: Tuple[int, ...] = (0, 1, 2, 3)

    def _init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
        self.num_features = self.head_hidden_size = num_features
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False

    # --- timm contract -------------------------------------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            init_weights(self.fc)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def stages(self) -> List[nn.Module]:
        return [getattr(self, n) for n in self.stage_names]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages():
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """As timm ``ResNet.forward_intermediates``: feature index i = output of stage i (no stem entry;
        ``norm`` is accepted for API compatibility, there is no final norm)."""
        assert output_fmt in ("NCHW",), "Output shape must be NCHW."
        stages = self.stages()
        take_indices, max_index = feature_take_indices(len(stages), indices)
        intermediates = []
        if stop_early:
            stages = stages[:max_index + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stage_names), indices)
        for name in self.stage_names[max_index + 1:]:
            setattr(self, name, nn.Identity())
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def make_extra_stage(self) -> nn.Module:
        """One extra last-stage block at the final width, stride 1 (the input of HSAKD's auxiliary classifier after the last stage)."""
        raise NotImplementedError
