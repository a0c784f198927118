"""Shared machinery of the episodic meta-learners (ProtoNet, MAML/FOMAML): seeded N-way K-shot task
sampling with learn2learn's data utilities and the episode layout handed to ``training_step``.

Episode layout (one :class:`~fsl_lsskd.methods.base.Batch` = ``T`` tasks, ``T = tasks_per_batch``:
1 for ProtoNet, the meta-batch size for MAML)::

    images = cat over tasks t of [support_t ; query_t]          float, normalised, [T*n_way*(n_shot+n_query),3,H,W]
    support_t = class 0's n_shot images, class 1's n_shot, ...   (class-major)
    query_t   = class 0's n_query images, class 1's n_query, ... (class-major)
    labels    = the episode labels 0..n_way-1 (remapped per task, NOT the base-class ids)
    index     = dataset row of every image (``loader.images`` index)

:func:`split_tasks` undoes this layout. The number of tasks in a batch is ``len(images) // task_size``
(the last batch of an epoch may hold fewer tasks than ``tasks_per_batch``).

Seeding: learn2learn samples with Python's global :mod:`random` module (``random.sample`` in ``NWays``/
``KShots``). :class:`EpisodeSampler` keeps its *own* ``random`` state, the ``episodes`` stream of
``(seed, epoch)`` (:mod:`fsl_lsskd.seeding`); every ``sample()`` swaps that state into :mod:`random`, samples and
swaps the caller's state back. So episodes are a pure function of ``(seed, epoch)`` -- whatever else
runs between two episodes -- and the global ``random`` state is left exactly as it was.
"""
from __future__ import annotations

import contextlib
import logging
import random
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..deps import require_learn2learn
from ..errors import ConfigError, ProtocolError
from ..seeding import episode_seed, python_random_state, torch_generator
from .base import Batch, Method
from .configs import EpisodicConfig

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _swapped_random_state(state: tuple) -> Iterator[List[tuple]]:
    """Run the body with ``random``'s state set to ``state``; yields a one-item list that holds the state
    reached at the end; the caller's global state is restored in all cases."""
    saved = random.getstate()
    random.setstate(state)
    out: List[tuple] = [state]
    try:
        yield out
    finally:
        out[0] = random.getstate()
        random.setstate(saved)


class EpisodeSampler:
    """N-way (n_shot+n_query)-shot tasks over cached uint8 tensors through learn2learn:
    ``MetaDataset(TensorDataset(images, labels, row_index))`` and ``Taskset`` with
    ``NWays, KShots, LoadData, RemapLabels, ConsecutiveLabels`` (learn2learn's documented pipeline).

    Args:
        images: ``[N,...]`` tensor (not copied). labels: int64 ``[N]``.
        seed, epoch: the sampling stream (see module docstring).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, n_way: int, n_shot: int, n_query: int,
                 seed: int = 0, epoch: int = 0) -> None:
        l2l = require_learn2learn()
        from torch.utils.data import TensorDataset

        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
        if images.shape[0] != labels.shape[0]:
            raise ValueError("images and labels must have the same length")
        self.n_way, self.n_shot, self.n_query = int(n_way), int(n_shot), int(n_query)
        k = self.n_shot + self.n_query
        lab = labels.numpy()
        classes, counts = np.unique(lab, return_counts=True)
        if len(classes) < self.n_way:
            raise ProtocolError(f"{self.n_way}-way episodes need {self.n_way} classes, the training split has "
                                f"{len(classes)}: lower n_way")
        if counts.min() < k:
            raise ProtocolError(f"episodes need n_shot+n_query={k} images per class, the smallest training class "
                                f"has {int(counts.min())}: lower n_shot/n_query")
        # Label bookkeeping from numpy: MetaDataset would otherwise index every image once to find it.
        order = np.argsort(lab, kind="stable")
        bounds = np.searchsorted(lab[order], classes)
        labels_to_indices: Dict[int, List[int]] = {
            int(c): order[b:e].tolist() for c, b, e in zip(classes, bounds, list(bounds[1:]) + [len(lab)])}
        indices_to_labels = {i: int(c) for i, c in enumerate(lab.tolist())}
        dataset = TensorDataset(images, labels, torch.arange(len(lab)))
        meta = l2l.data.MetaDataset(dataset, labels_to_indices=labels_to_indices,
                                    indices_to_labels=indices_to_labels)
        t = l2l.data.transforms
        transforms = [t.NWays(meta, n=self.n_way), t.KShots(meta, k=k, replacement=False), t.LoadData(meta),
                      t.RemapLabels(meta), t.ConsecutiveLabels(meta)]
        # num_tasks=-1: a fresh task description on every sample (no cached, index-addressed tasks).
        self.taskset = l2l.data.Taskset(meta, task_transforms=transforms, num_tasks=-1)
        self.reseed(seed, epoch)

    def reseed(self, seed: int, epoch: int) -> None:
        self._state = python_random_state("episodes", seed, epoch)

    def sample(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One task in the documented layout: ``(images [n_way*(n_shot+n_query),...], labels, rows)``."""
        with _swapped_random_state(self._state) as end:
            images, labels, rows = self.taskset.sample()
        self._state = end[0]
        return self.arrange(images, labels, rows)

    def arrange(self, images: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor):
        """Reorder a learn2learn task (grouped by class, in sampled order) into support-then-query,
        class-major; the first ``n_shot`` images of each class (a random subset: KShots samples in random
        order) are the support."""
        support, query = [], []
        for c in range(self.n_way):
            pos = torch.nonzero(labels == c, as_tuple=True)[0]
            if len(pos) != self.n_shot + self.n_query:
                raise RuntimeError(f"learn2learn returned {len(pos)} images for class {c}")
            support.append(pos[:self.n_shot])
            query.append(pos[self.n_shot:])
        perm = torch.cat(support + query)
        return images[perm], labels[perm], rows[perm]


def split_tasks(batch_images: torch.Tensor, batch_labels: torch.Tensor, n_way: int, n_shot: int, n_query: int):
    """Inverse of the layout: a list of ``(support_x, support_y, query_x, query_y)``, one per task."""
    task = n_way * (n_shot + n_query)
    if batch_images.shape[0] % task:
        raise ValueError(f"episode batch of {batch_images.shape[0]} images is not a multiple of the task size "
                         f"{task} = n_way*(n_shot+n_query)")
    ns = n_way * n_shot
    out = []
    for t in range(batch_images.shape[0] // task):
        x = batch_images[t * task:(t + 1) * task]
        y = batch_labels[t * task:(t + 1) * task]
        out.append((x[:ns], y[:ns], x[ns:], y[ns:]))
    return out


class EpisodicMethod(Method):
    """Base of the episodic methods: ``episodic = True`` and :meth:`iter_batches` yields episodes.

    The backbone's classifier is removed (``reset_classifier(0)``): ``self.backbone(x)`` gives pooled
    features, and no unused base-class head sits in the optimiser."""

    config_cls = EpisodicConfig
    episodic = True
    #: tasks per yielded Batch (MAML: the meta-batch size)
    tasks_per_batch: int = 1

    def __init__(self, backbone, num_classes: int, num_samples: int, config: Optional[EpisodicConfig] = None,
                 teacher: Optional[Method] = None) -> None:
        super().__init__(backbone, num_classes, num_samples, config, teacher)
        if not isinstance(self.config, EpisodicConfig):
            raise ConfigError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got "
                              f"{type(self.config).__name__}")
        if hasattr(self.backbone, "reset_classifier"):
            self.backbone.reset_classifier(0)

    def batches_per_epoch(self) -> int:
        return -(-self.config.episodes_per_epoch // self.tasks_per_batch)

    def _normalise(self, loader, uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``loader.augment`` (with this epoch's ``generator``) when ``config.augment``, else normalisation
        only (the papers' episodes are not augmented)."""
        if self.config.augment:
            return loader.augment(uint8, generator=generator)
        return loader.normalize(uint8)

    def sampling_seed(self, loader) -> int:
        """The episode stream's seed: ``config.seed`` mixed with the engine's run seed (``loader.seed``
        when present), so ``--seed`` changes the episodes as it changes the initialisation."""
        run_seed = getattr(loader, "seed", None)
        if run_seed is None:
            return int(self.config.seed)
        return episode_seed(self.config.seed, run_seed)

    def iter_batches(self, loader, epoch: int) -> Iterator[Batch]:
        """``ceil(episodes_per_epoch / tasks_per_batch)`` episode batches in the module-docstring layout,
        sampled by learn2learn from ``loader.images``/``loader.labels``; a pure function of
        ``(config.seed, loader.seed, epoch)``; the global ``random`` state is untouched."""
        cfg: EpisodicConfig = self.config
        sampler = EpisodeSampler(loader.images, loader.labels, cfg.n_way, cfg.n_shot, cfg.n_query,
                                 seed=self.sampling_seed(loader), epoch=epoch)
        # augmentation draws: own torch stream per (seed, epoch), so an epoch is the same after a resume
        gen = torch_generator("episode_augment", self.sampling_seed(loader), epoch)
        remaining = cfg.episodes_per_epoch
        while remaining > 0:
            n = min(self.tasks_per_batch, remaining)
            remaining -= n
            tasks = [sampler.sample() for _ in range(n)]
            images = torch.cat([t[0] for t in tasks])
            labels = torch.cat([t[1] for t in tasks])
            rows = torch.cat([t[2] for t in tasks])
            x = self._normalise(loader, images, gen).contiguous(memory_format=self.memory_format())
            yield Batch(x, labels.to(images.device), rows.to(images.device))
