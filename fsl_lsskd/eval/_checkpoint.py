"""Loading a frozen backbone for evaluation: an exported timm state dict (``.safetensors``/``.pth`` with a
``.json`` sidecar), a generic ``{"backbone": state_dict}`` dict, or an fsl-bench training checkpoint
``{"model": method.state_dict(), "meta": {...}}`` (the backbone is ``method.backbone``)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..errors import CheckpointError
from ..utils import first_line

log = logging.getLogger(__name__)


def create_backbone(name: str, image_size: int = 32) -> nn.Module:
    """The feature extractor (``num_classes=0``) of backbone ``name``."""
    from ..backbones import create_backbone as _create

    return _create(name, num_classes=0, image_size=image_size)


def _sidecar(path: Path) -> Dict[str, Any]:
    for cand in (path.with_suffix(".json"), path.parent / "backbone.json"):
        if cand.is_file():
            try:
                return dict(json.loads(cand.read_text(encoding="utf-8")))
            except ValueError as exc:
                raise CheckpointError(f"{cand} is not valid JSON ({exc}); re-export the backbone") from None
    return {}


def read_state(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(backbone state dict, meta) from any supported file; meta has ``backbone``/``image_size`` when known."""
    path = Path(path)
    if path.is_dir():
        for name in ("backbone.safetensors", "backbone.pth", "last.pt"):
            if (path / name).is_file():
                return read_state(path / name)
        raise CheckpointError(f"{path} holds no backbone.safetensors, backbone.pth or last.pt; pass the file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass an exported backbone or a training "
                              "checkpoint (--checkpoint PATH) or use --untrained")
    meta = _sidecar(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
            raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(exc)}): it is corrupt "
                                  f"or truncated; re-export it (fsl-bench export <run>/last.pt --out DIR)") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path} is not a readable torch checkpoint ({first_line(exc)}): it is corrupt, "
                                  "truncated or not a torch file; re-run the training or the export that wrote it, "
                                  "or pass a state dict saved with torch.save or an exported .safetensors") from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
        if "model" in obj and isinstance(obj["model"], dict):   # training checkpoint
            meta = {**meta, **dict(obj.get("meta") or {})}
            state = {k[len("backbone."):]: v for k, v in obj["model"].items() if k.startswith("backbone.")}
            if not state:
                state = dict(obj["model"])
        elif "backbone" in obj and isinstance(obj["backbone"], dict):
            meta = {**meta, **dict(obj.get("meta") or {})}
            state = dict(obj["backbone"])
        elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
            state = dict(obj["state_dict"])
        else:
            state = obj
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()
             if isinstance(v, torch.Tensor)}
    if "backbone" not in meta and "name" in meta:
        meta["backbone"] = meta["name"]
    return state, meta


def load_backbone(name: Optional[str], checkpoint: Optional[Path], image_size: Optional[int] = None
                  ) -> Tuple[nn.Module, Dict[str, Any]]:
    """A frozen (eval mode) backbone with ``num_classes=0``; raises :class:`CheckpointError` on mismatch."""
    meta: Dict[str, Any] = {}
    state = None
    if checkpoint is not None:
        state, meta = read_state(Path(checkpoint))
    name = name or meta.get("backbone")
    if not name:
        raise CheckpointError("no backbone name: pass --backbone NAME (the checkpoint has no meta naming it)")
    size = int(image_size or meta.get("image_size") or 32)
    model = create_backbone(name, image_size=size)
    if state is not None:
        _load_strict(model, state, name, meta, checkpoint)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, {**meta, "backbone": name, "image_size": size}


def _load_strict(model: nn.Module, state: Dict[str, torch.Tensor], name: str, meta: Dict[str, Any],
                 path) -> None:
    own = model.state_dict()
    head = ""
    try:
        head = str(model.pretrained_cfg.get("classifier", "") or "")
    except AttributeError:
        pass
    # The method's final classifier (timm head) is not part of the frozen feature extractor.
    state = {k: v for k, v in state.items() if k in own or not (head and k.startswith(head + "."))}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(state)
                    if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
        src = meta.get("backbone")
        hint = (f" The checkpoint's meta says it came from backbone {src!r}: pass --backbone {src}."
                if src and src != name else " Pass the --backbone the checkpoint was trained with.")
        raise CheckpointError(f"checkpoint {path} does not match backbone {name!r}: {'; '.join(parts)}.{hint}")
    model.load_state_dict(state, strict=True)
