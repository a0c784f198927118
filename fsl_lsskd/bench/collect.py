"""Read a benchmark's finished cells and scores from the store into a :class:`~fsl_lsskd.report.results.ResultSet`.

Reading needs no data: a cell's training run is found by its training identity with the data fingerprint (and
the teacher's id) left out, among the finished training runs of the store; when the store holds the same cell
for several versions of the data, the version the benchmark's latest invocation used wins. Scores are matched
by what they measure (target dataset and split, protocol, readout and settings).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List


from ..errors import ConfigError
from ..progress import track
from ..protocol import EpisodeProtocol
from .config import Benchmark
from .grid import Cell, expand, experiment_name, training_config, with_teachers
from ..report.results import ResultSet

log = logging.getLogger(__name__)

CURVE_METRICS = ("train_loss", "val_fewshot_acc", "heldout_base_acc")
_MASKED = ("split_fingerprint", "teacher")


def _masked(identity: Dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in identity.items() if k not in _MASKED}, sort_keys=True, default=str)


def cell_identity_key(bench: Benchmark, cell: Cell) -> str:
    """A cell's training identity with the data fingerprint and teacher id masked (data-free matching)."""
    from ..train.config import training_identity

    cfg = training_config(bench, cell, Path("."), data={})
    teacher = "?" if cell.teacher is not None else None
    return _masked(training_identity(cfg, "?", teacher))


def match_cells(bench: Benchmark, store) -> Dict[tuple, Any]:
    """cell key -> its finished :class:`~fsl_lsskd.record.TrainingRecord` (cells of the grid and teachers)."""
    cells = with_teachers(expand(bench))
    runs = list(store.trainings().values())
    by_key: Dict[str, List[Any]] = {}
    for rec in runs:
        by_key.setdefault(_masked(rec.identity), []).append(rec)
    preferred = _latest_fingerprints(bench, store)
    out = {}
    for cell in cells:
        cands = by_key.get(cell_identity_key(bench, cell), [])
        if cell.teacher is not None and cell.teacher.key in out:
            cands = [r for r in cands if r.identity.get("teacher") == out[cell.teacher.key].train_id]
        if len(cands) > 1 and cell.dataset in preferred:
            cands = [r for r in cands if r.identity.get("split_fingerprint") == preferred[cell.dataset]] or cands
        if cands:
            out[cell.key] = max(cands, key=lambda r: r.start_time)
    return out


def _latest_fingerprints(bench: Benchmark, store) -> Dict[str, str]:
    eid = store.experiment_id(experiment_name(bench), create=False)
    if eid is None:
        return {}
    runs = store.client.search_runs([eid], filter_string="tags.`fsl.kind` = 'invocation'",
                                    order_by=["attributes.start_time DESC"], max_results=20)
    for r in runs:
        raw = r.data.tags.get("fsl.fingerprints")
        if raw:
            return json.loads(raw)
    return {}


def collect(bench: Benchmark, store=None, data=None) -> ResultSet:
    """The benchmark's results: per row (method or variant, backbone), per column (training data, target,
    protocol, readout), per seed the per-episode arrays; base-class scores; training curves of the first seed;
    each column's episode classes (:func:`episode_classes`). ``data``: a
    :class:`~fsl_lsskd.bench.runner.DataCache` for the targets whose episodes were generated from their data
    (their classes are then rebuilt and checked against the scores' episode sha256), or None.
    Raises :class:`ConfigError` when nothing of the benchmark is in the store."""
    from ..eval.scoring import ReadoutSpec
    from ..record import check_no_legacy, open_store

    store = store or open_store(create=False)
    check_no_legacy(store)
    matched = match_cells(bench, store)
    if not matched:
        raise ConfigError(f"benchmark {bench.name!r} has no finished cells in the store; run "
                          f"`fsl-bench run {bench.where}` first")
    cells = with_teachers(expand(bench))
    scores = store.scores([rec.train_id for rec in matched.values()])
    by_train: Dict[str, List[Any]] = {}
    for rec in scores.values():
        by_train.setdefault(rec.train_id, []).append(rec)
    results = ResultSet()
    defaults = {"max_episodes": bench.eval.image_episodes} if bench.eval.image_episodes else {}
    curve = bench.eval.curves.protocols() if bench.eval.curves else []
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
        curve_specs = [ReadoutSpec.parse(r, defaults) for r in (bench.eval.curves.readouts if bench.eval.curves
                                                                else ())]
        for target in bench.eval_datasets(cell.dataset):
            main = bench.eval.target_protocols(target)
            specs = [ReadoutSpec.parse(r, defaults) for r in bench.eval.target_readouts(target, cell.row, cell.method)]
            for s in _newest_per_measure(by_train.get(rec.train_id, [])):
                ident = s.identity
                if s.tags.get("fsl.readout") == "heldout_base":
                    if target == cell.dataset:
                        results.add_base(row, cell.data_label, cell.seed, store.score_arrays(s, cache))
                    continue
                t = ident.get("target", {})
                if t.get("dataset") != target or t.get("split") != bench.eval.split:
                    continue
                proto = EpisodeProtocol.parse(ident["protocol"])
                spec = next((sp for sp in specs if sp.identity() == {"readout": ident["readout"],
                                                                       "settings": ident["settings"]}), None)
                cspec = next((sp for sp in curve_specs if sp.identity() == {"readout": ident["readout"],
                                                                              "settings": ident["settings"]}), None)
                arrays = None
                if spec is not None and proto in main:
                    arrays = store.score_arrays(s, cache)
                    results.add(row, (cell.data_label, target, proto.key, spec.label), cell.seed, arrays)
                    sources.add(s.tags.get("fsl.episodes_source", "?"))
                    episode_sources.setdefault((target, proto.key), (s.tags.get("fsl.episodes_source", "?"), proto,
                                                                     ident.get("episodes_sha256", "")))
                if cspec is not None and (proto in curve or proto.replace(n_episodes=bench.eval.n_episodes) in main):
                    arrays = arrays if arrays is not None else store.score_arrays(s, cache)
                    results.add_curve(row, (cell.data_label, target, proto.n_way, proto.n_shot, cspec.label),
                                      cell.seed, arrays, curve_episodes=proto in curve)
        if cell.seed == min(bench.seeds) and cell.fraction == max(bench.fractions or (bench.train.fraction,)):
            for metric in CURVE_METRICS:
                hist = store.client.get_metric_history(rec.run_id, metric)
                if hist:
                    results.curves.setdefault(row, {})[metric] = [(m.step, m.value) for m in hist]
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


def _newest_per_measure(records: List[Any]) -> List[Any]:
    """One score per (target dataset/split, protocol, readout, settings): the newest (a re-scored cell keeps
    older score runs of other data versions)."""
    best: Dict[str, Any] = {}
    for r in records:
        ident = r.identity
        key = json.dumps({"t": {k: ident.get("target", {}).get(k) for k in ("dataset", "split")},
                          "p": ident.get("protocol"), "r": ident.get("readout"), "s": ident.get("settings")},
                         sort_keys=True, default=str)
        if key not in best or r.start_time > best[key].start_time:
            best[key] = r
    return list(best.values())
