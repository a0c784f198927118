"""Read a benchmark's finished cells and scores from a store into a :class:`~fsl_lsskd.report.results.ResultSet`.

Reading needs no data, and it is a lookup: a grid cell's training is the finished training run with the cell's
data-free key (:func:`~fsl_lsskd.bench.measures.bench_cell_key`; the ``fsl.cell_key`` tag, or derived from the
run's identity); when the store holds the cell for several versions of the data, the version the benchmark's latest
invocation used wins, and a student's training is the one taught by its teacher's. Each of the cell's measures
(:func:`~fsl_lsskd.bench.measures.measures`) is then the newest score of that training with the measure's key.
The store is any :class:`~fsl_lsskd.record.ResultStore`: the MLflow store, or a published directory.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

from ..errors import ConfigError
from ..progress import track
from ..protocol import EpisodeProtocol
from ..record import TAG_EPISODES_SOURCE, ResultStore
from ..bench.config import Benchmark
from ..bench.grid import expand, experiment_name, with_teachers
from ..bench.measures import (BASE, CURVE, CURVE_FROM_MAIN, MAIN, Measure, bench_cell_key, cell_key_of, measure_key_of,
                       measures)
from .results import ResultSet

log = logging.getLogger(__name__)

CURVE_METRICS = ("train_loss", "val_fewshot_acc", "val_maml_finetune_acc", "heldout_base_acc")


def match_cells(bench: Benchmark, store: ResultStore) -> Dict[tuple, Any]:
    """cell key (:attr:`Cell.key`) -> its finished :class:`~fsl_lsskd.record.TrainingRecord` (cells of the grid
    and teachers), found by the data-free cell key."""
    cells = with_teachers(expand(bench))
    by_key: Dict[str, List[Any]] = {}
    for rec in store.trainings().values():
        by_key.setdefault(cell_key_of(rec), []).append(rec)
    preferred = store.latest_fingerprints(experiment_name(bench))
    out = {}
    for cell in cells:
        cands = by_key.get(bench_cell_key(bench, cell), [])
        if cell.teacher is not None and cell.teacher.key in out:
            cands = [r for r in cands if r.identity.get("teacher") == out[cell.teacher.key].train_id]
        if len(cands) > 1 and cell.dataset in preferred:
            cands = [r for r in cands if r.identity.get("split_fingerprint") == preferred[cell.dataset]] or cands
        if cands:
            out[cell.key] = max(cands, key=lambda r: r.start_time)
    return out


def newest_scores(records) -> Dict[Tuple[str, str], Any]:
    """(train id, measure key) -> the newest score run (a re-scored cell keeps older score runs, e.g. of another
    data version); records without a measure key are left out."""
    best: Dict[Tuple[str, str], Any] = {}
    for r in records:
        key = measure_key_of(r)
        if key is None:
            continue
        k = (r.train_id, key)
        if k not in best or r.start_time > best[k].start_time:
            best[k] = r
    return best


def collect(bench: Benchmark, store: Optional[ResultStore] = None, data=None) -> ResultSet:
    """The benchmark's results: per row (method or variant, backbone), per column (training data, target,
    protocol, readout), per seed the per-episode arrays; base-class scores; training curves of the first seed;
    each column's episode classes (:func:`episode_classes`). ``store``: any :class:`~fsl_lsskd.record.ResultStore`
    (default: the MLflow store, opened read-only and refused while it holds record format 1). ``data``: a
    :class:`~fsl_lsskd.bench.runner.DataCache` for the targets whose episodes were generated from their data
    (their classes are then rebuilt and checked against the scores' episode sha256), or None.
    Raises :class:`ConfigError` when nothing of the benchmark is in the store."""
    if store is None:
        from ..record import check_no_legacy, open_store

        store = open_store(create=False)
        check_no_legacy(store)
    matched = match_cells(bench, store)
    if not matched:
        raise ConfigError(f"benchmark {bench.name!r} has no finished cells in the store; run "
                          f"`fsl-bench run {bench.where}` first")
    cells = with_teachers(expand(bench))
    by_train: Dict[str, List[Tuple[str, Any]]] = {}
    for (tid, key), s in newest_scores(store.scores([rec.train_id for rec in matched.values()]).values()).items():
        by_train.setdefault(tid, []).append((key, s))
    results = ResultSet()
    cache: Dict[str, Any] = {}
    sources = set()
    episode_sources: Dict[tuple, Any] = {}
    for cell in track(cells, f"reading the results of {bench.name}", "cell", announce=False, leave=False):
        rec = matched.get(cell.key)
        if rec is None:
            continue
        row = (cell.row, cell.backbone)
        if cell.role == "teacher":
            results.teacher_rows.add(row)
        variant = bench.variants.get(cell.row)
        if variant is not None:
            results.variant_of[cell.row] = (variant.method, dict(variant.settings))
        wanted: Dict[str, List[Measure]] = {}
        for m in measures(bench, cell):
            wanted.setdefault(m.key, []).append(m)
        # the found scores target by target, each target's in the order the store lists them (the order results
        # load in; what a table shows is sorted, but the fractions figure's panels still follow it)
        targets = {t: i for i, t in enumerate(dict.fromkeys(m.target for ms in wanted.values() for m in ms))}
        found = [(m, s) for key, s in by_train.get(rec.train_id, []) for m in wanted.get(key, [])]
        for m, s in sorted(found, key=lambda ms: targets[ms[0].target]):
            arrays = store.score_arrays(s, cache)
            if m.kind == BASE:
                results.add_base(row, cell.data_label, cell.seed, arrays)
            elif m.kind == MAIN:
                results.add(row, (cell.data_label, m.target, m.protocol.key, m.readout.label), cell.seed, arrays)
                source = s.tags.get(TAG_EPISODES_SOURCE, "?")
                sources.add(source)
                episode_sources.setdefault((m.target, m.protocol.key),
                                           (source, m.protocol, s.identity.get("episodes_sha256", "")))
            elif m.kind in (CURVE, CURVE_FROM_MAIN):
                results.add_curve(row, (cell.data_label, m.target, m.protocol.n_way, m.protocol.n_shot,
                                        m.readout.label), cell.seed, arrays, curve_episodes=m.kind == CURVE)
        if cell.seed == min(bench.seeds) and cell.fraction == max(bench.fractions or (bench.train.fraction,)):
            for metric in CURVE_METRICS:
                hist = store.metric_history(rec.run_id, metric)
                if hist:
                    results.curves.setdefault(row, {})[metric] = list(hist)
    results.meta.update(cells_found=len(matched), cells_expected=len(cells), episodes_source=sources)
    for (target, key), (source, proto, sha) in sorted(episode_sources.items(), key=lambda kv: kv[0]):
        classes = episode_classes(target, bench.eval.split, source, proto, sha, data)
        if classes is not None:
            results.episode_classes[(target, key)] = classes
    return results


def episode_classes(target: str, split: str, source: str, protocol: EpisodeProtocol, sha256: str = "", data=None):
    """The test-class ids ``[E, n_way]`` of the episodes a score ran on: from the published episode file its
    ``fsl.episodes_source`` names (sha256-checked), or from the dataset's fixed episodes (Omniglot's runs), both
    without the data. Episodes generated from a dataset's per-class counts (a user's folder, a partial archive)
    are rebuilt from ``data`` (a :class:`~fsl_lsskd.bench.runner.DataCache` that knows ``target``) and used only
    when their sha256 equals the score's; otherwise None."""
    from ..eval.episodes import read_episode_file

    if source.startswith("splits/"):
        from ..data.splits import verified_path

        ep, _ = read_episode_file(verified_path(source[len("splits/"):]))
        return ep.classes[:protocol.n_episodes]
    if source.endswith("(fixed episodes of the dataset)"):
        from ..registry import DATASETS

        arrays = getattr(DATASETS.get(target), "fixed_episode_arrays", None) if target in DATASETS else None
        if arrays is not None:
            return arrays(split, protocol)[0]
    if source == "generated" and data is not None and target in data.bench.data_paths:
        from ..eval.episodes import class_offsets, load_episodes

        part = data.split(target, split)
        _, counts = class_offsets(part.labels, part.num_classes)
        ep = load_episodes(target, split, counts, protocol, part.class_names)
        if ep.sha256 == sha256:
            return ep.classes
        log.warning("%s %s %s: the data given rebuilds other episodes than the scores used (sha256 %s, scores %s); "
                    "no test-class interval", target, split, protocol.key, ep.sha256[:12], sha256[:12])
    return None
