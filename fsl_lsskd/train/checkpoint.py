"""Training checkpoints (atomic, resumable) and loaders for trained methods and backbones.

Checkpoint dict (``torch.save``)::

    {"model": method.state_dict(), "optimizer": ..., "scheduler": ..., "epoch": <epochs completed>,
     "rng": {"torch": ..., "numpy": ..., "loader": ...}, "mlflow_run_id": ..., "history": [...],
     "meta": {"method", "backbone", "num_classes", "num_samples", "image_size", "dataset", "mean", "std",
              "config": TrainConfig.to_dict(), "method_config": asdict(method config),
              "identity": {...}, "config_hash", "format_version"}}

An exported backbone (``fsl-bench export``) is ``backbone.safetensors`` + ``backbone.json`` (see export.py)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from torch import nn

from ..errors import CheckpointError
from ..utils import PathLike, atomic_torch_save, first_line

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def create_backbone(name: str, num_classes: int = 0, image_size: int = 32) -> nn.Module:
    """:func:`fsl_lsskd.backbones.create_backbone` (few-shot standards and small-input timm CNNs)."""
    from ..backbones import create_backbone as _create

    return _create(name, num_classes=num_classes, image_size=image_size)


def save_checkpoint(state: Dict[str, Any], path: PathLike) -> Path:
    path = Path(path)
    atomic_torch_save(state, path)
    return path


def read_checkpoint(path: PathLike, map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a training checkpoint "
                              f"(<out>/last.pt) or an exported backbone (<dir>/backbone.safetensors)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated / not a torch file
        raise CheckpointError(f"cannot read checkpoint {path} ({first_line(exc)}): it is corrupt or truncated. Delete it to "
                              f"restart that run from scratch (or train into a new --out), or re-run the training "
                              f"that wrote it") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "meta" not in ckpt:
        raise CheckpointError(f"{path} is not an fsl-bench training checkpoint (no 'model'/'meta'); "
                              f"export files are read with load_backbone()")
    return ckpt


def build_method(meta: Dict[str, Any], teacher=None):
    """An untrained Method with the architecture described by ``meta``."""
    from .. import plugins
    from ..registry import METHODS

    plugins.import_submodules("fsl_lsskd.methods")
    cls = METHODS.get(meta["method"])
    mc = dict(meta.get("method_config", {}))
    field_names = {f for f in getattr(cls.config_cls, "__dataclass_fields__", {})}
    mc = {k: (tuple(v) if isinstance(v, list) else v) for k, v in mc.items() if k in field_names}
    config = cls.config_cls(**mc)
    backbone = create_backbone(meta["backbone"], num_classes=int(meta["num_classes"]),
                               image_size=int(meta["image_size"]))
    if cls.needs_teacher and teacher is None:
        # architecture only (evaluation): a placeholder teacher satisfies the constructor
        teacher = nn.Identity()
    return cls(backbone, int(meta["num_classes"]), int(meta["num_samples"]), config, teacher)


def load_method(path: PathLike, device: str | torch.device = "cpu"):
    """Rebuild the trained :class:`~fsl_lsskd.methods.base.Method` of a training checkpoint (eval mode,
    on ``device``); used for teachers (frozen) and evaluation."""
    ckpt = read_checkpoint(path)
    method = build_method(ckpt["meta"])
    missing, unexpected = method.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: state does not match method {ckpt['meta']['method']!r} "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]}); was it written by another "
                              f"version of the code?")
    return method.to(device).eval()


def load_backbone(path: PathLike, device: str | torch.device = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """The inference backbone (no auxiliary heads, no classifier: ``model(x)`` = pooled features) and its
    meta, from a training checkpoint (``last.pt``) or an export (``backbone.safetensors``/``.json``/dir)."""
    path = Path(path)
    if path.is_dir():
        path = path / "backbone.safetensors"
    if path.suffix in (".safetensors", ".json") or path.name.startswith("backbone"):
        json_path = path.with_suffix(".json")
        weights = path.with_suffix(".safetensors")
        if not weights.is_file():
            weights = path.with_suffix(".pth")
        if not json_path.is_file() or not weights.is_file():
            raise CheckpointError(f"export {path} needs backbone.json and backbone.safetensors side by side; "
                                  f"re-run `fsl-bench export CHECKPOINT --out DIR`")
        meta = json.loads(json_path.read_text())
        net = create_backbone(meta["name"], num_classes=0, image_size=int(meta["image_size"]))
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{weights} does not match backbone {meta['name']!r}: {exc}") from None
        return net.to(device).eval(), meta
    method = load_method(path, device)
    meta = dict(read_checkpoint(path)["meta"])
    net = method.export_backbone().to(device).eval()
    meta.setdefault("name", meta.get("backbone"))
    return net, meta
