"""Training cells as jobs: ``fsl-bench run --launcher local|slurm`` (submitit).

One job per missing training cell, submitted through `submitit <https://github.com/facebookincubator/submitit>`_:

* ``slurm``: every cell is submitted at once, as job arrays (one array per dependency level, at most
  ``launcher.slurm.array_parallelism`` running at a time); a student's array starts after its teachers' jobs
  end (``--dependency=afterany``; a student whose teacher failed fails with a message naming the teacher, the
  rest of the grid goes on). Resources come from ``launcher.slurm`` in the benchmark file, overridden by
  ``--slurm KEY=VALUE``.
* ``local``: the same jobs as processes on this machine (submitit's ``LocalExecutor``), at most
  ``launcher.local.parallel`` at once, a student once its teacher's job ended.

A job trains one cell exactly as ``fsl-bench run`` does inline (:func:`fsl_lsskd.bench.runner.train_cell`:
the per-cell claim, the store check, resume from ``OUT/cells/<train id>/run/last.pt``), so the store rules are
the same: every cell once. On preemption or time limit submitit sends the job a signal; the job is requeued
(:meth:`TrainJob.checkpoint`) and resumes from its last finished epoch. Scoring runs in the submitting process
once the jobs are done (it is minutes; training is hours). Each job's log is
``OUT/jobs/<benchmark>/<job id>_0_log.{out,err}``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

from ..errors import ConfigError
from .config import Benchmark, LocalSpec, SlurmSpec
from .grid import Cell, with_teachers
from .runner import CellOutcome, Plan

log = logging.getLogger(__name__)

KINDS = ("local", "slurm")


@dataclass
class TrainJob:
    """The callable a job runs: train ``cell`` of ``bench`` into the store at ``tracking_uri``. Picklable;
    submitit calls :meth:`checkpoint` on preemption or timeout and requeues what it returns."""

    bench: Benchmark
    cell: Cell
    out_root: str
    tracking_uri: str
    cwd: str
    parent_run_id: Optional[str] = None
    rerun: bool = False
    attempt: int = 0

    def __call__(self) -> CellOutcome:
        from ..progress import configure
        from ..record import open_store
        from .runner import DataCache, train_cell

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
        configure()  # the job's log (stderr): a line per epoch and every 30 s within one, with the ETA
        os.chdir(self.cwd)
        os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri
        log.info("job for cell %s (attempt %d)", self.cell.label, self.attempt + 1)
        plan = Plan(self.bench, with_teachers([self.cell]), DataCache(self.bench))
        store = open_store()
        # a requeued --rerun job keeps the run directory it started (its last epoch) instead of starting over
        return train_cell(self.bench, self.cell, plan, Path(self.out_root), store, self.parent_run_id,
                          rerun=self.rerun, restart=self.attempt == 0)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Requeue: the same cell, which resumes from the last epoch its run directory holds."""
        import submitit

        log.warning("cell %s interrupted (preemption or time limit): requeued; it resumes from its last epoch",
                    self.cell.label)
        return submitit.helpers.DelayedSubmission(dataclasses.replace(self, attempt=self.attempt + 1))


def make_launcher(kind: str, bench: Benchmark, slurm_options: Sequence[str] = ()) -> "SubmititLauncher":
    """The launcher of ``--launcher KIND`` (``local`` or ``slurm``); ``slurm_options`` are ``KEY=VALUE``
    overrides of ``launcher.slurm``. Raises :class:`ConfigError` for an unknown kind or option and
    :class:`ConfigError` when submitit is missing."""
    if kind not in KINDS:
        raise ConfigError(f"unknown launcher {kind!r}; valid launchers: inline, {', '.join(KINDS)}")
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ConfigError("--launcher local/slurm needs submitit: pip install 'submitit>=1.5' (it is in the "
                          "project's dependencies: re-run the set-up)") from None
    slurm = apply_options(bench.launcher.slurm, slurm_options)
    if kind == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise ConfigError("--launcher slurm needs SLURM's sbatch and srun on PATH: run it on the cluster's login "
                          "node (--launcher local runs the same jobs on this machine)")
    return SubmititLauncher(kind, slurm, bench.launcher.local)


def apply_options(spec: SlurmSpec, options: Sequence[str]) -> SlurmSpec:
    """``launcher.slurm`` with ``KEY=VALUE`` overrides (numbers parsed); unknown keys raise
    :class:`ConfigError` naming the valid ones."""
    valid = {f.name: f for f in dataclasses.fields(SlurmSpec)}
    changes: Dict[str, Any] = {}
    additional = dict(spec.additional)
    for opt in options:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            raise ConfigError(f"--slurm {opt!r}: expected KEY=VALUE, e.g. --slurm partition=gpu")
        if key not in valid or key == "additional":
            additional[key] = value  # any sbatch option submitit passes through (e.g. account, qos, constraint)
            continue
        if valid[key].type in ("int", int):
            try:
                changes[key] = int(value)
            except ValueError:
                raise ConfigError(f"--slurm {key}={value}: expected an integer") from None
        else:
            changes[key] = value
    return dataclasses.replace(spec, additional=additional, **changes)


class SubmititLauncher:
    """Trains cells as submitit jobs (module docstring); :meth:`train` yields one outcome per cell."""

    def __init__(self, kind: str, slurm: SlurmSpec, local: LocalSpec) -> None:
        self.kind, self.slurm, self.local = kind, slurm, local

    def folder(self, bench: Benchmark, out_root: Path) -> Path:
        return Path(out_root).resolve() / "jobs" / bench.name

    def executor(self, folder: Path):
        import submitit

        if self.kind == "local":
            ex = submitit.LocalExecutor(folder=str(folder))
            ex.update_parameters(timeout_min=self.local.timeout_min, signal_delay_s=self.local.signal_delay_s)
            return ex
        ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        s = self.slurm
        params: Dict[str, Any] = dict(timeout_min=s.timeout_min, gpus_per_node=s.gpus_per_node,
                                      cpus_per_task=s.cpus_per_task, mem_gb=s.mem_gb, tasks_per_node=1, nodes=1,
                                      slurm_array_parallelism=s.array_parallelism)
        if s.partition:
            params["slurm_partition"] = s.partition
        if s.additional:
            params["slurm_additional_parameters"] = dict(s.additional)
        ex.update_parameters(**params)
        return ex

    def train(self, bench: Benchmark, cells: List[Cell], plan: Plan, out_root: Path, *, rerun: bool = False,
              parent_run_id: Optional[str] = None) -> Iterator[CellOutcome]:
        from ..record import store_uri

        folder = self.folder(bench, out_root)
        folder.mkdir(parents=True, exist_ok=True)

        def job_of(cell: Cell) -> TrainJob:
            return TrainJob(bench, cell, str(Path(out_root).resolve()), store_uri(), str(Path.cwd()),
                            parent_run_id, rerun)

        levels = dependency_levels(cells)
        log.info("%s launcher: %d cell(s) in %d level(s); job logs in %s", self.kind, len(cells), len(levels), folder)
        if self.kind == "slurm":
            yield from self._slurm(levels, job_of, folder)
        else:
            yield from self._local(levels, job_of, folder)

    # -- SLURM: everything submitted at once, arrays chained by dependencies
    def _slurm(self, levels: List[List[Cell]], job_of, folder: Path) -> Iterator[CellOutcome]:
        pending = self.submit_slurm(levels, job_of, folder)
        try:
            yield from self._wait(pending)
        except KeyboardInterrupt:
            ids = " ".join(sorted({j.job_id.split("_")[0] for _, j in pending.values()}))
            log.warning("stopped waiting; the SLURM jobs keep running (cancel them with: scancel %s). Run the same "
                        "command again to score what they train.", ids)
            raise

    def submit_slurm(self, levels: List[List[Cell]], job_of, folder: Path) -> Dict[tuple, Any]:
        """Submit every level as one job array, each after the jobs of its students' teachers
        (``afterany``); returns ``{cell key: (cell, job)}``."""
        ex = self.executor(folder)
        jobs: Dict[tuple, Any] = {}
        for level in levels:
            deps = sorted({jobs[c.teacher.key].job_id for c in level if c.teacher is not None
                           and c.teacher.key in jobs})
            extra = dict(self.slurm.additional)
            if deps:
                extra["dependency"] = "afterany:" + ":".join(deps)
            ex.update_parameters(slurm_additional_parameters=extra)
            with ex.batch():
                submitted = [(c, ex.submit(job_of(c))) for c in level]
            for c, job in submitted:
                jobs[c.key] = job
                log.info("submitted %s as SLURM job %s", c.label, job.job_id)
        return {c.key: (c, jobs[c.key]) for level in levels for c in level}

    # -- local: at most `parallel` processes; a student once its teacher's job ended
    def _local(self, levels: List[List[Cell]], job_of, folder: Path) -> Iterator[CellOutcome]:
        ex = self.executor(folder)
        queue = [c for level in levels for c in level]
        in_grid = {c.key for c in queue}
        ended: set = set()
        running: Dict[tuple, Any] = {}
        try:
            while queue or running:
                ready = [c for c in queue if c.teacher is None or c.teacher.key not in in_grid
                         or c.teacher.key in ended]
                while ready and len(running) < max(1, self.local.parallel):
                    cell = ready.pop(0)
                    queue.remove(cell)
                    running[cell.key] = (cell, ex.submit(job_of(cell)))
                    log.info("started %s as local job %s", cell.label, running[cell.key][1].job_id)
                for key, (cell, job) in list(running.items()):
                    if job.done():
                        del running[key]
                        ended.add(key)
                        yield self._outcome(cell, job)
                time.sleep(0.5)
        except BaseException:
            for cell, job in running.values():  # local jobs are this machine's processes: stop them with us
                job.cancel(check=False)
                log.warning("cancelled local job %s (%s); it resumes from its last epoch next time", job.job_id,
                            cell.label)
            raise

    def _wait(self, pending: Mapping[tuple, Any]) -> Iterator[CellOutcome]:
        left = dict(pending)
        while left:
            for key, (cell, job) in list(left.items()):
                if job.done():
                    del left[key]
                    yield self._outcome(cell, job)
            if left:
                time.sleep(10.0)

    @staticmethod
    def _outcome(cell: Cell, job) -> CellOutcome:
        try:
            out = job.result()
        except Exception as exc:  # noqa: BLE001 - a failed job is reported; the grid goes on
            logs = f"{job.paths.stderr}"
            first = str(exc).strip().splitlines()
            return CellOutcome(cell, "failed", error=f"job {job.job_id} failed ({first[-1] if first else exc}); "
                                                     f"log: {logs}")
        if not isinstance(out, CellOutcome):
            return CellOutcome(cell, "failed", error=f"job {job.job_id} returned {type(out).__name__}")
        out.cell = cell
        return out


def dependency_levels(cells: Sequence[Cell]) -> List[List[Cell]]:
    """``cells`` in levels: level 0 has no teacher among ``cells``, level k+1 is taught by level k (cells keep
    their order within a level)."""
    keys = {c.key for c in cells}
    depth: Dict[tuple, int] = {}

    def level(c: Cell) -> int:
        if c.key not in depth:
            depth[c.key] = 0 if c.teacher is None or c.teacher.key not in keys else level(c.teacher) + 1
        return depth[c.key]

    out: List[List[Cell]] = []
    for c in cells:
        k = level(c)
        while len(out) <= k:
            out.append([])
        out[k].append(c)
    return out
