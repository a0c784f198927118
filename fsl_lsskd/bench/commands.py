"""``fsl-bench run`` and ``fsl-bench table``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import click


def _split_list(value: Optional[str]):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@click.command("run")
@click.argument("benchmark", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--methods", help="Comma-separated subset of the file's methods.")
@click.option("--backbones", help="Comma-separated subset of the file's backbones.")
@click.option("--datasets", help="Comma-separated subset of the file's datasets.")
@click.option("--seeds", help="Comma-separated subset of the file's seeds.")
@click.option("--data", "data_paths", multiple=True, metavar="NAME=PATH",
              help="Where dataset NAME's archive or folder is on this machine (repeatable); not part of cell ids.")
@click.option("--out", "out_root", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"),
              show_default=True, help="Checkpoints and exports go to OUT/<benchmark>/<cell id>/.")
@click.option("--rerun", is_flag=True, help="Run cells again even if complete in the MLflow store.")
@click.option("--dry-run", is_flag=True, help="Print the grid (and which cells are done) and stop.")
@click.option("--shard", "shard_spec", help="Run slice I/N of the grid (1-based), e.g. 2/4.")
def run(benchmark: Path, methods, backbones, datasets, seeds, data_paths, out_root: Path, rerun: bool,
        dry_run: bool, shard_spec: Optional[str]) -> None:
    """Run a benchmark grid (methods x backbones x datasets x seeds), resumably.

    Cells already complete in the MLflow store (MLFLOW_TRACKING_URI, default ./mlflow.db) are skipped,
    so a killed run resumes where it stopped. A cell that crashes or diverges is reported and the grid
    goes on (exit code 1 at the end); bad data or config stops at once (exit code 2).

    \b
    Example:
      fsl-bench run benchmarks/smoke.yaml
      fsl-bench run benchmarks/cpu_tiny_imagenet.yaml --methods ce,lsskd --seeds 0 --shard 1/2
      fsl-bench run benchmarks/cpu_cifar_fs.yaml --data cifar_fs=~/data/cifar-100-python.tar.gz
    """
    from ..errors import ConfigError
    from .config import load_benchmark
    from .grid import expand, shard, with_teachers

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("fsl-bench run under torchrun would run the whole grid on every process; run it "
                          "without torchrun and use --shard I/N to spread cells over processes (torchrun is for "
                          "one `fsl-bench train` run on several processes)")
    bench = load_benchmark(benchmark)
    try:
        seed_list = [int(s) for s in _split_list(seeds)] if seeds else None
    except ValueError:
        raise ConfigError(f"--seeds {seeds!r}: expected integers, e.g. 0,1") from None
    bench = bench.with_filters(methods=_split_list(methods), backbones=_split_list(backbones),
                               datasets=_split_list(datasets), seeds=seed_list)
    if data_paths:
        import dataclasses

        paths = dict(bench.data_paths)
        for item in data_paths:
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ConfigError(f"--data {item!r}: expected NAME=PATH, e.g. --data cifar_fs=cifar-100-python.tar.gz")
            if name.strip() not in bench.datasets:
                raise ConfigError(f"--data {item!r}: {name.strip()!r} is not a dataset of {benchmark} "
                                  f"({', '.join(bench.datasets)})")
            paths[name.strip()] = path.strip()
        bench = dataclasses.replace(bench, data_paths=paths)
    click.echo(f"benchmark {bench.name}: {bench.description}")
    click.echo("resolved config: " + _one_line(bench.to_dict()))
    from .validate import validate_benchmark

    # names, settings, --out and the data against the protocols, before anything is trained or logged
    validate_benchmark(bench, data=not dry_run, out_root=None if dry_run else out_root)
    cells = expand(bench)
    if shard_spec:
        cells = shard(cells, shard_spec)
    cells = with_teachers(cells)
    if dry_run:
        done = _done_ids(bench)
        for c in cells:
            notes = ["teacher"] if c.role == "teacher" else []
            if c.teacher is not None:
                notes.append(f"taught by {c.teacher.id}")
            if c.id in done:
                notes.append("complete")
            click.echo(f"  {c.id}  {c.label}" + (f"  ({', '.join(notes)})" if notes else ""))
        click.echo(f"{len(cells)} cells, {sum(c.id in done for c in cells)} complete")
        return
    from tqdm import tqdm

    from ..utils import EpochBar
    from .runner import run_benchmark

    bar = tqdm(total=len(cells), desc="cells", unit="cell", position=0)
    epochs = EpochBar(position=1, leave=False)

    def on_event(kind, cell, outcome):
        epochs.close()
        if kind == "start":
            bar.set_postfix_str(cell.label)
        else:
            bar.update(1)

    try:
        outcomes = run_benchmark(bench, out_root, rerun=rerun, shard_spec=shard_spec, on_event=on_event,
                                 on_epoch=epochs)
    finally:
        epochs.close()
        bar.close()
    click.echo(f"\n{'cell':<40} {'status':<8} {'time':>7}  results")
    for o in outcomes:
        res = ", ".join(f"{k.split('.', 2)[-1].replace('.acc', '')}={v:.2f}" for k, v in sorted(o.metrics.items())
                        if k.endswith(".acc"))
        click.echo(f"{o.cell.label:<40} {o.status:<8} {o.seconds:>6.0f}s  {res or o.error}")
    busy = [o for o in outcomes if o.status == "busy"]
    if busy:
        click.echo(f"{len(busy)} cell(s) were running in another process; run the same command again when it is "
                   f"done to confirm the grid is complete", err=True)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        click.echo(f"{len(failed)} cell(s) failed (tracebacks above); fix the cause and run the same command "
                   f"again: finished cells are skipped", err=True)
        raise SystemExit(1)


def _done_ids(bench):
    from .. import tracking
    from .runner import experiment_name, finished_cells

    tracking.quiet_mlflow()
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment_name(bench))
    return finished_cells(client, exp.experiment_id) if exp else {}


def _one_line(d) -> str:
    import json

    return json.dumps(d, sort_keys=True, default=str)


@click.command("table")
@click.argument("benchmark", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True, help="Directory for <benchmark>.md/.csv/.tex and the PNG plots.")
@click.option("--baseline", "baselines", multiple=True, default=("ce",), show_default=True,
              help="Method every other method is compared with on identical episodes (paired table); repeat the "
                   "option for several.")
def table(benchmark: Path, out_dir: Path, baselines) -> None:
    """Publish result tables (Markdown, CSV, LaTeX) and plots for a benchmark from the MLflow store.

    \b
    Example:
      fsl-bench table benchmarks/smoke.yaml
      fsl-bench table benchmarks/cpu_tiny_imagenet.yaml --out results --baseline ce --baseline pskd
    """
    from .. import tracking
    from ..utils import check_writable_dir
    from .collect import collect
    from .config import load_benchmark
    from .tables import write_tables
    from .validate import check_names

    bench = load_benchmark(benchmark)
    check_names(methods=baselines)  # an unknown name fails with the valid ones (exit 2)
    check_writable_dir(out_dir, "--out")
    results = collect(bench)
    ev, tr = bench.eval, bench.train
    seeds = sorted({s for row in results.cells.values() for c in row.values() for s in c.per_seed})
    caption = (f"{bench.name}: {bench.description} 5-way accuracy (%) on the {ev.split} split, mean ± 95% CI "
               f"(t) over {ev.episodes} episodes ({ev.n_query} queries/class; episodes: {', '.join(sorted(results.meta['episodes_source']))}) of the per-episode "
               f"accuracy averaged over seeds {seeds}; {tr.epochs} epochs, image size {bench.image_size}. "
               + (f"Image-level evaluators ({', '.join(sorted({c for v in ev.extra_classifiers.values() for c in v}))}) "
                  f"score the first {ev.image_episodes} of the same episodes. " if ev.image_episodes else "")
               + f"Cells found: {results.meta['cells_found']}/{results.meta['cells_expected']}.")
    options = "".join(f" --baseline {b}" for b in baselines) if tuple(baselines) != ("ce",) else ""
    header = (f"<!-- generated by `fsl-bench table {benchmark}{options}` at commit {tracking.git_commit()}; "
              f"MLflow store {os.environ.get('MLFLOW_TRACKING_URI', 'sqlite:///mlflow.db (cwd)')} -->\n")
    paths = write_tables(results, bench.published, caption, out_dir / bench.name, header=header,
                         baselines=baselines)
    click.echo((out_dir / f"{bench.name}.md").read_text())
    for p in paths:
        click.echo(f"wrote {p}")
