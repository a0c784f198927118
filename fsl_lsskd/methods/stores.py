"""Per-sample prediction memory (PS-KD, Kim et al. ICCV 2021, lgcnsai/PS-KD-Pytorch main.py
``all_predictions``; LSSKD's per-layer memories ``[N, 4, 4C]``).

A prediction memory keeps, for every training sample, the detached softmax the network gave it at its last
visit, to build the next epoch's soft targets. ("Store" in this project means the MLflow record,
:mod:`fsl_lsskd.record`; the code names here, :class:`PredictionStore` and the methods' ``store_*`` settings and
buffers, keep their names because they are part of training identities and resume checkpoints.) Two layouts:

- **dense**: the full rows ``[N, *dims]`` in ``dtype`` (the reference: float32 ``[N, C]``);
- **top-k** (``top_k = k``): for every row, the ``k`` largest probabilities (float16) and their class
  indices (int16, or int32 for more than 32,767 classes); :meth:`get` rebuilds the row with the remaining
  probability mass spread evenly over the other classes, so it still sums to 1 (the maximum-entropy
  completion). Memory per row: ``4k`` bytes instead of ``4K`` (or ``2K`` in float16): at ImageNet-1k size
  (1.28 M images, K = 1000) PS-KD's memory is 0.1 GB at k = 20 instead of 5.1 GB, LSSKD's four auxiliary memories
  (K = 4000 per rotation) 1.6 GB instead of 157 GB (docs/design.md, "Prediction memory size").

Methods choose with :func:`choose_top_k` (their ``store_layout`` setting): ``auto`` (default) keeps dense rows
while they fit a memory budget (2 GB: every CPU profile, CIFAR-FS, Tiny ImageNet) and top-k rows beyond it
(ImageNet-1k). The accuracy effect of top-k against dense is measured in ``results/`` (docs/methods.md,
"Prediction memory").

The memory's tensors are *persistent buffers*, so a resume checkpoint carries them; the finished model does not
(:func:`fsl_lsskd.checkpoint.weights_state` drops them: they are training state).

Multi-process training (``torchrun``): the engine sets ``gather_across_ranks``; ``put`` then all-gathers the
indices and rows of every rank's slice before writing, so every rank holds the full, identical memory (PS-KD
main.py all-gathers ``inputs_index`` and the predictions in DDP the same way)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn


LAYOUTS = ("auto", "dense", "topk")


def dense_bytes(num_samples: int, dims: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of a dense prediction memory ``[num_samples, *dims]`` of ``dtype``."""
    n = int(num_samples)
    for d in dims:
        n *= int(d)
    return n * torch.empty(0, dtype=dtype).element_size()


def choose_top_k(layout: str, top_k: int, budget_mb: float, shapes: Sequence[tuple]) -> int:
    """The ``top_k`` of a method's prediction memories (0 = dense) from its settings: ``dense``, ``topk``, or
    ``auto`` = dense while all its dense memories (``shapes``: ``(num_samples, dims, dtype)`` each) fit in ``budget_mb``, else top-k
    (a log line says which and why)."""
    import logging

    if layout not in LAYOUTS:
        raise ValueError(f"store_layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "dense":
        return 0
    if layout == "topk":
        return int(top_k)
    total = sum(dense_bytes(n, d, dt) for n, d, dt in shapes)
    if total <= budget_mb * 2 ** 20:
        return 0
    logging.getLogger(__name__).info("prediction memory: %.1f GB dense > %.0f MB budget: keeping the top-%d "
                                     "probabilities per row (store_layout: dense keeps full rows)",
                                     total / 2 ** 30, budget_mb, top_k)
    return int(top_k)


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (same shape on all ranks) concatenated in rank order along dim 0."""
    import torch.distributed as dist

    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)  # list form: gloo has no all_gather_into_tensor
    return torch.cat(parts)


def multi_process() -> bool:
    """Whether this process is one of several in an initialised ``torch.distributed`` group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class PredictionStore(nn.Module):
    """A prediction memory: rows ``[N, *dims]`` of stored (detached) probability rows, indexed by dataset index.

    Args:
        num_samples: ``N``, the training-set size (``Batch.index`` ranges over ``0..N-1``).
        dims: shape of one row, e.g. ``(C,)`` for PS-KD or ``(4, 4 * C)`` for an LSSKD auxiliary memory; the
            last dimension holds the class probabilities.
        dtype: storage dtype of a dense memory.
        top_k: keep only the ``top_k`` largest entries of every row (see module docstring); None/0 = dense.
    """

    def __init__(self, num_samples: int, dims: Union[int, Sequence[int]], dtype: torch.dtype = torch.float32,
                 top_k: Optional[int] = None) -> None:
        super().__init__()
        dims = (int(dims),) if isinstance(dims, int) else tuple(int(d) for d in dims)
        self.dims = dims
        self.num_classes = dims[-1]
        self.top_k = int(top_k) if top_k and int(top_k) < dims[-1] else 0
        n = int(num_samples)
        if self.top_k:
            index_dtype = torch.int16 if self.num_classes <= torch.iinfo(torch.int16).max else torch.int32
            self.register_buffer("values", torch.zeros((n,) + dims[:-1] + (self.top_k,), dtype=torch.float16))
            self.register_buffer("indices", torch.zeros((n,) + dims[:-1] + (self.top_k,), dtype=index_dtype))
        else:
            self.register_buffer("values", torch.zeros((n,) + dims, dtype=dtype))
        self.register_buffer("seen", torch.zeros(n, dtype=torch.bool))
        #: set by the engine in multi-process runs: ``put`` is then a collective (every rank must call it,
        #: in the same order, with the same number of rows)
        self.gather_across_ranks = False

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def bytes_per_sample(self) -> int:
        """Storage bytes of one training sample's rows (values, indices and the seen flag)."""
        per = self.values[0].numel() * self.values.element_size() + 1
        if self.top_k:
            per += self.indices[0].numel() * self.indices.element_size()
        return int(per)

    def _dense_rows(self, index: torch.Tensor) -> torch.Tensor:
        if not self.top_k:
            return self.values[index].float()
        vals = self.values[index].float()
        idx = self.indices[index].long()
        rest = (1.0 - vals.sum(-1, keepdim=True)).clamp_min(0.0) / float(self.num_classes - self.top_k)
        rows = rest.expand(*vals.shape[:-1], self.num_classes).clone()
        return rows.scatter_(-1, idx, vals)

    def get(self, index: torch.Tensor, default: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Float32 rows ``[B, *dims]`` for ``index`` (on the memory's device). Rows never written are replaced by
        the matching rows of ``default`` when given (PS-KD: one-hot targets on first visit), else zeros."""
        index = index.to(self.values.device)
        rows = self._dense_rows(index)
        unseen = ~self.seen[index]
        if bool(unseen.any()):
            mask = unseen.view((-1,) + (1,) * len(self.dims))
            fill = default.to(rows.device, torch.float32) if default is not None else torch.zeros_like(rows)
            rows = torch.where(mask, fill, rows)
        return rows

    @torch.no_grad()
    def put(self, index: torch.Tensor, probs: torch.Tensor) -> None:
        """Write detached probability rows ``probs [B, *dims]`` at ``index`` and mark them seen. With
        ``gather_across_ranks`` in a multi-process run, every rank's ``(index, rows)`` are all-gathered first
        (in the storage layout) and written on every rank."""
        probs = probs.detach()
        if self.top_k:
            vals, idx = torch.topk(probs.float(), self.top_k, dim=-1)
            parts = [vals.to(torch.float16), idx.to(self.indices.dtype)]
        else:
            parts = [probs.to(dtype=self.values.dtype)]
        if self.gather_across_ranks and multi_process():
            index, parts = _all_gather_cat(index), [_all_gather_cat(p) for p in parts]
        index = index.to(self.values.device)
        self.values[index] = parts[0].to(self.values.device)
        if self.top_k:
            self.indices[index] = parts[1].to(self.indices.device)
        self.seen[index] = True

    def extra_repr(self) -> str:
        layout = f"top_k={self.top_k}" if self.top_k else f"dense, dtype={self.values.dtype}"
        return f"num_samples={len(self)}, dims={self.dims}, {layout}"
