"""The training engine: trains a registered method (:data:`fsl_lsskd.registry.METHODS`) with any timm backbone on
the base (train) classes of a dataset split.

Data: the uint8 split cache -> held-out base images (stratified, seeded) -> limited-data fraction (HSAKD's
stratified shuffle split) -> :class:`TrainLoader` (whole-batch augmentation). Optimisation: SGD (or Adam for
episodic configs with ``optimizer="adam"``) + MultiStepLR at ``lr_milestones`` fractions of the epochs, under
``precision`` autocast (fp16 with a gradient scaler). After every epoch the resume state (``last.pt``) is
written atomically; a killed run resumes from it exactly. When the last epoch is done the run keeps only what
is needed to use and re-score it (:mod:`fsl_lsskd.checkpoint`: ``model/`` weights, ``export/`` backbone) and
the resume state is deleted. Launched by ``torchrun`` with several processes, one run trains on all of them
(:mod:`fsl_lsskd.train.distributed`).

What the engine checks every epoch is handed to it (``validator``): by default
:func:`fsl_lsskd.eval.validation.fewshot_validator` on the config's ``validation`` episodes.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..checkpoint import (MODEL_META, load_method, read_model_meta, read_training_state,
                          save_model, save_training_state)
from ..errors import ConfigError, TrainingDiverged
from ..progress import Progress, announce
from ..seeding import seed_torch
from ..utils import atomic_path, atomic_write_text, check_writable_dir, make_dir
from .config import TrainConfig, build_method_config, diff_keys, method_class, train_id, training_identity
from .loader import TrainLoader

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
MODEL_DIR = "model"
EXPORT_DIR = "export"
STATE_FORMAT = 2

Validator = Callable[[torch.nn.Module], Dict[str, float]]


@dataclass
class TrainResult:
    """What :func:`train` produced.

    ``model_dir`` holds the finished method (``model.safetensors`` + ``model.json``), ``export_dir`` the
    inference backbone (None without export); ``identity``/``train_id`` name the training cell; ``history``
    has one dict of metrics per epoch (``epoch`` from 1); ``resumed_from_epoch`` the epochs a resume state
    already had; ``already_finished`` is True when ``out_dir`` already held this finished cell."""

    model_dir: Optional[Path]
    export_dir: Optional[Path]
    run_id: Optional[str]
    train_id: str
    identity: Dict[str, Any]
    metrics: Dict[str, float]
    out_dir: Path
    history: List[Dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int = 0
    already_finished: bool = False
    rank: int = 0  # this process in a multi-process (torchrun) run; 0 otherwise
    world_size: int = 1

    @property
    def finished(self) -> bool:
        return self.model_dir is not None


# ----------------------------------------------------------------------------------------------- data
@dataclass
class PreparedData:
    """The run's data: training rows (after hold-out and fraction), held-out base images, val split,
    normalisation, and the content fingerprint of the decoded training split (training identity)."""

    train: Any
    heldout: Optional[Any]
    val: Optional[Any]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    fingerprint: str


def load_training_data(cfg: TrainConfig, with_val: bool = True):
    """``(train split, val split or None, mean, std)`` of ``cfg.dataset`` as decoded (cache)."""
    from ..data import get_dataset

    ds = get_dataset(cfg.dataset, **cfg.data_kwargs())
    val = ds.load_split("val") if with_val else None
    return ds.load_split("train"), val, tuple(ds.mean), tuple(ds.std)


def prepare_data(cfg: TrainConfig, train_data=None, val_data=None, mean=None, std=None) -> PreparedData:
    """Load (or take) the train split, resize it to ``cfg.image_size``, hold out base images and apply the
    fraction (:func:`fsl_lsskd.data.limited.stratified_fraction`)."""
    from ..data.limited import heldout_split, stratified_fraction

    if train_data is None:
        train_data, loaded_val, mean, std = load_training_data(cfg, with_val=val_data is None and
                                                               cfg.validation is not None)
        val_data = val_data if val_data is not None else loaded_val
    mean = tuple(mean) if mean is not None else (0.5, 0.5, 0.5)
    std = tuple(std) if std is not None else (0.25, 0.25, 0.25)
    fingerprint = train_data.fingerprint or _bytes_fingerprint(train_data)
    resized = train_data.resized(cfg.image_size)
    if val_data is not None:
        val_data = val_data.resized(cfg.image_size)
    rows, held = heldout_split(resized.labels, cfg.heldout, cfg.seed)
    keep = stratified_fraction(resized.labels[rows], cfg.fraction)
    rows = rows[keep]
    train_sub = resized.subset(rows, split="train")
    held_sub = resized.subset(held, split="heldout") if len(held) else None
    return PreparedData(train_sub, held_sub, val_data if cfg.validation is not None else None, mean, std,
                        fingerprint)


def _bytes_fingerprint(split) -> str:
    import hashlib

    h = hashlib.sha256(np.ascontiguousarray(split.images).tobytes())
    h.update(np.ascontiguousarray(split.labels).tobytes())
    return f"{split.dataset}-{split.split}-bytes-{h.hexdigest()[:20]}"


def teacher_train_id(teacher_dir: Optional[str]) -> Optional[str]:
    """The training id recorded in a teacher's model directory (``model.json``)."""
    if not teacher_dir:
        return None
    meta = read_model_meta(teacher_dir)
    tid = meta.get("train_id")
    if not tid:
        raise ConfigError(f"teacher {teacher_dir} has no training id in its {MODEL_META}; pass the model directory "
                          f"of a finished fsl-bench training run")
    return str(tid)


def identity_of(cfg: TrainConfig, fingerprint: str) -> Tuple[Dict[str, Any], str]:
    """``(training identity, train id)`` of ``cfg`` for a training split with content ``fingerprint``."""
    identity = training_identity(cfg, fingerprint, teacher_train_id(cfg.teacher))
    return identity, train_id(identity)


# ------------------------------------------------------------------------------------------- helpers
def build_optimizer(method, mcfg) -> torch.optim.Optimizer:
    params = method.trainable_parameters()
    if getattr(mcfg, "optimizer", "sgd") == "adam":
        return torch.optim.Adam(params, lr=mcfg.lr, weight_decay=mcfg.weight_decay)
    return torch.optim.SGD(params, lr=mcfg.lr, momentum=mcfg.momentum, nesterov=bool(mcfg.nesterov) and
                           mcfg.momentum > 0, weight_decay=mcfg.weight_decay)


def milestones(mcfg) -> List[int]:
    """Epoch numbers of the LR decays: ``round(f * epochs)`` for each fraction (values > 1 are epochs)."""
    out = []
    for f in tuple(getattr(mcfg, "lr_milestones", ()) or ()):
        m = int(f) if f > 1 else int(round(float(f) * mcfg.epochs))
        if 0 < m < mcfg.epochs or (f > 1 and m < mcfg.epochs):
            out.append(m)
    return sorted(set(out))


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``bf16``/``fp16`` on the device's type; a no-op for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def plot_curves(history: List[Dict[str, float]], path: Path) -> Optional[Path]:
    """Training-curve PNG (loss terms, accuracies in %, learning rate per epoch from 1; matplotlib Agg)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [int(h["epoch"]) for h in history]
    keys = sorted({k for h in history for k in h})
    groups = [("loss terms", "value", [k for k in keys if k.startswith("train_")]),
              ("accuracy", "accuracy (%)", [k for k in keys if k.endswith("_acc")]),
              ("learning rate", "lr", ["lr"])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, ylabel, ks) in zip(axes, groups):
        for k in ks:
            ys = [h.get(k, float("nan")) for h in history]
            ax.plot(epochs, ys, marker="o", label=k)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_xticks(epochs if len(epochs) <= 20 else ax.get_xticks())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(len(epochs), 10)))
        if ks:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- train
def initial_method(cfg: TrainConfig, mcfg, num_classes: int, num_samples: int, teacher=None):
    """``cfg.method`` (config ``mcfg``) with the weights training seed ``cfg.seed`` starts from
    (:func:`fsl_lsskd.methods.settings.initial_method`)."""
    from ..methods.settings import initial_method as initial

    return initial(cfg.method, mcfg, cfg.backbone, cfg.image_size, cfg.seed, num_classes, num_samples, teacher)


def build_run(cfg: TrainConfig, data: PreparedData, teacher=None, dctx=None):
    """(method, method config, loader) for ``cfg`` on prepared data; model init seeded by ``cfg.seed`` (the
    same on every rank); the loader yields rank ``dctx.rank``'s slice of each global batch. Methods with
    a per-sample prediction memory train on every sample every epoch (the short last batch is kept, as PS-KD's
    reference does); the others drop it (RFS)."""
    cls = method_class(cfg.method)
    mcfg = build_method_config(cls.config_cls, cfg)
    method = initial_method(cfg, mcfg, int(data.train.num_classes), len(data.train), teacher)
    method = method.to(cfg.device).to(memory_format=method.memory_format())
    loader = TrainLoader(data.train.images, data.train.labels, data.mean, data.std, batch_size=mcfg.batch_size,
                         seed=cfg.seed, device=cfg.device, drop_last=not getattr(cls, "keeps_last_batch", False),
                         rank=dctx.rank if dctx else 0, world_size=dctx.world_size if dctx else 1)
    return method, mcfg, loader


def default_validator(cfg: TrainConfig, data: PreparedData) -> Optional[Validator]:
    """ProtoNet on ``cfg.validation`` val episodes, and the method's own readout when it has one (MAML's
    ``maml_finetune``); None when validation is off or there is no val split."""
    if cfg.validation is None or data.val is None:
        return None
    from ..eval.validation import fewshot_validator
    from ..protocol import check_capacity

    # checked up front by check_train_config unless the data was downloaded by this run: check before epoch 1
    check_capacity(data.val.class_counts(), cfg.validation, data.val.class_names,
                   where=f"{cfg.dataset} val split (validation: {cfg.validation.key} x{cfg.validation.n_episodes} "
                         f"every epoch)",
                   fix="pass --val-n-episodes 0 (no per-epoch validation) or lower --val-n-shot/--val-n-query")

    return fewshot_validator(data.val, cfg.validation, data.mean, data.std, cfg.image_size, cfg.device,
                             own_readout=method_class(cfg.method).own_readout)


def train(cfg: TrainConfig, *, train_data=None, val_data=None, mean=None, std=None, teacher=None,
          validator: Optional[Validator] = None, store=None, parent_run_id: Optional[str] = None,
          tags: Optional[Dict[str, str]] = None, stop_after_epoch: Optional[int] = None,
          on_epoch: Optional[Callable[[int, int, Dict[str, float]], None]] = None,
          resume_run_id: Optional[str] = None) -> TrainResult:
    """Train ``cfg.method`` and return a :class:`TrainResult`.

    Args:
        train_data/val_data (``SplitData``), mean, std: replace loading ``cfg.dataset`` (tests, benchmarks).
        teacher: a loaded teacher method (else ``cfg.teacher``'s model directory is loaded).
        validator: ``validator(backbone) -> metrics`` run every epoch on rank 0 (default
            :func:`default_validator`); its metrics are logged and shown.
        store: a :class:`fsl_lsskd.record.Store` (default: opened when ``cfg.mlflow``); ``parent_run_id`` nests
            the training run under an invocation run; ``tags`` are added to it; ``resume_run_id`` is an unfinished
            run of this training identity to continue in when there is no resume state (a run killed before its
            first epoch's state was written), instead of starting a second run.
        stop_after_epoch: stop after that many completed epochs (like a kill; nothing finished), for time-sliced
            runs.
        on_epoch: ``on_epoch(epochs_done, epochs, metrics)`` on rank 0 after each epoch's resume state is written,
            and once before the first epoch with the epochs already done.

    Rank 0 shows its progress (:mod:`fsl_lsskd.progress`): the data loading, every epoch (loss, images/s, ETA of
    the run) and, on a terminal or every 30 s in a log, the batches of the epoch (running loss, images/s, ETA).

    Resumes from ``cfg.out_dir/last.pt`` when it exists and has the same training identity; returns at once when
    ``out_dir`` already holds the finished model of this identity. A different identity raises
    :class:`ConfigError` naming the differing keys. Raises :class:`TrainingDiverged` on a NaN/inf loss.

    Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE > 1``) the N processes train one run together:
    ``batch_size`` is the global batch; BatchNorm uses global-batch statistics unless ``cfg.sync_bn`` is False;
    rank 0 alone writes files, logs, validates and exports.
    """
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    from . import distributed

    with distributed.process_group(cfg.device) as dctx:
        return _train(cfg, dctx, train_data=train_data, val_data=val_data, mean=mean, std=std, teacher=teacher,
                      validator=validator, store=store, parent_run_id=parent_run_id, tags=tags,
                      stop_after_epoch=stop_after_epoch, on_epoch=on_epoch, resume_run_id=resume_run_id)


def _setup_distributed(cfg: TrainConfig, method, dctx) -> None:
    """Global-batch BatchNorm (unless ``cfg.sync_bn`` is off) and all-gathering prediction memories."""
    from . import distributed

    say = log.info if dctx.is_main else log.debug
    if distributed.uses_batchnorm(method):
        if method.episodic:
            # MAML normalises each task with its own statistics, and a task lives on one rank
            say("episodic method: BatchNorm keeps per-task statistics (tasks are split over processes)")
        elif cfg.sync_bn:
            _, n = distributed.convert_sync_batchnorm(method, dctx.device)
            say("%d BatchNorm layers use the statistics of the global batch (sync_bn)", n)
        elif dctx.is_main:
            log.warning("sync_bn is off: BatchNorm normalises each process's slice of %d images separately, so "
                        "results depend on the number of processes", method.config.batch_size // dctx.world_size)
    distributed.enable_store_gather(method)


def finished_model(out: Path, tid: str, identity: Dict[str, Any]) -> bool:
    """Whether ``out`` holds the finished model of training id ``tid``; a finished model of another identity
    raises :class:`ConfigError` naming the differing keys."""
    meta_path = out / MODEL_DIR / MODEL_META
    if not meta_path.is_file():
        return False
    meta = read_model_meta(meta_path.parent)
    if meta.get("train_id") == tid:
        return True
    keys = diff_keys(meta.get("identity", {}), identity)
    raise ConfigError(f"{out} holds a finished run of a different configuration (differs in {', '.join(keys)}); "
                      f"use a new --out directory, or delete {out} to train again")


def _train(cfg: TrainConfig, dctx, *, train_data, val_data, mean, std, teacher, validator, store, parent_run_id,
           tags, stop_after_epoch, on_epoch, resume_run_id=None) -> TrainResult:
    from . import distributed

    run_cfg = replace(cfg, device=str(dctx.device)) if dctx.enabled else cfg  # cuda -> cuda:LOCAL_RANK
    out = Path(cfg.out_dir)
    # unwritable --out: OutputError (exit 2, stops a grid), not a crashed cell; the directory itself is created
    # only once the run starts writing, so a run that fails on its data or settings leaves no empty --out behind
    check_writable_dir(out, "--out")
    ckpt_path = out / CHECKPOINT_NAME
    label = f"training {cfg.method} {cfg.backbone} {cfg.dataset} seed {cfg.seed}"
    if dctx.is_main:
        announce(f"{label}: loading the data" + (" (decoded into the cache on a dataset's first use)"
                                                 if train_data is None else ""))
    with dctx.main_first():  # rank 0 decodes the dataset cache, then the other ranks read it
        data = prepare_data(cfg, train_data, val_data, mean, std)
    identity, tid = identity_of(cfg, data.fingerprint)
    if finished_model(out, tid, identity):
        log.info("%s already holds the finished run %s", out, tid)
        meta = read_model_meta(out / MODEL_DIR)
        export = out / EXPORT_DIR if (out / EXPORT_DIR).is_dir() else None
        history = list(meta.get("history", []))
        return TrainResult(out / MODEL_DIR, export, meta.get("mlflow_run_id"), tid, identity,
                           dict(history[-1]) if history else {}, out, history, len(history), True,
                           rank=dctx.rank, world_size=dctx.world_size)

    if teacher is None and cfg.teacher:
        teacher = load_method(cfg.teacher, run_cfg.device)
        for p in teacher.parameters():
            p.requires_grad_(False)
    method, mcfg, loader = build_run(run_cfg, data, teacher, dctx)
    if dctx.is_main and steps_per_epoch(method, loader) == 0:
        log.warning("%s %s seed %d takes no training step (episodes_per_epoch: 0): it validates, exports and scores "
                    "its initial weights, an untrained reference", cfg.method, cfg.backbone, cfg.seed)
    distributed.check_method(method, mcfg, loader, dctx)
    if dctx.enabled:
        _setup_distributed(cfg, method, dctx)
    optimizer = build_optimizer(method, mcfg)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones(mcfg), gamma=mcfg.lr_gamma)
    scaler = torch.amp.GradScaler(torch.device(run_cfg.device).type, enabled=cfg.precision == "fp16")

    start_epoch, history, run_id = 0, [], resume_run_id
    if ckpt_path.exists():
        ckpt = read_training_state(ckpt_path, map_location=run_cfg.device)
        old = ckpt["meta"].get("identity", {})
        if ckpt["meta"].get("train_id") != tid:
            detail = ", ".join(diff_keys(old, identity)) or "record format"
            raise ConfigError(f"{ckpt_path} was written by a different configuration (differs in {detail}); use a "
                              f"new --out directory or delete {ckpt_path} to start over")
        method.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, history, run_id = int(ckpt["epoch"]), list(ckpt.get("history", [])), ckpt.get("mlflow_run_id")
        log.info("resuming %s from epoch %d", ckpt_path, start_epoch)
    distributed.check_same_start(dctx, start_epoch, ckpt_path)
    step_fn = distributed.wrap_training_step(method, dctx)  # after loading: DDP starts from rank 0's state
    if validator is None and dctx.is_main:
        validator = default_validator(run_cfg, data)

    meta = {"method": cfg.method, "backbone": cfg.backbone, "num_classes": int(data.train.num_classes),
            "num_samples": len(data.train), "image_size": int(cfg.image_size), "dataset": cfg.dataset,
            "class_names": list(data.train.class_names), "mean": list(data.mean), "std": list(data.std),
            "method_config": json.loads(json.dumps(asdict(mcfg), default=str)), "identity": identity,
            "train_id": tid, "format_version": STATE_FORMAT, "world_size": dctx.world_size,
            "precision": cfg.precision}
    make_dir(out)
    if dctx.is_main:
        atomic_write_text(out / "config.json", json.dumps({"train": cfg.to_dict(), "identity": identity,
                                                           "train_id": tid}, indent=2, default=str) + "\n")
    if cfg.mlflow and dctx.is_main:
        from ..record import open_store

        store = store or open_store()
        params = {"run": {k: v for k, v in cfg.to_dict().items() if k not in ("method_overrides", "dataset_options")},
                  "num_classes": meta["num_classes"], "num_train_images": len(data.train),
                  "num_heldout_images": len(data.heldout) if data.heldout is not None else 0,
                  "world_size": dctx.world_size, "torch_threads": torch.get_num_threads()}
        run_id = store.start_training(cfg.experiment, cfg.run_name or out.name, tid, identity, tags=tags,
                                      params=params if run_id is None else None, parent_run_id=parent_run_id,
                                      resume_run_id=run_id)
        _backfill_epochs(store, run_id, history)
    else:
        store = None

    epochs_bar = None
    try:
        if dctx.is_main:
            epochs_bar = Progress(mcfg.epochs, label, "epoch", initial=start_epoch, interval=0, rate=False)
        if on_epoch is not None and dctx.is_main:
            on_epoch(start_epoch, mcfg.epochs, dict(history[-1]) if history else {})
        with torch.random.fork_rng(devices=[]):
            for epoch in range(start_epoch, mcfg.epochs):
                if stop_after_epoch is not None and epoch >= stop_after_epoch:
                    break
                metrics = _run_epoch(run_cfg, method, loader, optimizer, scheduler, scaler, epoch, data, step_fn,
                                     dctx, validator, epochs=mcfg.epochs)
                if dctx.is_main:
                    state = {"model": method.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                             "rng": {"loader": loader.generator.get_state(), "torch": torch.get_rng_state()},
                             "history": history + [metrics], "mlflow_run_id": run_id, "meta": meta}
                    save_training_state(state, ckpt_path)
                    if store is not None:
                        store.log_metrics(run_id, {k: v for k, v in metrics.items() if k != "epoch"}, step=epoch + 1)
                    log.info("epoch %d/%d %s", epoch + 1, mcfg.epochs,
                             " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
                    epochs_bar.update(1, **epoch_postfix(metrics))
                    if on_epoch is not None:
                        on_epoch(epoch + 1, mcfg.epochs, metrics)
                # rank 0's metrics (with validation) once its checkpoint is written: one history everywhere
                history.append(dctx.broadcast_object(metrics))
        model_dir = export_dir = None
        if len(history) >= mcfg.epochs and dctx.is_main:
            model_dir, export_dir = _finish(cfg, method, meta, history, run_id, out, store)
    except BaseException as exc:
        if store is not None and run_id is not None:  # a killed run is resumed into the same run later
            store.fail(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if epochs_bar is not None:
            epochs_bar.close()
    # the other ranks return once rank 0 has written everything
    run_id, model_dir, export_dir = dctx.broadcast_object((run_id, model_dir, export_dir))
    final = dict(history[-1]) if history else {}
    return TrainResult(model_dir, export_dir, run_id, tid, identity, final, out, history, start_epoch,
                       rank=dctx.rank, world_size=dctx.world_size)


def _backfill_epochs(store, run_id: str, history: List[Dict[str, float]]) -> None:
    """Log the epochs of a resumed checkpoint's ``history`` that its MLflow run lacks: an epoch's checkpoint is
    written before its metrics are logged, so a job stopped between the two (preempted, killed) resumes after
    an epoch the record never got. Each epoch is then in the record once, at step = epoch."""
    if not history:
        return
    key = next((k for k in history[0] if k != "epoch"), None)
    if key is None:
        return
    logged = {int(step) for step, _ in store.metric_history(run_id, key)}
    for epoch, metrics in enumerate(history, start=1):
        if epoch not in logged:
            log.info("logging epoch %d of the resumed run, which its record lacked", epoch)
            store.log_metrics(run_id, {k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)


def _finish(cfg: TrainConfig, method, meta: Dict[str, Any], history, run_id, out: Path, store):
    """Write the finished model and export, record them (``fsl.status=complete`` last), drop the resume state."""
    from ..checkpoint import export_backbone

    model_dir = save_model(method, {**meta, "history": history, "mlflow_run_id": run_id}, out / MODEL_DIR)
    export_dir = None
    if cfg.export:
        export_dir = out / EXPORT_DIR
        export_backbone(method.export_backbone().cpu(), cfg.backbone, cfg.image_size, export_dir,
                        extra={"method": cfg.method, "train_id": meta["train_id"], "dataset": cfg.dataset,
                               "mean": meta["mean"], "std": meta["std"]})
    curve = plot_curves(history, out / "training_curves.png")
    if store is not None:
        store.finish_training(run_id, model_dir, export_dir, [out / "config.json"] + ([curve] if curve else []))
    (out / CHECKPOINT_NAME).unlink(missing_ok=True)  # resume-only state (optimiser, prediction memories)
    return model_dir, export_dir


def epoch_postfix(metrics: Dict[str, float]) -> Dict[str, Any]:
    """What an epoch's progress line shows of its metrics: loss, validation and held-out accuracy, images/s."""
    shown: Dict[str, Any] = {}
    for key, name in (("train_loss", "loss"), ("val_fewshot_acc", "val_acc"), ("heldout_base_acc", "base_acc")):
        if key in metrics:
            shown[name] = float(metrics[key])
    for key in sorted(metrics):  # a method's own readout on the val episodes (val_maml_finetune_acc -> val_maml_finetune)
        if key.startswith("val_") and key.endswith("_acc") and key != "val_fewshot_acc":
            shown[key[:-len("_acc")]] = float(metrics[key])
    if "images_per_s" in metrics:
        shown["_ips"] = f"{metrics['images_per_s']:.0f} img/s"
    return shown


def steps_per_epoch(method, loader) -> int:
    """Optimiser steps in one epoch: the loader's batches, or an episodic method's episode batches."""
    per = getattr(method, "batches_per_epoch", None)
    return int(per()) if callable(per) else len(loader)


def _run_epoch(cfg: TrainConfig, method, loader: TrainLoader, optimizer, scheduler, scaler, epoch: int,
               data: PreparedData, step_fn=None, dctx=None, validator: Optional[Validator] = None,
               epochs: Optional[int] = None) -> Dict[str, float]:
    """One epoch: train (``step_fn`` = the method's step, DDP-wrapped on several processes, under autocast),
    reduce the metrics over the ranks, then validate (rank 0). Metric ``epoch`` counts from 1. Rank 0 shows the
    progress of the batches (``epochs``: the run's number of epochs, for its description); it only reads."""
    from .distributed import DistContext, nonfinite_losses, shard_tasks

    dctx = dctx if dctx is not None else DistContext(device=loader.device)
    step_fn = step_fn if step_fn is not None else method.training_step
    # the global torch RNG (dropout, stochastic depth, method sampling) restarts from (seed, epoch[, rank]): a
    # resumed epoch replays exactly; the caller's RNG state is restored by fork_rng
    seed_torch("training_global", cfg.seed, epoch, rank=dctx.rank)
    method.train()
    method.on_epoch_start(epoch)
    lr = float(optimizer.param_groups[0]["lr"])
    sums: Dict[str, float] = {}
    n_images, n_steps = 0, 0
    t0 = time.perf_counter()
    task_size = getattr(method.config, "task_size", 0)
    bar = None
    if dctx.is_main:
        bar = Progress(steps_per_epoch(method, loader), f"epoch {epoch + 1}" + (f"/{epochs}" if epochs else ""),
                       "batch", announce=False, leave=False, rate=False)
    for step, batch in enumerate(method.iter_batches(loader, epoch)):
        if dctx.enabled and method.episodic:  # every rank sampled the same tasks; keep this rank's share
            batch = shard_tasks(batch, task_size, dctx)
        with autocast(cfg.precision, loader.device):
            outputs = step_fn(batch, epoch)
        loss = outputs["loss"].float()
        bad = nonfinite_losses(dctx, loss)  # every rank sees every rank's verdict: all stop together
        if bad:
            where = f" on rank {', '.join(str(r) for r, _ in bad)} of {dctx.world_size}" if dctx.enabled else ""
            raise TrainingDiverged(f"{cfg.method}: loss is {bad[0][1]} at epoch {epoch + 1} step {step}{where}; "
                                   f"training stopped. Lower the learning rate (--set lr=...) or check the data")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        method.on_step_end(batch, epoch)
        bs = int(batch.images.shape[0])
        n_images += bs
        n_steps += 1
        for k, v in outputs.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach().float()) * bs
        if bar is not None:  # this rank's running mean loss and images/s
            bar.update(1, loss=sums["loss"] / n_images,
                       _ips=f"{n_images * dctx.world_size / max(time.perf_counter() - t0, 1e-9):.0f} img/s")
    train_time = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    if n_steps:  # an epoch of no steps (episodes_per_epoch: 0, a reference row of initial weights) keeps the lr
        scheduler.step()
    if dctx.enabled:  # global means: sums and image counts over the ranks, the slowest rank's time
        keys = sorted(sums)
        tot = dctx.all_reduce([sums[k] for k in keys] + [n_images], "sum")
        sums, n_images = dict(zip(keys, tot[:-1])), int(tot[-1])
        train_time = dctx.all_reduce([train_time], "max")[0]
    metrics: Dict[str, float] = {"epoch": float(epoch + 1)}
    for k, v in sums.items():
        metrics[f"train_{k}"] = v / max(n_images, 1)
    metrics.update({"lr": lr, "images_per_s": n_images / max(train_time, 1e-9), "epoch_time_s": train_time,
                    "steps": float(n_steps)})
    if dctx.is_main:  # the other ranks wait for rank 0's metrics (DistContext.broadcast_object)
        from ..eval.validation import base_accuracy

        tv = time.perf_counter()
        acc = base_accuracy(method, data.heldout, data.train if method.episodic else None, data.mean, data.std,
                            loader.device)
        if acc is not None:
            metrics["heldout_base_acc"] = acc
        if validator is not None:
            metrics.update(validator(method.export_backbone().to(loader.device)))
        metrics["val_time_s"] = time.perf_counter() - tv
    method.train()
    return metrics


def remove_run_dir(out: Path) -> None:
    """Delete a finished cell's run directory (its files are in the store)."""
    shutil.rmtree(out, ignore_errors=True)
