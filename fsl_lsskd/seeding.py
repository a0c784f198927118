"""Every random stream of training and scoring, named in one table, and the one place that derives a stream's
generator from ``(seed, name[, epoch, rank])``.

Randomness is an argument: code asks for the generator of a named stream (:func:`torch_generator`,
:func:`numpy_generator`, :func:`python_random_state`) or seeds torch's global RNG for one (:func:`seed_torch`,
only inside ``torch.random.fork_rng``), never for a number of its own. Each stream is a pure function of its seed
and position, so an epoch replays exactly after a resume and every method is scored on the same draws.

The derivations are the ones the published weights and scores were made with, frozen: changing one changes every
training or score that uses the stream (for a training stream, bump the training identity's version in
``train/config.py`` with it, or published weights would be found for training they no longer describe).
``tests/test_seeding.py`` pins them as literals. The derivations:

* ``"seedseq63"``: 63 bits of ``numpy.random.SeedSequence([seed mod 2**32, epoch, number (, rank if > 0)])`` --
  the engine's streams; ``number`` tells them apart (rank 0 keeps the one-process seed).
* ``"seedseq64"``: 64 bits of ``SeedSequence([seed mod 2**32, epoch mod 2**32, number])`` -- the episodic
  methods' task sampling (learn2learn draws from Python's :mod:`random`).
* ``"linear"``: ``seed * 1_000_003 + index + number`` -- the scorers' per-episode streams (index = episode).
* ``"given"``: the seed itself (``EpisodeProtocol.seed`` of generated episodes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Tuple

if TYPE_CHECKING:  # imported where used: the CLI starts without torch
    import numpy as np
    import torch

MASK32 = 0xFFFFFFFF
MASK63 = (1 << 63) - 1


@dataclass(frozen=True)
class Stream:
    """One named random stream.

    Attributes:
        name: the key in :data:`STREAMS`.
        derivation: ``"seedseq63"``, ``"seedseq64"``, ``"linear"`` or ``"given"`` (module docstring).
        number: the stream's constant in its derivation (the SeedSequence entry or the linear offset).
        xor: a constant XORed into the derived seed (``seedseq64`` streams that share another's draws'
            seed but must not share its numbers).
        library: what it feeds: ``"torch"`` (a ``torch.Generator`` or torch's global RNG), ``"numpy"``
            (``numpy.random.default_rng``) or ``"python"`` (a :class:`random.Random` state).
        draws: what is drawn from it, and where."""

    name: str
    derivation: str
    number: int
    library: str
    draws: str
    xor: int = 0


#: every random stream of training and scoring; a new stream gets a new name and an unused ``number``
STREAMS: Dict[str, Stream] = {s.name: s for s in (
    Stream("batches", "seedseq63", 0, "torch",
           "the training loader's epoch: the permutation of the training rows, then each batch's crop offsets "
           "and flips, in that order from one generator (train/loader.py; also the loader's initial state, "
           "epoch 0)"),
    Stream("training_global", "seedseq63", 3, "torch",
           "torch's global RNG during a training epoch, per rank (dropout, stochastic depth, methods' own "
           "sampling; train/engine.py, inside fork_rng)"),
    Stream("init", "seedseq63", 7, "torch",
           "torch's global RNG while the backbone and the method's heads are built (epoch 0; train/engine.py, "
           "inside fork_rng): the weight initialisation"),
    Stream("heldout", "seedseq63", 11, "numpy",
           "which training images are held out for the base-class accuracy (epoch 0; data/limited.py)"),
    Stream("episodes", "seedseq64", 0x5EED, "python",
           "the episodic methods' training tasks: learn2learn's NWays/KShots draws from Python's random, per "
           "epoch (methods/episodic.py); seed: episode_seed(method seed, run seed)"),
    Stream("episode_augment", "seedseq64", 0x5EED, "torch",
           "crop/flip draws of the episodic methods' augmented tasks, per epoch (methods/episodic.py): the "
           "'episodes' seed to 63 bits, XOR 0xA5A5", xor=0xA5A5),
    Stream("support_augment", "linear", 0, "torch",
           "the scorers' support-set augmentation of episode i (RFS transform; eval/base.py, eval/finetune.py); "
           "seed: eval.base.AUG_SEED"),
    Stream("finetune_batches", "linear", 1, "torch",
           "the fine-tuning readout's support mini-batches of episode i (eval/finetune.py). Its seed equals "
           "'support_augment' of episode i + 1: kept, the published finetune scores were drawn so"),
    Stream("eval_episodes", "given", 0, "numpy",
           "generated evaluation episodes: classes and images per episode (eval/episodes.py); seed: the "
           "protocol's"),
)}


def stream(name: str) -> Stream:
    """The stream named ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return STREAMS[name]
    except KeyError:
        raise KeyError(f"unknown random stream {name!r}; known: {', '.join(STREAMS)}") from None


def _seedseq(entropy) -> Tuple[int, int]:
    import numpy as np

    state = np.random.SeedSequence(entropy).generate_state(2)
    return int(state[0]), int(state[1])


def stream_seed(name: str, seed: int, epoch: int = 0, rank: int = 0) -> int:
    """The integer seed of stream ``name`` for run seed ``seed`` at position ``epoch`` (an epoch, or the episode
    index of a per-episode stream) on process ``rank`` (streams of the engine only; rank 0 is the one-process
    seed). Non-negative, below 2**64."""
    s = stream(name)
    if s.derivation == "seedseq63":
        a, b = _seedseq([int(seed) & MASK32, int(epoch), s.number] + ([int(rank)] if rank else []))
        return ((a << 31) ^ b) & MASK63
    if rank:
        raise ValueError(f"stream {name!r} has no per-rank seeds")
    if s.derivation == "seedseq64":
        a, b = _seedseq([int(seed) & MASK32, int(epoch) & MASK32, s.number])
        value = a << 32 | b
        return (value & MASK63) ^ s.xor if s.xor else value
    if s.derivation == "linear":
        return int(seed) * 1_000_003 + int(epoch) + s.number
    if s.derivation == "given":
        return int(seed)
    raise ValueError(f"stream {name!r}: unknown derivation {s.derivation!r}")


def episode_seed(method_seed: int, run_seed: int) -> int:
    """The seed of an episodic method's streams (``episodes``, ``episode_augment``): its config ``seed`` mixed
    with the engine's run seed, so ``--seed`` changes the tasks as it changes the initialisation (32 bits of
    ``SeedSequence([method_seed mod 2**32, run_seed mod 2**32])``)."""
    import numpy as np

    return int(np.random.SeedSequence([int(method_seed) & MASK32, int(run_seed) & MASK32]).generate_state(1)[0])


def torch_generator(name: str, seed: int, epoch: int = 0, rank: int = 0,
                    generator: "torch.Generator | None" = None) -> "torch.Generator":
    """A CPU ``torch.Generator`` at the start of stream ``name`` (``generator`` itself, re-seeded, when given:
    a loader keeps one generator and moves it to each epoch's stream)."""
    import torch

    g = generator if generator is not None else torch.Generator(device="cpu")
    g.manual_seed(stream_seed(name, seed, epoch, rank))
    return g


def seed_torch(name: str, seed: int, epoch: int = 0, rank: int = 0) -> None:
    """Seed torch's global RNG with stream ``name``: call it inside ``torch.random.fork_rng`` (the caller's RNG
    state comes back), for code that draws from the global RNG (timm's init, dropout)."""
    import torch

    torch.manual_seed(stream_seed(name, seed, epoch, rank))


def numpy_generator(name: str, seed: int, epoch: int = 0) -> "np.random.Generator":
    """``numpy.random.default_rng`` at the start of stream ``name``."""
    import numpy as np

    return np.random.default_rng(stream_seed(name, seed, epoch))


def python_random_state(name: str, seed: int, epoch: int = 0) -> tuple:
    """The state of a :class:`random.Random` at the start of stream ``name`` (swap it into :mod:`random` for
    libraries that draw from the module's global instance, as learn2learn does)."""
    import random

    return random.Random(stream_seed(name, seed, epoch)).getstate()
