"""One latency measurement in a fresh process: ``python -m fsl_lsskd.edge.worker SPEC.json OUT.json``.

A fresh process per (engine, precision, batch, threads) so that thread pools are set before any work, nothing
is shared between engines, and the peak memory is the engine's own. After the runtime is imported (for PyTorch
also timm and the backbones) and the input loaded, the resident size is recorded (``rss_baseline_mb``) and the
kernel's peak resident set (``VmHWM``) reset to it (``/proc/self/clear_refs``); at the end the peak is read
(``peak_rss_mb``): ``rss_delta_mb`` = peak - baseline is what loading the model and running it added. Where the
reset is not possible, ``ru_maxrss`` before and after is used and ``memory_method`` says so.

SPEC keys: ``engine`` (``pytorch``: the backbone loaded with :func:`fsl_lsskd.checkpoint.load_backbone` from the
export directory, eager mode under ``torch.inference_mode``; ``onnxruntime``: an ONNX Runtime CPU session of the
``.onnx`` file), ``model`` (path), ``inputs`` (``.npy`` of float32 ``[N, 3, S, S]`` prepared images), ``batch``,
``threads`` (torch.set_num_threads / intra_op_num_threads; inter-op threads 1), ``warmup``, ``runs``,
``max_seconds`` (time cap of the timed runs). OUT gets the raw figures (times in ms).
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Tuple


MEMORY_PEAK = ("VmHWM (peak resident set) of a fresh process, reset through /proc/self/clear_refs after the runtime "
               "is imported and the input loaded; rss_delta_mb = that peak minus VmRSS at the reset")
MEMORY_MAXRSS = ("ru_maxrss of a fresh process (no peak reset here): rss_delta_mb = ru_maxrss at the end minus "
                 "ru_maxrss after the runtime is imported and the input loaded (0 when the import peaked higher)")


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _status_mb(key: str):
    """``VmRSS``/``VmHWM`` of /proc/self/status in MiB, or None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _memory_baseline() -> Dict[str, Any]:
    """Reset the peak resident set to the current one (Linux >= 4.0: ``5`` into /proc/self/clear_refs) and
    return the baseline and how the peak will be read."""
    current = _status_mb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        reset = current is not None and _status_mb("VmHWM") is not None
    except OSError:
        reset = False
    if reset:
        return {"rss_baseline_mb": current, "memory_method": MEMORY_PEAK, "_peak": "VmHWM"}
    return {"rss_baseline_mb": _maxrss_mb(), "memory_method": MEMORY_MAXRSS, "_peak": "maxrss"}


def _peak_mb(how: str) -> float:
    return (_status_mb("VmHWM") if how == "VmHWM" else None) or _maxrss_mb()


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _pytorch(spec: Dict[str, Any], x) -> Tuple[Callable[[], Any], Dict[str, Any]]:
    import torch

    torch.set_num_threads(int(spec["threads"]))
    torch.set_num_interop_threads(1)
    from fsl_lsskd.backbones import create_backbone  # noqa: F401 - timm and the registered backbones, imported
    from fsl_lsskd.checkpoint import load_backbone  # before the load is timed (as onnxruntime is for ORT)

    xt = torch.from_numpy(x)
    base = _memory_baseline()
    t0 = time.perf_counter()
    net, _ = load_backbone(spec["model"])
    load_s = time.perf_counter() - t0

    def run():
        with torch.inference_mode():
            return net(xt)

    return run, {"load_s": load_s, **base, "threads_effective": torch.get_num_threads()}


def _onnxruntime(spec: Dict[str, Any], x) -> Tuple[Callable[[], Any], Dict[str, Any]]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = int(spec["threads"])
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    base = _memory_baseline()
    t0 = time.perf_counter()
    sess = ort.InferenceSession(spec["model"], so, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    feed = {sess.get_inputs()[0].name: x}

    def run():
        return sess.run(None, feed)

    return run, {"load_s": load_s, **base, "threads_effective": int(spec["threads"])}


def measure(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Load the engine, one cold run, ``warmup`` runs, then timed runs until ``runs`` or ``max_seconds``."""
    import numpy as np

    x = np.load(spec["inputs"], allow_pickle=False).astype(np.float32)
    b = int(spec["batch"])
    if len(x) < b:  # fewer prepared images than the batch: repeat them
        x = np.concatenate([x] * (-(-b // len(x))))
    x = np.ascontiguousarray(x[:b])
    run, out = (_pytorch if spec["engine"] == "pytorch" else _onnxruntime)(spec, x)
    t0 = time.perf_counter()
    run()
    out["first_run_s"] = time.perf_counter() - t0
    for _ in range(int(spec["warmup"])):
        run()
    times = []
    cap = float(spec["max_seconds"])
    cpu0, start = _cpu_s(), time.perf_counter()
    while len(times) < int(spec["runs"]):
        t = time.perf_counter()
        run()
        end = time.perf_counter()
        times.append(end - t)
        if end - start > cap:
            break
    wall = time.perf_counter() - start
    out.update(times_ms=[1e3 * t for t in times], timed_wall_s=wall, timed_cpu_s=_cpu_s() - cpu0,
               capped=len(times) < int(spec["runs"]), peak_rss_mb=_peak_mb(out.pop("_peak")), own_cpu_s=_cpu_s())
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    out = measure(spec)
    Path(argv[1]).write_text(json.dumps(out), encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover - run as a subprocess
    sys.exit(main())
