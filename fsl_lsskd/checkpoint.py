"""The files of a trained cell and how to load them.

A finished training run keeps what is needed to use and re-score it, nothing resume-only:

- ``model.safetensors`` + ``model.json``: the trained method's weights (backbone with its final classifier,
  auxiliary classifiers, MAML's head; per-sample prediction memories and optimiser state dropped) and its meta
  (method, backbone, classes, normalisation, resolved method config, training identity). Rebuilt by
  :func:`load_method` (teachers, fine-tuning readouts, base-class calibration).
- ``export/backbone.safetensors`` + ``export/backbone.json``: the inference backbone in timm's state-dict
  format (auxiliary classifiers and the classifier removed: ``model(x)`` = pooled features) with a report
  (parameters, FLOPs) and ``load_with``, a Python snippet that loads it in a fresh interpreter.

:func:`load_backbone` reads any of: an export (file or directory), a model directory or ``model.safetensors``,
an fsl-bench training checkpoint (``last.pt``, resume state), or a plain state dict (``.pth``/``.safetensors``,
``{"backbone": ...}``/``{"state_dict": ...}``). Errors are :class:`~fsl_lsskd.errors.CheckpointError` naming
the fix.

Opening a file never runs code from it: ``.safetensors`` holds only tensors, and every ``.pt``/``.pth`` is read
by :func:`torch_load` (``torch.load(weights_only=True)``: tensors, containers, numbers, strings and the few
types listed in :data:`TRAINING_STATE_GLOBALS`). A pickle that asks for anything else is refused with
:class:`~fsl_lsskd.errors.UnsafeCheckpointError` before that thing is called.
"""
from __future__ import annotations

import collections
import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .errors import CheckpointError, UnsafeCheckpointError
from .utils import PathLike, atomic_path, atomic_write_text, first_line, sha256_file

log = logging.getLogger(__name__)

MODEL_FORMAT = 1
MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
EXPORT_WEIGHTS = "backbone.safetensors"
EXPORT_META = "backbone.json"


# ----------------------------------------------------------------------------------------- resume state
def save_training_state(state: Dict[str, Any], path: PathLike) -> Path:
    """Write a training run's resume state (``last.pt``) atomically. Layout::

        {"model": method.state_dict(), "optimizer", "scheduler", "scaler", "epoch": <epochs completed>,
         "rng": {...}, "history": [...], "mlflow_run_id", "meta": {method, backbone, num_classes, num_samples,
         image_size, dataset, class_names, mean, std, method_config, identity, train_id, format_version}}
    """
    from .utils import atomic_torch_save

    path = Path(path)
    atomic_torch_save(state, path)
    return path


#: the non-tensor types a resume state holds beyond what ``weights_only=True`` always allows: the
#: ``milestones`` of ``MultiStepLR.state_dict()`` (torch 2.14 allows it by default; listed so that the
#: resume state never depends on that default)
TRAINING_STATE_GLOBALS = (collections.Counter,)

#: what fsl-bench opens without trusting the file's author (in the message of UnsafeCheckpointError)
SAFE_FORMATS = ("a .safetensors file (an export, a model directory, or any state dict saved with "
                "safetensors.torch.save_file) or a .pt/.pth of tensors, numbers, strings and plain containers, "
                "such as the last.pt this tool writes")


def torch_load(path: PathLike, map_location="cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with :data:`TRAINING_STATE_GLOBALS` allowed (in this call only).

    Raises:
        UnsafeCheckpointError: the pickle asks for a global outside that list (e.g. ``os.system`` or a class of
            another code base); nothing it names has been called.
        CheckpointError: the file is missing, truncated, or not a PyTorch file."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(TRAINING_STATE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"\bGLOBAL (\S+)", str(exc))  # not allowed, or in a blocked module
        if found:
            raise UnsafeCheckpointError(
                f"refused to open {path}: its pickle asks for {found.group(1)}, which a file of tensors never "
                f"needs; unpickling it could run code. fsl-bench opens {SAFE_FORMATS}. If you trust its author, "
                f"convert it once in Python: torch.load(path, weights_only=False), then "
                f"safetensors.torch.save_file(<its state dict>, 'weights.safetensors')") from None
        raise _corrupt(path, exc) from None
    except Exception as exc:  # noqa: BLE001 - truncated / not a torch file
        raise _corrupt(path, exc) from None


def _corrupt(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"cannot read checkpoint {path} ({first_line(exc)}): it is corrupt or truncated. "
                           f"Delete it to restart that run from scratch (or train into a new --out), or re-run "
                           f"the training that wrote it")


def read_training_state(path: PathLike, map_location="cpu") -> Dict[str, Any]:
    """Read a ``last.pt`` written by :func:`save_training_state` (with :func:`torch_load`: no code runs);
    :class:`CheckpointError` names the fix when it is missing, truncated, unsafe or not a training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a training checkpoint "
                              f"(<out>/last.pt), a model directory or an exported backbone")
    ckpt = torch_load(path, map_location=map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "meta" not in ckpt:
        raise CheckpointError(f"{path} is not an fsl-bench training checkpoint (no 'model'/'meta'); "
                              f"export files are read with load_backbone()")
    return ckpt


# ---------------------------------------------------------------------------------------------- methods
def build_method(meta: Dict[str, Any], teacher=None):
    """An untrained :class:`~fsl_lsskd.methods.base.Method` with the architecture described by ``meta``
    (keys ``method``, ``backbone``, ``num_classes``, ``num_samples``, ``image_size``, ``method_config``).
    A method that needs a teacher gets an architecture-only placeholder when ``teacher`` is None."""
    from .backbones import create_backbone
    from .registry import METHODS

    cls = METHODS.get(meta["method"])
    mc = dict(meta.get("method_config", {}))
    field_names = set(getattr(cls.config_cls, "__dataclass_fields__", {}))
    mc = {k: (tuple(v) if isinstance(v, list) else v) for k, v in mc.items() if k in field_names}
    config = cls.config_cls(**mc)
    backbone = create_backbone(meta["backbone"], num_classes=int(meta["num_classes"]),
                               image_size=int(meta["image_size"]))
    if cls.needs_teacher and teacher is None:
        teacher = nn.Identity()  # architecture only (evaluation): satisfies the constructor
    return cls(backbone, int(meta["num_classes"]), int(meta["num_samples"]), config, teacher)


def weights_state(method: nn.Module) -> Dict[str, torch.Tensor]:
    """The method's state dict without per-sample prediction memories (training-only state)."""
    from .methods.stores import PredictionStore

    stores = [name for name, m in method.named_modules() if isinstance(m, PredictionStore)]
    return {k: v.detach().cpu().contiguous().clone() for k, v in method.state_dict().items()
            if not any(k == s or k.startswith(s + ".") for s in stores if s)}


def save_model(method: nn.Module, meta: Dict[str, Any], out_dir: PathLike) -> Path:
    """Write ``model.safetensors`` (:func:`weights_state`) and ``model.json`` (``meta`` + format) atomically
    into ``out_dir``; returns the directory."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    with atomic_path(out / MODEL_WEIGHTS) as tmp:
        save_file(weights_state(method), str(tmp), metadata={"format": "pt"})
    doc = {**meta, "format": MODEL_FORMAT, "weights": MODEL_WEIGHTS,
           "weights_sha256": sha256_file(out / MODEL_WEIGHTS)}
    atomic_write_text(out / MODEL_META, json.dumps(doc, indent=2, default=str) + "\n")
    return out


def read_model_meta(path: PathLike) -> Dict[str, Any]:
    """``model.json`` of a model directory (or of the directory holding ``model.safetensors``)."""
    path = Path(path)
    meta_path = path / MODEL_META if path.is_dir() else path.with_name(MODEL_META)
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path} is missing: a model directory holds {MODEL_WEIGHTS} and "
                              f"{MODEL_META} (written when a training run finishes)") from None
    except ValueError as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON ({exc}); re-run the training that wrote it") from None


def load_method(path: PathLike, device="cpu", teacher=None):
    """Rebuild a trained :class:`~fsl_lsskd.methods.base.Method` (eval mode, on ``device``) from a model
    directory / ``model.safetensors`` or a training checkpoint (``last.pt``). Prediction memories start empty
    (they are training state); everything else must match exactly."""
    path = Path(path)
    if path.is_dir() and (path / MODEL_WEIGHTS).is_file():
        path = path / MODEL_WEIGHTS
    if path.suffix == ".safetensors" and path.name == MODEL_WEIGHTS:
        from safetensors.torch import load_file

        meta = read_model_meta(path)
        method = build_method(meta, teacher)
        try:
            state = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
            raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(exc)}): it is corrupt "
                                  f"or truncated; re-run the training that wrote it") from None
        expected = weights_state(method)
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{path}: weights do not match method {meta['method']!r} (missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}); was it written by another version of the code?")
        method.load_state_dict(state, strict=False)
        return method.to(device).eval()
    ckpt = read_training_state(path)  # a resume checkpoint (last.pt)
    method = build_method(ckpt["meta"], teacher)
    missing, unexpected = method.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: state does not match method {ckpt['meta']['method']!r} "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]}); was it written by another "
                              f"version of the code?")
    return method.to(device).eval()


# -------------------------------------------------------------------------------------------- backbones
def load_with_snippet(name: str, image_size: int, weights: str = EXPORT_WEIGHTS) -> str:
    """Python that loads an export in a fresh interpreter, run from the export directory."""
    return (f"from safetensors.torch import load_file; from fsl_lsskd.backbones import create_backbone; "
            f"model = create_backbone({name!r}, num_classes=0, image_size={int(image_size)}); "
            f"model.load_state_dict(load_file({weights!r})); model.eval()")


def count_flops(net: nn.Module, image_size: int) -> int:
    """FLOPs of one forward pass at batch 1 (``torch.utils.flop_counter.FlopCounterMode``; a multiply-add = 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(net.parameters(), None)
    x = torch.zeros(1, 3, image_size, image_size, device=p.device if p is not None else "cpu")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(x)
    return int(counter.get_total_flops())


def export_backbone(net: nn.Module, name: str, image_size: int, out_dir: PathLike,
                    extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write ``backbone.safetensors`` + ``backbone.json`` for the inference backbone ``net`` (auxiliary
    classifiers and classifier already removed) into ``out_dir``; returns the report (name, image_size,
    num_features, params, flops, weights sha256, ``load_with``, plus ``extra``: method, mean, std, ...)."""
    from safetensors.torch import save_file

    from .utils import make_dir

    out = make_dir(out_dir)
    net = net.to("cpu").eval()
    state = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    with atomic_path(out / EXPORT_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "name": name})
    report: Dict[str, Any] = {
        "name": name,
        "image_size": int(image_size),
        "num_features": int(getattr(net, "num_features", 0)),
        "params": int(sum(p.numel() for p in net.parameters())),
        "flops": count_flops(net, image_size),
        "weights": EXPORT_WEIGHTS,
        "weights_sha256": sha256_file(out / EXPORT_WEIGHTS),
        "load_with": load_with_snippet(name, image_size),
    }
    report.update(extra or {})
    atomic_write_text(out / EXPORT_META, json.dumps(report, indent=2, default=str) + "\n")
    log.info("exported %s to %s (%d params, %.1f MFLOPs)", name, out, report["params"], report["flops"] / 1e6)
    return report


def _sidecar(path: Path) -> Dict[str, Any]:
    for cand in (path.with_suffix(".json"), path.parent / EXPORT_META, path.parent / MODEL_META):
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
        for name in (EXPORT_WEIGHTS, f"export/{EXPORT_WEIGHTS}", MODEL_WEIGHTS, "backbone.pth", "last.pt"):
            if (path / name).is_file():
                return read_state(path / name)
        raise CheckpointError(f"{path} holds no {EXPORT_WEIGHTS}, {MODEL_WEIGHTS}, backbone.pth or last.pt; "
                              f"pass the file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass an exported backbone, a model directory or a "
                              "training checkpoint (--checkpoint PATH), or use --untrained")
    meta = _sidecar(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
            raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(exc)}): it is corrupt "
                                  f"or truncated; re-export it (fsl-bench export <run> --out DIR)") from None
        if path.name == MODEL_WEIGHTS:  # a whole method: keep the backbone's part
            state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    else:
        obj = torch_load(path)  # a training checkpoint, a state dict or a wrapper of one; never runs code
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


def load_backbone(checkpoint: Optional[PathLike] = None, name: Optional[str] = None,
                  image_size: Optional[int] = None, device="cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """A frozen (eval mode, no gradients) backbone with ``num_classes=0`` (``model(x)`` = pooled features
    ``[B, D]``) and its meta.

    Args:
        checkpoint: any file :func:`read_state` reads; None = randomly initialised ``name``.
        name: backbone name; default: the checkpoint's meta.
        image_size: input size; default: the checkpoint's meta, else 32.

    Raises :class:`CheckpointError` when the file is missing, unreadable or does not match the backbone
    (the message names the backbone it came from)."""
    from .backbones import create_backbone

    meta: Dict[str, Any] = {}
    state = None
    if checkpoint is not None:
        state, meta = read_state(Path(checkpoint))
    name = name or meta.get("backbone")
    if not name:
        raise CheckpointError("no backbone name: pass --backbone NAME (the checkpoint has no meta naming it)")
    size = int(image_size or meta.get("image_size") or 32)
    model = create_backbone(name, num_classes=0, image_size=size)
    if state is not None:
        _load_strict(model, state, name, meta, checkpoint)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device), {**meta, "backbone": name, "image_size": size}


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
