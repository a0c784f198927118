"""Export of a trained backbone in timm's format, with a cost report.

Writes ``<out>/backbone.safetensors`` (the backbone's ``state_dict`` without auxiliary heads and without the
classifier; loadable with ``timm.create_model(name, pretrained=False, num_classes=0, checkpoint_path=...)``)
and ``<out>/backbone.json`` (name, image_size, num_features, params, flops, latency, method, source sha256)."""
from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..utils import PathLike, atomic_path, atomic_write_text, sha256_file

log = logging.getLogger(__name__)


def count_flops(net: nn.Module, image_size: int) -> int:
    """FLOPs of one forward pass at batch 1 (``torch.utils.flop_counter.FlopCounterMode``; a multiply-add = 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(x)
    return int(counter.get_total_flops())


def cpu_latency_ms(net: nn.Module, image_size: int, runs: int = 30, warmup: int = 5) -> float:
    """Median CPU latency (ms) of a batch-1 forward pass."""
    x = torch.zeros(1, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.no_grad():
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            net(x)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def export_network(net: nn.Module, name: str, image_size: int, out_dir: PathLike, method: str = "",
                   source: Optional[PathLike] = None, latency_runs: int = 30,
                   extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write ``backbone.safetensors`` + ``backbone.json`` for ``net`` (already without heads); return the report."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = net.to("cpu").eval()
    state = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    with atomic_path(out / "backbone.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "name": name})
    cpu_net = net.to(memory_format=torch.channels_last)
    report: Dict[str, Any] = {
        "name": name,
        "image_size": int(image_size),
        "num_features": int(getattr(net, "num_features", 0)),
        "params": int(sum(p.numel() for p in net.parameters())),
        "flops": count_flops(cpu_net, image_size),
        "latency_ms_cpu_b1": cpu_latency_ms(cpu_net, image_size, runs=latency_runs),
        "latency_runs": int(latency_runs),
        "threads": torch.get_num_threads(),
        "method": method,
        "source": str(source) if source else None,
        "source_sha256": sha256_file(source) if source and Path(source).is_file() else None,
        "weights": "backbone.safetensors",
        "load_with": f"timm.create_model({name!r}, pretrained=False, num_classes=0, "
                     f"checkpoint_path='backbone.safetensors')",
    }
    report.update(extra or {})
    atomic_write_text(out / "backbone.json", json.dumps(report, indent=2) + "\n")
    log.info("exported %s to %s (%d params, %.1f MFLOPs)", name, out, report["params"], report["flops"] / 1e6)
    return report


def export_checkpoint(checkpoint: PathLike, out_dir: PathLike, latency_runs: int = 30) -> Dict[str, Any]:
    """Export the backbone of a training checkpoint (``fsl-bench export``)."""
    from .checkpoint import load_backbone

    net, meta = load_backbone(checkpoint)
    return export_network(net, meta["backbone"], int(meta["image_size"]), out_dir, method=meta.get("method", ""),
                          source=checkpoint, latency_runs=latency_runs)
