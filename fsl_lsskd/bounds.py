"""Bounds on every number and name a user types, checked in one place before any data is decoded or memory is
allocated: counts (batch sizes, episodes, images, epochs) are integers >= 1, sizes are >= 1 (a size of 0 never
means "the default"), seeds are integers in ``[0, 2**32)``, names that become file-name components are checked
as such, and a request whose arrays would not fit in this machine's available memory is refused with the
estimate.

Command-line options use the click types :data:`COUNT`, :data:`SIZE`, :data:`SEED` (a bad value is a usage error,
exit 2, naming the limit); benchmark files and the Python API call :func:`check_count`, :func:`check_seed` and
:func:`check_name`, which raise :class:`~fsl_lsskd.errors.ConfigError` (exit 2).
"""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Any, Optional

import click

from .errors import ConfigError

#: seeds are non-negative integers below 2**32: the training seed streams use its low 32 bits
#: (:func:`fsl_lsskd.seeding.stream_seed`), so a larger seed would silently repeat a smaller one's streams
SEED_LIMIT = 2 ** 32
SEED_RULE = "seeds are non-negative integers below 2**32 (0 .. 4294967295)"
_NAME_MAX = 255  # bytes of one file-name component on Linux file systems (NAME_MAX)


# ------------------------------------------------------------------------------------------------ numbers
def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an integer, got {value!r}")
    return int(value)


def check_count(value: Any, what: str, minimum: int = 1) -> int:
    """``value`` as an int when it is an integer >= ``minimum`` (default 1: a batch size, an episode count, a
    number of images or epochs), else :class:`ConfigError` naming ``what`` and the limit."""
    v = _integer(value, what)
    if v < minimum:
        raise ConfigError(f"{what} must be >= {minimum}, got {v}")
    return v


def check_size(value: Any, what: str) -> int:
    """An image size in pixels: an integer >= 1 (0 is refused, never read as "the default")."""
    v = _integer(value, what)
    if v < 1:
        raise ConfigError(f"{what} must be >= 1 pixel, got {v} (leave it out for the default)")
    return v


def check_seed(value: Any, what: str = "seed") -> int:
    """A seed: an integer in ``[0, 2**32)`` (:data:`SEED_RULE`), else :class:`ConfigError`."""
    v = _integer(value, what)
    if not 0 <= v < SEED_LIMIT:
        raise ConfigError(f"{what} {v}: {SEED_RULE}")
    return v


class _Bounded(click.IntRange):
    """A click integer range whose error message states the rule (``rule``) rather than click's interval."""

    def __init__(self, min: Optional[int] = None, max: Optional[int] = None, rule: str = "") -> None:
        super().__init__(min=min, max=max)
        self.rule = rule

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as exc:
            if not self.rule:
                raise
            self.fail(f"{value}: {self.rule}", param, ctx)
            raise exc  # pragma: no cover - fail() raises


#: a count typed on the command line (batch size, episodes, images, epochs, threads): an integer >= 1
COUNT = _Bounded(min=1, rule="must be an integer >= 1")
#: a count where 0 means "none" (e.g. ``--val-n-episodes 0`` disables validation)
COUNT_OR_ZERO = _Bounded(min=0, rule="must be an integer >= 0 (0 disables it)")
#: an image size in pixels typed on the command line: an integer >= 1
SIZE = _Bounded(min=1, rule="must be an image size >= 1 pixel (leave the option out for the default)")
#: a seed typed on the command line
SEED = _Bounded(min=0, max=SEED_LIMIT - 1, rule=SEED_RULE)


# ------------------------------------------------------------------------------------------------- memory
def format_bytes(n: float) -> str:
    """``931 GiB``, ``2.98 TiB``, ``512 MiB``: binary units, three significant digits."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            break
        n /= 1024
    if unit == "B":
        return f"{int(n)} B"
    return f"{n:.3g} {unit}" if n < 100 else f"{n:,.0f} {unit}"


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> Optional[int]:
    """Room left under this process's cgroup (v2) memory limit, when it has one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def available_memory() -> int:
    """Bytes of memory this process can still allocate without swapping: the kernel's ``MemAvailable``
    (``/proc/meminfo``; free pages on other systems), capped by the cgroup's memory limit when there is one."""
    found = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return 1 << 62  # unknown: do not refuse
    return int(min(found))


def check_memory(nbytes: int, what: str, fix: str) -> None:
    """Refuse (:class:`ConfigError`) a request whose arrays need ``nbytes``, more than :func:`available_memory`:
    ``"<what> need 931 GiB, more than the 12.1 GiB of memory available here; <fix>"``."""
    have = available_memory()
    if nbytes > have:
        raise ConfigError(f"{what} need {format_bytes(nbytes)}, more than the {format_bytes(have)} of memory "
                          f"available here; {fix}")


# -------------------------------------------------------------------------------------------------- names
def check_name(name: Any, what: str) -> str:
    """``name`` when it is usable as one file-name component (it names files and folders, e.g. a benchmark's
    ``results/<name>.md``): not empty, no ``/`` or ``\\``, not ``.`` or ``..``, no leading dot (hidden, or a
    relative path), no control characters, at most 255 bytes. Else :class:`ConfigError` naming the rule."""
    text = name if isinstance(name, str) else None
    if text is None or not text:
        raise ConfigError(f"{what} must be a non-empty name, got {name!r}")
    bad = []
    if "/" in text or "\\" in text or (os.altsep and os.altsep in text):
        bad.append("a path separator (/ or \\)")
    if text.startswith("."):
        bad.append("a leading dot" + (" (a relative path)" if text in (".", "..") or text.startswith("..")
                                      else " (a hidden file)"))
    if any(unicodedata.category(ch) == "Cc" for ch in text):
        bad.append("a control character")
    if len(text.encode("utf-8", "surrogateescape")) > _NAME_MAX:
        bad.append(f"more than {_NAME_MAX} bytes")
    if bad:
        raise ConfigError(f"{what} {text!r} names files and folders, so it must be one file-name component: it has "
                          f"{' and '.join(bad)}; use letters, digits, '-', '_' and '.' (e.g. my_benchmark)")
    return text
