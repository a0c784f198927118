"""MLflow tracking helpers used by the training engine (and the grid runner for parent runs).

Tracking URI: ``$MLFLOW_TRACKING_URI`` when set, else MLflow's own default (``sqlite:///<cwd>/mlflow.db``,
artifacts under ``<cwd>/mlruns``; MLflow 3.x). MLflow's INFO logging and URL printing are silenced."""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional

log = logging.getLogger(__name__)

_PARAM_MAX = 6000  # MLflow's param value limit


def quiet_mlflow() -> None:
    """Silence MLflow's table-creation/experiment INFO lines, URL printing and telemetry (install.md §3)."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _mlflow():
    quiet_mlflow()
    import mlflow

    quiet_mlflow()
    return mlflow


def _sqlite_path(uri: str) -> Optional[Path]:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None


@contextlib.contextmanager
def store_lock() -> Iterator[None]:
    """An exclusive lock on a local SQLite tracking store (a ``.lock`` file beside the database).

    Several shard processes started together on a fresh store would otherwise race in MLflow's table creation
    (alembic migrations fail with "Online migration expected to match one row") and in creating the same
    experiment. Other stores (an MLflow server) serialise this themselves: no lock."""
    mlflow = _mlflow()
    db = _sqlite_path(mlflow.get_tracking_uri())
    if db is None:
        yield
        return
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def set_experiment(name: str):
    """``mlflow.set_experiment`` under :func:`store_lock` (creates the store and the experiment safely when
    several processes start at once)."""
    mlflow = _mlflow()
    with store_lock():
        return mlflow.set_experiment(name)


def git_commit(path: Optional[Path] = None) -> str:
    """The checkout's commit (``+dirty`` suffix when modified), or ``unknown``."""
    cwd = Path(path) if path else Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, str]:
    """Nested mapping -> ``{"a.b": "value"}`` with string values (MLflow params)."""
    out: Dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            s = str(list(v) if isinstance(v, tuple) else v)
            out[key] = s[:_PARAM_MAX]
    return out


@contextlib.contextmanager
def start_run(experiment: str = "fsl-bench", run_name: Optional[str] = None,
              tags: Optional[Mapping[str, str]] = None, run_id: Optional[str] = None,
              parent_run_id: Optional[str] = None, nested: bool = False) -> Iterator[Any]:
    """Start (or resume, with ``run_id``) an MLflow run and end it on exit (status FAILED on error).

    Nesting: a run started while another is active (or with ``parent_run_id``/``nested=True``) becomes its
    child (``mlflow.parentRunId`` tag), so a grid runner can wrap many training runs in one parent."""
    mlflow = _mlflow()
    active = mlflow.active_run()
    if active is not None and parent_run_id is None:
        parent_run_id = active.info.run_id
    nested = nested or parent_run_id is not None or active is not None
    if run_id is None:
        set_experiment(experiment)
    kwargs: Dict[str, Any] = {"run_id": run_id, "run_name": run_name if run_id is None else None,
                              "nested": nested}
    if parent_run_id is not None and run_id is None:
        kwargs["parent_run_id"] = parent_run_id
    all_tags = dict(tags or {})
    if run_id is None:
        kwargs["tags"] = all_tags
    run = mlflow.start_run(**kwargs)
    if run_id is not None and all_tags:
        mlflow.set_tags(all_tags)
    try:
        yield run
    except BaseException:
        mlflow.end_run(status="FAILED" if run is not None else "FAILED")
        raise
    else:
        mlflow.end_run()


def log_params(params: Mapping[str, Any]) -> None:
    mlflow = _mlflow()
    flat = flatten(params)
    items = list(flat.items())
    for i in range(0, len(items), 100):  # MLflow's batch limit
        mlflow.log_params(dict(items[i:i + 100]))


def log_metrics(metrics: Mapping[str, float], step: int) -> None:
    """One call per epoch (``log_metrics`` batches them; install.md §3)."""
    mlflow = _mlflow()
    clean = {k.replace("/", "_"): float(v) for k, v in metrics.items()}
    mlflow.log_metrics(clean, step=int(step))


def log_artifact(path: os.PathLike, artifact_path: Optional[str] = None) -> None:
    _mlflow().log_artifact(str(path), artifact_path=artifact_path)


def log_dict(d: Mapping[str, Any], name: str) -> None:
    _mlflow().log_dict(dict(d), name)


def set_tags(tags: Mapping[str, str]) -> None:
    _mlflow().set_tags(dict(tags))
