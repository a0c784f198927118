"""Backbones: the few-shot standards registered in timm (``resnet12``, ``resnet12_narrow``, ``conv4``,
``resnet18_cifar``) and any timm CNN adapted to small inputs, plus stage helpers for auxiliary classifiers.
See ``_factory`` for which stages :func:`forward_stages` returns per model."""
from . import conv4, resnet12, resnet18_cifar  # noqa: F401  (register in timm + BACKBONES)
from ._factory import (stage_tail, check_backbone_name, check_image_size, create_backbone, embedding_dim,
                       forward_stages, smallest_image_size, stage_indices, stage_info, stage_modules,
                       tail_modules)
from .base import StagedNet, init_weights

__all__ = ["create_backbone", "check_backbone_name", "check_image_size", "smallest_image_size", "forward_stages",
           "stage_info", "stage_indices", "stage_modules", "stage_tail", "tail_modules", "embedding_dim", "StagedNet",
           "init_weights"]
