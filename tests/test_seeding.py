"""The named random streams (fsl_lsskd.seeding) keep the seeds the published weights and scores were made with.

The literals below were computed with the code before the streams had names (``utils.derived_seed`` for the
engine's streams 0/3/7/11, ``methods.episodic.epoch_seed`` and its ``^ 0xA5A5`` variant, the episodic methods'
``SeedSequence([method seed, run seed])`` mix, and ``AUG_SEED * 1_000_003 + episode (+ 1)``). A change of any
derivation fails here: published training ids would then name weights this code no longer reproduces.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fsl_lsskd import seeding
from fsl_lsskd.seeding import STREAMS, episode_seed, stream_seed

#: (seed, epoch) positions
CASES = [(0, 0), (0, 1), (1, 0), (4, 14), (123456789, 7), (2 ** 32 + 5, 3)]

PINNED = {
    "batches": [6375474604893067239, 8514611595815388268, 3941715100300054245, 1831370949039381157,
                2648597327451597574, 1561583422746209997],
    "training_global": [426229271328196471, 3608036388118029465, 2370397874146895395, 6832374544115168029,
                        3406669062702925634, 3210309230676669138],
    "init": [6840754936244187882, 545437934077907436, 3152635821140962520, 5998501423154204377,
             4735777098081489856, 3874577777888432190],
    "heldout": [7021376477571824198, 6703956056620789026, 3081037596151582501, 4026530656504106543,
                7061173734132087951, 4359459263573260256],
    "episodes": [9651857407752632941, 3260075565260488529, 8570401936432529578, 2079668629900608879,
                 11933469877161934331, 7283449338967522934],
    "episode_augment": [428485370897883080, 3260075565260511988, 8570401936432506127, 2079668629900583114,
                        2710097840307116126, 7283449338967546835],
    "support_augment": [s * 1_000_003 + e for s, e in CASES],
    "finetune_batches": [s * 1_000_003 + e + 1 for s, e in CASES],
    "eval_episodes": [s for s, _ in CASES],
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_stream_seeds_are_the_published_ones(name):
    assert [stream_seed(name, s, e) for s, e in CASES] == PINNED[name]


def test_every_stream_is_pinned_and_per_rank_seeds_stay():
    assert set(STREAMS) == set(PINNED), "a new stream needs pinned seeds here"
    # rank 0 is the one-process seed; other ranks their own (torchrun training)
    assert stream_seed("training_global", 0, 2, rank=0) == stream_seed("training_global", 0, 2)
    assert stream_seed("training_global", 0, 2, rank=1) == 4150971461556793550
    assert stream_seed("training_global", 3, 5, rank=2) == 4911864882677315583
    with pytest.raises(ValueError, match="per-rank"):
        stream_seed("episodes", 0, 0, rank=1)
    with pytest.raises(KeyError, match="known: batches"):
        stream_seed("no_such_stream", 0)
    assert [episode_seed(a, b) for a, b in [(0, 0), (0, 1), (7, 3)]] == [2968811710, 3964924996, 3466196061]


def test_generators_start_where_the_seed_says():
    g = seeding.torch_generator("batches", 4, 14)
    assert torch.equal(torch.randperm(50, generator=g),
                       torch.randperm(50, generator=torch.Generator().manual_seed(1831370949039381157)))
    reused = torch.Generator()
    assert seeding.torch_generator("init", 0, generator=reused) is reused
    assert reused.initial_seed() == 6840754936244187882
    assert np.array_equal(seeding.numpy_generator("heldout", 1).permutation(20),
                          np.random.default_rng(3081037596151582501).permutation(20))
    assert seeding.python_random_state("episodes", 0, 1) == random.Random(3260075565260488529).getstate()
    with torch.random.fork_rng(devices=[]):
        seeding.seed_torch("training_global", 1, 0)
        assert torch.initial_seed() == 2370397874146895395
