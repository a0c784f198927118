"""Latency, load time and peak memory of the inference backbone on PyTorch eager fp32, ONNX Runtime fp32 and
ONNX Runtime int8, per batch size and thread count, with the load guard and the machine on every figure.

Each (engine, batch, threads) runs in a fresh process (:mod:`fsl_lsskd.edge.worker`): the runtime is imported,
the prepared real images loaded, the model loaded (``load_ms``: ``load_backbone`` = build + weights for PyTorch,
``InferenceSession`` creation with graph optimisation for ONNX Runtime), one cold run (``first_run_ms``),
``warmup`` runs, then timed runs until ``runs`` or ``max_seconds``. Percentiles over the timed runs (numpy,
linear interpolation): p50 always, p90 from 10 runs, p99 from 100 runs (else NaN: too few runs to say).
``peak_rss_mb``/``rss_delta_mb``: the process's peak resident set, and that minus its resident size after the
runtime was imported and the input loaded (the peak is reset there; :mod:`fsl_lsskd.edge.worker`). Threads:
``torch.set_num_threads(n)`` + ``set_num_interop_threads(1)``; ONNX Runtime ``intra_op_num_threads = n``,
``inter_op_num_threads = 1``, sequential execution; ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` = n in the
process's environment.

Load: :func:`fsl_lsskd.edge.guard.read_load` before the first and after the last measurement, and the other
processes' CPU share during each one (``others_busy_share``). A figure is ``under_load`` when the reading before
or after tripped or its own share exceeded the limit; :class:`~fsl_lsskd.edge.guard.MachineBusy` is raised
(before any timing when the first reading trips) unless ``allow_load``.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError
from ..utils import usable_cores
from .guard import (BUSY_MAX, SPREAD_MAX, WINDOW_S, MachineBusy, busy_message, cpu_ticks, machine_info,
                    others_share, read_load)

log = logging.getLogger(__name__)

# engine id -> (runtime, precision, label)
ENGINES: Dict[str, Tuple[str, str, str]] = {
    "pytorch_fp32": ("pytorch", "fp32", "PyTorch eager fp32"),
    "ort_fp32": ("onnxruntime", "fp32", "ONNX Runtime fp32"),
    "ort_int8": ("onnxruntime", "int8", "ONNX Runtime int8"),
}
P90_MIN_RUNS, P99_MIN_RUNS = 10, 100


def parse_threads(text: str) -> Tuple[int, ...]:
    """``"1,all"`` -> ``(1, <usable cores>)`` (duplicates dropped, order kept); :class:`ConfigError` otherwise."""
    out: List[int] = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part == "all":
            n = usable_cores()
        else:
            try:
                n = int(part)
            except ValueError:
                raise ConfigError(f"--threads {text!r}: expected positive integers or 'all', e.g. 1,all") from None
        if n < 1:
            raise ConfigError(f"--threads {text!r}: thread counts must be >= 1")
        if n not in out:
            out.append(n)
    if not out:
        raise ConfigError(f"--threads {text!r}: give at least one thread count, e.g. 1,all")
    return tuple(out)


def parse_batch_sizes(text: str) -> Tuple[int, ...]:
    """``"1,64"`` -> ``(1, 64)``; :class:`ConfigError` for anything but positive integers."""
    try:
        vals = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--batch-sizes {text!r}: expected positive integers, e.g. 1,64") from None
    if not vals or min(vals) < 1:
        raise ConfigError(f"--batch-sizes {text!r}: expected positive integers, e.g. 1,64")
    return tuple(dict.fromkeys(vals))


@dataclass(frozen=True)
class LatencySettings:
    """How latency is measured: thread counts, batch sizes, warm-up runs, timed runs (at most) and the time cap
    of the timed runs per figure (seconds), and the load guard's limits (:mod:`fsl_lsskd.edge.guard`)."""

    threads: Tuple[int, ...] = (1,)
    batch_sizes: Tuple[int, ...] = (1, 64)
    warmup: int = 20
    runs: int = 300
    max_seconds: float = 15.0
    busy_max: float = BUSY_MAX
    spread_max: float = SPREAD_MAX
    window_s: float = WINDOW_S

    def __post_init__(self) -> None:
        if self.runs < 1 or self.warmup < 0 or self.max_seconds <= 0:
            raise ConfigError("--runs must be >= 1, --warmup >= 0 and --max-seconds > 0")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def summarise(times_ms: Sequence[float], batch: int) -> Dict[str, float]:
    """Percentiles and moments (ms) of timed runs; p90/p99 NaN below 10/100 runs; images/s at the median."""
    t = np.asarray(times_ms, dtype=np.float64)
    n = len(t)
    if n == 0:
        raise ValueError("no timed runs")
    p50 = float(np.percentile(t, 50))
    return {"n_runs": n, "p50_ms": p50,
            "p90_ms": float(np.percentile(t, 90)) if n >= P90_MIN_RUNS else float("nan"),
            "p99_ms": float(np.percentile(t, 99)) if n >= P99_MIN_RUNS else float("nan"),
            "mean_ms": float(t.mean()), "std_ms": float(t.std(ddof=1)) if n > 1 else float("nan"),
            "min_ms": float(t.min()), "max_ms": float(t.max()), "images_per_s": 1e3 * batch / p50}


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def run_worker(engine: str, model: Path, inputs_npy: Path, batch: int, threads: int, settings: LatencySettings,
               workdir: Path) -> Dict[str, Any]:
    """One figure (module docstring) in a fresh process; returns the record without the guard/machine fields."""
    runtime, precision, label = ENGINES[engine]
    tag = f"{engine}_b{batch}_t{threads}"
    spec_path, out_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.out.json"
    spec = {"engine": runtime, "model": str(model), "inputs": str(inputs_npy), "batch": int(batch),
            "threads": int(threads), "warmup": int(settings.warmup), "runs": int(settings.runs),
            "max_seconds": float(settings.max_seconds)}
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([_package_root()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                             if p])
    from .guard import own_cpu_seconds

    ticks0, own0, wall0 = cpu_ticks(), own_cpu_seconds(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fsl_lsskd.edge.worker", str(spec_path), str(out_path)], env=env,
                          capture_output=True, text=True, timeout=600 + 4 * settings.max_seconds)
    wall, ticks1 = time.perf_counter() - wall0, cpu_ticks()
    if proc.returncode != 0 or not out_path.is_file():
        raise RuntimeError(f"latency worker {tag} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    raw = json.loads(out_path.read_text(encoding="utf-8"))
    # own_cpu_seconds counts waited-for children: the worker's CPU is in it once it has been reaped
    own = own_cpu_seconds() - own0
    others = others_share(ticks0, ticks1, own, wall) if ticks0 is not None and ticks1 is not None else None
    rec = {"engine": engine, "runtime": runtime, "precision": precision, "label": label, "batch": int(batch),
           "threads": int(threads), "inter_op_threads": 1, "threads_effective": raw.get("threads_effective"),
           "warmup": int(settings.warmup), "runs_requested": int(settings.runs),
           "max_seconds": float(settings.max_seconds), "capped": bool(raw["capped"]),
           **summarise(raw["times_ms"], batch),
           "load_ms": 1e3 * raw["load_s"], "first_run_ms": 1e3 * raw["first_run_s"],
           "rss_baseline_mb": raw["rss_baseline_mb"], "peak_rss_mb": raw["peak_rss_mb"],
           "rss_delta_mb": raw["peak_rss_mb"] - raw["rss_baseline_mb"], "memory_method": raw["memory_method"],
           "cpu_per_wall": raw["timed_cpu_s"] / raw["timed_wall_s"] if raw["timed_wall_s"] > 0 else float("nan"),
           "others_busy_share": others, "measure_wall_s": wall}
    log.info("%s batch %d threads %d: p50 %.3f ms p90 %.3f p99 %.3f (%d runs; others %.0f%%)", label, batch, threads,
             rec["p50_ms"], rec["p90_ms"], rec["p99_ms"], rec["n_runs"], 100 * (others or 0))
    return rec


def measure_latency(models: Mapping[str, Path], inputs: np.ndarray, settings: LatencySettings,
                    allow_load: bool = False, machine: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Latency figures of every engine in ``models`` (engine id of :data:`ENGINES` -> the export directory for
    ``pytorch_fp32``, the ``.onnx`` file otherwise) at every batch size and thread count of ``settings``, on
    ``inputs`` (float32 ``[N, 3, S, S]`` prepared real images; repeated when a batch is larger).

    Returns ``{"records": [...], "guard": {"before", "after"}, "under_load", "machine", "settings"}``; every record
    carries the machine, its thread counts, its ``others_busy_share`` and ``under_load``. Raises
    :class:`~fsl_lsskd.edge.guard.MachineBusy` when the guard trips and ``allow_load`` is False (before timing
    anything when the first reading trips)."""
    unknown = sorted(set(models) - set(ENGINES))
    if unknown:
        raise ConfigError(f"unknown engine(s) {unknown}; known: {', '.join(ENGINES)}")
    machine = machine or machine_info()
    guard_kw = dict(window_s=settings.window_s, busy_max=settings.busy_max, spread_max=settings.spread_max)
    before = read_load(**guard_kw)
    if before.under_load and not allow_load:
        raise MachineBusy(busy_message(before))
    records: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fsl-latency-") as tmp:
        npy = Path(tmp) / "inputs.npy"
        np.save(npy, np.ascontiguousarray(inputs, dtype=np.float32))
        for engine, model in models.items():
            for threads in settings.threads:
                for batch in settings.batch_sizes:
                    rec = run_worker(engine, Path(model), npy, batch, threads, settings, Path(tmp))
                    during = rec["others_busy_share"]
                    rec["under_load"] = bool(before.under_load or (during is not None and during > settings.busy_max))
                    rec["machine"] = machine
                    records.append(rec)
                    if rec["under_load"] and not allow_load:
                        raise MachineBusy(
                            f"the machine became busy while measuring {rec['label']} at batch {batch} with {threads} "
                            f"thread(s): other processes took {100 * during:.0f}% of the {machine['cores']} cores' "
                            f"time (limit {100 * settings.busy_max:.0f}%), so the figure would measure them, not the "
                            f"model. Measure on a quiet machine, or pass --allow-load to publish figures marked "
                            f"under_load: true")
    after = read_load(**guard_kw)
    if after.under_load:
        for rec in records:
            rec["under_load"] = True
        if not allow_load:
            raise MachineBusy(busy_message(after, "the latency figures just taken"))
    for rec in records:
        rec["guard_before_under_load"], rec["guard_after_under_load"] = before.under_load, after.under_load
    return {"records": records, "guard": {"before": before.to_dict(), "after": after.to_dict()},
            "under_load": any(r["under_load"] for r in records), "machine": machine, "settings": settings.to_dict()}

