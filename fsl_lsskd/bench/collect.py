"""Read a benchmark's completed cells from MLflow into a :class:`~fsl_lsskd.bench.tables.ResultSet`."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .config import Benchmark
from .grid import expand, with_teachers
from .runner import COMPLETE, experiment_name
from .tables import ResultSet, eval_artifact_name

log = logging.getLogger(__name__)

CURVE_METRICS = ("train_loss", "val_fewshot_acc", "heldout_base_acc")


def collect(bench: Benchmark) -> ResultSet:
    """Only runs tagged complete and belonging to the benchmark's current grid are read."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from .. import tracking

    tracking.quiet_mlflow()
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment_name(bench))
    if exp is None:
        raise ConfigError(f"no runs for benchmark {bench.name!r} in {mlflow.get_tracking_uri()}; "
                          f"run `fsl-bench run {bench.path or bench.name}` first")
    wanted = {c.id: c for c in with_teachers(expand(bench))}  # teacher rows are results too
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`fsl.cell_status` = '{COMPLETE}'",
                              max_results=50000)
    results = ResultSet()
    ev = bench.eval
    n_cells = 0
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            cell = wanted.get(run.data.tags.get("fsl.cell_id", ""))
            if cell is None:
                continue
            n_cells += 1
            key = (cell.method, cell.backbone)
            results.meta.setdefault("episodes_source", set()).add(run.data.tags.get("fsl.episodes_source", "?"))
            for shot in ev.shots:
                for clf in ev.classifiers_for(cell.method):
                    name = eval_artifact_name(ev.split, ev.n_way, shot, clf)
                    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=f"eval/{name}",
                                                                dst_path=str(Path(tmp) / run.info.run_id))
                    results.add(key, (cell.data_label, shot, clf), cell.seed, np.load(local))
            if cell.seed == min(bench.seeds) and cell.fraction == max(bench.fractions or (1.0,)):
                for metric in CURVE_METRICS:
                    hist = client.get_metric_history(run.info.run_id, metric)
                    if hist:
                        results.curves.setdefault(key, {})[metric] = [(m.step, m.value) for m in hist]
    results.meta.update(cells_found=n_cells, cells_expected=len(wanted))
    if n_cells == 0:
        raise ConfigError(f"benchmark {bench.name!r} has no completed cells yet; run `fsl-bench run` first")
    return results
