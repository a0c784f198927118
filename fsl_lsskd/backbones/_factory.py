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

Small inputs: :func:`create_backbone` changes the strides of a timm CNN consistently (every strided op of a
resolution step, shortcuts included) and verifies the result; models that are not CNNs or cannot be adapted are
refused (:class:`~fsl_lsskd.errors.ConfigError`). :func:`check_image_size` refuses an input size below the
smallest the backbone takes, naming it.

Performance: all models work with ``channels_last`` (1.15-2x faster on CPU for these CNNs, measured on the
project's 2-core machine); ``create_backbone(..., channels_last=True)`` converts the model, the training engine
decides and must convert its input batches too.
"""
from __future__ import annotations

import copy
import logging
import math
import re
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError, UnknownNameError, UserError
from ..registry import BACKBONES
from .base import init_weights

log = logging.getLogger(__name__)


def _ensure_registered() -> None:
    # Importing the package registers resnet12/conv4/resnet18_cifar in timm and BACKBONES.
    from . import conv4, resnet12, resnet18_cifar  # noqa: F401


def _small_input_factor(image_size: int) -> int:
    """How much to reduce a timm CNN's downsampling so the final map is >= 4x4 (32 -> 4, 64 -> 2)."""
    if image_size <= 32:
        return 4
    if image_size <= 64:
        return 2
    return 1


#: Input sizes of the dummy forward that locates every strided op (powers of two, so each halving is exact); the
#: first the original model takes is used.
TRACE_SIZES = (64, 128, 224)
#: Where to turn for a model that is refused.
ALTERNATIVES = "resnet18, resnet10t, efficientnet_b0, mobilenetv3_small_100 or the few-shot standards conv4 / resnet12"

# Module types that mix tokens over all positions (self-attention, token MLPs, recurrences): such a model is not a
# CNN. Matched against class names; channel attention (SE, ECA, CBAM, ResNeSt's split attention) is allowed.
_NOT_CNN_CLASS = re.compile(r"Attention|Attn|MultiQuery|MHSA|GPSA|SHSA|LiteMLA|LambdaLayer|Transformer|LSTM|GRU|RNN"
                            r"|^MixerBlock$|^SpatialGatingUnit$")
_CHANNEL_ATTN = re.compile(r"SplitAttn|SqueezeExcite|SEModule|EcaModule|CecaModule|CbamModule|LightCbamModule"
                           r"|GatherExcite|GlobalContext|EffectiveSEModule|SelectiveKernel|CoordAttn|ChannelAttn"
                           r"|SpatialAttn|LightChannelAttn|LightSpatialAttn|EcaAttn|SEAttn")


def _not_cnn_reason(model: nn.Module) -> Optional[str]:
    """Why ``model`` is not a convolutional network (None: it is one): a class token / position embedding (vision
    transformers), self-attention or token-mixing MLP / recurrent layers anywhere in the trunk (hybrids such as
    CoaT, LeViT, ConViT, MaxViT, MobileViT, BoTNet; MLP-Mixer, ResMLP, gMLP, Sequencer)."""
    for attr in ("cls_token", "pos_embed", "dist_token", "reg_token"):
        if getattr(model, attr, None) is not None:
            return f"it has a transformer's `{attr}`"
    for name, m in model.named_modules():
        if not name:
            continue  # the model's own class name (e.g. ...Transformer) says less than the module that mixes tokens
        if isinstance(m, (nn.MultiheadAttention, nn.RNNBase)):
            return f"{type(m).__name__} at `{name}`"
        cls = type(m).__name__
        if _CHANNEL_ATTN.search(cls):
            continue
        if _NOT_CNN_CLASS.search(cls) or any(isinstance(getattr(m, a, None), nn.Module)
                                              for a in ("qkv", "qk", "to_qkv", "mlp_tokens", "linear_tokens")):
            return f"self-attention / token mixing ({cls} at `{name}`)"
    return None


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _pair(v: Any) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _stride_of(m: nn.Module) -> Optional[Tuple[int, int]]:
    """The spatial stride of a strided op we know how to change (convolutions and their timm variants,
    max/avg pooling, timm ``BlurPool2d``); None for anything else."""
    if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) or (
            hasattr(m, "stride") and hasattr(m, "padding") and (hasattr(m, "kernel_size") or hasattr(m, "filt_size"))):
        s = m.stride if m.stride is not None else getattr(m, "kernel_size", 1)
        try:
            return _pair(s)
        except (TypeError, ValueError, IndexError):
            return None
    return None


def _log2_ratio(a: int, b: int) -> int:
    return int(round(math.log2(a / b)))


@torch.no_grad()
def _trace_strided_ops(model: nn.Module, size: int, in_chans: int) -> Tuple[List[Tuple[str, int, int]], List[int]]:
    """One dummy ``forward_intermediates`` at ``size`` x ``size`` (eval mode, restored after):
    ``(ops, reductions)``: ``(module name, log2 reduction before it, log2 reduction after it)`` of every strided
    op (stride > 1, see :func:`_stride_of`) and the reduction of every feature_info entry. Raises ValueError when
    a strided module runs at two different resolutions (shared weights: its stride cannot follow both)."""
    seen: Dict[str, Tuple[int, int]] = {}
    shared: List[str] = []
    hooks = []

    def hook(name):
        def fn(_m, args, out):
            if not args or not torch.is_tensor(args[0]) or not torch.is_tensor(out) or out.dim() != 4:
                return
            rec = (_log2_ratio(size, args[0].shape[-2]), _log2_ratio(size, out.shape[-2]))
            if seen.setdefault(name, rec) != rec:
                shared.append(name)
        return fn

    for name, m in model.named_modules():
        st = _stride_of(m)
        if name and st is not None and max(st) > 1:
            hooks.append(m.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        feats = model.forward_intermediates(torch.zeros(1, in_chans, size, size, device=p.device, dtype=p.dtype),
                                            intermediates_only=True)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    if shared:
        raise ValueError(f"strided `{shared[0]}` runs at two resolutions")
    return [(n, a, b) for n, (a, b) in seen.items()], [2 ** _log2_ratio(size, f.shape[-1]) for f in feats]


class _AsymPadConv2d(nn.Conv2d):
    """A stride-1 ``nn.Conv2d`` with an even kernel that keeps the input size: zero-pads ``(k - 1) // 2`` before
    and ``k // 2`` after each spatial dimension (what ``padding='same'`` does, without its per-call copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = [self.dilation[i] * (self.kernel_size[i] - 1) for i in (0, 1)]
        return super().forward(nn.functional.pad(x, (kw // 2, kw - kw // 2, kh // 2, kh - kh // 2)))


def _restride(model: nn.Module, name: str, stride: int) -> None:
    """Give strided op ``name`` the new (smaller) ``stride``; padding becomes 'same'-like so an S x S input
    gives ceil(S / stride); a pool at stride 1 becomes ``nn.Identity`` (as CIFAR ResNets drop the max-pool)."""
    m = model.get_submodule(name)
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        if stride == 1:
            _set_submodule(model, name, nn.Identity())
        else:
            m.kernel_size, m.stride, m.padding = stride, stride, 0
        return
    if not hasattr(m, "kernel_size"):  # BlurPool2d: its reflect padding already keeps the size at stride 1
        m.stride = stride
        return
    k, d = _pair(m.kernel_size), _pair(getattr(m, "dilation", 1))
    m.stride = (stride, stride) if isinstance(m.stride, tuple) else stride
    if type(m).__name__.endswith("Same") or getattr(m, "dynamic_padding", False):  # timm TF 'same': padding follows
        return
    eff = [d[i] * (k[i] - 1) + 1 for i in (0, 1)]
    if stride == 1 and any((e - 1) % 2 for e in eff):  # even kernel (ConvNeXt's 4x4/2x2 patchify convs)
        if type(m) is nn.Conv2d and m.padding_mode == "zeros":
            m.__class__ = _AsymPadConv2d  # same parameters and state dict; pads (k-1)//2 before, k//2 after
            m.padding = (0, 0)
        else:
            m.padding = "same"
    else:
        pad = tuple(max(e - stride + 1, 0) // 2 for e in eff)
        m.padding = pad if isinstance(m.padding, tuple) else pad[0]


def _adapt_strides(model: nn.Module, factor: int, in_chans: int) -> Tuple[Dict[str, int], List[int]]:
    """Divide the model's early downsampling by ``factor`` consistently: every strided op that sits where the
    resolution goes from reduction ``r_in`` to ``r_out`` (measured in a dummy forward) gets the stride
    ``max(1, r_out / factor) / max(1, r_in / factor)``, so a block's strided main path and the strided shortcut /
    downsample that matches it change together. Returns ``({module name: new stride}, reductions of the
    feature_info entries before the change)``."""
    shift = int(round(math.log2(factor)))
    plan: Dict[str, int] = {}
    for size in TRACE_SIZES:
        try:
            ops, before = _trace_strided_ops(model, size, in_chans)
            break
        except UserError:
            raise
        except Exception:  # noqa: BLE001 - too small for the original model (valid convolutions): a larger one
            if size == TRACE_SIZES[-1]:
                raise
    for name, a, b in ops:
        new = 2 ** (max(b - shift, 0) - max(a - shift, 0))
        if new != 2 ** (b - a):
            plan[name] = new
    for name, stride in plan.items():
        _restride(model, name, stride)
    return plan, before


def _refuse(name: str, why: str) -> ConfigError:
    return ConfigError(f"backbone {name!r} is not supported: {why}; use a timm CNN that is (docs/design.md, "
                       f"\"Backbones\"), e.g. {ALTERNATIVES}")


# (name, factor, timm kwargs) -> (stride plan, feature_info): the verified adaptation, so building the same backbone
# again (size probes, training after the up-front checks) skips the dummy forwards.
_ADAPTED: Dict[Tuple[str, int, str], Tuple[Dict[str, int], List[Dict[str, Any]]]] = {}


def _adapt_timm_cnn(name: str, model: nn.Module, image_size: int, kw: Dict[str, Any]) -> None:
    """Check that timm model ``name`` is a CNN with stage features, adapt it to ``image_size`` inputs
    (:func:`_adapt_strides`) and verify the adaptation numerically (one dummy forward at 32 or 64: every stage's
    reduction is the original one divided by the factor, the final map >= 2x2, ``model(x)`` pooled); sets
    ``fsl_stage_indices`` and the re-measured ``feature_info``. Raises :class:`ConfigError` (naming the reason and
    working alternatives) otherwise."""
    from ..utils import first_line

    why = _not_cnn_reason(model)
    if why:
        raise _refuse(name, f"not a CNN ({why})")
    if not hasattr(model, "forward_intermediates") or not getattr(model, "feature_info", None):
        raise _refuse(name, "timm gives it no stage features (forward_intermediates / feature_info)")
    infos = [dict(d) for d in stage_info(model)]
    model.fsl_stage_indices = tuple(range(1, len(infos))) if len(infos) > 1 and infos[0]["reduction"] <= 2 \
        else tuple(range(len(infos)))
    factor = _small_input_factor(image_size)
    if factor == 1:
        return
    key = (name, factor, repr(sorted(kw.items())))
    if key in _ADAPTED:
        plan, infos = _ADAPTED[key]
        for module_name, stride in plan.items():
            _restride(model, module_name, stride)
        model.feature_info = [dict(d) for d in infos]
        return
    in_chans = int(kw.get("in_chans", 3))
    verify = 32 if factor == 4 else 64
    was_training = model.training
    try:
        plan, before = _adapt_strides(model, factor, in_chans)
        p = next(model.parameters())
        with torch.no_grad():
            final, feats = model.eval().forward_intermediates(
                torch.zeros(1, in_chans, verify, verify, device=p.device, dtype=p.dtype))
            pooled = model.forward_head(final)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own error, reported as a refusal
        raise _refuse(name, f"changing its strides for {verify}x{verify} inputs breaks it ({first_line(exc)})") \
            from None
    finally:
        model.train(was_training)
    after = [2 ** _log2_ratio(verify, f.shape[-1]) for f in feats]
    want = [max(1, r // factor) for r in before]
    if after != want or len(after) != len(infos) or verify // after[-1] < 2 or pooled.dim() != 2:
        raise _refuse(name, f"after changing its strides for {verify}x{verify} inputs its stages have reductions "
                            f"{after}, not {want} (some of its downsampling is not a strided convolution or pooling, "
                            f"e.g. a space-to-depth stem)")
    for d, r in zip(infos, after):
        d["reduction"] = r
    model.feature_info = infos
    _ADAPTED[key] = (dict(plan), [dict(d) for d in infos])
    log.info("adapted %s to %dx%d inputs: strides %s", name, image_size, image_size, plan)


def check_backbone_name(name: str) -> None:
    """Raise :class:`UnknownNameError` unless ``name`` is a registered few-shot backbone or a timm model name
    (whether a timm model is a usable CNN is decided by :func:`create_backbone`)."""
    from ..registry import check_names

    check_names(backbones=[name])


PROBE_SIZES = (2, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class InputTooSmall(ValueError):
    """The input is smaller than the backbone's total stride: its last stage would see only padding."""


def _probe_model(name: str, image_size: int) -> nn.Module:
    return create_backbone(name, num_classes=2, image_size=image_size).eval()


def _reference_size(image_size: int) -> int:
    """A size of the same small-input regime (:func:`_small_input_factor`) at which every model the regime
    adapts has a final map of several pixels: the total stride is measured there."""
    return {4: 32, 2: 64}.get(_small_input_factor(image_size), max(int(image_size), 224))


@torch.no_grad()
def _final_map_size(model: nn.Module, image_size: int, in_chans: int = 3) -> int:
    x = torch.zeros(1, in_chans, image_size, image_size)
    model(x)
    maps, _ = forward_stages(model, x)
    return int(maps[-1].shape[-1])


def total_stride(model: nn.Module, image_size: int) -> float:
    """Input pixels per pixel of the last stage's map (the backbone's total downsampling) of ``model`` as built for
    ``image_size``, measured by one forward pass at a size of the same regime (Conv-4: 16; a timm CNN adapted
    to <= 32 pixels: usually 8)."""
    ref = _reference_size(image_size)
    return ref / _final_map_size(model, ref)


def _forward_probe(model: nn.Module, image_size: int, stride: Optional[float] = None) -> None:
    """Raise :class:`InputTooSmall` below ``stride`` (default: :func:`total_stride`, one forward at the regime's
    reference size), else run a forward and a stage pass at ``image_size`` (unless that is the reference size,
    which :func:`total_stride` just ran)."""
    if stride is None:
        stride = total_stride(model, image_size)
        if image_size == _reference_size(image_size):
            return
    if image_size < stride:
        raise InputTooSmall(f"{image_size}x{image_size} is below the backbone's total stride {stride:g}: its last "
                            f"stage would see only padding")
    _final_map_size(model, image_size)


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "alloc" in text or "out of memory" in text


def probe(name: str, image_size: int) -> None:
    """Build backbone ``name`` for ``image_size`` and run one forward pass and one stage pass on zeros (eval
    mode, batch 1); raises :class:`InputTooSmall` below the backbone's total stride, otherwise whatever the
    model raises (:class:`ConfigError` for a refused backbone)."""
    _forward_probe(_probe_model(name, image_size), image_size)


def smallest_image_size(name: str) -> Optional[int]:
    """The smallest of :data:`PROBE_SIZES` at which :func:`probe` passes (None: none does). Cheap: one model per
    small-input regime (<= 32, <= 64, larger; the adaptation depends on nothing else), one forward per size."""
    models: Dict[int, nn.Module] = {}
    strides: Dict[int, float] = {}  # one total-stride forward per regime, not one per size tried
    for size in PROBE_SIZES:
        try:
            regime = _small_input_factor(size)
            if regime not in models:
                models[regime] = _probe_model(name, size)
            if regime not in strides:
                strides[regime] = total_stride(models[regime], size)
            _forward_probe(models[regime], size, strides[regime])
            return size
        except UserError:
            raise
        except Exception:  # noqa: BLE001 - a size the model cannot take
            continue
    return None


def check_image_size(name: str, image_size: int) -> None:
    """Raise :class:`ConfigError` (exit 2) when backbone ``name`` cannot take ``image_size`` x ``image_size``
    inputs: below its total stride or too small for its operations (e.g. ``conv4`` at 8: its four 2x2 poolings
    leave nothing), naming the smallest size that works; too large for this machine's memory (one image's forward
    pass fails to allocate), naming that; or the refusal of :func:`create_backbone` (not a CNN, cannot be adapted
    to small inputs). One model build and two forward passes when the size is fine; a few more (one per size
    tried) to find the smallest when it is not."""
    from ..utils import first_line

    try:
        probe(name, int(image_size))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own error, reported with the fix
        if _is_out_of_memory(exc):
            raise ConfigError(f"backbone {name!r} cannot take {image_size}x{image_size} inputs on this machine: the "
                              f"forward pass of one image ran out of memory ({first_line(exc)}); pass a smaller "
                              f"--image-size (`image_size:` in a benchmark file)") from None
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
    * Any other timm CNN (``resnet18``, ``regnetx_002``, ``efficientnet_b0``, ``convnext_atto``...) is adapted to
      small inputs by dividing its early downsampling by 4 (``image_size <= 32``) or 2 (``<= 64``): a dummy forward
      locates every strided convolution / pooling and the resolution step it belongs to, and every op of the same
      step changes together (a block's strided main path with its strided shortcut); a pooling left at stride 1 is
      dropped (timm ResNet at 32: stem ``conv1`` stride 1 and no ``maxpool``, 4x4 final map; at 64: ``conv1``
      stride 1). The result is verified with a dummy forward (each stage's reduction is the original one / the
      factor, the final map at least 2x2) and ``feature_info`` reductions are re-measured. Above 64 the model is
      timm's, unchanged.
    * Refused with :class:`ConfigError` naming the reason and working alternatives: models that are not CNNs
      (vision transformers, attention hybrids such as CoaT, LeViT, ConViT, MaxViT, MobileViT, BoTNet; MLP-Mixer,
      ResMLP, gMLP; recurrent Sequencer), models without timm stage features, and CNNs whose downsampling is not in
      strided ops (TResNet's space-to-depth stem). No upsampling fallback. docs/design.md, "Backbones", lists
      the families verified at 32 and 64 and those refused.

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
        _adapt_timm_cnn(name, model, image_size, kw)
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


def _extra_last_stage(model: nn.Module, chs: int) -> nn.Module:
    from timm.models.resnet import ResNet

    if hasattr(model, "make_extra_stage"):  # few-shot standards: one block of the last width, no pooling
        return model.make_extra_stage()
    last = stage_modules(model)[-1] if isinstance(model, ResNet) else None
    if isinstance(last, nn.Sequential) and len(last) > 0:
        # HSAKD: _make_layer(block, 512, layers[3], stride=1) -> len(layer4) copies of its last (C->C, stride 1) block
        blk = last[-1]
        if getattr(blk, "downsample", None) is not None:  # one-block stages (resnet10t): first block is C/2 -> C
            blk = type(blk)(chs, chs // getattr(blk, "expansion", 1))
        return nn.Sequential(*[copy.deepcopy(blk) for _ in range(len(last))])
    # Other CNNs: a conv3x3-BN-ReLU at the final width (their last stage does not map C -> C).
    return nn.Sequential(nn.Conv2d(chs, chs, 3, 1, 1, bias=False), nn.BatchNorm2d(chs), nn.ReLU(inplace=True))


def _chain(model: nn.Module, start: str, end: str) -> List[str]:
    """Names of the largest modules that come after module ``start`` and up to module ``end`` (included) in
    registration order, none containing ``start`` or ``end``'s successors: for a model whose forward runs its
    modules in registration order, the chain that maps ``start``'s output to ``end``'s output (ResNet ``layer1`` ->
    ``layer4``: ``layer2, layer3, layer4``; DenseNet: ``transition1, denseblock2, ..., norm5``)."""
    out: List[str] = []
    started = False
    for name, _ in model.named_modules():
        if not started:
            started = name == start
            continue
        if name.startswith(start + ".") or any(name.startswith(c + ".") for c in out[-1:]):
            continue  # inside ``start`` or inside a module already taken
        if end.startswith(name + "."):
            continue  # an ancestor of ``end``: take its children instead
        out.append(name)
        if name == end:
            return out
    return []


def tail_modules(model: nn.Module, stage_index: int) -> Optional[List[str]]:
    """Names of the backbone's modules that map stage ``stage_index``'s map to the last stage's (0-based into
    :func:`forward_stages`'s list, not the last), in order, or None when no chain of modules does: the chain of
    :func:`_chain`, checked numerically on one random input (eval mode, no gradients; the model's train/eval mode is
    restored): running the modules one after the other on ``forward_stages(model, x)[0][stage_index]`` must give
    the last stage map. ``stage_tail`` copies these modules."""
    infos, idx = stage_info(model), stage_indices(model)
    if not 0 <= stage_index < len(idx) - 1:
        raise ConfigError(f"stage_index {stage_index} out of range: {type(model).__name__} has {len(idx)} stages, "
                          f"the modules after stage 0..{len(idx) - 2} lead to the last")
    names = _chain(model, infos[idx[stage_index]]["module"], infos[idx[-1]]["module"])
    if not names:
        return None
    r = int(infos[idx[-1]]["reduction"])
    p = next(model.parameters())
    in_chans = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    gen = torch.Generator().manual_seed(0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            maps = None
            for size in (max(32, 2 * r), max(64, 4 * r), 8 * r):  # the first the model takes (valid convolutions)
                x = torch.randn(1, in_chans, size, size, generator=gen).to(device=p.device, dtype=p.dtype)
                try:
                    maps, _ = forward_stages(model, x)
                    break
                except Exception:  # noqa: BLE001 - too small for this model: a larger one
                    continue
            if maps is None:
                return None
            got = maps[stage_index]
            for n in names:
                got = model.get_submodule(n)(got)
    except Exception:  # noqa: BLE001 - the chain is not how the model computes the last stage
        return None
    finally:
        model.train(was_training)
    want = maps[-1]
    if not torch.is_tensor(got) or got.shape != want.shape or \
            not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()) + 1e-6):
        return None
    return names


def _generic_tail(in_chs: int, out_chs: int, halvings: int) -> nn.Sequential:
    """conv3x3-BN-ReLU per halving (stride 2; widths geometric from ``in_chs`` to ``out_chs``), or one at stride 1
    when there is none: the feature extractor of an auxiliary classifier where the backbone's own modules do not
    form a chain (:func:`stage_tail`)."""
    layers: List[nn.Module] = []
    steps = max(halvings, 1)
    c = in_chs
    for i in range(steps):
        nxt = int(round(in_chs * (out_chs / in_chs) ** ((i + 1) / steps)))
        layers += [nn.Conv2d(c, nxt, 3, 2 if i < halvings else 1, 1, bias=False), nn.BatchNorm2d(nxt),
                   nn.ReLU(inplace=True)]
        c = nxt
    return nn.Sequential(*layers)


def stage_tail(model: nn.Module, stage_index: int, seed: Optional[int] = None) -> nn.Sequential:
    """Freshly initialised copy of the stages after ``stage_index`` (0-based into ``forward_stages``'s list), as
    an ``nn.Sequential``: the feature extractor of an LSSKD/HSAKD auxiliary classifier (winycg/HSAKD
    ``models/resnet.py``; docs/methods.md, "Auxiliary classifiers"). For the last stage it is one extra last-stage
    block at stride 1. ``stage_tail(model, l)(stage_maps[l])`` has the last stage's channel count
    (``stage_info(model)[stage_indices(model)[-1]]['num_chs']``) and spatial size. ``seed`` seeds the init.

    The copy is the chain of the backbone's modules between the two stages (:func:`tail_modules`: used only when it
    reproduces the backbone's last stage map from stage ``stage_index``'s, checked numerically). Where
    it does not (stage maps tapped inside a block, as Xception's; multi-branch nets such as HRNet) the tail is a
    generic conv3x3-BN-ReLU stack, one stride-2 conv per halving, logged as such (docs/design.md, "Backbones")."""
    idx = stage_indices(model)
    n = len(idx)
    if not 0 <= stage_index < n:
        raise ConfigError(f"stage_index {stage_index} out of range: {type(model).__name__} has {n} stages (0..{n - 1})")
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    infos = stage_info(model)
    last_chs = int(infos[idx[-1]]["num_chs"])
    if stage_index == n - 1:
        tail = nn.Sequential(_extra_last_stage(model, last_chs))
    else:
        names = tail_modules(model, stage_index)
        tail = nn.Sequential(*[copy.deepcopy(model.get_submodule(n)) for n in names]) if names else None
        if tail is None:
            halvings = _log2_ratio(int(infos[idx[-1]]["reduction"]), int(infos[idx[stage_index]]["reduction"]))
            log.warning("%s: the modules after stage %d do not form a chain; its auxiliary feature extractor is a "
                        "generic conv stack (%d stride-2 convs)", type(model).__name__, stage_index, halvings)
            tail = _generic_tail(int(infos[idx[stage_index]]["num_chs"]), last_chs, halvings)
    p = next(model.parameters(), None)
    if p is not None:
        tail = tail.to(device=p.device)
    init_weights(tail, gen)
    return tail
