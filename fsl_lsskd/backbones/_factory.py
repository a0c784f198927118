"""Backbone factory and stage helpers over timm's model API.

Stages (what :func:`forward_stages` returns, in order):

* ``resnet12``, ``resnet12_narrow``, ``conv4``: the 4 residual / conv stages ``layer1..layer4``
  (feature_info entries 0..3; the models have no stem entry).
* ``resnet18_cifar`` and any timm ResNet: ``layer1..layer4`` (feature_info entries 1..4; entry 0 is the stem
  ``act1``, skipped).
* other timm CNNs (EfficientNet, MobileNetV3, ...): every feature_info entry except entry 0 when its
  (original, ImageNet) reduction is 2, i.e. the stem-level entry (``blocks.0`` / ``bn1``) is skipped.

A model may override the choice with a ``fsl_stage_indices`` attribute (indices into ``feature_info``);
:func:`create_backbone` sets it on adapted timm models.

Performance: all models work with ``channels_last`` (1.15-2x faster on CPU for these CNNs, measured on the
project's 2-core machine); ``create_backbone(..., channels_last=True)`` converts the model, the training engine
decides and must convert its input batches too.
"""
from __future__ import annotations

import copy
import logging
import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import ConfigError, UnknownNameError
from ..registry import BACKBONES
from .base import init_weights

log = logging.getLogger(__name__)


def _ensure_registered() -> None:
    # Importing the package registers resnet12/conv4/resnet18_cifar in timm and BACKBONES.
    from . import conv4, resnet12, resnet18_cifar  # noqa: F401


def _small_input_factor(image_size: int) -> int:
    """How much to reduce the stem's downsampling so the final map is >= 4x4 (32 -> 4, 64 -> 2)."""
    if image_size <= 32:
        return 4
    if image_size <= 64:
        return 2
    return 1


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _reduce_stem_stride(model: nn.Module, factor: int) -> List[str]:
    """Turn the first log2(factor) stride-2 ops (in forward/registration order: timm ResNet ``conv1`` then
    ``maxpool``; EfficientNet/MobileNet ``conv_stem`` then the first strided block) into stride 1 (pools are
    removed). Returns the names of the changed modules."""
    todo = int(round(math.log2(factor)))
    changed: List[str] = []
    if todo <= 0:
        return changed
    for name, m in list(model.named_modules()):
        if len(changed) >= todo:
            break
        if isinstance(m, nn.Conv2d) and tuple(m.stride) == (2, 2):
            m.stride = (1, 1)
            changed.append(name)
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) and m.stride in (2, (2, 2)):
            _set_submodule(model, name, nn.Identity())
            changed.append(name)
    return changed


@torch.no_grad()
def _measure_reductions(model: nn.Module, size: int = 64, in_chans: int = 3) -> List[int]:
    """Reductions of every feature_info entry, measured with one dummy forward (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        x = torch.zeros(1, in_chans, size, size, device=p.device, dtype=p.dtype)
        feats = model.forward_intermediates(x, intermediates_only=True)
    finally:
        model.train(was_training)
    return [2 ** int(round(math.log2(size / f.shape[-1]))) for f in feats]


def _is_transformer(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") or hasattr(model, "blocks") and hasattr(model, "cls_token")


def check_backbone_name(name: str) -> None:
    """Raise :class:`UnknownNameError` unless ``name`` is a registered few-shot backbone or a timm model name
    (whether a timm model is a usable CNN is decided by :func:`create_backbone`)."""
    from ..registry import check_names

    check_names(backbones=[name])


PROBE_SIZES = (8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


@torch.no_grad()
def probe(name: str, image_size: int) -> None:
    """Build backbone ``name`` for ``image_size`` and run one forward pass and one stage pass on zeros (eval
    mode); raises whatever the model raises."""
    model = create_backbone(name, num_classes=2, image_size=image_size).eval()
    x = torch.zeros(2, 3, image_size, image_size)
    model(x)
    forward_stages(model, x)


def smallest_image_size(name: str) -> Optional[int]:
    """The smallest of :data:`PROBE_SIZES` at which :func:`probe` passes (None: none does)."""
    for size in PROBE_SIZES:
        try:
            probe(name, size)
            return size
        except Exception:  # noqa: BLE001 - a size the model cannot take
            continue
    return None


def check_image_size(name: str, image_size: int) -> None:
    """Raise :class:`ConfigError` (exit 2) naming the smallest size that works when backbone ``name`` cannot take
    ``image_size`` x ``image_size`` inputs (e.g. ``conv4`` at 8: its four 2x2 poolings leave nothing)."""
    from ..errors import UserError
    from ..utils import first_line

    try:
        probe(name, int(image_size))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own error, reported with the fix
        smallest = smallest_image_size(name)
        fix = (f"the smallest input it takes is {smallest}x{smallest}: pass --image-size {smallest} or larger "
               f"(`image_size:` in a benchmark file)" if smallest else
               f"it takes none of the sizes {PROBE_SIZES[0]}..{PROBE_SIZES[-1]}; use another backbone (e.g. "
               f"{', '.join(BACKBONES.names())})")
        raise ConfigError(f"backbone {name!r} cannot take {image_size}x{image_size} inputs ({first_line(exc)}); "
                          f"{fix}") from None


def create_backbone(name: str, num_classes: int = 0, image_size: int = 32, *, channels_last: bool = False,
                    seed: Optional[int] = None, **kw: Any) -> nn.Module:
    """Build backbone ``name`` (always ``pretrained=False``: there is no network on the benchmark machines).

    * Registered few-shot standards (``fsl-bench ls``: ``resnet12``, ``resnet12_narrow``, ``conv4``,
      ``resnet18_cifar``) are built by ``timm.create_model`` unchanged (they work at any input size).
    * Any other timm CNN (``resnet18``, ``resnet10t``, ``efficientnet_b0``, ``mobilenetv3_small_100``...) is adapted
      to small inputs: for ``image_size <= 32`` the first two stride-2 ops are made stride 1 (timm ResNet: stem
      ``conv1`` stride 1 and no ``maxpool``, total reduction 8 -> 4x4 final map at 32x32); for ``<= 64`` only the
      first (ResNet: ``conv1`` stride 1; EfficientNet/MobileNet: ``conv_stem`` stride 1 -> 4x4 at 64x64).
      ``feature_info`` reductions are re-measured so ``features_only``-style metadata stays correct.
    * Vision transformers are rejected (ConfigError): their patch embedding makes 32x32 maps of 2x2 tokens and
      they have no stage hierarchy for the auxiliary branches.

    ``seed`` makes the weight init reproducible without touching the global RNG (``None``: global RNG).
    ``num_classes > 0`` gives timm's head (the method's final classifier); ``num_classes=0`` makes ``model(x)``
    return the pooled embedding (``embedding_dim(model)``-d). Other ``kw`` go to ``timm.create_model``.
    """
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return create_backbone(name, num_classes, image_size, channels_last=channels_last, **kw)
    import timm

    _ensure_registered()
    if kw.pop("pretrained", False):
        raise ConfigError(f"backbone {name!r}: pretrained weights are not supported (no network on benchmark "
                          f"machines); drop `pretrained` from the config")
    if name in BACKBONES:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)
    elif timm.is_model(name):
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)
        if _is_transformer(model) or not hasattr(model, "forward_intermediates") \
                or not getattr(model, "feature_info", None):
            raise ConfigError(f"backbone {name!r} is not a CNN with timm stage features (vision transformers "
                              f"and models without forward_intermediates are not supported); use one of "
                              f"{', '.join(BACKBONES.names())} or a timm CNN such as resnet18 / efficientnet_b0")
        infos = [dict(d) for d in stage_info(model)]
        stage_idx = tuple(range(1, len(infos))) if len(infos) > 1 and infos[0]["reduction"] <= 2 \
            else tuple(range(len(infos)))
        changed = _reduce_stem_stride(model, _small_input_factor(image_size))
        if changed:
            for d, r in zip(infos, _measure_reductions(model, in_chans=int(kw.get("in_chans", 3)))):
                d["reduction"] = r
            model.feature_info = infos
            log.info("adapted %s to %dx%d inputs: stride 1 at %s", name, image_size, image_size, changed)
        model.fsl_stage_indices = stage_idx
    else:
        raise UnknownNameError(
            f"unknown backbone {name!r}. Registered few-shot backbones: {', '.join(BACKBONES.names())}; any "
            f"timm CNN name also works (see `python -c \"import timm; print(timm.list_models())\"`, "
            f"e.g. resnet18, efficientnet_b0)")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def stage_info(model: nn.Module) -> List[Dict[str, Any]]:
    """timm ``feature_info`` as a list of dicts (num_chs, reduction, module, ...), ALL entries (stem too)."""
    fi = getattr(model, "feature_info", None)
    if fi is None:
        raise ConfigError(f"{type(model).__name__} has no feature_info; build it with create_backbone()")
    if hasattr(fi, "get_dicts"):  # timm FeatureInfo (features_only models)
        return list(fi.get_dicts())
    return list(fi)


def stage_indices(model: nn.Module) -> Tuple[int, ...]:
    """Indices into :func:`stage_info` of the stages :func:`forward_stages` returns (see module doc)."""
    idx = getattr(model, "fsl_stage_indices", None)
    if idx is not None:
        return tuple(idx)
    infos = stage_info(model)
    if len(infos) > 1 and infos[0]["reduction"] <= 2:
        return tuple(range(1, len(infos)))
    return tuple(range(len(infos)))


def stage_modules(model: nn.Module) -> List[nn.Module]:
    """The module of each stage returned by :func:`forward_stages`, in order (feature_info ``module`` names
    resolved with ``model.get_submodule``)."""
    infos = stage_info(model)
    return [model.get_submodule(infos[i]["module"]) for i in stage_indices(model)]


def forward_stages(model: nn.Module, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """One forward pass: ``(stage_maps, logits)``. Stage maps come from timm's ``forward_intermediates``
    (stages as in :func:`stage_indices`); ``logits = model.forward_head(final)`` (pooled embedding when
    ``num_classes == 0``)."""
    final, maps = model.forward_intermediates(x, indices=list(stage_indices(model)))
    return list(maps), model.forward_head(final)


def embedding_dim(model: nn.Module) -> int:
    """Size of ``model(x)`` with ``num_classes=0`` (``head_hidden_size`` where timm has a pre-logits conv,
    e.g. MobileNetV3; otherwise ``num_features``)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def _fresh(modules: Sequence[nn.Module], generator: Optional[torch.Generator]) -> nn.Sequential:
    tail = nn.Sequential(*[copy.deepcopy(m) for m in modules])
    init_weights(tail, generator)
    return tail


def _extra_last_stage(model: nn.Module, last: nn.Module, chs: int) -> nn.Module:
    from timm.models.resnet import ResNet

    if hasattr(model, "make_extra_stage"):  # few-shot standards: one block of the last width, no pooling
        return model.make_extra_stage()
    if isinstance(model, ResNet) and isinstance(last, nn.Sequential) and len(last) > 0:
        # HSAKD: _make_layer(block, 512, layers[3], stride=1) -> len(layer4) copies of its last (C->C, stride 1) block
        blk = last[-1]
        if getattr(blk, "downsample", None) is not None:  # one-block stages (resnet10t): first block is C/2 -> C
            blk = type(blk)(chs, chs // getattr(blk, "expansion", 1))
        return nn.Sequential(*[copy.deepcopy(blk) for _ in range(len(last))])
    # Other CNNs: a conv3x3-BN-ReLU at the final width (their last stage does not map C -> C).
    return nn.Sequential(nn.Conv2d(chs, chs, 3, 1, 1, bias=False), nn.BatchNorm2d(chs), nn.ReLU(inplace=True))


def branch_tail(model: nn.Module, stage_index: int, seed: Optional[int] = None) -> nn.Sequential:
    """Freshly initialised copy of the stages after ``stage_index`` (0-based into ``forward_stages``'s list), as
    an ``nn.Sequential``: the feature extractor of an LSSKD/HSAKD auxiliary classifier (winycg/HSAKD
    ``models/resnet.py``; docs/methods.md, "Auxiliary classifiers"). For the last stage it is one extra last-stage
    block at stride 1. ``branch_tail(model, l)(stage_maps[l])`` has the last stage's channel count
    (``stage_info(model)[stage_indices(model)[-1]]['num_chs']``) and spatial size. ``seed`` seeds the init."""
    idx = stage_indices(model)
    n = len(idx)
    if not 0 <= stage_index < n:
        raise ConfigError(f"stage_index {stage_index} out of range: {type(model).__name__} has {n} stages (0..{n - 1})")
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    infos = stage_info(model)
    mods = stage_modules(model)
    if stage_index == n - 1:
        tail = nn.Sequential(_extra_last_stage(model, mods[-1], int(infos[idx[-1]]["num_chs"])))
        init_weights(tail, gen)
        return tail
    names = [infos[i]["module"] for i in idx]
    pat = [re.fullmatch(r"(.*)\.(\d+)", s) for s in names]
    if all(pat) and len({p.group(1) for p in pat}) == 1:
        # EfficientNet/MobileNet: stages are picked from one block list; copy every group in between too.
        parent = model.get_submodule(pat[0].group(1))
        lo, hi = int(pat[stage_index].group(2)) + 1, int(pat[-1].group(2)) + 1
        return _fresh([parent[i] for i in range(lo, hi)], gen)
    return _fresh(mods[stage_index + 1:], gen)
