"""Multi-process training: one run on N processes started by ``torchrun`` (PyTorch DistributedDataParallel,
https://pytorch.org/docs/stable/notes/ddp.html; launcher: https://pytorch.org/docs/stable/elastic/run.html).

The engine (:func:`fsl_lsskd.train.engine.train`) uses this module as follows:

- :func:`process_group` reads torchrun's ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``, initialises the default
  process group (gloo for CPU, nccl for CUDA, where rank ``r`` trains on ``cuda:LOCAL_RANK``) and destroys it
  at the end, also on error. Without torchrun (``WORLD_SIZE`` unset or 1) nothing changes.
- ``batch_size`` is the GLOBAL batch: every rank draws the same seeded permutation and augmentation of the
  global batch and trains on its contiguous slice (``TrainLoader(rank=, world_size=)``); episodic methods
  split the *tasks* of a meta-batch (:func:`shard_tasks`).
- :func:`wrap_training_step` wraps the method in DDP, routing ``Method.training_step`` through DDP's
  ``forward`` (DDP only reduces gradients of a backward that follows its own forward; PyTorch Lightning
  wraps its ``training_step`` the same way). Per-sample prediction memories are excluded from DDP's buffer
  broadcast: they are kept identical by their own all-gather (:meth:`PredictionStore.put`, as PS-KD's
  official code all-gathers predictions and indices, lgcnsai/PS-KD-Pytorch main.py).
- :func:`convert_sync_batchnorm` makes BatchNorm use the statistics of the global batch, so N processes
  train the same model as 1. ``torch.nn.SyncBatchNorm`` refuses CPU tensors (torch 2.14: "SyncBatchNorm
  expected input tensor to be on GPU", and ``aten::batch_norm_stats`` has no CPU kernel), so on CPU the
  BatchNorm layers get :class:`CPUSyncBatchNorm2d` & co. (two differentiable all-reduces per layer).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..methods.stores import multi_process
from ..methods.base import Batch

log = logging.getLogger(__name__)

_inits = 0  # process groups this process has created: a fresh key prefix each time (see process_group)


def _dist():
    import torch.distributed as dist

    return dist


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when absent)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not an integer; launch with "
                          f"`torchrun --nproc_per_node N ...`") from None


@dataclass
class DistContext:
    """Where this process stands in the run: ``rank`` of ``world_size`` processes, its ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ collectives (no-ops on 1 process)
    def _tensor(self, values, dtype=torch.float64) -> torch.Tensor:
        # nccl only moves CUDA tensors; gloo takes CPU ones
        dev = self.device if self.backend == "nccl" else torch.device("cpu")
        return torch.as_tensor(values, dtype=dtype, device=dev)

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> List[float]:
        """Element-wise ``sum``/``max``/``min`` of ``values`` over the ranks (float64)."""
        if not self.enabled:
            return [float(v) for v in values]
        dist = _dist()
        t = self._tensor(list(values))
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
        return [float(v) for v in t.cpu().tolist()]

    def gather_scalar(self, value: float) -> List[float]:
        """``value`` of every rank, in rank order (one all-reduce: each rank fills its own slot)."""
        if not self.enabled:
            return [float(value)]
        slots = [0.0] * self.world_size
        slots[self.rank] = float(value)
        return self.all_reduce(slots, "sum")

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects; also a barrier)."""
        if not self.enabled:
            return obj
        box = [obj]
        _dist().broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            self.all_reduce([0.0])  # a tiny all-reduce: works on every backend without device_ids

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the body first (e.g. decodes the dataset cache), then the others (read the cache)."""
        if self.enabled and not self.is_main:
            self.barrier()
        yield
        if self.enabled and self.is_main:
            self.barrier()


@contextlib.contextmanager
def process_group(device: str | torch.device = "cpu") -> Iterator[DistContext]:
    """The run's :class:`DistContext`; initialises (and at exit destroys) the default process group when
    launched by torchrun with ``WORLD_SIZE > 1``. A group the caller initialised is used and left alone.

    Rendezvous: ``env://`` (torchrun's ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``) behind a key
    prefix unique to each group this process creates, so :func:`train` may be called several times in one
    torchrun process (a plain re-``init_process_group`` would read the previous group's stale keys)."""
    global _inits
    device = torch.device(device)
    world = env_world_size()
    dist = _dist()
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        yield DistContext(device=device)
        return
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run on one process (without torchrun)")
    if "LOCAL_RANK" in os.environ:
        local_rank = int(os.environ["LOCAL_RANK"])
    else:  # a group the caller started without torchrun (e.g. torch.multiprocessing.spawn): one GPU per rank
        local_rank = dist.get_rank() % max(1, torch.cuda.device_count()) if dist.is_initialized() else 0
    if device.type == "cuda":
        if device.index is not None and device.index != local_rank:
            log.warning("device %s ignored on rank with LOCAL_RANK=%d: each process uses cuda:LOCAL_RANK",
                        device, local_rank)
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        backend = dist.get_default_backend_for_device(device) if hasattr(dist, "get_default_backend_for_device") \
            else ("nccl" if device.type == "cuda" else "gloo")
        store, rank, world = next(dist.rendezvous("env://"))
        _inits += 1
        dist.init_process_group(backend, store=dist.PrefixStore(f"fsl_lsskd/{_inits}", store), rank=rank,
                                world_size=world)
    ctx = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                      device=device, backend=dist.get_backend(), owns_group=owns)
    if ctx.is_main:
        log.info("distributed training: %d processes, backend %s, device %s on rank 0", ctx.world_size,
                 ctx.backend, device)
    try:
        yield ctx
    finally:
        if owns and dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ checks
def check_method(method, mcfg, loader, ctx: DistContext) -> None:
    """Raise :class:`ConfigError` naming the fix unless ``method`` can train on ``ctx.world_size`` processes
    with the same result as on one: every optimiser step must split into equal per-rank parts."""
    if not ctx.enabled:
        return
    w = ctx.world_size
    if getattr(method, "episodic", False):
        tasks = int(getattr(method, "tasks_per_batch", 1))
        if tasks % w:
            if hasattr(mcfg, "meta_batch_size"):
                fix = f"use --set meta_batch_size={w * max(1, -(-tasks // w))} (a multiple of {w})"
            else:
                fix = "train it on one process (without torchrun)"
            raise ConfigError(f"{type(method).__name__} puts {tasks} task(s) in each optimiser step; {w} processes "
                              f"split the tasks of a step, so that number must be a multiple of {w}: {fix}")
        episodes = int(getattr(mcfg, "episodes_per_epoch", 0))
        if episodes % w:
            raise ConfigError(f"episodes_per_epoch={episodes} does not split over {w} processes; use "
                              f"--set episodes_per_epoch={w * -(-episodes // w)} (a multiple of {w})")
        return
    loader.check_shardable()


def shard_tasks(batch: Batch, task_size: int, ctx: DistContext) -> Batch:
    """This rank's contiguous share of the tasks of an episodic ``batch`` (layout of
    :mod:`fsl_lsskd.methods.episodic`: ``task_size`` rows per task, tasks back to back)."""
    if not ctx.enabled:
        return batch
    n = int(batch.images.shape[0])
    tasks = n // int(task_size)
    if n % int(task_size) or tasks % ctx.world_size:
        raise ConfigError(f"an episode batch of {tasks} task(s) does not split over {ctx.world_size} processes; "
                          f"make meta_batch_size and episodes_per_epoch multiples of {ctx.world_size}")
    per = tasks // ctx.world_size * int(task_size)
    sl = slice(ctx.rank * per, (ctx.rank + 1) * per)
    return Batch(batch.images[sl], batch.labels[sl], batch.index[sl])


def check_same_start(ctx: DistContext, start_epoch: int, path) -> None:
    """Every rank must resume from the same epoch (all read ``path``; a node that cannot see it starts at 0)."""
    if not ctx.enabled:
        return
    lo, hi = ctx.all_reduce([start_epoch], "min")[0], ctx.all_reduce([start_epoch], "max")[0]
    if lo != hi:
        raise CheckpointError(f"ranks disagree on the resume epoch ({int(lo)} vs {int(hi)}): {path} is not the "
                              f"same file on every node; put --out on storage that all nodes share")


# --------------------------------------------------------------------------------------------------- DDP
class _TrainingStep(nn.Module):
    """``forward(batch, epoch) = method.training_step(batch, epoch)``, so DDP sees the method's step as its
    forward (DDP arms gradient reduction in ``forward``)."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, batch: Batch, epoch: int) -> Dict[str, torch.Tensor]:
        return self.method.training_step(batch, epoch)


def store_buffer_names(module: nn.Module, prefix: str = "") -> List[str]:
    """Fully qualified names of the buffers of every :class:`PredictionStore` under ``module``."""
    from ..methods.stores import PredictionStore

    names = []
    for mname, m in module.named_modules(prefix=prefix.rstrip(".")):
        if isinstance(m, PredictionStore):
            names += [f"{mname}.{b}" if mname else b for b, _ in m.named_buffers(recurse=False)]
    return names


def enable_store_gather(method: nn.Module, enabled: bool = True) -> int:
    """Make every :class:`PredictionStore` of ``method`` all-gather what ``put`` writes; returns their count."""
    from ..methods.stores import PredictionStore

    stores = [m for m in method.modules() if isinstance(m, PredictionStore)]
    for s in stores:
        s.gather_across_ranks = bool(enabled)
    return len(stores)


def wrap_training_step(method: nn.Module, ctx: DistContext) -> Callable[[Batch, int], Dict[str, torch.Tensor]]:
    """The callable the engine runs for one step: ``method.training_step`` on one process, a DDP-wrapped
    step on several. DDP broadcasts rank 0's parameters and buffers once (every rank starts equal) and
    averages gradients in ``backward``; prediction memories are left out (they are large and synced by
    their own all-gather). ``static_graph``: a method uses the same parameters at every step, but some flags
    leave heads out of the loss (e.g. LSSKD ``ls_aux=false``); DDP then learns the unused ones at the first
    step instead of walking the graph at every step (``find_unused_parameters``)."""
    if not ctx.enabled:
        return method.training_step
    from torch.nn.parallel import DistributedDataParallel as DDP

    step = _TrainingStep(method)
    DDP._set_params_and_buffers_to_ignore_for_model(step, store_buffer_names(step))
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(step, device_ids=device_ids, static_graph=True)


# ------------------------------------------------------------------------------------------- SyncBatchNorm
class _AllReduceSum(torch.autograd.Function):
    """Differentiable SUM all-reduce: the gradient of a sum over ranks w.r.t. one rank's input is the sum of
    the ranks' output gradients (as ``torch.distributed.nn.functional.all_reduce``, deprecated in torch 2.x)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone(memory_format=torch.contiguous_format)
        _dist().all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _AllReduceSum.apply(grad)


def _syncing(bn: nn.Module) -> bool:
    return bn.training and multi_process()


def sync_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Training-mode batch norm of ``x`` with the mean/variance of the union of every rank's batch (what one
    process sees): all-reduce the per-channel sum and count, then the sum of squared deviations from the
    global mean (two passes, no ``E[x^2]-E[x]^2`` cancellation). Running statistics get the global mean and
    unbiased variance, with ``_BatchNorm``'s momentum rules, so they are identical on every rank."""
    c = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    shape = [1, c] + [1] * (x.dim() - 2)
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    n_local = x.numel() // max(c, 1)
    stats = _AllReduceSum.apply(torch.cat([xf.sum(dims), xf.new_tensor([float(n_local)])]))
    count = stats[c].detach()
    mean = stats[:c] / count
    d = xf - mean.view(shape)
    var = _AllReduceSum.apply((d * d).sum(dims)) / count
    y = d * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else float(bn.momentum)
            unbiased = var.detach() * (count / torch.clamp(count - 1, min=1))
            bn.running_mean.mul_(1 - f).add_(mean.detach().to(bn.running_mean.dtype), alpha=f)
            bn.running_var.mul_(1 - f).add_(unbiased.to(bn.running_var.dtype), alpha=f)
    return y.to(x.dtype)


class CPUSyncBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with global-batch statistics across ranks in training (:func:`sync_batch_norm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sync_batch_norm(self, x) if _syncing(self) else super().forward(x)


class CPUSyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with global-batch statistics across ranks in training (:func:`sync_batch_norm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sync_batch_norm(self, x) if _syncing(self) else super().forward(x)


class CPUSyncBatchNorm3d(nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with global-batch statistics across ranks in training (:func:`sync_batch_norm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sync_batch_norm(self, x) if _syncing(self) else super().forward(x)


_CPU_SYNC: Dict[type, type] = {nn.BatchNorm1d: CPUSyncBatchNorm1d, nn.BatchNorm2d: CPUSyncBatchNorm2d,
                                nn.BatchNorm3d: CPUSyncBatchNorm3d}
try:
    from timm.layers import BatchNormAct2d
except ImportError:  # pragma: no cover - timm is a dependency of the backbones
    BatchNormAct2d = None
else:
    class CPUSyncBatchNormAct2d(BatchNormAct2d):
        """timm ``BatchNormAct2d`` (BN + drop + act, e.g. EfficientNet/MobileNet) with global-batch statistics
        across ranks in training."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not _syncing(self):
                return super().forward(x)
            return self.act(self.drop(sync_batch_norm(self, x)))

    _CPU_SYNC[BatchNormAct2d] = CPUSyncBatchNormAct2d


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> Tuple[nn.Module, int]:
    """``module`` with BatchNorm layers that use the global batch's statistics; returns ``(module, count)``.

    CUDA: ``timm.layers.convert_sync_batchnorm`` (``torch.nn.SyncBatchNorm``; timm's variant keeps the
    activation of its ``BatchNormAct2d``). CPU: the class of each ``nn.BatchNorm{1,2,3}d``/``BatchNormAct2d``
    becomes its ``CPUSync*`` subclass in place (same parameters and buffers: state dicts, checkpoints and the
    optimiser are unchanged). Other BatchNorm subclasses are left per-rank, with a warning."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return module, 0
    if device.type == "cuda":
        try:
            from timm.layers import convert_sync_batchnorm as timm_convert
        except ImportError:
            timm_convert = nn.SyncBatchNorm.convert_sync_batchnorm
        return timm_convert(module), len(bns)
    done, skipped = 0, set()
    targets = set(_CPU_SYNC.values())
    for m in bns:
        if type(m) in targets:
            done += 1
        elif type(m) in _CPU_SYNC:
            m.__class__ = _CPU_SYNC[type(m)]
            done += 1
        else:
            skipped.add(type(m).__name__)
    if skipped:
        log.warning("BatchNorm layers of type %s keep per-process statistics (no CPU sync variant); results with "
                    "several processes will differ slightly from one process", ", ".join(sorted(skipped)))
    return module, done


def uses_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def nonfinite_losses(ctx: DistContext, loss: torch.Tensor) -> List[Tuple[int, float]]:
    """``[(rank, value)]`` of every rank whose ``loss`` is NaN/inf (every rank gets the same list, so all stop
    together instead of the healthy ranks hanging in the next collective)."""
    values = ctx.gather_scalar(float(loss.detach()))
    return [(r, v) for r, v in enumerate(values) if not math.isfinite(v)]


__all__ = ["DistContext", "process_group", "check_method", "shard_tasks", "check_same_start",
           "wrap_training_step", "enable_store_gather", "store_buffer_names", "convert_sync_batchnorm",
           "sync_batch_norm", "CPUSyncBatchNorm1d", "CPUSyncBatchNorm2d", "CPUSyncBatchNorm3d", "uses_batchnorm",
           "nonfinite_losses", "env_world_size"]
