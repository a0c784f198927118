"""``fsl-bench run``: train only the missing training cells of a benchmark, then score only the missing
(trained cell, scored split, protocol, readout) pairs, against the MLflow store (:mod:`fsl_lsskd.record`).

1. **Identities.** Every cell's training identity is computed from its :class:`TrainConfig`
   (:func:`fsl_lsskd.bench.grid.training_config`) and the content fingerprint of its training split; teachers
   come before their students (a student's identity holds its teacher's id).
2. **Training.** A cell whose id has no finished run in the store is trained (resumed from its run directory
   ``OUT/cells/<train id>/last.pt`` when a killed run left one). A process claims the cell (a lock on its run
   directory) first, so overlapping invocations on one machine never train a cell twice. The finished model
   and export go to the store; the run directory is deleted (nothing is stored twice).
3. **Scoring.** Every finished cell is scored with every (target split, protocol, readout) of the benchmark
   whose scoring id has no finished score run: adding a readout, a protocol or a target to a benchmark scores
   the existing checkpoints in seconds and trains nothing.

A cell that crashes (or diverges) is reported and the grid goes on; bad input or an unwritable output stops it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..errors import UserError
from ..protocol import EpisodeProtocol, can_host
from ..utils import make_dir, output_error
from .config import Benchmark
from .grid import Cell, data_kwargs, expand, experiment_name, shard, training_config, with_teachers
from .measures import BASE, MAIN, Measure, cell_key, measure_key_of, measures

log = logging.getLogger(__name__)

CELLS_DIR = "cells"


@dataclass
class CellOutcome:
    """What happened to one cell in this invocation. ``status``: ``trained`` (from scratch), ``resumed`` (from
    a killed run's state), ``rescored`` (trained earlier; new scores now), ``reused`` (nothing to do),
    ``failed``, ``busy`` (another process holds it)."""

    cell: Cell
    status: str
    train_id: str = ""
    run_id: Optional[str] = None
    new_scores: int = 0
    metrics: Dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""
    notes: List[str] = field(default_factory=list)


@dataclass
class WantedScore:
    """A score the benchmark asks of a cell (its :class:`~fsl_lsskd.bench.measures.Measure`) with its scoring
    identity and id once the episodes are known."""

    measure: Measure
    identity: Dict[str, Any] = field(default_factory=dict)
    score_id: str = ""

    @property
    def target(self) -> str:
        return self.measure.target

    @property
    def protocol(self) -> Optional[EpisodeProtocol]:
        """The episodes, or None for the held-out base images."""
        return self.measure.protocol

    @property
    def readout(self):
        return self.measure.readout


class DataCache:
    """Datasets and decoded splits of one invocation, loaded once (memory-mapped from the uint8 cache)."""

    def __init__(self, bench: Benchmark, fetch: bool = True) -> None:
        """``fetch=False``: never download (a dataset with ``download: true`` that is missing raises
        :class:`~fsl_lsskd.errors.DataError`)."""
        self.bench, self.fetch = bench, fetch
        self._ds: Dict[str, Any] = {}
        self._splits: Dict[Tuple[str, str], Any] = {}

    def kwargs(self, name: str) -> Dict[str, Any]:
        return data_kwargs(name, self.bench)

    def dataset(self, name: str):
        if name not in self._ds:
            from ..data import get_dataset

            kw = self.kwargs(name)
            if not self.fetch:
                kw["download"] = False
            ds = get_dataset(name, **kw)
            if kw.get("download") and hasattr(ds, "prepare"):
                ds.prepare()  # fetch (checksummed) and decode into the cache
            self._ds[name] = ds
        return self._ds[name]

    def split(self, name: str, split: str):
        if (name, split) not in self._splits:
            self._splits[(name, split)] = self.dataset(name).load_split(split, mmap=True)
        return self._splits[(name, split)]

    def fingerprint(self, name: str) -> str:
        return self.split(name, "train").fingerprint

    def check_leakage(self, datasets: Sequence[str]) -> Dict[str, int]:
        """For each training dataset of ``datasets`` that the benchmark also scores: how many images of its scored
        split (``eval.split``) occur among its train images (identical decoded pixels), each count above 0 logged
        as a WARNING (:func:`~fsl_lsskd.data.duplicates.check_leakage`). Both splits are decoded for the grid
        anyway; the check reads the pixel hashes their cache entries store."""
        from ..data.duplicates import check_leakage

        out = {}
        for name in sorted(set(datasets)):
            if name in self.bench.eval_datasets(name):
                n = check_leakage(self.dataset(name), self.bench.eval.split)
                if n is not None:
                    out[name] = n
        return out


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


class Plan:
    """The cells of one invocation with their training identities (teachers first)."""

    def __init__(self, bench: Benchmark, cells: List[Cell], data: DataCache) -> None:
        from ..train.config import train_id, training_identity

        self.bench, self.cells, self.data = bench, cells, data
        self.identity: Dict[tuple, Dict[str, Any]] = {}
        self.train_id: Dict[tuple, str] = {}
        for cell in cells:  # teachers come first (with_teachers), so their ids are known
            teacher_tid = self.train_id[cell.teacher.key] if cell.teacher is not None else None
            cfg = training_config(bench, cell, Path("."), data=data.kwargs(cell.dataset))
            identity = training_identity(cfg, data.fingerprint(cell.dataset), teacher_tid)
            self.identity[cell.key] = identity
            self.train_id[cell.key] = train_id(identity)

    def tid(self, cell: Cell) -> str:
        return self.train_id[cell.key]


def plan_cells(bench: Benchmark, shard_spec: Optional[str] = None) -> List[Cell]:
    """The cells one invocation handles (its shard), teachers included and first."""
    cells = expand(bench)
    if shard_spec:
        cells = shard(cells, shard_spec)
    return with_teachers(cells)


def run_benchmark(bench: Benchmark, out_root: Path, *, rerun: bool = False, shard_spec: Optional[str] = None,
                  on_event: Callable[[str, Cell, Optional[CellOutcome]], None] = lambda *a: None,
                  on_epoch: Optional[Callable[[int, int, Dict[str, float]], None]] = None,
                  launcher=None) -> List[CellOutcome]:
    """Train the missing cells of ``bench`` (this shard), then score what is missing; one outcome per cell.

    ``on_event(kind, cell, outcome)`` reports ``train``/``score`` starts and ``end`` (the CLI's progress bars),
    ``on_epoch`` each training epoch. ``rerun`` retrains and re-scores every cell. ``launcher`` (e.g.
    :class:`fsl_lsskd.bench.launch.SubmititLauncher`) trains the missing cells as jobs instead of in this
    process; scoring then runs here."""
    from ..record import TAG_BENCHMARK, TAG_FINGERPRINTS, TAG_SHARD, check_no_legacy, open_store

    store = open_store()
    check_no_legacy(store)
    data = DataCache(bench)
    cells = plan_cells(bench, shard_spec)
    plan = Plan(bench, cells, data)
    done = {} if rerun else store.trainings([plan.tid(c) for c in cells])
    outcomes: Dict[tuple, CellOutcome] = {}
    fingerprints = {d: data.fingerprint(d) for d in sorted({c.dataset for c in cells})}
    data.check_leakage(list(fingerprints))
    parent = store.start_invocation(experiment_name(bench), f"{bench.name} invocation",
                                    {TAG_BENCHMARK: bench.name, TAG_SHARD: shard_spec or "1/1",
                                     TAG_FINGERPRINTS: json.dumps(fingerprints, sort_keys=True)})
    status = "FINISHED"
    try:
        store.log_params(parent, {"benchmark": bench.to_dict()})
        missing = [c for c in cells if plan.tid(c) not in done]
        if launcher is not None and missing:
            for o in launcher.train(bench, missing, plan, out_root, rerun=rerun, parent_run_id=parent):
                outcomes[o.cell.key] = o
                on_event("end" if o.status in ("failed", "busy") else "trained", o.cell, o)
        else:
            busy: set = set()
            for cell in missing:
                on_event("train", cell, None)
                o = train_cell(bench, cell, plan, out_root, store, parent, rerun=rerun, busy=busy, on_epoch=on_epoch)
                outcomes[cell.key] = o
                if o.status == "busy":
                    busy.add(cell.key)
                on_event("end" if o.status in ("failed", "busy") else "trained", cell, o)
        finished = store.trainings([plan.tid(c) for c in cells])
        for cell in cells:
            o = outcomes.get(cell.key) or CellOutcome(cell, "reused", plan.tid(cell))
            outcomes[cell.key] = o
            if o.status in ("failed", "busy") or plan.tid(cell) not in finished:
                continue
            on_event("score", cell, o)
            t0 = time.perf_counter()
            try:
                n, notes = score_cell(bench, cell, plan, finished[plan.tid(cell)], store, data, rerun=rerun)
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - a crashed readout must not cost the rest of the grid
                err = unwritable(exc)
                if err is not None:  # but a full or read-only store or output stops it
                    raise err from exc
                log.exception("scoring %s failed", cell.label)
                o.status, o.error = "failed", f"scoring: {type(exc).__name__}: {exc}"
                n, notes = 0, []
            o.new_scores += n
            o.notes += notes
            o.seconds += time.perf_counter() - t0
            if o.status == "reused" and n:
                o.status = "rescored"
            o.run_id = finished[plan.tid(cell)].run_id
            o.metrics = main_metrics(store, bench, cell, plan.tid(cell))
            on_event("end", cell, o)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        result = list(outcomes.values())
        with contextlib.suppress(Exception):
            store.log_metrics(parent, {s: sum(o.status == s for o in result) for s in
                                       ("trained", "resumed", "rescored", "reused", "failed", "busy")})
        store.end_run(parent, status)
    return [outcomes[c.key] for c in cells if c.key in outcomes]


def unwritable(exc: BaseException) -> Optional[UserError]:
    """The one-line :class:`~fsl_lsskd.errors.OutputError` of an error that means the MLflow store
    (:func:`fsl_lsskd.record.store_error`) or an output (:func:`fsl_lsskd.utils.output_error`) cannot be
    written, which stops the grid (every later cell would fail the same way); None for a crash of the cell."""
    from ..record import store_error

    return store_error(exc) or (output_error(exc) if isinstance(exc, OSError) else None)


def teacher_model_dir(store, teacher_tid: str, out_root: Path) -> Path:
    """The finished model directory of a teacher cell (the store's own copy, or downloaded next to the student)."""
    rec = store.training(teacher_tid)
    if rec is None:
        raise RuntimeError(f"teacher cell {teacher_tid} did not finish; its student cannot train")
    return store.fetch_dir(rec.run_id, "model", Path(out_root) / CELLS_DIR / teacher_tid / "fetched")


def train_cell(bench: Benchmark, cell: Cell, plan: Plan, out_root: Path, store, parent_run_id: Optional[str],
               rerun: bool = False, busy: Optional[set] = None,
               on_epoch: Optional[Callable[[int, int, Dict[str, float]], None]] = None,
               restart: bool = True) -> CellOutcome:
    """Train one cell (claimed, re-checked against the store, resumed when its run directory has a state).
    ``rerun`` trains it again even when the store has it finished; with ``restart`` (default) a rerun starts
    from scratch, without it (a requeued job) it resumes the run directory it left."""
    from ..record import TAG_BENCHMARK, TAG_CELL_KEY, TAG_ROLE, TAG_ROW
    from ..train.engine import train

    tid = plan.tid(cell)
    cell_dir = Path(out_root) / CELLS_DIR / tid
    t0 = time.perf_counter()
    try:
        with cell_claim(cell_dir) as claimed:
            if not claimed:
                return CellOutcome(cell, "busy", tid, error="running in another process on this machine")
            if cell.teacher is not None and busy and cell.teacher.key in busy:
                return CellOutcome(cell, "busy", tid, error="its teacher is running in another process")
            if not rerun and store.training(tid) is not None:  # finished meanwhile by another process
                return CellOutcome(cell, "reused", tid)
            teacher_dir = None
            if cell.teacher is not None:
                teacher_dir = teacher_model_dir(store, plan.tid(cell.teacher), out_root)
            cfg = training_config(bench, cell, cell_dir / "run", teacher_dir, data=plan.data.kwargs(cell.dataset))
            restarted = rerun and restart
            if restarted and (cell_dir / "run").exists():
                shutil.rmtree(cell_dir / "run")
            # a killed run of this cell (SIGKILL, scancel, a lost node) is left RUNNING: continue in it when it
            # died before logging an epoch and no resume state names another run, and end the others as KILLED
            # (the resume state's run, if any, is reopened by the engine); we hold the cell, so none is alive
            unfinished = store.unfinished_training(tid)
            reuse = (unfinished.run_id if unfinished is not None and not restarted
                     and not store.has_metrics(unfinished.run_id) else None)
            store.close_unfinished(tid, keep=reuse)
            tags = {TAG_BENCHMARK: bench.name, TAG_ROW: cell.row, TAG_ROLE: cell.role,
                    TAG_CELL_KEY: cell_key(plan.identity[cell.key])}
            res = train(cfg, store=store, parent_run_id=parent_run_id, tags=tags, on_epoch=on_epoch,
                        train_data=plan.data.split(cell.dataset, "train"),
                        val_data=plan.data.split(cell.dataset, "val") if cfg.validation is not None else None,
                        mean=plan.data.dataset(cell.dataset).mean, std=plan.data.dataset(cell.dataset).std,
                        resume_run_id=reuse)
            if res.train_id != tid:  # the plan and the engine computed the identity by the same function
                raise RuntimeError(f"{cell.label}: trained {res.train_id}, planned {tid}")
            resumed = res.resumed_from_epoch > 0  # a reused run that had no epoch trained from scratch
        shutil.rmtree(cell_dir, ignore_errors=True)  # the finished files are in the store
        return CellOutcome(cell, "resumed" if resumed else "trained", tid, res.run_id,
                           seconds=time.perf_counter() - t0)
    except UserError:
        raise  # bad data/config: every later cell would fail the same way
    except Exception as exc:  # noqa: BLE001 - a diverged or crashed cell must not cost the rest of the grid
        err = unwritable(exc)
        if err is not None:  # but an output or store that cannot be written (full disk, read-only) stops it
            raise err from exc
        log.exception("cell %s failed", cell.label)
        return CellOutcome(cell, "failed", tid, error=f"{type(exc).__name__}: {exc}",
                           seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- scoring
def wanted_scores(bench: Benchmark, cell: Cell, plan: Plan) -> Tuple[List[WantedScore], List[str]]:
    """Every score the benchmark asks of ``cell`` (:func:`~fsl_lsskd.bench.measures.measures`, each key once) that
    its target's split can host, with scoring identities (episodes resolved); and notes on the main protocols a
    target cannot host (skipped; curve protocols it cannot host are skipped silently)."""
    from ..eval.base_classes import base_identity
    from ..eval.episodes import class_offsets, load_episodes
    from ..eval.scoring import score_id, scoring_identity

    tid = plan.tid(cell)
    out: List[WantedScore] = []
    notes: Dict[str, None] = {}
    seen = set()
    targets: Dict[Tuple[str, str], Tuple[Any, Any, Dict[str, Any]]] = {}
    episodes: Dict[Tuple[str, str, EpisodeProtocol], Any] = {}
    for m in measures(bench, cell):
        if m.key in seen:
            continue
        seen.add(m.key)
        if m.kind == BASE:
            ident = base_identity(tid)
            out.append(WantedScore(m, ident, score_id(ident)))
            continue
        if (m.target, m.split) not in targets:
            split = plan.data.split(m.target, m.split)
            _, counts = class_offsets(split.labels, split.num_classes)
            targets[(m.target, m.split)] = (split, counts, {"dataset": m.target, "split": m.split,
                                                            "fingerprint": split.fingerprint,
                                                            "image_size": bench.image_size})
        split, counts, tinfo = targets[(m.target, m.split)]
        if not can_host(counts, m.protocol):
            if m.kind == MAIN:
                notes.setdefault(f"{m.target}: cannot host {m.protocol.key} (fewest images per class: "
                                 f"{min(counts)}); skipped")
            continue
        ekey = (m.target, m.split, m.protocol)
        if ekey not in episodes:
            episodes[ekey] = load_episodes(m.target, m.split, counts, m.protocol, split.class_names)
        ident = scoring_identity(tid, tinfo, m.protocol, episodes[ekey].sha256, m.readout)
        out.append(WantedScore(m, ident, score_id(ident)))
    return out, list(notes)


def score_cell(bench: Benchmark, cell: Cell, plan: Plan, training, store, data: DataCache,
               rerun: bool = False) -> Tuple[int, List[str]]:
    """Score ``cell`` with everything the benchmark asks that the store does not hold; returns (scores written,
    notes)."""
    from ..checkpoint import load_backbone, load_method
    from ..eval.scoring import evaluate

    wanted, notes = wanted_scores(bench, cell, plan)
    have = {} if rerun else store.scores([training.train_id])
    todo = [w for w in wanted if w.score_id not in have]
    if not todo:
        return 0, notes
    written = 0
    with tempfile.TemporaryDirectory(prefix="fsl-score-") as tmp:
        export_dir = store.fetch_dir(training.run_id, "export", Path(tmp) / "export")
        model_cache: Dict[str, Any] = {}

        def method():
            if "m" not in model_cache:
                model_dir = store.fetch_dir(training.run_id, "model", Path(tmp) / "model")
                model_cache["m"] = load_method(model_dir, bench.train.device)
            return model_cache["m"]

        backbone, meta = load_backbone(export_dir, device=bench.train.device)
        ds_train = data.dataset(cell.dataset)
        groups: Dict[str, List[WantedScore]] = {}
        for w in todo:
            groups.setdefault(w.target, []).append(w)
        for target, items in groups.items():
            base_items = [w for w in items if w.protocol is None]
            ep_items = [w for w in items if w.protocol is not None]
            if ep_items:
                split = data.split(target, bench.eval.split)
                target_ds = data.dataset(target)
                # a cross-domain target is normalised like the training data (the backbone's input statistics)
                by_protocol: Dict[EpisodeProtocol, List[WantedScore]] = {}
                for w in ep_items:
                    by_protocol.setdefault(w.protocol, []).append(w)
                for protocol, ws in by_protocol.items():
                    results = evaluate(backbone, split, protocols=[protocol], readouts=[w.readout for w in ws],
                                       mean=ds_train.mean, std=ds_train.std, image_size=bench.image_size,
                                       device=bench.train.device, method=method)
                    for w, res in zip(ws, results):
                        write_score(store, training, w, res, target_ds)
                        written += 1
            for w in base_items:
                from ..eval.base_classes import score_heldout

                res = score_heldout(method(), data.split(cell.dataset, "train"), training.identity, ds_train.mean,
                                    ds_train.std, bench.train.device)
                write_score(store, training, w, res, ds_train)
                written += 1
    return written, notes


def write_score(store, training, wanted: WantedScore, res, dataset=None) -> None:
    """Record a :class:`ScoreResult` for ``wanted`` (metrics in %, arrays, summary)."""
    metrics = {"accuracy": res.mean, "accuracy_ci95": res.ci95, "n_episodes": float(res.n_episodes)}
    arrays: Dict[str, Any] = {"accuracy": res.accuracy}
    if res.nll is not None:
        from ..eval.base import mean_ci

        metrics.update(ece=res.ece, nll=float(res.nll.mean()), nll_ci95=mean_ci(res.nll)[1],
                       brier=float(res.brier.mean()), brier_ci95=mean_ci(res.brier)[1])
        arrays.update(nll=res.nll, brier=res.brier, reliability=res.reliability)
    from ..record import TAG_EPISODES_SOURCE, TAG_LABEL, TAG_MEASURE, TAG_PROTOCOL, TAG_READOUT, TAG_TARGET

    tags = {TAG_READOUT: res.readout, TAG_LABEL: res.label, TAG_TARGET: wanted.target,
            TAG_PROTOCOL: res.protocol.key if wanted.protocol is not None else "base",
            TAG_EPISODES_SOURCE: res.episodes_source, TAG_MEASURE: wanted.measure.key}
    store.write_score(training, wanted.score_id, wanted.identity, arrays, metrics, res.summary(), tags)


def main_metrics(store, bench: Benchmark, cell: Cell, tid: str) -> Dict[str, float]:
    """The cell's accuracy (%) per :data:`~fsl_lsskd.bench.measures.MAIN` and
    :data:`~fsl_lsskd.bench.measures.BASE` measure it has a score of (the newest), named by
    :attr:`~fsl_lsskd.bench.measures.Measure.label`, for the run summary; curve points are left to the figures."""
    newest: Dict[str, Any] = {}
    for rec in store.scores([tid]).values():
        key = measure_key_of(rec)
        if key is not None and (key not in newest or rec.start_time > newest[key].start_time):
            newest[key] = rec
    out = {}
    for m in measures(bench, cell):
        rec = newest.get(m.key)
        if m.kind in (MAIN, BASE) and rec is not None:
            out[m.label] = rec.metrics.get("accuracy", float("nan"))
    return out
