"""The cell record: everything fsl-bench writes to and reads from the MLflow store, in one place.

Store: ``$MLFLOW_TRACKING_URI`` when set, else a local SQLite database ``./mlflow.db`` (artifacts under
``./mlruns``) of the directory the command runs in. Commands that only read (``fsl-bench table``,
``fsl-bench run --dry-run``) never create a store: :func:`open_store` with ``create=False`` names the
store it looked for and how to point at another one.

Runs (record format 2):

- **invocation** (``fsl.kind=invocation``): one per ``fsl-bench run``, in experiment ``fsl-bench/<benchmark>``.
- **training** (``fsl.kind=train``): one per training cell, named by its training id (``fsl.train_id``);
  params = the flattened training identity and run settings; metrics per epoch (``train_<term>``, ``lr``,
  ``images_per_s``, ``epoch_time_s``, ``val_fewshot_acc``/``val_fewshot_ci95``, ``heldout_base_acc``; step =
  epoch, from 1); artifacts ``model/`` (weights + meta), ``export/`` (inference backbone),
  ``training_curves.png``. A finished cell carries ``fsl.status=complete``, written last: resume, scoring
  and tables trust nothing else. A training run is found by its id in any ``fsl-bench/*`` experiment, so
  benchmarks that share a cell share its training; ``fsl-bench run`` tags it with its data-free cell key
  (``fsl.cell_key``), by which the tables find it.
- **score** (``fsl.kind=score``): one per (training cell, scored split, protocol, readout), a child of the
  training run, identified by its scoring id (``fsl.score_id``) and tagged with what it measures (``fsl.measure``,
  the tables' lookup key), named for people (:func:`score_run_name`); params = the scoring identity; metrics
  ``accuracy``/``accuracy_ci95`` and for probabilistic readouts ``ece``, ``nll``, ``brier`` (+ CIs);
  artifact ``score.npz`` (per-episode arrays) and ``score.json``; ``fsl.status=complete`` last.
- **base** (``fsl.kind=score`` with ``fsl.readout=heldout_base``): base-class accuracy and calibration of
  the held-out base images, same layout.
- **edge** (``fsl.kind=edge``): one per ``fsl-bench edge`` measurement of a training cell, a child of the
  training run: metrics (file sizes, latency percentiles per engine/batch/threads, int8 accuracy differences),
  ``edge.json`` (every figure with its machine and load readings), ``edge_accuracy.npz`` (per-episode accuracy
  per engine) and the ONNX files (``onnx/``); ``fsl.under_load`` says whether any figure was taken under load.

Units: accuracy and ECE in percent everywhere; NLL in nats; Brier 0..2.

Every tag name is a constant below (``TAG_*``); no other module talks to the MLflow client. Readers use the typed
read contract :class:`ResultStore`, which a published results directory implements too.

Record format 1 (fsl-bench before the train-once-score-many design: ``fsl.cell_id``/``fsl.cell_status`` on
one run per cell) is converted by ``fsl-bench store migrate``; :func:`check_no_legacy` refuses it otherwise.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import (Any, Dict, Iterable, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple,
                    runtime_checkable)

from .errors import UserError
from .utils import pid_alive, project_root

log = logging.getLogger(__name__)

RECORD_FORMAT = 2
EXPERIMENT_PREFIX = "fsl-bench/"
TRAIN_EXPERIMENT = "fsl-bench/train"  # runs started by `fsl-bench train`

#: every tag fsl-bench writes starts with this (``fsl-bench publish`` copies exactly these)
TAG_PREFIX = "fsl."
# every run
TAG_FORMAT = "fsl.record_format"
TAG_KIND = "fsl.kind"
TAG_STATUS = "fsl.status"
TAG_TRAIN_ID = "fsl.train_id"
TAG_COMMIT = "fsl.git_commit"
TAG_BENCHMARK = "fsl.benchmark"
TAG_ROW = "fsl.row"  # the table row of the cell (a method or a variant's name)
# invocation runs
TAG_HOST, TAG_PID = "fsl.host", "fsl.pid"  # where an invocation runs (a killed one is closed by the next)
TAG_SHARD = "fsl.shard"  # I/N of ``--shard``
TAG_FINGERPRINTS = "fsl.fingerprints"  # JSON {training dataset: content fingerprint of its train split}
# training runs
TAG_IDENTITY = "fsl.identity"  # JSON of the training identity (score runs: of the scoring identity)
TAG_METHOD, TAG_BACKBONE, TAG_DATASET = "fsl.method", "fsl.backbone", "fsl.dataset"
TAG_SEED, TAG_FRACTION = "fsl.seed", "fsl.fraction"
TAG_TEACHER = "fsl.teacher_train_id"
TAG_ROLE = "fsl.role"  # ``grid`` or ``teacher`` (a cell trained only to teach)
#: the data-free cell key (:func:`fsl_lsskd.bench.measures.cell_key`): the training identity without the data's
#: content fingerprint and the teacher's id; the reader finds a benchmark's cells by it
TAG_CELL_KEY = "fsl.cell_key"
# score runs
TAG_SCORE_ID = "fsl.score_id"
#: what the score measures (:attr:`fsl_lsskd.bench.measures.Measure.key`): the reader's lookup key
TAG_MEASURE = "fsl.measure"
TAG_READOUT, TAG_LABEL = "fsl.readout", "fsl.label"  # registered readout name; column label (name + settings)
TAG_TARGET = "fsl.target"  # scored dataset
TAG_PROTOCOL = "fsl.protocol"  # protocol key (``5w1s15q``; ``base`` for the held-out base images)
TAG_EPISODES_SOURCE = "fsl.episodes_source"  # the episode file (``splits/episodes/...``), ``generated``, ...
# edge runs
TAG_UNDER_LOAD, TAG_CPU_MODEL = "fsl.under_load", "fsl.cpu_model"
COMPLETE = "complete"
KIND_INVOCATION, KIND_TRAIN, KIND_SCORE, KIND_EDGE = "invocation", "train", "score", "edge"
# record format 1, and what ``fsl-bench store migrate`` writes when it converts it
LEGACY_CELL_ID, LEGACY_STATUS = "fsl.cell_id", "fsl.cell_status"
LEGACY_TEACHER = "fsl.teacher_cell_id"
TAG_MIGRATED_FROM, TAG_MIGRATED_TO = "fsl.migrated_from", "fsl.migrated_to"

_PARAM_MAX = 6000  # MLflow's param value limit


class StoreNotFound(UserError):
    """A reading command found no MLflow store where it looked."""


# --------------------------------------------------------------------------------------------------- store
def quiet_mlflow() -> None:
    """Silence MLflow's table-creation/experiment INFO lines, URL printing, telemetry and progress bars."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow logs every SQL error with its statement, parameters and chained tracebacks before raising it again;
    # the raised error is reported (a store that cannot be written: :func:`store_error`, one line)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def store_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db`` (MLflow's own default, made absolute)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Optional[Path]:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None


def describe_store() -> str:
    """Where the store is, for messages: the URI and whether it came from the environment."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return f"{store_uri()} (MLFLOW_TRACKING_URI)"
    return f"{sqlite_path(store_uri())} (the default ./mlflow.db: MLFLOW_TRACKING_URI is unset)"


#: SQLite's messages for a store it cannot write (the database file or its directory is read-only)
_READ_ONLY_TEXT = ("attempt to write a readonly database", "readonly database", "unable to open database file")


def _in_store(filename) -> bool:
    """Whether ``filename`` is one of the local store's files: the SQLite database with its lock and journal, or
    a file under an artifact root beside it or in the working directory (``mlruns/``)."""
    path = Path(os.fsdecode(filename)).absolute()
    db = sqlite_path(store_uri())
    roots = [Path.cwd() / "mlruns"] + ([db.parent / "mlruns"] if db is not None else [])
    if db is not None and path.parent == db.absolute().parent and path.name.startswith(db.name):
        return True
    return any(path.is_relative_to(r.absolute()) for r in roots)


def store_error(exc: BaseException) -> Optional[UserError]:
    """An :class:`~fsl_lsskd.errors.OutputError` (one line) when ``exc`` means the store cannot be written: its
    disk is full (SQLite's "database or disk is full", or an artifact write failing with ENOSPC: the free space is
    named) or it is read-only (SQLite's "readonly database", its lock or artifact folder refused). The fix names
    MLFLOW_TRACKING_URI. None for any other error."""
    import errno as _errno

    from .errors import OutputError
    from .utils import WRITE_ERRNOS, free_space, full_disk_cause

    chain, e, seen = [], exc, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    db = sqlite_path(store_uri())
    where = str(db.parent) if db is not None else store_uri()
    oserr = next((c for c in chain if isinstance(c, OSError) and c.errno in WRITE_ERRNOS and c.filename
                  and _in_store(c.filename)), None)
    text = " ".join(str(c).lower() for c in chain)
    is_sql = any(type(c).__module__.startswith(("sqlite3", "sqlalchemy", "mlflow")) for c in chain)
    if oserr is not None:
        filename = Path(os.fsdecode(oserr.filename))
        where = str(filename.parent if not filename.is_dir() else filename)
    if (oserr is not None and oserr.errno in (_errno.ENOSPC, _errno.EDQUOT)) or (
            is_sql and full_disk_cause(exc) is not None):
        return OutputError(f"cannot write the MLflow store {describe_store()}: no space left on the device holding "
                           f"{where} ({free_space(where)} free). Free disk space there, or point "
                           f"MLFLOW_TRACKING_URI at a store on another disk, and run the command again (nothing "
                           f"finished was lost: the same command resumes)")
    if oserr is not None or (is_sql and any(s in text for s in _READ_ONLY_TEXT)):
        return OutputError(f"cannot write the MLflow store {describe_store()}: {where} is read-only or not writable "
                           f"by this user. Commands that only read it (fsl-bench table, run --dry-run) work as it is; "
                           f"to write, copy mlflow.db and mlruns/ to a writable directory and point "
                           f"MLFLOW_TRACKING_URI at the copy (MLFLOW_TRACKING_URI=sqlite:////path/to/copy/mlflow.db)")
    return None


@contextlib.contextmanager
def store_lock() -> Iterator[None]:
    """An exclusive lock on a local SQLite store (a ``.lock`` file beside the database): several processes
    started together on a fresh store would otherwise race in MLflow's table creation. Other stores (an
    MLflow server) serialise this themselves: no lock."""
    db = sqlite_path(store_uri())
    if db is None:
        yield
        return
    import fcntl

    from .utils import make_dir

    make_dir(db.parent)
    with open(db.with_name(db.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def git_commit(path: Optional[Path] = None) -> str:
    """The checkout's commit (``+dirty`` when tracked files are modified), or ``unknown``."""
    cwd = Path(path) if path else project_root()
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
            s = json.dumps(list(v) if isinstance(v, tuple) else v, default=str) if not isinstance(v, str) else v
            out[key] = s[:_PARAM_MAX]
    return out


@dataclass
class TrainingRecord:
    """A training run in the store."""

    run_id: str
    experiment_id: str
    train_id: str
    tags: Dict[str, str]
    params: Dict[str, str]
    complete: bool
    start_time: int = 0

    @property
    def identity(self) -> Dict[str, Any]:
        raw = self.tags.get(TAG_IDENTITY)
        return json.loads(raw) if raw else {}


@dataclass
class ScoreRecord:
    """A finished score run in the store."""

    run_id: str
    score_id: str
    train_id: str
    tags: Dict[str, str]
    metrics: Dict[str, float] = field(default_factory=dict)
    start_time: int = 0

    @property
    def identity(self) -> Dict[str, Any]:
        return json.loads(self.tags.get(TAG_IDENTITY, "{}"))


@runtime_checkable
class ResultStore(Protocol):
    """What the readers of results (:func:`fsl_lsskd.report.collect.collect`, ``fsl-bench publish``,
    ``fsl-bench edge``) may ask of a store: the typed read contract. Implemented by the MLflow :class:`Store` and
    by :class:`fsl_lsskd.report.publish.PublishedStore` (a published results directory); nothing else of either is
    read, so a table built from one equals the table built from the other.

    Keys: a training cell by its training id (``fsl.train_id``, 16 hex digits), a score by its score id
    (``fsl.score_id``, 16 hex digits), a run by its run id. Which cell and which measure a record is comes from
    its tags: ``fsl.cell_key`` and ``fsl.measure`` (derived from ``fsl.identity`` where a record predates them:
    :func:`fsl_lsskd.bench.measures.cell_key_of`, :func:`~fsl_lsskd.bench.measures.measure_key_of`)."""

    def trainings(self, train_ids: Optional[Iterable[str]] = None) -> Dict[str, TrainingRecord]:
        """train id -> its finished training run (:class:`TrainingRecord`: tags with ``fsl.identity``, params,
        ``start_time`` in ms since the epoch); every finished one when ``train_ids`` is None."""
        ...

    def scores(self, train_ids: Optional[Iterable[str]] = None) -> Dict[str, ScoreRecord]:
        """score id -> its finished score run (:class:`ScoreRecord`: tags, summary metrics with ``accuracy`` and
        ``ece`` in %, ``nll`` in nats, ``brier`` in 0..2, ``start_time`` in ms) of the given training cells (all
        when None); older scores of the same measure included (the reader keeps the newest)."""
        ...

    def score_arrays(self, record: ScoreRecord, cache: Dict[str, Any]) -> Dict[str, Any]:
        """The per-episode arrays of a score (numpy): ``accuracy`` ``[E]`` in %, and for probabilistic readouts
        ``nll`` ``[E]`` (nats), ``brier`` ``[E]``, ``reliability`` ``[E, bins, 3]``; base-class scores have one
        entry per held-out image instead of per episode. ``cache`` is the caller's dict, reused across calls."""
        ...

    def metric_history(self, run_id: str, metric: str) -> List[Tuple[int, float]]:
        """``[(step, value)]`` of a training run's per-epoch ``metric`` (step = epoch from 1; e.g. ``train_loss``,
        ``val_fewshot_acc`` in %, ``heldout_base_acc`` in %); empty when the run logged none."""
        ...

    def latest_fingerprints(self, experiment: str) -> Dict[str, str]:
        """training dataset -> the content fingerprint of its train split that the newest ``fsl-bench run`` of
        ``experiment`` (``fsl-bench/<benchmark>``) used; it picks among trainings of several data versions.
        Empty when unknown (a published directory holds one version)."""
        ...


class Store:
    """The MLflow store of fsl-bench runs (:func:`open_store`); a :class:`ResultStore`, and the writer of every
    run. The only code that talks to the MLflow client."""

    def __init__(self, client) -> None:
        self.client = client
        self._experiments: Dict[str, str] = {}

    # ---------------------------------------------------------------- experiments
    def experiment_id(self, name: str, create: bool = True) -> Optional[str]:
        if name in self._experiments:
            return self._experiments[name]
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            if not create:
                return None
            with store_lock():
                exp = self.client.get_experiment_by_name(name)
                eid = exp.experiment_id if exp is not None else self._create_experiment(name)
        else:
            eid = exp.experiment_id
        self._experiments[name] = eid
        return eid

    def _create_experiment(self, name: str) -> str:
        """Create experiment ``name``; if another machine created it first (the
        file lock only orders processes on this machine), use theirs."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(name)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS" and "already exists" not in str(exc):
                raise
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            log.debug("experiment %s was created concurrently by another process", name)
            return exp.experiment_id

    def fsl_experiments(self) -> List[str]:
        """Ids of every ``fsl-bench/*`` experiment."""
        from mlflow.entities import ViewType

        exps = self.client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=5000)
        return [e.experiment_id for e in exps if e.name.startswith(EXPERIMENT_PREFIX)]

    def _search(self, filter_string: str, experiment_ids: Optional[Sequence[str]] = None) -> list:
        ids = list(experiment_ids) if experiment_ids is not None else self.fsl_experiments()
        if not ids:
            return []
        out, token = [], None
        while True:
            page = self.client.search_runs(ids, filter_string=filter_string, max_results=5000, page_token=token)
            out.extend(page)
            token = page.token
            if not token:
                return out

    # ---------------------------------------------------------------- training records
    def trainings(self, train_ids: Optional[Iterable[str]] = None, complete_only: bool = True
                  ) -> Dict[str, TrainingRecord]:
        """train id -> its run (the finished one when ``complete_only``; else the newest)."""
        query = f"tags.`{TAG_KIND}` = '{KIND_TRAIN}'"
        if complete_only:
            query += f" and tags.`{TAG_STATUS}` = '{COMPLETE}'"
        wanted = set(train_ids) if train_ids is not None else None
        found: Dict[str, TrainingRecord] = {}
        for run in sorted(self._search(query), key=lambda r: r.info.start_time or 0):
            tid = run.data.tags.get(TAG_TRAIN_ID)
            if not tid or (wanted is not None and tid not in wanted):
                continue
            rec = TrainingRecord(run.info.run_id, run.info.experiment_id, tid, dict(run.data.tags),
                                 dict(run.data.params), run.data.tags.get(TAG_STATUS) == COMPLETE,
                                 int(run.info.start_time or 0))
            if tid not in found or rec.complete or not found[tid].complete:
                found[tid] = rec
        return found

    def training(self, train_id: str) -> Optional[TrainingRecord]:
        return self.trainings([train_id]).get(train_id)

    def unfinished_training(self, train_id: str) -> Optional[TrainingRecord]:
        """The newest run of ``train_id`` that did not finish (a killed run to resume into), or None."""
        rec = self.trainings([train_id], complete_only=False).get(train_id)
        return rec if rec is not None and not rec.complete else None

    def close_unfinished(self, train_id: str, keep: Optional[str] = None, status: str = "KILLED") -> List[str]:
        """End every training run of ``train_id`` that MLflow still shows RUNNING, but ``keep``, as ``status``
        (a run whose process was killed: SIGKILL, ``scancel``, a lost node); returns their ids. Call it only while
        holding the cell (:func:`fsl_lsskd.bench.runner.cell_claim`): a run of the cell still RUNNING then belongs
        to no live process."""
        query = f"tags.`{TAG_KIND}` = '{KIND_TRAIN}' and tags.`{TAG_TRAIN_ID}` = '{train_id}'"
        closed = []
        for run in self._search(query):
            if run.info.status == "RUNNING" and run.info.run_id != keep:
                self.client.set_terminated(run.info.run_id, status)
                closed.append(run.info.run_id)
        if closed:
            log.info("training %s: closed %d run(s) left RUNNING by a killed process as %s: %s", train_id,
                     len(closed), status, ", ".join(closed))
        return closed

    def has_metrics(self, run_id: str) -> bool:
        """Whether run ``run_id`` logged any metric (a training run: finished at least one epoch)."""
        return bool(self.client.get_run(run_id).data.metrics)

    def start_training(self, experiment: str, run_name: str, train_id: str, identity: Mapping[str, Any],
                       tags: Optional[Mapping[str, str]] = None, params: Optional[Mapping[str, Any]] = None,
                       parent_run_id: Optional[str] = None, resume_run_id: Optional[str] = None) -> str:
        """Create (or reopen, with ``resume_run_id``) the training run of ``train_id``; returns its run id."""
        if resume_run_id is not None:
            try:
                self.client.get_run(resume_run_id)
                self.client.update_run(resume_run_id, status="RUNNING")
                return resume_run_id
            except Exception:  # noqa: BLE001 - the run lives in another store: start a fresh one
                log.warning("MLflow run %s not found in %s; starting a new run", resume_run_id, describe_store())
        all_tags = {TAG_FORMAT: str(RECORD_FORMAT), TAG_KIND: KIND_TRAIN, TAG_TRAIN_ID: train_id,
                    TAG_STATUS: "running", TAG_COMMIT: git_commit(), "mlflow.runName": run_name,
                    TAG_IDENTITY: json.dumps(identity, sort_keys=True, default=str),
                    TAG_METHOD: str(identity.get("method", "")), TAG_BACKBONE: str(identity.get("backbone", "")),
                    TAG_DATASET: str(identity.get("dataset", "")), TAG_SEED: str(identity.get("seed", "")),
                    TAG_FRACTION: str(identity.get("fraction", "")), **dict(tags or {})}
        if identity.get("teacher"):
            all_tags[TAG_TEACHER] = str(identity["teacher"])
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id(experiment), run_name=run_name, tags=all_tags)
        run_id = run.info.run_id
        self.log_params(run_id, {"identity": dict(identity), **dict(params or {})})
        return run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k.replace("/", "_"), float(v), now, int(step)) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    def log_artifacts(self, run_id: str, path: Path, artifact_path: Optional[str] = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def finish_training(self, run_id: str, model_dir: Path, export_dir: Optional[Path],
                        extra_artifacts: Sequence[Path] = ()) -> None:
        """Log the finished model (and export) and mark the run complete, last."""
        self.log_artifacts(run_id, model_dir, "model")
        if export_dir is not None:
            self.log_artifacts(run_id, export_dir, "export")
        for p in extra_artifacts:
            if Path(p).is_file():
                self.log_artifacts(run_id, Path(p))
        self.client.set_tag(run_id, TAG_STATUS, COMPLETE)  # written last: only now is the cell trained
        self.client.set_terminated(run_id, "FINISHED")

    def fail(self, run_id: str, status: str = "FAILED") -> None:
        with contextlib.suppress(Exception):
            self.client.set_terminated(run_id, status)

    def fetch_dir(self, run_id: str, artifact_path: str, dest: Path) -> Path:
        """An artifact directory of ``run_id`` as a local path (the artifact store's own path when it is on this
        machine, else a download into ``dest``)."""
        import mlflow

        uri = self.client.get_run(run_id).info.artifact_uri
        local = _local_artifact_path(uri)
        if local is not None and (local / artifact_path).exists():
            return local / artifact_path
        Path(dest).mkdir(parents=True, exist_ok=True)
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                        dst_path=str(dest), tracking_uri=store_uri()))

    # ---------------------------------------------------------------- scores
    def scores(self, train_ids: Optional[Iterable[str]] = None) -> Dict[str, ScoreRecord]:
        """score id -> its finished score run (of the given training cells)."""
        wanted = set(train_ids) if train_ids is not None else None
        query = f"tags.`{TAG_KIND}` = '{KIND_SCORE}' and tags.`{TAG_STATUS}` = '{COMPLETE}'"
        out: Dict[str, ScoreRecord] = {}
        for run in self._search(query):
            tid = run.data.tags.get(TAG_TRAIN_ID, "")
            if wanted is not None and tid not in wanted:
                continue
            sid = run.data.tags.get(TAG_SCORE_ID)
            if sid:
                out[sid] = ScoreRecord(run.info.run_id, sid, tid, dict(run.data.tags), dict(run.data.metrics),
                                       int(run.info.start_time or 0))
        return out

    def write_child_run(self, training: TrainingRecord, kind: str, name: str, tags: Mapping[str, str],
                        params: Optional[Mapping[str, Any]] = None, metrics: Optional[Mapping[str, float]] = None,
                        documents: Optional[Mapping[str, Any]] = None,
                        arrays: Optional[Mapping[str, Mapping[str, Any]]] = None,
                        artifacts: Sequence[Path] = ()) -> str:
        """Record a finished child run of ``training`` (``fsl.kind=kind``, ``fsl.train_id``, ``tags``): params,
        metrics, JSON ``documents`` (file name -> object), ``arrays`` (``.npz`` file name -> {name: array}) and
        ``artifacts`` (files or directories), then ``fsl.status=complete`` last; returns its run id. A failure
        marks the run FAILED (never complete) and re-raises."""
        import numpy as np

        all_tags = {TAG_FORMAT: str(RECORD_FORMAT), TAG_KIND: kind, TAG_TRAIN_ID: training.train_id,
                    TAG_STATUS: "running", TAG_COMMIT: git_commit(), "mlflow.parentRunId": training.run_id,
                    "mlflow.runName": name, **dict(tags)}
        run = self.client.create_run(training.experiment_id, run_name=name, tags=all_tags)
        run_id = run.info.run_id
        try:
            if params:
                self.log_params(run_id, params)
            if metrics:
                self.log_metrics(run_id, metrics)
            if documents or arrays:
                with tempfile.TemporaryDirectory(prefix=f"fsl-{kind}-") as tmp:
                    for fname, doc in (documents or {}).items():
                        (Path(tmp) / fname).write_text(json.dumps(doc, indent=2, default=str) + "\n")
                    for fname, arrs in (arrays or {}).items():
                        with open(Path(tmp) / fname, "wb") as fh:
                            np.savez_compressed(fh, **{k: np.asarray(v) for k, v in arrs.items() if v is not None})
                    self.client.log_artifacts(run_id, tmp)
            for path in artifacts:
                self.log_artifacts(run_id, Path(path))
            self.client.set_tag(run_id, TAG_STATUS, COMPLETE)
            self.client.set_terminated(run_id, "FINISHED")
        except BaseException:
            self.fail(run_id)
            raise
        return run_id

    def write_score(self, training: TrainingRecord, score_id: str, identity: Mapping[str, Any],
                    arrays: Mapping[str, Any], metrics: Mapping[str, float], summary: Mapping[str, Any],
                    tags: Mapping[str, str]) -> str:
        """Record one score as a child run of ``training``: params (identity), metrics, ``score.npz`` (arrays)
        and ``score.json`` (summary), then ``fsl.status=complete``. The run is named for people reading a flat
        list (:func:`score_run_name`); the score id and ``fsl.measure`` identify it."""
        all_tags = {TAG_SCORE_ID: score_id, TAG_IDENTITY: json.dumps(identity, sort_keys=True, default=str),
                    **dict(tags)}
        name = score_run_name(training, all_tags, str(identity.get("readout", "")))
        return self.write_child_run(training, KIND_SCORE, name, all_tags, params={"score": dict(identity)},
                                    metrics=metrics, documents={"score.json": {"identity": identity,
                                                                               "summary": summary}},
                                    arrays={"score.npz": arrays})

    def edge_runs(self, train_ids: Optional[Iterable[str]] = None) -> Dict[str, List[Any]]:
        """train id -> its finished edge runs (``fsl.kind=edge``, newest first)."""
        wanted = set(train_ids) if train_ids is not None else None
        query = f"tags.`{TAG_KIND}` = '{KIND_EDGE}' and tags.`{TAG_STATUS}` = '{COMPLETE}'"
        out: Dict[str, List[Any]] = {}
        for run in sorted(self._search(query), key=lambda r: -(r.info.start_time or 0)):
            tid = run.data.tags.get(TAG_TRAIN_ID, "")
            if wanted is None or tid in wanted:
                out.setdefault(tid, []).append(run)
        return out

    def score_arrays(self, record: ScoreRecord, cache: Dict[str, Any]) -> Dict[str, Any]:
        """The per-episode arrays of a score (``accuracy`` in %, ``nll``, ``brier``, ``reliability``)."""
        import numpy as np

        if record.run_id in cache:
            return cache[record.run_id]
        with tempfile.TemporaryDirectory(prefix="fsl-read-") as tmp:
            path = self.fetch_dir(record.run_id, "score.npz", Path(tmp))
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        cache[record.run_id] = arrays
        return arrays

    def metric_history(self, run_id: str, metric: str) -> List[Tuple[int, float]]:
        """``[(step, value)]`` of ``metric`` of run ``run_id`` (:meth:`ResultStore.metric_history`)."""
        return [(int(m.step), float(m.value)) for m in self.client.get_metric_history(run_id, metric)]

    def latest_fingerprints(self, experiment: str) -> Dict[str, str]:
        """training dataset -> split fingerprint of the newest invocation of ``experiment`` that recorded them
        (``fsl.fingerprints``; the 20 newest invocations are looked at); empty when there is none."""
        eid = self.experiment_id(experiment, create=False)
        if eid is None:
            return {}
        runs = self.client.search_runs([eid], filter_string=f"tags.`{TAG_KIND}` = '{KIND_INVOCATION}'",
                                       order_by=["attributes.start_time DESC"], max_results=20)
        for r in runs:
            raw = r.data.tags.get(TAG_FINGERPRINTS)
            if raw:
                return json.loads(raw)
        return {}

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set ``tags`` on run ``run_id``, in their order (write ``fsl.status`` last where it matters)."""
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)

    def runs_without(self, kind: str, tag: str) -> List[Tuple[str, Dict[str, str]]]:
        """``[(run id, tags)]`` of every run of ``fsl.kind=kind`` (any status) that lacks ``tag``."""
        runs = self._search(f"tags.`{TAG_KIND}` = '{kind}'")
        return [(r.info.run_id, dict(r.data.tags)) for r in runs if tag not in r.data.tags]

    # ---------------------------------------------------------------- invocations
    def start_invocation(self, experiment: str, name: str, tags: Mapping[str, str]) -> str:
        """Open the invocation run of one ``fsl-bench run`` (tagged with this host and process id), after ending
        as KILLED the invocation runs of ``experiment`` that a killed process (SIGKILL, a lost shell) left RUNNING
        on this host."""
        import socket

        eid = self.experiment_id(experiment)
        host = socket.gethostname()
        for run in self._search(f"tags.`{TAG_KIND}` = '{KIND_INVOCATION}' and tags.`{TAG_HOST}` = '{host}'", [eid]):
            pid = run.data.tags.get(TAG_PID, "")
            if run.info.status == "RUNNING" and pid.isdigit() and not pid_alive(int(pid)):
                self.client.set_terminated(run.info.run_id, "KILLED")
                log.info("closed invocation run %s of killed process %s as KILLED", run.info.run_id, pid)
        run = self.client.create_run(eid, run_name=name,
                                     tags={TAG_FORMAT: str(RECORD_FORMAT), TAG_KIND: KIND_INVOCATION,
                                           TAG_COMMIT: git_commit(), TAG_HOST: host, TAG_PID: str(os.getpid()),
                                           **dict(tags)})
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        with contextlib.suppress(Exception):
            self.client.set_terminated(run_id, status)

    # ---------------------------------------------------------------- record format 1
    def legacy_runs(self, experiment_ids: Optional[Sequence[str]] = None) -> list:
        """Finished cell runs of record format 1 (not yet migrated)."""
        runs = self._search(f"tags.`{LEGACY_STATUS}` = '{COMPLETE}'", experiment_ids)
        return [r for r in runs if TAG_FORMAT not in r.data.tags and TAG_MIGRATED_TO not in r.data.tags]


def score_run_name(training: TrainingRecord, tags: Mapping[str, str], readout: str = "") -> str:
    """The MLflow run name of a score: the training cell's row (its method when untagged), seed and fraction,
    then readout label, protocol key and target, e.g. ``lsskd seed1 protonet 5w1s15q tiny_imagenet`` (``lsskd
    seed1 25% ...`` for a quarter of the data), so that CE's and LSSKD's scores differ in a flat list. A name, not
    an identity: scores are found by ``fsl.score_id`` and ``fsl.measure``."""
    ident = training.identity
    who = training.tags.get(TAG_ROW) or str(ident.get("method", ""))
    seed = f"seed{ident['seed']}" if "seed" in ident else ""
    fraction = float(ident.get("fraction", 1.0))
    share = f"{100 * fraction:g}%" if fraction < 1.0 else ""
    parts = (who, seed, share, tags.get(TAG_LABEL) or readout, tags.get(TAG_PROTOCOL, ""), tags.get(TAG_TARGET, ""))
    return " ".join(p for p in parts if p)


def _local_artifact_path(uri: str) -> Optional[Path]:
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" not in uri:
        return Path(uri)
    return None


def open_store(create: bool = True) -> Store:
    """The store at :func:`store_uri`. ``create=False`` (reading commands) raises :class:`StoreNotFound`
    instead of creating a missing local SQLite store, and opens an existing one without taking the write lock
    (:func:`store_lock`), so a store on a read-only share or directory can be read."""
    quiet_mlflow()
    uri = store_uri()
    db = sqlite_path(uri)
    if db is not None and not create and not db.is_file():
        raise StoreNotFound(f"no MLflow store at {describe_store()}: run the command in the directory where "
                            f"`fsl-bench run` ran, or point at the store with MLFLOW_TRACKING_URI "
                            f"(e.g. MLFLOW_TRACKING_URI=sqlite:////path/to/mlflow.db or http://host:5000)")
    import mlflow
    from mlflow.tracking import MlflowClient

    if db is not None and create:
        with store_lock():  # table creation of a fresh SQLite store, serialised
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
    elif db is not None:  # an existing store, read: no lock (it may be on a read-only share)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    else:
        client = MlflowClient(tracking_uri=uri)
    mlflow.set_tracking_uri(uri)
    return Store(client)


def check_no_legacy(store: Store) -> None:
    """Refuse a store holding record-format-1 cells (before the train-once-score-many design) until they are
    migrated: :class:`UserError` naming ``fsl-bench store migrate``."""
    legacy = store.legacy_runs()
    if legacy:
        raise UserError(f"the MLflow store {describe_store()} holds {len(legacy)} finished cell(s) in record format 1 "
                        f"(written by fsl-bench before train-once-score-many); convert them with "
                        f"`fsl-bench store migrate` (nothing is retrained; cells whose training did not change are "
                        f"reused), then run the command again")
