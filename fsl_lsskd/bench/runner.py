"""``fsl-bench run``: execute a benchmark grid resumably against the MLflow store.

One MLflow parent run per invocation, one child run per cell. A cell counts as done only when its run
carries ``fsl.cell_status=complete``, the last thing written after training, evaluation and artifacts;
a killed cell is therefore re-run (and its training resumes from its own checkpoint), never half-read.
A process claims a cell (a lock on its run directory) before running it, so overlapping invocations on one
machine never train the same cell twice; across machines, ``--shard`` keeps them apart.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

from ..errors import ConfigError, UserError
from ..utils import atomic_path, atomic_write_text, make_dir, output_error
from .config import Benchmark, DataSource
from .grid import Cell, expand, shard, with_teachers

log = logging.getLogger(__name__)

COMPLETE = "complete"


def experiment_name(bench: Benchmark) -> str:
    return f"fsl-bench/{bench.name}"


@dataclass
class CellOutcome:
    cell: Cell
    status: str  # "done" | "skipped" | "failed" | "busy" (claimed by another process)
    run_id: Optional[str] = None
    metrics: Dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""


def _resolve(path: str, bench: Benchmark, relative_to_file: bool = True) -> Path:
    """A path from the benchmark file (relative to the file) or the command line (relative to the cwd)."""
    p = Path(os.path.expandvars(os.path.expanduser(path)))
    if not p.is_absolute() and bench.path and relative_to_file:
        p = (Path(bench.path).resolve().parent / p).resolve()
    return p.resolve()


def data_kwargs(dataset: str, source: Optional[DataSource], bench: Benchmark) -> Dict[str, object]:
    """Arguments for ``fsl_lsskd.data.get_dataset`` from a benchmark's data source (``data_paths`` first)."""
    if dataset in bench.data_paths:
        path = _resolve(bench.data_paths[dataset], bench, relative_to_file=False)
        if not path.exists():
            raise ConfigError(f"--data {dataset}={bench.data_paths[dataset]}: {path} does not exist; pass the "
                              f"dataset's official archive or its extracted folder")
        return {"root": path} if path.is_dir() else {"archive": path}
    if source is None:
        return {}
    if source.generate:
        return {"archive": generated_archive(dataset, tuple(source.generate))}
    kw: Dict[str, object] = {"download": source.download}
    if source.archive:
        kw["archive"] = _resolve(source.archive, bench)
    if source.data_root:
        kw["root"] = _resolve(source.data_root, bench)
    return kw


def generated_archive(dataset: str, sizes: tuple) -> Path:
    """Generate (once, into the cache) a small dataset in the official archive format."""
    from ..data import fake
    from ..utils import cache_dir

    out = cache_dir() / "generated" / f"{dataset}-{'x'.join(map(str, sizes))}"
    writers = {
        "tiny_imagenet": lambda d, a, b: fake.write_fake_tiny_imagenet(d, per_class_train=a, per_class_val=b, seed=0),
        "cifar_fs": lambda d, a, b: fake.write_fake_cifar100(d, per_class_train=a, per_class_test=b, seed=0),
    }
    if dataset not in writers:
        raise ConfigError(f"`generate` is supported for {', '.join(writers)}, not {dataset!r}")
    done = out / ".done"
    if done.is_file():
        return Path(done.read_text().strip())
    make_dir(out)
    path = writers[dataset](out, sizes[0], sizes[1])
    atomic_write_text(done, str(path))  # the marker last: a killed generation is redone
    return Path(path)


def finished_cells(client, experiment_id: str) -> Dict[str, str]:
    """cell id -> run id of every cell marked complete in the store."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`fsl.cell_status` = '{COMPLETE}'",
                              max_results=50000)
    return {r.data.tags["fsl.cell_id"]: r.info.run_id for r in runs if "fsl.cell_id" in r.data.tags}


def finished_run(client, experiment_id: str, cell_id: str) -> Optional[str]:
    """The run id of ``cell_id`` when the store has it complete, else None."""
    query = f"tags.`fsl.cell_status` = '{COMPLETE}' and tags.`fsl.cell_id` = '{cell_id}'"
    runs = client.search_runs([experiment_id], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


@contextlib.contextmanager
def cell_claim(cell_dir: Path) -> Iterator[bool]:
    """Hold an exclusive, non-blocking ``flock`` on the cell's run directory itself while the cell runs; yields
    False when another process holds it. Locking the directory writes no file (nothing to leave behind on a
    full disk), and the kernel drops the lock with its process, so a killed run leaves no stale claim."""
    import fcntl

    make_dir(cell_dir)
    fd = os.open(cell_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def run_benchmark(bench: Benchmark, out_root: Path, *, rerun: bool = False, shard_spec: Optional[str] = None,
                  on_event: Callable[[str, Cell, Optional[CellOutcome]], None] = lambda *a: None,
                  on_epoch: Optional[Callable[[int, int, Dict[str, float]], None]] = None) -> List[CellOutcome]:
    """Run every (not yet complete) cell of ``bench``; returns one outcome per cell of this shard.
    ``on_event(kind, cell, outcome)`` reports cell start/skip/end and ``on_epoch`` each training epoch
    (see :func:`fsl_lsskd.train.engine.train`): the CLI's progress bars."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from .. import tracking

    cells = expand(bench)
    if shard_spec:
        cells = shard(cells, shard_spec)
    cells = with_teachers(cells)  # teachers first; a shard holds every teacher of its students
    tracking.quiet_mlflow()
    exp = tracking.set_experiment(experiment_name(bench))
    exp_id = exp.experiment_id
    client = MlflowClient()
    done = {} if rerun else finished_cells(client, exp_id)
    outcomes: List[CellOutcome] = []
    busy = set()
    with mlflow.start_run(experiment_id=exp_id, run_name=f"{bench.name} invocation",
                          tags={"fsl.kind": "invocation", "fsl.benchmark": bench.name,
                                "fsl.shard": shard_spec or "1/1", "git_commit": tracking.git_commit()}) as parent:
        mlflow.log_dict(bench.to_dict(), "benchmark.json")
        for cell in cells:
            if cell.id in done:
                outcomes.append(_skipped(client, cell, done[cell.id]))
                on_event("skip", cell, outcomes[-1])
                continue
            on_event("start", cell, None)
            t0 = time.perf_counter()
            try:
                with cell_claim(out_root / bench.name / cell.id) as claimed:
                    if not claimed:
                        outcome = CellOutcome(cell, "busy", error="running in another process on this machine")
                    elif cell.teacher is not None and cell.teacher.id in busy:
                        outcome = CellOutcome(cell, "busy", error="its teacher is running in another process")
                    elif not rerun and (run_id := finished_run(client, exp_id, cell.id)):  # done meanwhile
                        outcome = _skipped(client, cell, run_id)
                    else:
                        teacher = None
                        if cell.teacher is not None:
                            teacher = teacher_checkpoint(client, exp_id, cell.teacher, out_root / bench.name)
                        outcome = run_cell(bench, cell, out_root / bench.name / cell.id, parent.info.run_id,
                                           exp_id, teacher=teacher, on_epoch=on_epoch)
            except UserError:
                raise  # bad data/config: every later cell would fail the same way
            except OSError as exc:  # an output that cannot be written (full disk, read-only) stops the grid too
                err = output_error(exc)
                if err is None:
                    log.exception("cell %s failed", cell.label)
                    outcome = CellOutcome(cell, "failed", error=f"{type(exc).__name__}: {exc}")
                else:
                    raise err from exc
            except Exception as exc:  # a diverged or crashed cell must not cost the rest of the grid
                log.exception("cell %s failed", cell.label)
                outcome = CellOutcome(cell, "failed", error=f"{type(exc).__name__}: {exc}")
            outcome.seconds = time.perf_counter() - t0
            if outcome.status == "busy":
                busy.add(cell.id)
                log.warning("cell %s: %s; skipped by this process", cell.label, outcome.error)
            outcomes.append(outcome)
            on_event("end", cell, outcome)
        mlflow.log_metrics({status: sum(o.status == status for o in outcomes)
                            for status in ("done", "skipped", "failed", "busy")})
    return outcomes


def _skipped(client, cell: Cell, run_id: str) -> CellOutcome:
    """A cell finished earlier: its results come from the store, for the summary."""
    found = client.get_run(run_id).data.metrics
    return CellOutcome(cell, "skipped", run_id, metrics={k: v for k, v in found.items() if k.startswith("eval.")})


def image_evaluator_options(classifiers, checkpoint: Path, max_episodes: Optional[int]) -> Dict[str, dict]:
    """Constructor arguments of the image-level evaluators among ``classifiers``: they fine-tune the trained
    method itself (its training checkpoint) on each episode, on at most ``max_episodes`` episodes."""
    from .. import plugins
    from ..registry import EVALUATORS

    plugins.import_submodules("fsl_lsskd.eval")
    return {name: {"checkpoint": Path(checkpoint), "max_episodes": max_episodes}
            for name in classifiers if EVALUATORS.get(name).needs_images}


def teacher_checkpoint(client, exp_id: str, teacher: Cell, bench_dir: Path) -> Path:
    """The training checkpoint of a completed teacher cell: its run directory's ``last.pt`` when this machine
    trained it, else the ``checkpoint/last.pt`` artifact of its MLflow run, fetched into that directory (so the
    path, which the student's checkpoint records, is the same either way)."""
    import mlflow

    local = bench_dir / teacher.id / "last.pt"
    run_id = finished_run(client, exp_id, teacher.id)
    if run_id is None:
        raise RuntimeError(f"teacher cell {teacher.label} ({teacher.id}) did not complete; its student cannot run")
    if not local.is_file():
        log.info("fetching teacher checkpoint of %s from run %s", teacher.label, run_id)
        fetched = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint/last.pt",
                                                           dst_path=str(local.parent / ".fetch")))
        make_dir(local.parent)
        os.replace(fetched, local)
    return local


def run_cell(bench: Benchmark, cell: Cell, out_dir: Path, parent_run_id: str, exp_id: str,
             teacher: Optional[Path] = None,
             on_epoch: Optional[Callable[[int, int, Dict[str, float]], None]] = None) -> CellOutcome:
    """Train, export and evaluate one cell inside its child run; mark it complete last."""
    import mlflow
    import numpy as np

    from ..data import get_dataset
    from ..eval import evaluate
    from ..eval._checkpoint import load_backbone
    from ..train.config import TrainConfig
    from ..train.engine import train
    from .tables import eval_artifact_name, eval_metric_name

    settings = cell.settings()
    tags = {"fsl.kind": "cell", "fsl.benchmark": bench.name, "fsl.cell_id": cell.id, "fsl.role": cell.role}
    if cell.teacher is not None:
        tags["fsl.teacher_cell_id"] = cell.teacher.id
    data_kw = data_kwargs(cell.dataset, bench.data.get(cell.dataset), bench)
    dataset = get_dataset(cell.dataset, **data_kw)
    if data_kw.get("download"):
        dataset.prepare()  # fetch (checksummed) into the cache's downloads/ where training finds it
    tr, ev = bench.train, bench.eval
    cfg = TrainConfig(method=cell.method, backbone=cell.backbone, dataset=cell.dataset,
                      archive=str(data_kw["archive"]) if data_kw.get("archive") else None,
                      data_root=str(data_kw["root"]) if data_kw.get("root") else None,
                      image_size=bench.image_size, seed=cell.seed, fraction=cell.fraction, epochs=tr.epochs,
                      batch_size=tr.batch_size, method_overrides=dict(settings["overrides"]), device=tr.device,
                      out_dir=str(out_dir), heldout=tr.heldout, val_episodes=tr.val_episodes,
                      experiment=experiment_name(bench), run_name=cell.label,
                      teacher=str(teacher) if teacher is not None else None)
    result = train(cfg, parent_run_id=parent_run_id, tags=tags, on_epoch=on_epoch)
    if result.run_id is None or result.backbone is None:
        raise ConfigError(f"cell {cell.label}: training produced no MLflow run or exported backbone")
    model, _ = load_backbone(cell.backbone, result.backbone, bench.image_size)
    split = dataset.load_split(ev.split)
    classifiers = ev.classifiers_for(cell.method)
    results = evaluate(model, split, shots=ev.shots, n_way=ev.n_way, n_query=ev.n_query, n_episodes=ev.episodes,
                       classifiers=classifiers, mean=dataset.mean, std=dataset.std,
                       image_size=bench.image_size, device=tr.device,
                       evaluator_options=image_evaluator_options(classifiers, result.checkpoint, ev.image_episodes))
    client = mlflow.tracking.MlflowClient()
    art_dir = out_dir / "eval"
    make_dir(art_dir)
    metrics: Dict[str, float] = {}
    for r in results:
        name = eval_metric_name(ev.split, ev.n_way, r.n_shot, r.classifier)
        metrics[f"{name}.acc"] = 100 * r.mean
        metrics[f"{name}.ci95"] = 100 * r.ci95
        path = art_dir / eval_artifact_name(ev.split, ev.n_way, r.n_shot, r.classifier)
        with atomic_path(path, suffix=".npy") as tmp:
            with open(tmp, "wb") as fh:  # a file handle: np.save would append .npy to the temp name
                np.save(fh, np.asarray(r.accuracies, dtype=np.float32))
        client.log_artifact(result.run_id, str(path), "eval")
    for k, v in metrics.items():
        client.log_metric(result.run_id, k, v)
    client.set_tag(result.run_id, "fsl.episodes_source", ",".join(sorted({r.episodes_source for r in results})))
    # written last: only now does the cell count as done (tables and resume read this tag)
    client.set_tag(result.run_id, "fsl.cell_status", COMPLETE)
    return CellOutcome(cell, "done", result.run_id, metrics)
