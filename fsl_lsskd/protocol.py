"""The episode protocol: one value for "N-way K-shot with Q queries per class, E episodes from seed S".

Used everywhere a protocol is named: the Python API (:func:`fsl_lsskd.eval.evaluate`), benchmark files
(``eval: {n_way, n_shot, n_query, n_episodes}``), the CLI (``--n-way --n-shot --n-query --n-episodes``) and
the training-time validation episodes (``TrainConfig.validation``). Vocabulary (easyfsl's, the field's):
``n_way`` classes per episode, ``n_shot`` support images per class, ``n_query`` query images per class,
``n_episodes`` episodes, ``seed`` the episode stream (0 = the published episodes).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple, Union

from .bounds import SEED_LIMIT, SEED_RULE
from .errors import ProtocolError

PUBLISHED_SEED = 0
_KEY = re.compile(r"^(\d+)w(\d+)s(\d+)q(?:_(\d+))?$")


@dataclass(frozen=True, order=True)
class EpisodeProtocol:
    """``n_way``-way ``n_shot``-shot episodes with ``n_query`` queries per class; ``n_episodes`` of them,
    drawn from ``seed`` (RFS sampling; :mod:`fsl_lsskd.eval.episodes`).

    Raises :class:`ProtocolError` for values below 1 (``n_way`` below 2) and seeds outside ``[0, 2**32)``."""

    n_way: int = 5
    n_shot: int = 1
    n_query: int = 15
    n_episodes: int = 2000
    seed: int = PUBLISHED_SEED

    def __post_init__(self) -> None:
        for name in ("n_way", "n_shot", "n_query", "n_episodes", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ProtocolError(f"{name} must be an integer, got {value!r}")
        if self.n_way < 2:
            raise ProtocolError(f"n_way must be >= 2 (an episode classifies between classes), got {self.n_way}")
        for name in ("n_shot", "n_query", "n_episodes"):
            if getattr(self, name) < 1:
                raise ProtocolError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ProtocolError(f"seed {self.seed}: {SEED_RULE}")

    @property
    def images_per_class(self) -> int:
        """``n_shot + n_query``: what every class of an episode must supply."""
        return self.n_shot + self.n_query

    @property
    def key(self) -> str:
        """Short name of the episode shape, e.g. ``5w1s15q`` (episode count and seed not included)."""
        return f"{self.n_way}w{self.n_shot}s{self.n_query}q"

    @property
    def label(self) -> str:
        """Human label, e.g. ``5-way 1-shot``."""
        return f"{self.n_way}-way {self.n_shot}-shot"

    def to_dict(self) -> Dict[str, int]:
        return asdict(self)

    def replace(self, **changes: Any) -> "EpisodeProtocol":
        return EpisodeProtocol(**{**asdict(self), **changes})

    @classmethod
    def parse(cls, value: Union[str, Mapping[str, Any], "EpisodeProtocol"], **defaults: Any) -> "EpisodeProtocol":
        """From an ``EpisodeProtocol``, a mapping with the field names, or a key such as ``5w1s15q`` or
        ``5w1s15q_2000`` (episodes); missing fields come from ``defaults``, then the class defaults."""
        if isinstance(value, EpisodeProtocol):
            return value
        if isinstance(value, str):
            m = _KEY.match(value.strip())
            if not m:
                raise ProtocolError(f"protocol {value!r}: expected e.g. 5w1s15q or 5w1s15q_2000 "
                                    f"(n_way, n_shot, n_query[, n_episodes])")
            fields = {"n_way": int(m.group(1)), "n_shot": int(m.group(2)), "n_query": int(m.group(3))}
            if m.group(4):
                fields["n_episodes"] = int(m.group(4))
            return cls(**{**defaults, **fields})
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise ProtocolError(f"unknown protocol key {unknown[0]!r}; valid: n_way, n_shot, n_query, "
                                    f"n_episodes, seed")
            return cls(**{**defaults, **dict(value)})
        raise ProtocolError(f"cannot read a protocol from {value!r}")


def protocol_grid(n_way: Union[int, Sequence[int]], n_shot: Union[int, Sequence[int]], n_query: int,
                  n_episodes: int, seed: int = PUBLISHED_SEED) -> List[EpisodeProtocol]:
    """Every (n_way, n_shot) combination as a protocol, in ``n_way``-then-``n_shot`` order."""
    ways = [n_way] if isinstance(n_way, int) else list(n_way)
    shots = [n_shot] if isinstance(n_shot, int) else list(n_shot)
    return [EpisodeProtocol(int(w), int(k), int(n_query), int(n_episodes), int(seed)) for w in ways for k in shots]


def check_capacity(counts: Sequence[int], protocol: EpisodeProtocol, class_names: Sequence[str] = (),
                   where: str = "split", fix: str = "") -> None:
    """Raise :class:`ProtocolError` when a split with per-class image ``counts`` cannot host ``protocol``
    (too few classes, or classes with fewer than ``n_shot + n_query`` images, listed by name). ``fix`` is
    appended to the message (what the user should change, e.g. the benchmark key)."""
    counts = [int(c) for c in counts]
    tail = f"; {fix}" if fix else ""
    if protocol.n_way > len(counts):
        raise ProtocolError(f"{where}: {protocol.n_way}-way episodes need {protocol.n_way} classes but it has "
                            f"{len(counts)}{tail or f'; use n_way {len(counts)} or fewer'}")
    need = protocol.images_per_class
    names = list(class_names) or [str(i) for i in range(len(counts))]
    short = [(names[i], c) for i, c in enumerate(counts) if c < need]
    if short:
        listing = ", ".join(f"{n} ({c} images)" for n, c in short[:10])
        more = f" and {len(short) - 10} more" if len(short) > 10 else ""
        raise ProtocolError(f"{where}: n_shot + n_query = {protocol.n_shot} + {protocol.n_query} = {need} images "
                            f"per class, but {len(short)} classes have fewer: {listing}{more}"
                            f"{tail or f'; lower n_shot/n_query (at most {min(counts)} images per class in all)'}")


def can_host(counts: Sequence[int], protocol: EpisodeProtocol) -> bool:
    """Whether a split with per-class ``counts`` can host ``protocol``."""
    try:
        check_capacity(counts, protocol)
    except ProtocolError:
        return False
    return True


def unique(protocols: Iterable[EpisodeProtocol]) -> Tuple[EpisodeProtocol, ...]:
    """Protocols without repeats, first occurrence kept."""
    seen: Dict[EpisodeProtocol, None] = {}
    for p in protocols:
        seen.setdefault(p, None)
    return tuple(seen)
