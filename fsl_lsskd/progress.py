"""Progress of the long steps (training epochs and batches, feature extraction, scoring, tables), with an ETA.

:class:`Progress` shows a tqdm bar when the ``fsl-bench`` command runs on a terminal (stderr is a TTY). Otherwise
(stderr is a log file, a pipe or a SLURM job's output) it writes timestamped lines: one when the step starts
(``announce``), then at most one every ``interval`` seconds (30 by default, ``FSL_BENCH_PROGRESS_INTERVAL``
overrides it; 0 = every update, e.g. one line per epoch), each with what is done, the rate and the ETA::

    [2025-01-02 14:03:22] epoch 3/30: 120/211 batches (57%), loss=2.412, 305 img/s, 0:00:40 elapsed, ETA 0:00:31

The lines are records of the ``fsl_lsskd.progress`` logger at level INFO; :func:`configure` (run by ``fsl-bench``)
prints them on stderr, flushed line by line. Library code that never calls :func:`configure` shows no bars, and
its progress lines appear only where logging shows INFO. ``FSL_BENCH_PROGRESS=bars|lines|off`` overrides the
choice (``off``: nothing). Progress only reads counters: it never changes what is computed.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Dict, Iterable, Iterator, Optional, TypeVar

from .errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: seconds between two progress lines of one step when stderr is not a terminal (``FSL_BENCH_PROGRESS_INTERVAL``)
INTERVAL = 30.0
MODES = ("bars", "lines", "off")
ENV = "FSL_BENCH_PROGRESS"
INTERVAL_ENV = "FSL_BENCH_PROGRESS_INTERVAL"
#: seconds before the bar of a step that is not announced appears (short steps do not flash a bar)
BAR_DELAY = 2.0
_configured = False


class _Stderr(logging.StreamHandler):
    """A handler writing to the current ``sys.stderr`` (looked up per record, as :data:`logging.lastResort`
    does), flushed after every line."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure() -> None:
    """Show progress on stderr: bars on a terminal, timestamped lines otherwise (``fsl-bench`` calls this once
    per command). Idempotent."""
    global _configured
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # not a second time through the root handler of -v
    _configured = True


def mode() -> str:
    """``bars``, ``lines`` or ``off``: :data:`ENV` when set, else bars on a terminal once :func:`configure` ran,
    else lines. An unknown :data:`ENV` value is a :class:`ConfigError`."""
    env = os.environ.get(ENV, "").strip().lower()
    if env:
        if env not in MODES:
            raise ConfigError(f"{ENV}={os.environ[ENV]!r}: expected one of {', '.join(MODES)}")
        return env
    stream = sys.stderr
    return "bars" if _configured and stream is not None and stream.isatty() else "lines"


def default_interval() -> float:
    """Seconds between two lines of one step: :data:`INTERVAL_ENV` when set, else :data:`INTERVAL`."""
    text = os.environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ConfigError(f"{INTERVAL_ENV}={text!r}: expected seconds >= 0, e.g. 30")
    return value


def format_seconds(seconds: float) -> str:
    """``H:MM:SS`` (``D days, H:MM:SS`` past a day)."""
    s = max(int(round(seconds)), 0)
    days, s = divmod(s, 86400)
    text = f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{days} day{'s' if days > 1 else ''}, {text}" if days else text


_PLURALS = {"batch": "batches"}


def plural(unit: str) -> str:
    """``batch`` -> ``batches``, ``epoch`` -> ``epochs``, ``image`` -> ``images``."""
    return _PLURALS.get(unit, unit + "s")


def format_value(v: Any) -> str:
    """A float with 4 significant digits, anything else as ``str``."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Progress:
    """Progress of one step of ``total`` units (``None``: unknown, then no percentage and no ETA).

    Args:
        desc: what is done (``epoch 3/30``, ``features tiny_imagenet test``).
        unit: the unit's name, singular (``batch``, ``image``, ``episode``); lines use its plural.
        initial: units already done before this process (a resumed run): not counted in the rate.
        interval: seconds between lines when not on a terminal (0: a line at every update; default
            :func:`default_interval`).
        announce: write a line when the step starts (not on a terminal); without it, a bar appears after
            :data:`BAR_DELAY` seconds and the first line after ``interval`` seconds.
        leave: keep the bar when closed (terminal); write a last line at :meth:`close` when units were done
            since the last line (not on a terminal).
        rate: show the rate of units per second (turn off when the postfix gives a better one, e.g. img/s).

    A context manager; :meth:`update` adds done units, :meth:`set_postfix` the values shown after the count.
    """

    def __init__(self, total: Optional[int], desc: str, unit: str = "it", *, initial: int = 0,
                 interval: Optional[float] = None, announce: bool = True, leave: bool = True,
                 rate: bool = True) -> None:
        self.total = None if total is None else int(total)
        self.desc, self.unit, self.leave, self.rate = desc, unit, leave, rate
        self.interval = default_interval() if interval is None else float(interval)
        self.n = self._start_n = int(initial)
        self._t0 = time.monotonic()
        self._last_line: Optional[float] = None
        self._last_n = self.n
        self.postfix: Dict[str, Any] = {}
        self.mode = mode()
        self.bar = None
        if self.mode == "bars":
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, leave=leave, file=sys.stderr,
                            dynamic_ncols=True, delay=0 if announce else BAR_DELAY)
        elif self.mode == "lines":
            if announce:
                self._line()
            else:
                self._last_line = self._t0  # the first line after ``interval`` seconds

    # -- counters
    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def eta(self) -> Optional[float]:
        """Seconds left at this process's rate, or None (no total, nothing done yet)."""
        done = self.n - self._start_n
        if self.total is None or done <= 0:
            return None
        return self.elapsed / done * max(self.total - self.n, 0)

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the count as ``key=value`` (floats with 4 significant digits; a key starting with
        ``_`` shows its value alone, e.g. ``_ips="305 img/s"``); ``None`` removes a key."""
        for k, v in values.items():
            if v is None:
                self.postfix.pop(k, None)
            else:
                self.postfix[k] = v
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix_text(), refresh=False)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """``n`` more units are done (and the postfix values, as :meth:`set_postfix`)."""
        if postfix:
            self.set_postfix(**postfix)
        self.n += int(n)
        if self.bar is not None:
            self.bar.update(int(n))
        elif self.mode == "lines":
            now = time.monotonic()
            if self._last_line is None or now - self._last_line >= self.interval:
                self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "lines" and self.leave and self.n != self._last_n:
            self._line()
        self.mode = "closed"

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- lines
    def _postfix_text(self) -> str:
        return ", ".join(f"{k}={format_value(v)}" if not k.startswith("_") else format_value(v)
                         for k, v in self.postfix.items())

    def text(self) -> str:
        """The line (without the timestamp): ``desc: n/total units (p%), postfix, rate, elapsed, ETA``."""
        units = self.unit if self.n == 1 and self.total in (None, 1) else plural(self.unit)
        parts = [f"{self.n}/{self.total} {units} ({100.0 * self.n / self.total:.0f}%)" if self.total
                 else f"{self.n} {units}"]
        if self.postfix:
            parts.append(self._postfix_text())
        elapsed = self.elapsed
        done = self.n - self._start_n
        if self.rate and done > 0 and elapsed > 0:
            r = done / elapsed
            parts.append(f"{r:.3g} {plural(self.unit)}/s" if r >= 1 else f"{1 / r:.3g} s/{self.unit}")
        parts.append(f"{format_seconds(elapsed)} elapsed")
        eta = self.eta()
        if eta is not None:
            parts.append("done" if self.total is not None and self.n >= self.total else f"ETA {format_seconds(eta)}")
        return f"{self.desc}: " + ", ".join(parts)

    def _line(self) -> None:
        self._last_line = time.monotonic()
        self._last_n = self.n
        log.info("%s", self.text())

    def write(self, message: str) -> None:
        """A message beside the progress (above the bar on a terminal, a timestamped line otherwise)."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        elif self.mode != "off":
            log.info("%s", message)


def announce(message: str) -> None:
    """A one-off message that a step starts (``loading the data``): a timestamped line, or a line above the bars
    on a terminal; nothing when progress is off."""
    m = mode()
    if m == "bars":
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    elif m == "lines":
        log.info("%s", message)


def track(items: Iterable[T], desc: str, unit: str = "it", total: Optional[int] = None, **kwargs: Any) -> Iterator[T]:
    """Iterate over ``items`` with a :class:`Progress` (``total``: ``len(items)`` by default; ``kwargs`` as
    :class:`Progress`): an item counts as done when the loop asks for the next one."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    bar = Progress(total, desc, unit, **kwargs)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
