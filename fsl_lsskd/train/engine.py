"""The training engine: trains a registered method (``fsl_lsskd.registry.METHODS``) with any timm backbone on
the base (train) classes of a dataset split.

Data: the uint8 split cache -> held-out base images (stratified, seeded) -> limited-data fraction
(stratified, seeded; HSAKD ``--few-ratio`` protocol) -> :class:`TrainLoader` (whole-batch augmentation).
Optimisation: SGD (or Adam for episodic configs with ``optimizer="adam"``) + MultiStepLR at
``lr_milestones`` fractions of the epochs. A checkpoint is written atomically after every epoch and holds
everything needed to resume exactly; :func:`train` resumes from ``out_dir/last.pt`` automatically.
Launched by ``torchrun`` with several processes, one run trains on all of them (DistributedDataParallel;
:mod:`fsl_lsskd.train.distributed`)."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import ConfigError, TrainingDiverged
from ..utils import atomic_path, atomic_write_text, make_dir
from .checkpoint import FORMAT_VERSION, create_backbone, read_checkpoint, save_checkpoint
from .config import TrainConfig, build_method_config, config_hash, identity_dict
from .loader import TrainLoader, epoch_seed

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    checkpoint: Path
    backbone: Optional[Path]
    run_id: Optional[str]
    metrics: Dict[str, float]
    out_dir: Path
    history: List[Dict[str, float]] = field(default_factory=list)
    export_report: Optional[Dict[str, Any]] = None
    resumed_from_epoch: int = 0
    rank: int = 0  # this process in a multi-process (torchrun) run; 0 otherwise
    world_size: int = 1


# ----------------------------------------------------------------------------------------------- data
def limited_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Row indices of the limited-data protocol (:func:`fsl_lsskd.data.limited.stratified_fraction`)."""
    from ..data.limited import stratified_fraction

    return np.sort(np.asarray(stratified_fraction(labels, fraction, seed), dtype=np.int64))


def split_heldout(labels: np.ndarray, heldout: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows): a stratified seeded ``heldout`` fraction of every class with >= 2 images."""
    labels = np.asarray(labels)
    if heldout <= 0:
        return np.arange(len(labels)), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(epoch_seed(seed, 0, stream=11))
    held = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) < 2:
            continue
        k = min(len(rows) - 1, max(1, int(round(heldout * len(rows)))))
        held.append(rng.permutation(rows)[:k])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


@dataclass
class PreparedData:
    train: Any  # SplitData of the training rows
    heldout: Optional[Any]
    val: Optional[Any]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    fingerprint: str


def prepare_data(cfg: TrainConfig, train_data=None, val_data=None, mean=None, std=None) -> PreparedData:
    """Load (or take) the train split at ``cfg.image_size``, hold out base images and apply the fraction."""
    if train_data is None:
        from ..data import get_dataset

        ds = get_dataset(cfg.dataset, root=cfg.data_root, archive=cfg.archive)
        train_data = ds.load_split("train")
        if val_data is None and cfg.val_episodes > 0:
            val_data = ds.load_split("val")
        mean = mean if mean is not None else tuple(ds.mean)
        std = std if std is not None else tuple(ds.std)
    mean = tuple(mean) if mean is not None else (0.5, 0.5, 0.5)
    std = tuple(std) if std is not None else (0.25, 0.25, 0.25)
    train_data = train_data.resized(cfg.image_size)
    if val_data is not None:
        val_data = val_data.resized(cfg.image_size)
    rows, held = split_heldout(train_data.labels, cfg.heldout, cfg.seed)
    keep = limited_fraction(train_data.labels[rows], cfg.fraction, cfg.seed)
    rows = rows[keep]
    train_sub = train_data.subset(rows, split="train")
    held_sub = train_data.subset(held, split="heldout") if len(held) else None
    fp = f"{train_data.fingerprint}|rows{len(rows)}:{int(rows.sum()) % 1000003}"
    return PreparedData(train_sub, held_sub, val_data if cfg.val_episodes > 0 else None, mean, std, fp)


# ----------------------------------------------------------------------------------------- validation
@torch.no_grad()
def _batched(net, loader: TrainLoader, images_uint8: np.ndarray, bs: int = 512) -> torch.Tensor:
    outs = []
    for i in range(0, len(images_uint8), bs):
        x = torch.from_numpy(np.ascontiguousarray(images_uint8[i:i + bs])).permute(0, 3, 1, 2).to(loader.device)
        outs.append(net(loader.normalize(x)).float().cpu())
    return torch.cat(outs) if outs else torch.zeros(0)


@torch.no_grad()
def heldout_accuracy(method, loader: TrainLoader, heldout) -> Optional[float]:
    """Base-class top-1 accuracy on held-out train images (None when the method has no base classifier)."""
    if heldout is None or len(heldout) == 0:
        return None
    was = method.training
    method.eval()
    try:
        logits = _batched(method.backbone, loader, heldout.images)
    finally:
        method.train(was)
    if logits.ndim != 2 or logits.shape[1] != method.num_classes:
        return None
    return float((logits.argmax(1).numpy() == heldout.labels).mean())


@torch.no_grad()
def fewshot_val(net, loader: TrainLoader, val, episodes: int, seed: int, n_way: int = 5, n_shot: int = 5,
                n_query: int = 15) -> Dict[str, float]:
    """ProtoNet N-way K-shot accuracy (and its 95% CI) on the standard (published) val episodes, through the
    evaluator (:func:`fsl_lsskd.eval.evaluate`), so checkpoint selection uses the test-time protocol."""
    from ..eval._core import evaluate

    res = evaluate(net, val, shots=(n_shot,), n_way=n_way, n_query=n_query, n_episodes=episodes,
                   classifiers=("protonet",), mean=loader.mean, std=loader.std, image_size=loader.image_size,
                   device=loader.device, cache=False)[0]
    return {"val_fewshot_acc": float(res.mean), "val_fewshot_ci95": float(res.ci95)}


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


def _diff_keys(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def plot_curves(history: List[Dict[str, float]], path: Path) -> Optional[Path]:
    """Training-curve PNG (losses, accuracies, learning rate per epoch; matplotlib Agg)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    keys = sorted({k for h in history for k in h})
    groups = [("loss", [k for k in keys if k.startswith("train_")]),
              ("accuracy", [k for k in keys if k.endswith("_acc")]),
              ("learning rate", ["lr"])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, ks) in zip(axes, groups):
        for k in ks:
            ys = [h.get(k, float("nan")) for h in history]
            ax.plot(epochs, ys, marker="o", label=k)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ks:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- train
def build_run(cfg: TrainConfig, data: PreparedData, teacher=None, dctx=None):
    """(method, method config, loader) for ``cfg`` on prepared data; model init seeded by ``cfg.seed`` (the
    same on every rank); the loader yields rank ``dctx.rank``'s slice of each global batch."""
    from .. import plugins
    from ..registry import METHODS

    plugins.import_submodules("fsl_lsskd.methods")
    cls = METHODS.get(cfg.method)
    mcfg = build_method_config(cls.config_cls, cfg)
    num_classes = int(data.train.num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(epoch_seed(cfg.seed, 0, stream=7))
        backbone = create_backbone(cfg.backbone, num_classes=num_classes, image_size=cfg.image_size)
        method = cls(backbone, num_classes, len(data.train), mcfg, teacher)
    method = method.to(cfg.device).to(memory_format=torch.channels_last)
    loader = TrainLoader(data.train.images, data.train.labels, data.mean, data.std, batch_size=mcfg.batch_size,
                         seed=cfg.seed, device=cfg.device, rank=dctx.rank if dctx else 0,
                         world_size=dctx.world_size if dctx else 1)
    return method, mcfg, loader


def train(cfg: TrainConfig, *, train_data=None, val_data=None, mean=None, std=None, teacher=None,
          parent_run_id: Optional[str] = None, tags: Optional[Dict[str, str]] = None,
          stop_after_epoch: Optional[int] = None,
          on_epoch: Optional[Callable[[int, int, Dict[str, float]], None]] = None) -> TrainResult:
    """Train ``cfg.method`` and return a :class:`TrainResult`.

    ``train_data``/``val_data`` (``SplitData``) replace loading ``cfg.dataset`` (tests, benchmarks).
    Resumes from ``cfg.out_dir/last.pt`` when it exists and was written with the same config
    (else :class:`ConfigError` naming the differing keys). Raises :class:`TrainingDiverged` on a NaN/inf loss.
    ``stop_after_epoch=k`` stops after ``k`` completed epochs (like a kill; no export), for time-sliced runs.
    ``on_epoch(epochs_done, epochs, metrics)`` is called on rank 0 after each checkpoint (progress bars), and
    once before the first epoch with the epochs already done (0, or those of a resumed checkpoint).

    Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE > 1``) the N processes train one run together
    (:mod:`fsl_lsskd.train.distributed`): ``batch_size`` is the global batch, split into equal contiguous
    slices; BatchNorm uses global-batch statistics unless ``cfg.sync_bn`` is False; rank 0 alone writes the
    checkpoint and config, logs to MLflow, validates, plots and exports; every rank reads the same checkpoint
    to resume and returns the same history (``TrainResult.rank``/``world_size`` tell them apart).
    """
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    from . import distributed

    with distributed.process_group(cfg.device) as dctx:
        return _train(cfg, dctx, train_data=train_data, val_data=val_data, mean=mean, std=std, teacher=teacher,
                      parent_run_id=parent_run_id, tags=tags, stop_after_epoch=stop_after_epoch, on_epoch=on_epoch)


def _setup_distributed(cfg: TrainConfig, method, dctx) -> None:
    """Global-batch BatchNorm (unless ``cfg.sync_bn`` is off) and all-gathering prediction stores."""
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


def _train(cfg: TrainConfig, dctx, *, train_data, val_data, mean, std, teacher, parent_run_id, tags,
           stop_after_epoch, on_epoch) -> TrainResult:
    from . import distributed

    run_cfg = replace(cfg, device=str(dctx.device)) if dctx.enabled else cfg  # cuda -> cuda:LOCAL_RANK
    out = Path(cfg.out_dir)
    make_dir(out)  # unwritable --out: OutputError (exit 2, stops a grid), not a crashed cell
    ckpt_path = out / CHECKPOINT_NAME
    with dctx.main_first():  # rank 0 decodes the dataset cache, then the other ranks read it
        data = prepare_data(cfg, train_data, val_data, mean, std)

    if teacher is None and cfg.teacher:
        from .checkpoint import load_method

        teacher = load_method(cfg.teacher, run_cfg.device)
        for p in teacher.parameters():
            p.requires_grad_(False)
    method, mcfg, loader = build_run(run_cfg, data, teacher, dctx)
    distributed.check_method(method, mcfg, loader, dctx)
    if dctx.enabled:
        _setup_distributed(cfg, method, dctx)
    identity = identity_dict(cfg, mcfg, data.fingerprint)
    chash = config_hash(identity)
    optimizer = build_optimizer(method, mcfg)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones(mcfg), gamma=mcfg.lr_gamma)

    start_epoch, history, run_id = 0, [], None
    if ckpt_path.exists():
        ckpt = read_checkpoint(ckpt_path, map_location=run_cfg.device)
        old = ckpt["meta"].get("identity", {})
        if ckpt["meta"].get("config_hash") != chash:
            keys = _diff_keys(old, identity)
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {identity.get(k)!r}" for k in keys)
            raise ConfigError(f"{ckpt_path} was written by a different config ({detail}); use a new --out "
                              f"directory or delete {ckpt_path} to start over")
        method.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history, run_id = int(ckpt["epoch"]), list(ckpt.get("history", [])), ckpt.get("mlflow_run_id")
        log.info("resuming %s from epoch %d", ckpt_path, start_epoch)
    distributed.check_same_start(dctx, start_epoch, ckpt_path)
    step_fn = distributed.wrap_training_step(method, dctx)  # after loading: DDP starts from rank 0's state

    meta = {"method": cfg.method, "backbone": cfg.backbone, "num_classes": int(data.train.num_classes),
            "num_samples": len(data.train), "image_size": int(cfg.image_size), "dataset": cfg.dataset,
            "class_names": list(data.train.class_names), "mean": list(data.mean), "std": list(data.std),
            "config": cfg.to_dict(), "method_config": json.loads(json.dumps(asdict(mcfg), default=str)),
            "identity": identity, "config_hash": chash, "format_version": FORMAT_VERSION,
            "world_size": dctx.world_size}
    if dctx.is_main:
        atomic_write_text(out / "config.json", json.dumps({"train": cfg.to_dict(), "method": meta["method_config"],
                                                           "config_hash": chash}, indent=2, default=str) + "\n")

    run_tags = {"method": cfg.method, "backbone": cfg.backbone, "dataset": cfg.dataset, "seed": str(cfg.seed),
                "fraction": str(cfg.fraction), "config_hash": chash}
    run_tags.update(tags or {})
    if cfg.mlflow and dctx.is_main:
        from .. import tracking

        run_tags["git_commit"] = tracking.git_commit()
        run_ctx = _open_run(cfg, run_id, run_tags, parent_run_id)
    else:
        import contextlib

        run_ctx = contextlib.nullcontext(None)

    with run_ctx as run:
        if run is not None:
            from .. import tracking

            run_id = run.info.run_id
            if start_epoch == 0:
                params = {k: v for k, v in cfg.to_dict().items() if k != "method_overrides"}
                params["method_overrides"] = json.dumps(cfg.method_overrides, sort_keys=True, default=str)
                params["method_config"] = meta["method_config"]
                params["num_classes"] = meta["num_classes"]
                params["num_train_images"] = len(data.train)
                params["num_heldout_images"] = len(data.heldout) if data.heldout is not None else 0
                params["world_size"] = dctx.world_size
                tracking.log_params(params)
        if on_epoch is not None and dctx.is_main:
            on_epoch(start_epoch, mcfg.epochs, dict(history[-1]) if history else {})
        with torch.random.fork_rng(devices=[]):
            for epoch in range(start_epoch, mcfg.epochs):
                if stop_after_epoch is not None and epoch >= stop_after_epoch:
                    break
                metrics = _run_epoch(run_cfg, method, loader, optimizer, scheduler, epoch, data, step_fn, dctx)
                if dctx.is_main:
                    state = {"model": method.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "epoch": epoch + 1,
                             "rng": {"loader": loader.generator.get_state(), "torch": torch.get_rng_state(),
                                     "numpy_seed": cfg.seed},
                             "history": history + [metrics], "mlflow_run_id": run_id, "meta": meta}
                    save_checkpoint(state, ckpt_path)
                    if run is not None:
                        tracking.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
                    log.info("epoch %d/%d %s", epoch + 1, mcfg.epochs,
                             " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
                    if on_epoch is not None:
                        on_epoch(epoch + 1, mcfg.epochs, metrics)
                # rank 0's metrics (with validation) once its checkpoint is written: one history everywhere
                history.append(dctx.broadcast_object(metrics))
        report, backbone_path = None, None
        finished = len(history) >= mcfg.epochs
        if cfg.export and finished and dctx.is_main:
            from .export import export_network

            backbone_path = out / "export" / "backbone.safetensors"
            report = export_network(method.export_backbone().cpu(), cfg.backbone, cfg.image_size, out / "export",
                                    method=cfg.method, source=ckpt_path)
        curve = plot_curves(history, out / "training_curves.png") if dctx.is_main else None
        if run is not None:
            tracking.log_artifact(out / "config.json")
            tracking.log_artifact(ckpt_path, "checkpoint")
            if curve is not None:
                tracking.log_artifact(curve)
            if backbone_path is not None:
                tracking.log_artifact(backbone_path, "export")
                tracking.log_artifact(backbone_path.with_suffix(".json"), "export")
                tracking.log_metrics({"export_params": report["params"], "export_flops": report["flops"],
                                      "export_latency_ms": report["latency_ms_cpu_b1"]}, step=mcfg.epochs)
    # the other ranks return once rank 0 has written everything
    run_id, report, backbone_path = dctx.broadcast_object((run_id, report, backbone_path))
    final = dict(history[-1]) if history else {}
    return TrainResult(ckpt_path, backbone_path, run_id, final, out, history, report, start_epoch,
                       rank=dctx.rank, world_size=dctx.world_size)


def _open_run(cfg: TrainConfig, run_id: Optional[str], tags: Dict[str, str], parent_run_id: Optional[str]):
    from .. import tracking

    if run_id is not None:
        try:
            import mlflow

            tracking.quiet_mlflow()
            mlflow.get_run(run_id)
        except Exception:  # the run lives in another store (cwd / URI changed): start a fresh one
            log.warning("MLflow run %s not found in the current store; starting a new run", run_id)
            run_id = None
    return tracking.start_run(cfg.experiment, run_name=cfg.run_name or Path(cfg.out_dir).name, tags=tags,
                              run_id=run_id, parent_run_id=parent_run_id)


def _run_epoch(cfg: TrainConfig, method, loader: TrainLoader, optimizer, scheduler, epoch: int,
               data: PreparedData, step_fn=None, dctx=None) -> Dict[str, float]:
    """One epoch: train (``step_fn`` = the method's step, DDP-wrapped on several processes), reduce the
    metrics over the ranks, then validate (rank 0)."""
    from .distributed import DistContext, nonfinite_losses, shard_tasks

    dctx = dctx if dctx is not None else DistContext(device=loader.device)
    step_fn = step_fn if step_fn is not None else method.training_step
    # the global torch RNG (dropout, stochastic depth, method sampling) restarts from (seed, epoch[, rank]): a
    # resumed epoch replays exactly; the caller's RNG state is restored by fork_rng
    torch.manual_seed(epoch_seed(cfg.seed, epoch, stream=3, rank=dctx.rank))
    method.train()
    method.on_epoch_start(epoch)
    lr = float(optimizer.param_groups[0]["lr"])
    sums: Dict[str, float] = {}
    n_images, n_steps = 0, 0
    t0 = time.perf_counter()
    task_size = getattr(method.config, "task_size", 0)
    for step, batch in enumerate(method.iter_batches(loader, epoch)):
        if dctx.enabled and method.episodic:  # every rank sampled the same tasks; keep this rank's share
            batch = shard_tasks(batch, task_size, dctx)
        outputs = step_fn(batch, epoch)
        loss = outputs["loss"]
        bad = nonfinite_losses(dctx, loss)  # every rank sees every rank's verdict: all stop together
        if bad:
            where = f" on rank {', '.join(str(r) for r, _ in bad)} of {dctx.world_size}" if dctx.enabled else ""
            raise TrainingDiverged(f"{cfg.method}: loss is {bad[0][1]} at epoch {epoch} step {step}{where}; training "
                                   f"stopped. Lower the learning rate (--set lr=...) or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.on_step_end(batch, epoch)
        bs = int(batch.images.shape[0])
        n_images += bs
        n_steps += 1
        for k, v in outputs.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * bs
    train_time = time.perf_counter() - t0
    scheduler.step()
    if dctx.enabled:  # global means: sums and image counts over the ranks, the slowest rank's time
        keys = sorted(sums)
        tot = dctx.all_reduce([sums[k] for k in keys] + [n_images], "sum")
        sums, n_images = dict(zip(keys, tot[:-1])), int(tot[-1])
        train_time = dctx.all_reduce([train_time], "max")[0]
    metrics: Dict[str, float] = {"epoch": float(epoch)}
    for k, v in sums.items():
        metrics[f"train_{k}"] = v / max(n_images, 1)
    metrics.update({"lr": lr, "images_per_s": n_images / max(train_time, 1e-9), "epoch_time_s": train_time,
                    "steps": float(n_steps)})
    if dctx.is_main:  # the other ranks wait for rank 0's metrics (DistContext.broadcast_object)
        tv = time.perf_counter()
        acc = heldout_accuracy(method, loader, data.heldout)
        if acc is not None:
            metrics["heldout_base_acc"] = acc
        if data.val is not None and cfg.val_episodes > 0:
            net = method.export_backbone().to(loader.device)
            metrics.update(fewshot_val(net, loader, data.val, cfg.val_episodes, cfg.seed, n_shot=cfg.val_shot))
        metrics["val_time_s"] = time.perf_counter() - tv
    method.train()
    return metrics
