"""Grid expansion: a benchmark becomes cells (dataset x backbone x method x seed), each with a
content-derived id so a finished cell is recognised in the MLflow store and skipped on resume."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

from ..errors import ConfigError
from .config import Benchmark, content_id

CELL_FORMAT = 1


@dataclass(frozen=True)
class Cell:
    benchmark: str
    dataset: str
    backbone: str
    method: str
    seed: int
    payload: Tuple[Tuple[str, Any], ...]  # the resolved settings that define the cell

    @property
    def id(self) -> str:
        return content_id(dict(self.payload))

    @property
    def label(self) -> str:
        return f"{self.method}/{self.backbone}/{self.dataset}/seed{self.seed}"

    def settings(self) -> Dict[str, Any]:
        return dict(self.payload)


def expand(bench: Benchmark) -> List[Cell]:
    """All cells of the grid, in a stable order (dataset, backbone, method, seed)."""
    cells = []
    for dataset in bench.datasets:
        source = bench.data.get(dataset)
        for backbone in bench.backbones:
            for method in bench.methods:
                for seed in bench.seeds:
                    payload = {
                        "format": CELL_FORMAT,
                        "benchmark": bench.name,
                        "dataset": dataset,
                        "data": dataclasses.asdict(source) if source else None,
                        "backbone": backbone,
                        "method": method,
                        "seed": seed,
                        "image_size": bench.image_size,
                        "train": dataclasses.asdict(bench.train),
                        "eval": dataclasses.asdict(bench.eval),
                        "overrides": dict(bench.method_overrides.get(method, {})),
                    }
                    cells.append(Cell(bench.name, dataset, backbone, method, seed,
                                      tuple(sorted(payload.items()))))
    return cells


def shard(cells: List[Cell], spec: str) -> List[Cell]:
    """``I/N`` (1-based): every N-th cell starting at I, so N processes share a grid without overlap."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {spec!r}: expected I/N, e.g. 1/4") from None
    if not (n >= 1 and 1 <= i <= n):
        raise ConfigError(f"--shard {spec!r}: need 1 <= I <= N")
    return cells[i - 1::n]
