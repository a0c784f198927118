"""Per-sample prediction stores (PS-KD, Kim et al. ICCV 2021, lgcnsai/PS-KD-Pytorch main.py
``all_predictions``; reused by LSSKD for its per-layer stores ``[N, 4, 4C]``).

The store is a pair of *persistent buffers* (``values``, ``seen``) so a training checkpoint carries it and a
resumed run continues with exactly the same targets."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn


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
        """Write detached ``probs`` ``[B, *dims]`` at ``index`` and mark the rows seen."""
        index = index.to(self.values.device)
        self.values[index] = probs.detach().to(self.values.device, self.values.dtype)
        self.seen[index] = True

    def extra_repr(self) -> str:
        return f"num_samples={len(self)}, dims={self.dims}, dtype={self.values.dtype}"
