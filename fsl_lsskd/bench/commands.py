"""``fsl-bench run`` and ``fsl-bench table``."""
from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import click

from ..bounds import COUNT
from ..options import data_option, renamed_option

log = logging.getLogger(__name__)


def _cells(n: int) -> str:
    return f"{n} cell" + ("" if n == 1 else "s")


def _split_list(value: Optional[str]):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def load_filtered(benchmark: Path, methods=None, backbones=None, datasets=None, seeds=None, data_paths=(),
                  fractions=None):
    """A benchmark file with the CLI's filters and ``--data NAME=PATH`` applied."""
    from ..errors import ConfigError
    from .config import load_benchmark

    bench = load_benchmark(benchmark)
    lists = {}
    for option, value in (("methods", methods), ("backbones", backbones), ("datasets", datasets), ("seeds", seeds),
                          ("fractions", fractions)):
        lists[option] = _split_list(value)
        if value is not None and not lists[option]:
            raise ConfigError(f"--{option} {value!r} selects nothing; leave the option out to keep all of them")
    try:
        seed_list = [int(s) for s in lists["seeds"]] if lists["seeds"] else None
    except ValueError:
        raise ConfigError(f"--seeds {seeds!r}: expected integers, e.g. 0,1") from None
    try:
        fraction_list = [float(f) for f in lists["fractions"]] if lists["fractions"] else None
    except ValueError:
        raise ConfigError(f"--fractions {fractions!r}: expected shares of the base images, e.g. 0.25,0.5") from None
    filtered = bench.with_filters(methods=lists["methods"], backbones=lists["backbones"], datasets=lists["datasets"],
                                  seeds=seed_list, fractions=fraction_list)
    if not any(filtered.seeds_of(row) for row in filtered.methods):  # no registry lookups: validation names those
        why = [f"{row} has seeds {', '.join(map(str, bench.method_seeds[row]))} only" for row in filtered.methods
               if row in bench.method_seeds]
        raise ConfigError(f"the selection has no cells: {'; '.join(why)} (`method_seeds` in {bench.where}); choose "
                          f"seeds these rows have" if why else f"the selection has no cells of {bench.where}")
    bench = filtered
    if data_paths:
        from ..options import parse_data_items

        names = set(bench.datasets) | set(bench.eval.datasets)
        paths = {**bench.data_paths, **parse_data_items(data_paths, names, f"a dataset of {benchmark}")}
        bench = dataclasses.replace(bench, data_paths=paths)
    return bench


def fewer_episodes(results) -> List[Tuple[str, int]]:
    """``[(readout label, N)]`` of the readouts scored on fewer episodes than others of the same protocol (the first
    N of the same published episodes: image-level readouts with ``max_episodes``), for the table caption."""
    counts: Dict[tuple, int] = {}
    for row in results.cells.values():
        for col, series in row.items():
            n = int(series.stacked().shape[1])
            counts[col] = min(counts.get(col, n), n)
    full: Dict[tuple, int] = {}
    for col, n in counts.items():
        full[col[:3]] = max(full.get(col[:3], 0), n)
    return sorted({(col[3], n) for col, n in counts.items() if n < full[col[:3]]})


@click.command("run")
@click.argument("benchmark", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--methods", help="Comma-separated subset of the file's methods (or variants).")
@click.option("--backbones", help="Comma-separated subset of the file's backbones.")
@click.option("--datasets", help="Comma-separated subset of the file's datasets.")
@click.option("--seeds", help="Comma-separated subset of the file's seeds.")
@click.option("--fractions", help="Comma-separated subset of the file's fractions (limited-data protocol), e.g. 0.25.")
@data_option("Where dataset NAME is on this machine (repeatable): NAME=FILE for its official archive, NAME=DIR "
             "for a directory holding it; not part of any id.")
@renamed_option("--runs-dir", "out_root", "--out", type=click.Path(file_okay=False, path_type=Path),
                default=Path("runs"), show_default=True, help="Run directories of cells being trained: "
                "RUNS_DIR/cells/<train id>/ (deleted when a cell finishes: its files go to the MLflow store).")
@click.option("--rerun", is_flag=True, help="Train and score every cell again, even if finished in the store.")
@click.option("--dry-run", is_flag=True, help="Check the benchmark and its data, print the grid (which cells are "
              "trained, which scores are missing) and stop.")
@click.option("--shard", "shard_spec", help="Run slice I/N of the grid (1-based), e.g. 2/4.")
@click.option("--launcher", type=click.Choice(["inline", "local", "slurm"]), default="inline", show_default=True,
              help="Train missing cells in this process (inline), as local jobs or as SLURM jobs (submitit); "
                   "scoring runs here once they finish.")
@click.option("--slurm", "slurm_options", multiple=True, metavar="KEY=VALUE",
              help="Override launcher.slurm of the benchmark file (repeatable): partition, gpus_per_node, "
                   "cpus_per_task, mem_gb, timeout_min, array_parallelism; other keys are passed to sbatch "
                   "(e.g. account=proj, qos=high).")
@click.option("--parallel", type=COUNT, default=None,
              help="With --launcher local: train N cells at once, each with CPUs/N threads (default: "
                   "launcher.local.parallel of the benchmark file, else 1). On a 2-core CPU, 2 one-thread Conv-4 "
                   "CE cells trained 1.14-1.32x the images per second of one two-thread cell (docs/performance.md).")
def run(benchmark: Path, methods, backbones, datasets, seeds, fractions, data_paths, out_root: Path, rerun: bool,
        dry_run: bool, shard_spec: Optional[str], launcher: str, slurm_options, parallel: Optional[int]) -> None:
    """Run a benchmark grid resumably: train only the cells that are not finished in the MLflow store, then
    score only the (cell, split, protocol, readout) pairs the store lacks.

    Store: MLFLOW_TRACKING_URI, default ./mlflow.db of the current directory. Adding a readout or a protocol
    to the benchmark file re-scores finished cells in seconds and trains nothing. A cell that crashes or
    diverges is reported and the grid goes on (exit code 1 at the end); bad data or config stops at once
    (exit code 2); Ctrl-C stops (exit code 130) and the same command resumes.

    \b
    Example:
      fsl-bench run benchmarks/smoke.yaml
      fsl-bench run benchmarks/cpu_tiny_imagenet.yaml --methods ce,lsskd --seeds 0 --shard 1/2
      fsl-bench run benchmarks/limited_data_tiny_imagenet.yaml --methods lsskd --fractions 0.25,0.5
      fsl-bench run benchmarks/cpu_cifar_fs.yaml --data cifar_fs=~/data/cifar-100-python.tar.gz
      fsl-bench run benchmarks/paper_tiny_imagenet.yaml --launcher slurm
      fsl-bench run benchmarks/cpu_tiny_imagenet.yaml --launcher local --parallel 2
    """
    import os

    from ..errors import ConfigError
    from .validate import validate_benchmark

    if slurm_options and launcher != "slurm":
        raise ConfigError("--slurm KEY=VALUE sets SLURM resources: use it with --launcher slurm")
    if parallel is not None and launcher != "local":
        raise ConfigError("--parallel N trains N cells at once as local jobs: use it with --launcher local "
                          "(on SLURM, launcher.slurm.array_parallelism sets how many run at once)")

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("fsl-bench run under torchrun would run the whole grid on every process; run it "
                          "without torchrun and use --shard I/N or --launcher to spread cells (torchrun is for "
                          "one `fsl-bench train` run on several processes)")
    bench = load_filtered(benchmark, methods, backbones, datasets, seeds, data_paths, fractions)
    click.echo(f"benchmark {bench.name}: {bench.description}")
    log.info("resolved config: %s", json.dumps(bench.to_dict(), sort_keys=True, default=str))
    launcher_obj = None
    if launcher != "inline" and not dry_run:  # its errors (no sbatch, resources beyond the nodes) come first
        from .launch import make_launcher

        launcher_obj = make_launcher(launcher, bench, slurm_options, notify=click.echo,  # job ids, waits
                                     parallel=parallel)
    # names, settings, --runs-dir and the data against the protocols, before anything is trained or logged
    notes = validate_benchmark(bench, data=True, out_root=None if dry_run else out_root, fetch=not dry_run)
    for n in notes:
        click.echo(f"note: {n}")
    if dry_run:
        _dry_run(bench, shard_spec)
        return
    _run(bench, out_root, rerun, shard_spec, launcher_obj, command=" ".join(shlex.quote(a) for a in sys.argv))


def _run(bench, out_root: Path, rerun: bool, shard_spec, launcher, command: str) -> None:
    from tqdm import tqdm

    from .runner import plan_cells, run_benchmark

    n_cells = len(plan_cells(bench, shard_spec))
    # the cells on a terminal; the engine adds the epochs and batches of the cell being trained (fsl_lsskd.progress)
    bar = tqdm(total=n_cells, desc="cells", unit="cell", position=0, disable=None)
    state: List = []
    trained: List = []

    def on_event(kind, cell, outcome):
        if kind in ("train", "score"):
            bar.set_postfix_str(f"{'training' if kind == 'train' else 'scoring'} {cell.label}")
        elif kind == "trained" and outcome.status in ("trained", "resumed"):
            trained.append(outcome)
        elif kind == "end":
            state.append(outcome)
            bar.update(1)
        if bar.disable:  # not a terminal (a log file, a job): one line per step instead of progress bars
            if kind in ("train", "score"):
                what = "training" if kind == "train" else "scoring"
            elif kind == "trained":
                what = f"{outcome.status} in {outcome.seconds:.0f} s"
            else:
                what = f"{outcome.status} ({outcome.seconds:.0f} s in all, {outcome.new_scores} new scores)"
            click.echo(f"[{time.strftime('%H:%M:%S')}] {cell.label}: {what}")

    try:
        outcomes = run_benchmark(bench, out_root, rerun=rerun, shard_spec=shard_spec, on_event=on_event,
                                 launcher=launcher)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (fsl_lsskd.errors.Terminated)
        from ..errors import Terminated

        bar.close()
        done = [o for o in state if o.status not in ("failed", "busy")]
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        click.echo(f"\n{how}: {_cells(len(trained))} trained and {len(done)} of {n_cells} scored in this run; the "
                   f"interrupted cell keeps its last epoch in {out_root}/cells/ and resumes from it.\nresume with: "
                   f"{command}", err=True)
        sys.exit(143 if isinstance(exc, Terminated) else 130)
    finally:
        bar.close()
    _summary(outcomes)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        click.echo(f"{len(failed)} cell(s) failed (tracebacks above); fix the cause and run the same command again: "
                   f"finished cells and scores are kept", err=True)
        sys.exit(1)


def _summary(outcomes) -> None:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("trained", "resumed", "rescored", "reused", "failed",
                                                                "busy")}
    scores = sum(o.new_scores for o in outcomes)
    click.echo(f"\n{'cell':<44} {'status':<9} {'time':>7}  results (accuracy %)")
    for o in outcomes:
        res = ", ".join(f"{k}={v:.2f}" for k, v in sorted(o.metrics.items()) if v is not None)
        click.echo(f"{o.cell.label:<44} {o.status:<9} {o.seconds:>6.0f}s  {res or o.error}")
    notes = sorted({n for o in outcomes for n in o.notes})
    for n in notes:
        click.echo(f"note: {n}")
    click.echo(f"summary: {counts['trained']} trained, {counts['resumed']} resumed, {counts['rescored']} re-scored, "
               f"{counts['reused']} reused, {counts['failed']} failed, {counts['busy']} busy; {scores} new scores")
    if counts["busy"]:
        click.echo(f"{counts['busy']} cell(s) were running in another process; run the same command again when it "
                   f"is done to confirm the grid is complete", err=True)


def _dry_run(bench, shard_spec) -> None:
    from ..errors import DataError, UserError
    from ..record import StoreNotFound, check_no_legacy, describe_store, open_store
    from .runner import DataCache, Plan, plan_cells, wanted_scores

    cells = plan_cells(bench, shard_spec)
    try:
        data = DataCache(bench, fetch=False)
        plan = Plan(bench, cells, data)
    except DataError:  # a dataset `fsl-bench run` downloads first: identities need its content
        click.echo(f"{_cells(len(cells))}; their training ids and scores are known once the data is downloaded (the "
                   f"note above): `fsl-bench run` fetches it and starts")
        for c in cells:
            click.echo(f"  {c.label}" + (" (teacher)" if c.role == "teacher" else ""))
        return
    try:
        data.check_leakage([c.dataset for c in cells])  # a WARNING when test images are training images
    except UserError as exc:  # an eval split that cannot be read: every cell below says so
        log.info("leakage not checked: %s", exc)
    try:
        store = open_store(create=False)
        check_no_legacy(store)
        done = store.trainings([plan.tid(c) for c in cells])
        have = store.scores([plan.tid(c) for c in cells])
    except StoreNotFound:
        click.echo(f"store: none yet at {describe_store()} (created by the first run)")
        done, have = {}, {}
    to_train = to_score = 0
    for c in cells:
        tid = plan.tid(c)
        notes = ["teacher"] if c.role == "teacher" else []
        if c.teacher is not None:
            notes.append(f"taught by {plan.tid(c.teacher)}")
        try:
            wanted, _ = wanted_scores(bench, c, plan)
        except UserError as exc:
            wanted, _ = [], None
            notes.append(f"cannot score: {exc}")
        missing = [w for w in wanted if w.score_id not in have]
        if tid in done:
            notes.append("trained" + (f", {len(missing)} of {len(wanted)} scores missing" if missing else ", scored"))
        else:
            to_train += 1
            notes.append(f"to train, then {len(wanted)} scores")
        to_score += len(missing)
        click.echo(f"  {tid}  {c.label}  ({', '.join(notes)})")
    click.echo(f"{_cells(len(cells))}: {len(cells) - to_train} trained, {to_train} to train; {to_score} scores to compute")


@click.command("table")
@click.argument("benchmark", type=click.Path(dir_okay=False, path_type=Path))
@renamed_option("--results-dir", "out_dir", "--out", type=click.Path(file_okay=False, path_type=Path),
                default=Path("results"), show_default=True,
                help="Directory for <benchmark>.md/.csv/.tex and the figures (PNG and PDF).")
@click.option("--baseline", "baselines", multiple=True, default=("ce",), show_default=True,
              help="Method every other method is compared with on identical episodes (paired table); repeat the "
                   "option for several.")
@click.option("--from-results", "from_results", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Rebuild the tables from a published results directory (results/weights/<benchmark>/) instead "
                   "of the MLflow store.")
@data_option("Where a scored target's data is (NAME=FILE or NAME=DIR), for the test-class interval of episodes "
             "generated from that data (a partial archive, your own folder); published episode files need no data.")
def table(benchmark: Path, out_dir: Path, baselines, from_results: Optional[Path], data_paths=()) -> None:
    """Publish result tables (Markdown, CSV, LaTeX) and figures for a benchmark from the MLflow store (read only:
    a missing store is an error naming where it looked, never created).

    \b
    Example:
      fsl-bench table benchmarks/smoke.yaml
      fsl-bench table benchmarks/cpu_tiny_imagenet.yaml --results-dir results --baseline ce --baseline pskd
      fsl-bench table benchmarks/cpu_tiny_imagenet.yaml --from-results results/weights/cpu_tiny_imagenet
    """
    from ..errors import ConfigError
    from ..record import git_commit
    from ..utils import check_writable_dir
    from ..report.collect import collect
    from .config import load_benchmark
    from ..report.files import write_tables

    bench = load_benchmark(benchmark) if not data_paths else load_filtered(benchmark, data_paths=data_paths)
    from ..progress import announce
    from ..registry import check_names

    check_names(methods=[b for b in baselines if b not in bench.variants])  # a typo: the valid names, exit 2
    check_writable_dir(out_dir, "--results-dir")
    data = None
    if data_paths:
        from .runner import DataCache

        data = DataCache(bench, fetch=False)
    if from_results is not None:
        from ..report.publish import collect_published

        source = f"published files in {from_results.as_posix()}"
        announce(f"table {bench.name}: reading the results ({source})")
        results = collect_published(bench, from_results, data=data)
    else:
        source = "the MLflow store"
        announce(f"table {bench.name}: reading the results ({source})")
        results = collect(bench, data=data)
    present = sorted({r[0] for r in results.cells})
    missing = [b for b in baselines if b not in present]
    if missing:
        raise ConfigError(f"--baseline {', '.join(missing)}: not a method of the results of {bench.name} (methods "
                          f"present: {', '.join(present)})")
    ev, tr = bench.eval, bench.train
    fewer = fewer_episodes(results)
    seeds = sorted({s for row in results.cells.values() for c in row.values() for s in c.per_seed})
    caption = (f"{bench.name}: {bench.description} Accuracy (%) on the {ev.split} split, {ev.n_episodes} episodes "
               f"({ev.n_query} queries per class; episodes: {', '.join(sorted(results.meta.get('episodes_source', [])))}); "
               f"training seeds {seeds}; {tr.epochs} epoch{'s' if tr.epochs != 1 else ''}, image size {bench.image_size}. "
               + (f"Scored on the first N of the same episodes: {', '.join(f'{r} {n}' for r, n in fewer)}. "
                  if fewer else "")
               + f"Cells found: {results.meta.get('cells_found')}/{results.meta.get('cells_expected')}.")
    options = "".join(f" --baseline {b}" for b in baselines) if tuple(baselines) != ("ce",) else ""
    header = (f"<!-- generated by `fsl-bench table {Path(benchmark).as_posix()}{options}` from {source} at commit "
              f"{git_commit()} -->\n")
    announce(f"table {bench.name}: statistics, tables and figures of {len(results.cells)} rows")
    paths = write_tables(results, bench.published, caption, out_dir / bench.name, header=header, baselines=baselines)
    click.echo((out_dir / f"{bench.name}.md").read_text())
    for p in paths:
        click.echo(f"wrote {p}")


@click.command("publish")
@click.argument("benchmark", type=click.Path(dir_okay=False, path_type=Path))
@renamed_option("--published-dir", "out_dir", "--out", type=click.Path(file_okay=False, path_type=Path),
                default=None, help="Directory of the published files [default: results/weights/<benchmark name>].")
def publish_cmd(benchmark: Path, out_dir: Optional[Path]) -> None:
    """Publish every finished cell of a benchmark as files: its exported backbone (safetensors + meta) and
    per-episode scores, with a MANIFEST.json (sha256, training identity, commits). `fsl-bench table
    --from-results DIR` rebuilds the tables from them; `fsl-bench evaluate --checkpoint FILE` scores a file again.

    \b
    Example:
      fsl-bench publish benchmarks/cpu_tiny_imagenet.yaml
      fsl-bench table benchmarks/cpu_tiny_imagenet.yaml --from-results results/weights/cpu_tiny_imagenet
    """
    from ..utils import check_writable_dir
    from .config import load_benchmark
    from ..report.publish import publish

    bench = load_benchmark(benchmark)
    out_dir = out_dir or Path("results") / "weights" / bench.name
    check_writable_dir(out_dir, "--published-dir")
    path = publish(bench, out_dir)
    manifest = json.loads(path.read_text(encoding="utf-8"))
    total = sum(f["bytes"] for e in manifest["cells"] for f in e["files"].values())
    click.echo(f"published {_cells(len(manifest['cells']))} of {bench.name} into {out_dir} ({total / 1e6:.1f} MB); "
               f"manifest {path}")
