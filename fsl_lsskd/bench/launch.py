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

On SLURM, before anything is submitted, the resources are compared with the partition's nodes (``sinfo``):
unset ``cpus_per_task``/``mem_gb`` are lowered to the largest node, a value set beyond every node is a
:class:`ConfigError` (:func:`fit_to_partition`). A submission sbatch refuses (wrong partition or account, a
cluster it cannot reach) is a :class:`ConfigError` quoting sbatch. While waiting, the submitting process reads
``squeue`` (not ``sacct``, which clusters without accounting lack): a job pending for a reason that cannot
resolve without changing the job (:data:`STUCK_REASONS`, e.g. ``PartitionTimeLimit``) cancels the submitted
jobs and ends the run with a :class:`ConfigError` naming the reason; one that an administrator may lift
(:data:`WAIT_REASONS`) is reported once; a job that leaves the queue without a result (cancelled, killed) is a
failed cell.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import subprocess
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from ..errors import ConfigError
from ..utils import usable_cores
from .config import Benchmark, LocalSpec, SlurmSpec
from .grid import Cell, with_teachers
from .runner import CellOutcome, Plan

log = logging.getLogger(__name__)

KINDS = ("local", "slurm")

#: SLURM pending reasons that do not resolve while the job stays as it is: the run cancels its jobs and stops
#: with the reason. Any association or QOS limit "per job" (e.g. ``QOSMaxWallDurationPerJobLimit``) is one too.
STUCK_REASONS: Dict[str, str] = {
    "PartitionConfig": "the job breaks a limit of the partition (more CPUs, memory or GPUs than its nodes have, "
                       "or its MaxTime, MaxNodes, ...): lower cpus_per_task, mem_gb, gpus_per_node or "
                       "timeout_min, or choose another partition",
    "PartitionNodeLimit": "the job asks for more nodes than the partition allows: choose another partition",
    "PartitionTimeLimit": "the job's time limit is above the partition's MaxTime: lower timeout_min (--slurm "
                          "timeout_min=N; a job at its time limit is requeued and resumes from its last epoch), "
                          "or choose another partition",
    "BadConstraints": "no node has the requested constraint or features: change or drop the constraint",
    "InvalidAccount": "the account is not valid for you: set --slurm account=NAME (sacctmgr show assoc user=$USER)",
    "InvalidQOS": "the QOS is not valid for you or your account: set --slurm qos=NAME",
    "DependencyNeverSatisfied": "a teacher's job can no longer satisfy the dependency",
}
#: pending reasons an administrator (or time) may lift: reported once, the run keeps waiting
WAIT_REASONS: Dict[str, str] = {
    "ReqNodeNotAvail": "the nodes it needs are down, drained or reserved (sinfo -R says why)",
    "NodeDown": "a node it needs is down (sinfo -R says why)",
    "PartitionDown": "the partition is down (scontrol show partition)",
    "PartitionInactive": "the partition is inactive (scontrol show partition)",
    "JobHeldAdmin": "an administrator holds it",
    "JobHeldUser": "it is held (scontrol release JOBID)",
}
#: SLURM job states after which the job never runs again (anything else squeue shows may still run)
ENDED_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                          "DEADLINE", "PREEMPTED", "REVOKED"})
#: seconds a job that ended normally (or left the queue) may take to show its result file (shared file systems)
RESULT_GRACE_S = 15.0
#: seconds after the end state of a job stopped from outside (no result to wait for) before it counts as failed;
#: a job SLURM requeues (node failure, preemption, submitit's requeue at a time limit) is back in the queue by then
KILLED_GRACE_S: Dict[str, float] = {"CANCELLED": 0.0, "OUT_OF_MEMORY": 0.0, "DEADLINE": 0.0, "REVOKED": 0.0,
                                    "TIMEOUT": 5.0, "NODE_FAIL": 5.0, "BOOT_FAIL": 5.0}
#: seconds between queue reads, at most (the first reads come sooner)
POLL_S = 10.0
#: seconds a pending reason of :data:`STUCK_REASONS` must hold before the run gives up on the job
STUCK_CONFIRM_S = 5.0


def route_submitit_logging() -> None:
    """One copy of each submitit message: submitit gives its ``submitit`` logger two handlers (stdout, and
    stderr for warnings) and the logger also propagates to the root logger, so a warning came out three times.
    Its handlers are removed and its level follows the root logger's (the CLI's ``-v``)."""
    logger = logging.getLogger("submitit")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


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
    threads: Optional[int] = None  # torch threads of the job (local jobs run in parallel); None: torch's default

    def __call__(self) -> CellOutcome:
        from ..progress import configure
        from ..record import open_store
        from ..utils import retain_freed_memory
        from .runner import DataCache, train_cell

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
        route_submitit_logging()  # from here on each line once, in the job's .err log
        configure()  # the job's log (stderr): a line per epoch and every 30 s within one, with the ETA
        retain_freed_memory()  # as `fsl-bench run` does in its own process
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        os.chdir(self.cwd)
        os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri
        log.info("job for cell %s (attempt %d, torch threads: %d)", self.cell.label, self.attempt + 1,
                 torch.get_num_threads())
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


def make_launcher(kind: str, bench: Benchmark, slurm_options: Sequence[str] = (),
                  notify: Optional[Callable[[str], None]] = None,
                  parallel: Optional[int] = None) -> "SubmititLauncher":
    """The launcher of ``--launcher KIND`` (``local`` or ``slurm``); ``slurm_options`` are ``KEY=VALUE``
    overrides of ``launcher.slurm``; ``parallel`` overrides ``launcher.local.parallel``; ``notify(message)``
    receives what a user follows (job ids; default: the log at info level). For SLURM the resources are fitted
    to the partition's nodes (:func:`fit_to_partition`).
    Raises :class:`ConfigError` for an unknown kind or option, resources beyond every node of the partition,
    when submitit is missing, and when SLURM's ``sbatch``/``srun`` are not on PATH."""
    if kind not in KINDS:
        raise ConfigError(f"unknown launcher {kind!r}; valid launchers: inline, {', '.join(KINDS)}")
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ConfigError("--launcher local/slurm needs submitit: pip install 'submitit>=1.5' (it is in the "
                          "project's dependencies: re-run the set-up)") from None
    route_submitit_logging()
    slurm = apply_options(bench.launcher.slurm, slurm_options)
    nodes: Optional[List[NodeResources]] = None
    if kind == "slurm":
        if not (shutil.which("sbatch") and shutil.which("srun")):
            raise ConfigError("--launcher slurm needs SLURM's sbatch and srun on PATH: run it on the cluster's "
                              "login node (--launcher local runs the same jobs on this machine)")
        nodes = partition_nodes()
        slurm = fit_to_partition(slurm, nodes)
    local = bench.launcher.local if parallel is None else dataclasses.replace(bench.launcher.local, parallel=parallel)
    cores = usable_cores()
    if kind == "local" and local.parallel > cores:
        log.warning("%d local jobs at once on %d CPU(s): each gets 1 torch thread and they share the cores",
                    local.parallel, cores)
    return SubmititLauncher(kind, slurm, local, notify=notify, nodes=nodes)


def apply_options(spec: SlurmSpec, options: Sequence[str]) -> SlurmSpec:
    """``launcher.slurm`` with ``KEY=VALUE`` overrides (numbers parsed); unknown keys raise
    :class:`ConfigError` naming the valid ones."""
    hints = typing.get_type_hints(SlurmSpec)
    valid = {f.name for f in dataclasses.fields(SlurmSpec)}
    changes: Dict[str, Any] = {}
    additional = dict(spec.additional)
    for opt in options:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            raise ConfigError(f"--slurm {opt!r}: expected KEY=VALUE, e.g. --slurm partition=gpu")
        if key not in valid or key == "additional":
            additional[key] = value  # any sbatch option submitit passes through (e.g. account, qos, constraint)
            continue
        if int in (hints[key], *typing.get_args(hints[key])):
            try:
                changes[key] = int(value)
            except ValueError:
                raise ConfigError(f"--slurm {key}={value}: expected an integer") from None
        else:
            changes[key] = value
    return dataclasses.replace(spec, additional=additional, **changes)


@dataclass(frozen=True)
class NodeResources:
    """One node of one partition as ``sinfo`` reports it."""

    partition: str
    default: bool  #: the cluster's default partition (sinfo marks it with ``*``)
    cpus: int
    mem_mb: int
    gpus: int
    time_limit: str = ""  #: the partition's MaxTime as sinfo prints it (``1:00:00``, ``infinite``)


def _gpu_count(gres: str) -> int:
    """GPUs in a node's generic resources as sinfo's ``%G`` prints them, e.g. ``gpu:a100:4(S:0-1),mps:100``."""
    n = 0
    for item in gres.split(","):
        parts = item.split("(")[0].strip().split(":")
        if parts[0] == "gpu":
            n += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return n


def partition_nodes() -> Optional[List[NodeResources]]:
    """Every node of every partition this user sees (``sinfo -N``); None when sinfo is missing or cannot
    answer (the resources are then not checked before submitting: sbatch and the queue still are)."""
    if shutil.which("sinfo") is None:
        return None
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%P|%c|%m|%G|%l"], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("could not read the partitions' nodes (sinfo: %s); the job resources are not checked before "
                    "submitting", exc)
        return None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["exit code %d" % proc.returncode])[-1]
        log.warning("could not read the partitions' nodes (%s); the job resources are not checked before "
                    "submitting", last)
        return None
    nodes = []
    for line in proc.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5:
            continue
        part, cpus, mem, gres, limit = fields
        try:
            nodes.append(NodeResources(part.rstrip("*"), part.endswith("*"), int(cpus.rstrip("+")),
                                       int(mem.rstrip("+")), _gpu_count(gres), limit.strip()))
        except ValueError:
            continue
    return nodes


def fit_to_partition(spec: SlurmSpec, nodes: Optional[Sequence[NodeResources]]) -> SlurmSpec:
    """``spec`` with ``cpus_per_task`` and ``mem_gb`` resolved against the nodes of its partition (the default
    partition when ``spec.partition`` is unset): an unset value is :attr:`SlurmSpec.DEFAULT_CPUS` /
    :attr:`SlurmSpec.DEFAULT_MEM_GB`, lowered to the largest node with a warning; a value that is set and
    exceeds every node raises :class:`ConfigError` naming the largest node, and so does ``gpus_per_node``.
    Without ``nodes`` (sinfo unavailable), or for a partition sinfo does not list (sbatch judges it), only the
    defaults are filled in. ``mem_gb`` stays unset (the cluster's default memory) when the nodes declare
    less than 1 GB (SLURM's default RealMemory is 1 MB)."""
    where = f"partition {spec.partition}"
    mine = [n for n in nodes or () if (n.partition == spec.partition if spec.partition else n.default)]
    if not mine:
        return dataclasses.replace(spec, cpus_per_task=spec.cpus_per_task or SlurmSpec.DEFAULT_CPUS,
                                   mem_gb=spec.mem_gb or SlurmSpec.DEFAULT_MEM_GB)
    if not spec.partition:
        where = f"the default partition {mine[0].partition}"
    other = "or choose another partition (sinfo -s lists them)"
    with_gpus = [n for n in mine if n.gpus >= spec.gpus_per_node]
    if not with_gpus:
        most = max(n.gpus for n in mine)
        raise ConfigError(f"launcher.slurm gpus_per_node={spec.gpus_per_node}: no node of {where} has that many "
                          f"GPUs (most: {most}); lower it (--slurm gpus_per_node={most}) {other}")
    most_cpus = max(n.cpus for n in with_gpus)
    cpus = spec.cpus_per_task
    if cpus is None:
        cpus = min(SlurmSpec.DEFAULT_CPUS, most_cpus)
        if cpus < SlurmSpec.DEFAULT_CPUS:
            log.warning("the default cpus_per_task=%d is more than any node of %s has: using cpus_per_task=%d "
                        "(set launcher.slurm.cpus_per_task or --slurm cpus_per_task=N to choose)",
                        SlurmSpec.DEFAULT_CPUS, where, cpus)
    elif cpus > most_cpus:
        raise ConfigError(f"launcher.slurm cpus_per_task={cpus}: no node of {where} has that many CPUs (most: "
                          f"{most_cpus}); lower it (--slurm cpus_per_task={most_cpus}) {other}")
    most_mem_gb = max(n.mem_mb for n in with_gpus if n.cpus >= cpus) // 1024
    mem = spec.mem_gb
    if mem is None:
        mem = min(SlurmSpec.DEFAULT_MEM_GB, most_mem_gb) or None
        if mem != SlurmSpec.DEFAULT_MEM_GB:
            log.warning("the default mem_gb=%d is more than any node of %s has: %s (set launcher.slurm.mem_gb or "
                        "--slurm mem_gb=N to choose)", SlurmSpec.DEFAULT_MEM_GB, where,
                        f"using mem_gb={mem}" if mem else "asking for the cluster's default memory")
    elif mem > most_mem_gb:
        raise ConfigError(f"launcher.slurm mem_gb={mem}: no node of {where} with {cpus} CPUs has that much memory "
                          f"(most: {most_mem_gb} GB); lower it (--slurm mem_gb={most_mem_gb}) {other}")
    return dataclasses.replace(spec, cpus_per_task=cpus, mem_gb=mem)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _array_id(job_id: str) -> str:
    """``1234`` of an array task ``1234_5`` (a plain job's id is its own)."""
    return job_id.split("_")[0]


def queue_states(job_ids: Iterable[str]) -> Optional[Dict[str, Tuple[str, str]]]:
    """``{job id: (state, reason)}`` of the jobs (and array tasks, as ``ARRAY_TASK``) that ``squeue`` still
    holds, ended ones included while slurmctld keeps them (``MinJobAge``); a job missing from the answer has
    left the queue. None when squeue cannot answer."""
    ids = sorted({_array_id(j) for j in job_ids})
    if not ids:
        return {}
    try:
        proc = subprocess.run(["squeue", "-h", "-r", "--states=all", "-j", ",".join(ids), "-o", "%i|%T|%r"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("squeue did not answer (%s); trying again", exc)
        return None
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:  # none of them is known any more
            return {}
        log.warning("squeue failed (%s); trying again", (proc.stderr.strip().splitlines() or ["?"])[-1])
        return None
    out = {}
    for line in proc.stdout.splitlines():
        job, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if job:
            out[job] = (state.strip(), reason.strip())
    return out


def _reason_code(reason: str) -> str:
    """SLURM's code of a pending reason as squeue's ``%r`` prints it: ``ReqNodeNotAvail`` of
    ``ReqNodeNotAvail, UnavailableNodes:n1``; the sentence the scheduler writes for drained or down nodes is
    ``ReqNodeNotAvail`` too."""
    if reason.startswith("Nodes required for job are DOWN"):
        return "ReqNodeNotAvail"
    return reason.split(",")[0].strip()


def stuck_reason(reason: str) -> Optional[str]:
    """What a pending reason that cannot resolve means (None for one that can): :data:`STUCK_REASONS`, and any
    association or QOS limit per job."""
    code = _reason_code(reason)
    if code in STUCK_REASONS:
        return STUCK_REASONS[code]
    if "PerJob" in code:
        return ("a limit per job of your association or QOS is below what the job asks for (sacctmgr show qos; "
                "sacctmgr show assoc user=$USER): lower the resources or choose another QOS/account")
    return None


def waiting_reason(reason: str) -> Optional[str]:
    """What a pending reason that an administrator (or time) may lift means (:data:`WAIT_REASONS`), else None."""
    return WAIT_REASONS.get(_reason_code(reason))


def cancel_jobs(job_ids: Iterable[str]) -> List[str]:
    """``scancel`` the jobs (whole arrays); returns the ids it was given (failures are logged)."""
    ids = sorted({_array_id(j) for j in job_ids})
    if ids and shutil.which("scancel"):
        try:
            proc = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)
            if proc.returncode != 0:
                log.warning("scancel %s failed: %s", " ".join(ids), proc.stderr.strip())
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("scancel %s failed: %s", " ".join(ids), exc)
    return ids


class SubmititLauncher:
    """Trains cells as submitit jobs (module docstring); :meth:`train` yields one outcome per cell.
    ``notify(message)`` receives the job ids and what the jobs wait for (default: the log at info level)."""

    def __init__(self, kind: str, slurm: SlurmSpec, local: LocalSpec,
                 notify: Optional[Callable[[str], None]] = None,
                 nodes: Optional[Sequence[NodeResources]] = None) -> None:
        self.kind, self.slurm, self.local = kind, slurm, local
        self.notify = notify or log.info
        self.nodes = list(nodes) if nodes is not None else None

    def folder(self, bench: Benchmark, out_root: Path) -> Path:
        return Path(out_root).resolve() / "jobs" / bench.name

    def job_threads(self) -> Optional[int]:
        """Threads of each local job when several run at once: this machine's CPUs shared evenly
        (:func:`~fsl_lsskd.utils.process_threads`), so N jobs do not oversubscribe the cores; None (torch's
        default) for one job at a time and on SLURM, where ``cpus_per_task`` bounds the job."""
        if self.kind != "local" or self.local.parallel <= 1:
            return None
        from ..utils import process_threads

        return process_threads(self.local.parallel)

    def partition(self) -> Optional[str]:
        """The partition the jobs go to: ``launcher.slurm.partition``, else the cluster's default (None when
        sinfo could not say)."""
        if self.slurm.partition:
            return self.slurm.partition
        return next((n.partition for n in self.nodes or () if n.default), None)

    def resources(self) -> str:
        """The SLURM request of one job, in words."""
        s = self.slurm
        part = self.partition()
        parts = [f"partition {part}" if part else "default partition",
                 _count(s.cpus_per_task or SlurmSpec.DEFAULT_CPUS, "CPU"),
                 f"{s.mem_gb} GB" if s.mem_gb else "default memory"]
        if s.gpus_per_node:
            parts.append(_count(s.gpus_per_node, "GPU"))
        parts.append(f"{s.timeout_min} min")
        parts += [f"{k}={v}" for k, v in sorted(s.additional.items())]
        return ", ".join(parts)

    def executor(self, folder: Path):
        import submitit

        if self.kind == "local":
            ex = submitit.LocalExecutor(folder=str(folder))
            ex.update_parameters(timeout_min=self.local.timeout_min, signal_delay_s=self.local.signal_delay_s)
            return ex
        ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        s = self.slurm
        params: Dict[str, Any] = dict(timeout_min=s.timeout_min, gpus_per_node=s.gpus_per_node,
                                      cpus_per_task=s.cpus_per_task or SlurmSpec.DEFAULT_CPUS, tasks_per_node=1,
                                      nodes=1, slurm_array_parallelism=s.array_parallelism)
        if s.mem_gb:
            params["mem_gb"] = s.mem_gb
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

        threads = self.job_threads()

        def job_of(cell: Cell) -> TrainJob:
            return TrainJob(bench, cell, str(Path(out_root).resolve()), store_uri(), str(Path.cwd()),
                            parent_run_id, rerun, threads=threads)

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
            ids = " ".join(sorted({_array_id(j.job_id) for _, j in pending.values()}))
            log.warning("stopped waiting; the SLURM jobs keep running (cancel them with: scancel %s). Run the same "
                        "command again to score what they train.", ids)
            raise

    def submit_slurm(self, levels: List[List[Cell]], job_of, folder: Path) -> Dict[tuple, Any]:
        """Submit every level as one job array, each after the jobs of its students' teachers
        (``afterany``); returns ``{cell key: (cell, job)}``. A submission sbatch refuses cancels the levels
        already submitted and raises :class:`ConfigError` quoting sbatch."""
        from submitit.core.utils import FailedJobError

        ex = self.executor(folder)
        jobs: Dict[tuple, Any] = {}
        for level in levels:
            deps = sorted({jobs[c.teacher.key].job_id for c in level if c.teacher is not None
                           and c.teacher.key in jobs})
            extra = dict(self.slurm.additional)
            if deps:
                extra["dependency"] = "afterany:" + ":".join(deps)
            ex.update_parameters(slurm_additional_parameters=extra)
            try:
                # submitit prints sbatch's stderr before raising; the error below quotes it once
                with contextlib.redirect_stderr(io.StringIO()), ex.batch():
                    submitted = [(c, ex.submit(job_of(c))) for c in level]
            except FailedJobError as exc:
                cancelled = cancel_jobs(j.job_id for j in jobs.values())
                raise ConfigError(self._refusal(str(exc), cancelled)) from None
            for c, job in submitted:
                jobs[c.key] = job
                log.info("submitted %s as SLURM job %s", c.label, job.job_id)
            array = _array_id(submitted[0][1].job_id)
            after = f", after jobs {', '.join(sorted({_array_id(d) for d in deps}))}" if deps else ""
            self.notify(f"submitted {_count(len(level), 'cell')} as SLURM job {array} ({self.resources()}{after}); "
                        f"follow it with: squeue -j {array}; logs: {folder}")
        return {c.key: (c, jobs[c.key]) for level in levels for c in level}

    def _refusal(self, stderr: str, cancelled: Sequence[str]) -> str:
        """The error of a submission sbatch refused: sbatch's own words and the fix."""
        said = [line.split("error:", 1)[1].strip() if "error:" in line else line.strip()
                for line in stderr.splitlines() if line.strip()]
        text = "; ".join(said) or "no message"
        low = text.lower()
        if "partition" in low:
            parts = sorted({n.partition for n in self.nodes or ()})
            hint = ("Choose one with --slurm partition=NAME or launcher.slurm.partition"
                    + (f" (partitions here: {', '.join(parts)})" if parts else " (sinfo -s lists them)"))
        elif "account" in low:
            hint = "Set --slurm account=NAME to one of yours (sacctmgr show assoc user=$USER format=account)"
        elif "configuration" in low or "controller" in low or "connect" in low:
            hint = ("sbatch cannot reach a SLURM cluster from here: run on the cluster's login node (SLURM_CONF names "
                    "its slurm.conf), or use --launcher local")
        else:
            hint = "Check launcher.slurm in the benchmark file and the --slurm KEY=VALUE options"
        done = f"; cancelled the jobs already submitted ({' '.join(cancelled)})" if cancelled else ""
        return f"sbatch refused the job submission: {text}. {hint}{done}"

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
                    job = job_of(cell)
                    running[cell.key] = (cell, ex.submit(job))
                    log.info("started %s as local job %s%s", cell.label, running[cell.key][1].job_id,
                             f" (torch threads: {job.threads})" if job.threads else "")
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
        """Yield each job's outcome as it ends: its result file is looked for every second, the queue read
        (:func:`queue_states`) after 1, 2, 4, 8 s, then every :data:`POLL_S`. Raises :class:`ConfigError` (after
        cancelling the jobs left) when one stays pending for a reason that cannot resolve."""
        left = dict(pending)
        told: set = set()
        ended_at: Dict[tuple, float] = {}
        stuck_since: Dict[tuple, float] = {}
        use_queue = shutil.which("squeue") is not None
        next_read, delay = 0.0, 1.0
        while left:
            for key, (cell, job) in list(left.items()):
                if job.paths.result_pickle.exists():
                    del left[key]
                    yield self._outcome(cell, job)
            if not left:
                break
            if time.monotonic() >= next_read:
                states = queue_states(j.job_id for _, j in left.values()) if use_queue else None
                next_read, delay = time.monotonic() + delay, min(POLL_S, delay * 2)
                for key, (cell, job) in list(left.items()):
                    if states is None:  # no squeue answer: submitit's own view (sacct, where the cluster has it)
                        if job.done():
                            del left[key]
                            yield self._outcome(cell, job)
                        continue
                    state, reason = states.get(job.job_id, ("", ""))
                    if state and state not in ENDED_STATES:
                        ended_at.pop(key, None)  # (again) in the queue, e.g. requeued
                        if state == "PENDING":
                            self._pending(cell, job, reason, left, told, stuck_since)
                        continue
                    grace = KILLED_GRACE_S.get(state, RESULT_GRACE_S)
                    if time.monotonic() - ended_at.setdefault(key, time.monotonic()) < grace:
                        next_read = min(next_read, ended_at[key] + grace)
                        continue
                    if job.paths.result_pickle.exists():
                        continue  # it just arrived: the next round yields it
                    del left[key]
                    yield CellOutcome(cell, "failed", error=f"SLURM job {job.job_id} ended without a result "
                                      f"({state or 'it left the queue'}); log: {job.paths.stderr}. The same command "
                                      "trains it again, from its last finished epoch")
            if left:
                time.sleep(1.0)

    def _pending(self, cell: Cell, job, reason: str, left: Mapping[tuple, Any], told: set,
                 stuck_since: Dict[tuple, float]) -> None:
        """Act on a pending job's reason: stop on one that cannot resolve once it has held for
        :data:`STUCK_CONFIRM_S` (slurmctld first gives a general reason at submission, then the scheduler the
        precise one), tell once about one that may resolve."""
        meaning = stuck_reason(reason)
        if meaning is None:
            stuck_since.pop(cell.key, None)
        elif time.monotonic() - stuck_since.setdefault(cell.key, time.monotonic()) >= STUCK_CONFIRM_S:
            cancelled = cancel_jobs(j.job_id for _, j in left.values())
            part = self.partition() or "PARTITION"
            limit = next((n.time_limit for n in self.nodes or () if n.partition == part and n.time_limit), "")
            allows = f"; partition {part} allows at most {limit}" if limit else ""
            raise ConfigError(f"SLURM job {job.job_id} ({cell.label}) cannot start: it is pending with reason "
                              f"{reason}: {meaning}. Asked for: {self.resources()}{allows}. Cancelled the jobs "
                              f"left ({' '.join(cancelled)}); cells finished so far are kept. The partition's "
                              f"limits: scontrol show partition {part}; its nodes: sinfo -N -l -p {part}")
        waiting = waiting_reason(reason)
        if waiting is not None and (_array_id(job.job_id), _reason_code(reason)) not in told:
            told.add((_array_id(job.job_id), _reason_code(reason)))
            self.notify(f"SLURM job {_array_id(job.job_id)} is pending ({reason}): {waiting}; waiting "
                        f"(Ctrl-C stops waiting, scancel {_array_id(job.job_id)} cancels the jobs)")

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
