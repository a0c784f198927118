"""The engine's fast data path: whole-batch augmentation of a uint8 tensor cache.

Standard CIFAR-style augmentation (RandomCrop(pad 4) + RandomHorizontalFlip + Normalize, as used by rfs,
PS-KD and HSAKD) applied to a batch at once: zero padding, per-sample crop offsets gathered with one
advanced-indexing op, flips via ``torch.where``. Every random draw comes from a ``torch.Generator`` at the
``batches`` stream of ``(seed, epoch)`` (:mod:`fsl_lsskd.seeding`), so epoch ``e`` is identical whether or not
the run was resumed.

Multi-process runs (``rank``/``world_size``): ``batch_size`` is the global batch. Every rank draws the same
permutation and the crop/flip parameters of the whole global batch, then augments and returns only its
contiguous slice, so the union of the ranks' slices is exactly the one-process batch."""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..inputs import InputSpec
from ..methods.base import Batch
from ..seeding import torch_generator


class TrainLoader:
    """Shuffled, augmented mini-batches over a uint8 image cache.

    Args:
        images: uint8 ``[N,H,W,3]`` (numpy or tensor, as in ``SplitData``) or ``[N,3,H,W]`` tensor.
        labels: int64 ``[N]``.
        mean, std: per-channel normalisation (the dataset's).
        batch_size: images per (global) batch; ``drop_last`` drops the short last batch (rfs does) unless
            that would leave an epoch empty.
        seed: run seed; the epoch's permutation and augmentation draws come from ``(seed, epoch)``.
        padding: RandomCrop padding (4); ``flip``: random horizontal flip.
        device: where batches are produced.
        rank, world_size: this process's slice of every global batch in a multi-process run.
    """

    def __init__(self, images, labels, mean: Sequence[float], std: Sequence[float], batch_size: int = 64,
                 seed: int = 0, padding: int = 4, flip: bool = True, drop_last: bool = True,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1) -> None:
        x = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"images must be uint8 [N,H,W,3] or [N,3,H,W], got {x.dtype} {tuple(x.shape)}")
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)  # NHWC memory viewed as NCHW = channels_last
        self.device = torch.device(device)
        self.images = x.to(self.device).contiguous(memory_format=torch.channels_last)
        self.labels = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels,
                                      dtype=torch.int64).to(self.device)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.padding = int(padding)
        self.flip = bool(flip)
        self.drop_last = bool(drop_last)
        self.rank, self.world_size = int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.generator = torch_generator("batches", self.seed, 0)
        # (x/255 - mean)/std == x*scale + shift: the input contract's fused training form
        self.input_spec = InputSpec(self.mean, self.std)
        self._scale, self._shift = self.input_spec.affine(self.device)

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.labels)
        if self.drop_last and n >= self.batch_size:
            return n // self.batch_size
        return -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def normalize(self, uint8: torch.Tensor) -> torch.Tensor:
        """Float normalised batch, no augmentation (evaluation / episodic methods): uint8 ``[B, 3, H, W]`` ->
        float32 channels_last, ``x * scale + shift`` (:meth:`fsl_lsskd.inputs.InputSpec.affine`)."""
        x = uint8.to(self.device, torch.float32) * self._scale + self._shift
        return x.contiguous(memory_format=torch.channels_last)

    normalise = normalize

    def batch_sizes(self) -> List[int]:
        """Global size of each batch of an epoch."""
        n, b = self.num_samples, self.batch_size
        return [min(b, n - i * b) for i in range(len(self))]

    def check_shardable(self) -> None:
        """Raise :class:`ConfigError` naming the fix unless every global batch splits into ``world_size``
        equal slices (unequal slices would weight the ranks' mean losses, and so the gradients, unequally)."""
        w = self.world_size
        if w <= 1:
            return
        b = self.batch_size
        if b % w:
            lower = max(w, b // w * w)
            raise ConfigError(f"batch_size {b} is the global batch and must split evenly over {w} processes; use "
                              f"--batch-size {lower} or {lower + w} (a multiple of {w}), or another --nproc_per_node")
        bad = [s for s in self.batch_sizes() if s % w]
        if bad:
            raise ConfigError(f"the training set has {self.num_samples} images, so an epoch has a batch of {bad[0]} "
                              f"that does not split over {w} processes; use --batch-size <= {self.num_samples // w * w}"
                              f" and a multiple of {w}")

    def _draw(self, b: int, g: torch.Generator):
        """Crop offsets ``[2, b]`` (None without padding) and flip mask ``[b]`` (None without flips), in the
        order the one-process path has always drawn them."""
        off = torch.randint(0, 2 * self.padding + 1, (2, b), generator=g).to(self.device) if self.padding > 0 \
            else None
        flip = (torch.rand(b, generator=g) < 0.5).to(self.device) if self.flip else None
        return off, flip

    def augment(self, uint8: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Random crop (zero padding ``padding``) + horizontal flip + normalise, on the whole batch."""
        g = generator if generator is not None else self.generator
        off, flip = self._draw(int(uint8.shape[0]), g)
        return self._apply(uint8, off, flip)

    def _apply(self, uint8: torch.Tensor, off: Optional[torch.Tensor], flip: Optional[torch.Tensor]) -> torch.Tensor:
        b, c, h, w = uint8.shape
        p = self.padding
        x = uint8
        if off is not None:
            # NHWC view of the channels_last batch; zero padding as torchvision RandomCrop(fill=0); one gather
            # of each sample's window (flat row-major offsets), 3x faster than 3-tensor advanced indexing
            padded = torch.nn.functional.pad(x.permute(0, 2, 3, 1), (0, 0, p, p, p, p))  # [B,H+2p,W+2p,C]
            h2, w2 = h + 2 * p, w + 2 * p
            ar_h = torch.arange(h, device=self.device).view(1, h, 1) * w2
            ar_w = torch.arange(w, device=self.device).view(1, 1, w)
            idx = (off[0] * w2 + off[1]).view(b, 1, 1) + ar_h + ar_w  # [B,H,W]
            flat = padded.reshape(b, h2 * w2, c)
            x = torch.gather(flat, 1, idx.view(b, h * w, 1).expand(b, h * w, c)).view(b, h, w, c).permute(0, 3, 1, 2)
        if flip is not None:
            x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
        return self.normalize(x)

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        """The epoch's batches: a seeded permutation, each batch augmented; ``index`` = row in ``images``.
        With ``world_size > 1``, this rank's contiguous slice of each global batch (same draws as one process)."""
        torch_generator("batches", self.seed, epoch, generator=self.generator)
        perm = torch.randperm(self.num_samples, generator=self.generator).to(self.device)
        n_batches = len(self)
        for i in range(n_batches):
            idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
            off, flip = self._draw(len(idx), self.generator)  # the global batch's draws, on every rank
            if len(idx) % self.world_size:
                self.check_shardable()
            per = len(idx) // self.world_size  # one process: the whole batch
            sl = slice(self.rank * per, (self.rank + 1) * per)
            mine = idx[sl]
            yield Batch(self._apply(self.images[mine], None if off is None else off[:, sl],
                                    None if flip is None else flip[sl]), self.labels[mine], mine)
