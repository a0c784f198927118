"""Per-sample prediction stores (PS-KD, Kim et al. ICCV 2021, lgcnsai/PS-KD-Pytorch main.py
``all_predictions``; reused by LSSKD for its per-layer stores ``[N, 4, 4C]``).

The store is a pair of *persistent buffers* (``values``, ``seen``) so a training checkpoint carries it and a
resumed run continues with exactly the same targets.

Multi-process training (``torchrun``): the engine sets ``gather_across_ranks`` on every store; ``put`` then
all-gathers the indices and predictions of every rank's slice before writing, so every rank holds the full,
identical store (PS-KD main.py all-gathers ``inputs_index`` and the predictions in DDP the same way)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn


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
    """Rows ``[N, *dims]`` of stored (detached) predictions, indexed by dataset index.

    Args:
        num_samples: ``N``, the training-set size (``Batch.index`` ranges over ``0..N-1``).
        dims: shape of one row, e.g. ``(C,)`` for PS-KD or ``(4, 4 * C)`` for an LSSKD auxiliary store.
        dtype: storage dtype; ``torch.float16`` halves memory (LSSKD's auxiliary stores, method.md §1.5).
    """

    def __init__(self, num_samples: int, dims: Union[int, Sequence[int]],
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        dims = (int(dims),) if isinstance(dims, int) else tuple(int(d) for d in dims)
        self.dims = dims
        self.register_buffer("values", torch.zeros((int(num_samples),) + dims, dtype=dtype))
        self.register_buffer("seen", torch.zeros(int(num_samples), dtype=torch.bool))
        #: set by the engine in multi-process runs: ``put`` is then a collective (every rank must call it,
        #: in the same order, with the same number of rows)
        self.gather_across_ranks = False

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def get(self, index: torch.Tensor, default: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Float32 rows for ``index`` (on the store's device). Rows never written are replaced by the
        matching rows of ``default`` when given (PS-KD: one-hot targets on first visit), else zeros."""
        index = index.to(self.values.device)
        rows = self.values[index].float()
        if default is not None:
            unseen = ~self.seen[index]
            if bool(unseen.any()):
                mask = unseen.view((-1,) + (1,) * len(self.dims))
                rows = torch.where(mask, default.to(rows.device, torch.float32), rows)
        return rows

    @torch.no_grad()
    def put(self, index: torch.Tensor, probs: torch.Tensor) -> None:
        """Write detached ``probs`` ``[B, *dims]`` at ``index`` and mark the rows seen. With
        ``gather_across_ranks`` in a multi-process run, every rank's ``(index, probs)`` are all-gathered first
        (in the storage dtype) and written on every rank."""
        probs = probs.detach().to(dtype=self.values.dtype)
        if self.gather_across_ranks and multi_process():
            index, probs = _all_gather_cat(index), _all_gather_cat(probs)
        index = index.to(self.values.device)
        self.values[index] = probs.to(self.values.device)
        self.seen[index] = True

    def extra_repr(self) -> str:
        return f"num_samples={len(self)}, dims={self.dims}, dtype={self.values.dtype}"
