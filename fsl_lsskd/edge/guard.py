"""The load guard and the machine record: is this machine quiet enough for latency figures, and which machine is it.

A latency figure belongs to a machine and a moment. The same Conv-4 export measured 0.49 ms at batch 1 on a quiet
machine and 348 ms under load, so every figure carries the machine (:func:`machine_info`) and a reading of how busy
it was (:class:`LoadReading`), and figures taken under load are marked ``under_load`` and refused unless the caller
allows them.

How the guard decides (:func:`read_load`), two measurements, either one trips it:

1. **Other processes' CPU share** (``busy_share``): from ``/proc/stat`` over a short window (default 1 s) in which
   this process sleeps, the share of all cores' time spent busy (user, nice, system, irq, softirq, steal); this
   process contributes nothing, so it is what *other* processes (and the hypervisor, ``steal``) took. Trips above
   :data:`BUSY_MAX` (0.15 = 15 % of all cores' time).
2. **Probe spread** (``probe_spread``): a fixed pure-Python workload (~1 ms) run :data:`PROBE_REPEATS` times; the
   90th percentile of its times over the best one. A quiet core repeats it within a few percent; a core shared with
   another runnable process stretches the tail. Trips above :data:`SPREAD_MAX` (1.5).

The 1-minute load average per core is recorded too but does not decide: it lags by minutes (a machine that just
went quiet still reports the old load). During each measurement the share of CPU other processes took is also
computed (:func:`others_share`: the machine's busy time in ``/proc/stat`` minus the measuring process's own CPU
time, over the wall time of all cores) and marks that figure when it exceeds :data:`BUSY_MAX`.
"""
from __future__ import annotations

import logging
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..errors import UserError
from ..utils import usable_cores

log = logging.getLogger(__name__)

BUSY_MAX = 0.15
SPREAD_MAX = 1.5
WINDOW_S = 1.0
PROBE_REPEATS = 50
PROBE_LOOP = 20_000


class MachineBusy(UserError):
    """The load guard tripped: latency figures taken now would measure the other processes, not the model."""


def cpu_ticks() -> Optional[Tuple[int, int]]:
    """(busy, total) clock ticks of all cores since boot from the first line of ``/proc/stat``; busy = user + nice
    + system + irq + softirq + steal, total adds idle and iowait (guest time is already inside user/nice). None
    where ``/proc/stat`` does not exist (not Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    v = [int(x) for x in fields[1:9]]
    v += [0] * (8 - len(v))  # old kernels have no irq/softirq/steal columns
    user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def busy_share(before: Tuple[int, int], after: Tuple[int, int]) -> float:
    """Share (0..1) of all cores' time spent busy between two :func:`cpu_ticks` readings."""
    d_busy, d_total = after[0] - before[0], after[1] - before[1]
    return float(d_busy) / d_total if d_total > 0 else 0.0


def own_cpu_seconds() -> float:
    """CPU seconds (user + system) this process and its waited-for children have used."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def others_share(before: Tuple[int, int], after: Tuple[int, int], own_cpu_s: float, wall_s: float,
                 cores: Optional[int] = None) -> float:
    """Share (0..1) of all cores' time that processes other than the measuring ones were busy: the machine's
    busy ticks between ``before`` and ``after`` minus ``own_cpu_s`` (the measuring processes' CPU seconds), over
    ``wall_s`` times the cores."""
    cores = cores or os.cpu_count() or 1
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy_s = (after[0] - before[0]) / float(hz)
    return max(0.0, busy_s - own_cpu_s) / max(wall_s * cores, 1e-9)


def _probe_once(n: int = PROBE_LOOP) -> int:
    s = 0
    for i in range(n):
        s += i * i
    return s


def probe_spread(repeats: int = PROBE_REPEATS) -> Tuple[float, float]:
    """(best time in ms, 90th percentile over best) of a fixed pure-Python workload run ``repeats`` times."""
    _probe_once()
    times = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        _probe_once()
        times[i] = time.perf_counter() - t0
    best = float(times.min())
    return 1e3 * best, float(np.percentile(times, 90) / best)


@dataclass
class LoadReading:
    """One reading of the load guard. ``busy_share``: other processes' share of all cores' time over ``window_s``
    (None off Linux); ``probe_ms``/``probe_spread``: the probe's best time and p90/best; ``loadavg_1m``: the
    1-minute load average (recorded, not decisive); ``under_load`` and the ``reasons`` it tripped; the thresholds
    it used."""

    busy_share: Optional[float]
    probe_ms: float
    probe_spread: float
    loadavg_1m: float
    cores: int
    window_s: float
    busy_max: float = BUSY_MAX
    spread_max: float = SPREAD_MAX
    under_load: bool = False
    reasons: List[str] = field(default_factory=list)
    at: float = 0.0

    def decide(self) -> "LoadReading":
        """Set ``under_load``/``reasons`` from the measured values and the thresholds; returns self."""
        reasons = []
        if self.busy_share is not None and self.busy_share > self.busy_max:
            reasons.append(f"other processes took {100 * self.busy_share:.0f}% of the {self.cores} cores' time over "
                           f"{self.window_s:g} s (limit {100 * self.busy_max:.0f}%)")
        if self.probe_spread > self.spread_max:
            reasons.append(f"a fixed {self.probe_ms:.2f} ms probe varied {self.probe_spread:.2f}x (p90/best; "
                           f"limit {self.spread_max:g}x)")
        self.reasons = reasons
        self.under_load = bool(reasons)
        return self

    def describe(self) -> str:
        busy = "n/a" if self.busy_share is None else f"{100 * self.busy_share:.0f}%"
        return (f"others' CPU share {busy}, probe p90/best {self.probe_spread:.2f}x, load average "
                f"{self.loadavg_1m:.2f} on {self.cores} cores")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def read_load(window_s: float = WINDOW_S, busy_max: float = BUSY_MAX, spread_max: float = SPREAD_MAX,
              repeats: int = PROBE_REPEATS) -> LoadReading:
    """Measure how busy the machine is now (module docstring): ``window_s`` seconds of ``/proc/stat`` while
    sleeping, then the probe. Takes about ``window_s`` + 0.1 s."""
    before = cpu_ticks()
    time.sleep(window_s)
    after = cpu_ticks()
    share = busy_share(before, after) if before is not None and after is not None else None
    probe_ms, spread = probe_spread(repeats)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    reading = LoadReading(share, probe_ms, spread, float(load1), os.cpu_count() or 1, float(window_s), busy_max,
                          spread_max, at=time.time()).decide()
    log.info("load guard: %s -> %s", reading.describe(), "under load" if reading.under_load else "quiet")
    return reading


def check_quiet(settings) -> None:
    """Raise :class:`MachineBusy` (exit 2 naming --allow-load) when the load guard trips now; ``settings`` is a
    :class:`~fsl_lsskd.edge.latency.LatencySettings` (its guard window and thresholds)."""
    reading = read_load(window_s=settings.window_s, busy_max=settings.busy_max, spread_max=settings.spread_max)
    if reading.under_load:
        raise MachineBusy(busy_message(reading))


def busy_message(reading: LoadReading, what: str = "latency figures") -> str:
    """The error text when the guard trips: what it measured and the way out (``--allow-load``)."""
    return (f"the machine is busy ({'; '.join(reading.reasons) or reading.describe()}): {what} taken now would "
            f"measure the other processes, not the model. Measure on a quiet machine (stop other jobs), or pass "
            f"--allow-load to publish them marked under_load: true")


def cpu_model() -> str:
    """The CPU's name: ``model name`` of ``/proc/cpuinfo``, else :func:`platform.processor`, else the machine."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def machine_info() -> Dict[str, Any]:
    """Which machine and software a latency figure belongs to: CPU model, logical cores, cores this process may
    use (affinity), OS, Python, torch, onnxruntime and onnx versions (read from the installed distributions, so
    nothing heavy is imported)."""
    return {"cpu_model": cpu_model(), "cores": os.cpu_count() or 1, "usable_cores": usable_cores(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": _version("torch"),
            "onnxruntime": _version("onnxruntime"), "onnx": _version("onnx")}
