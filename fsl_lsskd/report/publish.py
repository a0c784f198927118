"""Published results: every finished cell's exported backbone and per-episode scores as plain files, and the
tables rebuilt from them without a store.

``fsl-bench publish BENCHMARK --published-dir results/weights/<benchmark>`` writes, per cell,

* ``<row>-<backbone>-seed<k>[-<fraction>pct].safetensors``: the exported backbone (``fsl-bench evaluate
  --checkpoint FILE`` loads it; its meta is the ``.json`` beside it: backbone, image size, normalisation,
  training id, how to load it without fsl-bench);
* ``<same stem>.scores.npz``: every score of the cell, per episode (``<score id>.accuracy`` in %, ``.nll``,
  ``.brier``, ``.reliability``),
* ``<same stem>.model/`` (``model.safetensors``, ``model.json``), only for cells scored by a readout that needs
  the whole trained method (``needs_method``: MAML's ``maml_finetune`` fine-tunes backbone *and* head):
  ``fsl-bench evaluate --checkpoint <stem>.model --readouts maml_finetune`` re-scores it,

and ``MANIFEST.json``: for every cell its files (sha256, bytes), its training identity and the code commit that
trained it, its scores' identities (target, protocol with the episodes' sha256, readout and settings) and
summary metrics, its training curves, and the commit that published them. Rows are methods or variants;
teacher-only cells end in ``-teacher``; a benchmark with several training datasets puts the dataset first.

``fsl-bench table BENCHMARK --from-results DIR`` reads a published directory through :class:`PublishedStore`, a
:class:`~fsl_lsskd.record.ResultStore` like the MLflow store, so the tables it writes are the ones the store gives,
checksums checked first. A manifest's cells and scores carry the store's ``fsl.*`` tags; those published before
the ``fsl.cell_key`` and ``fsl.measure`` tags existed are read by the keys their identities give
(:mod:`fsl_lsskd.bench.measures`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path, PureWindowsPath
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from ..errors import ConfigError, DataError
from ..record import TAG_COMMIT, TAG_PREFIX, TAG_READOUT, ScoreRecord, TrainingRecord
from ..utils import atomic_path, make_dir
from ..bench.config import Benchmark
from ..bench.grid import Cell, expand, with_teachers

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
FORMAT = 1
ARRAYS = ("accuracy", "nll", "brier", "reliability")
MODEL_SUFFIX = ".model"  # <stem>.model/: the whole trained method, for readouts that need it (needs_method)


#: Run parameters that name places on the training machine: published as the file's name only (the run
#: directory not at all), so a published manifest names no path of the machine that trained it.
MACHINE_PATHS = ("run.archive", "run.data_root", "run.split_file", "run.teacher")


def portable_params(params: Dict[str, str]) -> Dict[str, str]:
    """``params`` of a training run without machine-local paths: ``run.out_dir`` dropped, the paths of
    :data:`MACHINE_PATHS` reduced to their file name (``/data/tiny-imagenet-200.zip`` -> ``tiny-imagenet-200.zip``)."""
    out = {}
    for key, value in params.items():
        if key == "run.out_dir":
            continue
        if key in MACHINE_PATHS and value and ("/" in value or "\\" in value):
            value = PureWindowsPath(value).name  # splits on / and \\ alike
        out[key] = value
    return out


def cell_stem(bench: Benchmark, cell: Cell) -> str:
    """The file stem of a cell: ``<row>-<backbone>-seed<k>[-<fraction>pct][-teacher]`` (dataset first when the
    benchmark trains on several)."""
    parts = [cell.dataset] if len(bench.datasets) > 1 else []
    parts += [cell.row, cell.backbone, f"seed{cell.seed}"]
    if cell.fraction < 1.0:
        parts.append(f"{100 * cell.fraction:g}pct")
    if cell.role == "teacher":
        parts.append("teacher")
    return "-".join(parts)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def publish(bench: Benchmark, out_dir: Path, store=None) -> Path:
    """Write the published files of every finished cell of ``bench`` into ``out_dir`` (module docstring) and
    return the manifest's path; the manifest is written last.

    Publishing adds to what ``out_dir`` already holds: a cell of the grid that the store lacks but the existing
    manifest publishes (same data-free training identity, files unchanged: sha256 checked) keeps its files and
    its manifest entry as they are, so seeds trained on another machine or in another session, with another
    store, join the published ones. A cell the store holds is published from the store (it replaces an older
    entry). Files of cells no longer in the grid are removed. Raises :class:`ConfigError` when neither the store
    nor ``out_dir`` holds a finished cell of the benchmark."""
    from ..eval.scoring import needs_method
    from ..record import git_commit, open_store
    from .collect import CURVE_METRICS, match_cells

    store = store or open_store(create=False)
    matched = match_cells(bench, store)
    kept = _kept_entries(bench, out_dir, set(matched))
    if not matched and not kept:
        raise ConfigError(f"benchmark {bench.name!r} has no finished cells in the store; run "
                          f"`fsl-bench run {bench.where}` first")
    cells = [c for c in with_teachers(expand(bench)) if c.key in matched]
    stems = [cell_stem(bench, c) for c in cells]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})
        raise ConfigError(f"{bench.where}: cells share the published file name {dup[0]!r}; give the rows distinct "
                          f"names (variants)")
    make_dir(out_dir)
    scores = store.scores([matched[c.key].train_id for c in cells])
    by_train: Dict[str, List[ScoreRecord]] = {}
    for rec in scores.values():
        by_train.setdefault(rec.train_id, []).append(rec)
    entries = []
    cache: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fsl-publish-") as tmp:
        for cell, stem in zip(cells, stems):
            rec = matched[cell.key]
            export = store.fetch_dir(rec.run_id, "export", Path(tmp) / rec.train_id)
            weights, meta = out_dir / f"{stem}.safetensors", out_dir / f"{stem}.json"
            with atomic_path(weights) as t:
                shutil.copyfile(export / "backbone.safetensors", t)
            meta_obj = json.loads((export / "backbone.json").read_text(encoding="utf-8"))
            with atomic_path(meta) as t:
                Path(t).write_text(json.dumps(meta_obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            arrays: Dict[str, np.ndarray] = {}
            score_entries = []
            for s in sorted(by_train.get(rec.train_id, []), key=lambda r: r.score_id):
                a = store.score_arrays(s, cache)
                for k in ARRAYS:
                    if k in a:
                        arrays[f"{s.score_id}.{k}"] = np.asarray(a[k])
                score_entries.append({"score_id": s.score_id, "run_id": s.run_id, "start_time": s.start_time,
                                      "tags": _fsl_tags(s.tags), "metrics": dict(s.metrics)})
            npz = out_dir / f"{stem}.scores.npz"
            with atomic_path(npz, suffix=".npz") as t:
                with open(t, "wb") as fh:
                    np.savez_compressed(fh, **arrays)
            files = [(weights.name, weights), (meta.name, meta), (npz.name, npz)]
            if any(needs_method(s.tags.get(TAG_READOUT, "")) for s in by_train.get(rec.train_id, [])):
                files += _copy_model(store, rec.run_id, Path(tmp) / f"{rec.train_id}-model", out_dir, stem)
            curves = {m: [[step, value] for step, value in store.metric_history(rec.run_id, m)]
                      for m in CURVE_METRICS}
            entries.append({
                "stem": stem, "row": cell.row, "method": cell.method, "backbone": cell.backbone,
                "dataset": cell.dataset, "seed": cell.seed, "fraction": cell.fraction, "role": cell.role,
                "train_id": rec.train_id, "run_id": rec.run_id, "start_time": rec.start_time,
                "trained_at_commit": rec.tags.get(TAG_COMMIT, ""),
                "tags": _fsl_tags(rec.tags), "params": portable_params(rec.params),
                "files": {name: {"sha256": sha256(p), "bytes": p.stat().st_size} for name, p in files},
                "scores": score_entries, "curves": {k: v for k, v in curves.items() if v}})
    order = {c.key: i for i, c in enumerate(with_teachers(expand(bench)))}
    entries = [e for _, e in sorted([(order[c.key], e) for c, e in zip(cells, entries)]
                                    + [(order[k], e) for k, e in kept.items()], key=lambda ke: ke[0])]
    keep = {name.split("/")[0] for e in entries for name in e["files"]} | {MANIFEST}
    for p in out_dir.iterdir():
        if p.name in keep:
            continue
        if p.is_file() and p.name.endswith((".safetensors", ".json", ".scores.npz")):
            p.unlink()  # a cell that left the grid
        elif p.is_dir() and p.name.endswith(MODEL_SUFFIX):
            shutil.rmtree(p)  # a model directory that is no longer published
    manifest = {"format": FORMAT, "benchmark": bench.name, "benchmark_file": Path(bench.where).name,
                "published_at_commit": git_commit(), "cells": entries}
    path = out_dir / MANIFEST
    with atomic_path(path) as t:
        Path(t).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    log.info("published %d cells of %s into %s", len(entries), bench.name, out_dir)
    return path


def _kept_entries(bench: Benchmark, out_dir: Path, fresh: set) -> Dict[tuple, Dict[str, Any]]:
    """cell key -> manifest entry of the cells ``out_dir`` already publishes for ``bench`` that are not in
    ``fresh`` (the cells about to be published from the store); empty when ``out_dir`` has no manifest. Raises
    :class:`DataError` when the existing files differ from their manifest (restore them first: nothing is
    silently dropped) or the directory publishes another benchmark."""
    from .collect import match_cells

    if not (Path(out_dir) / MANIFEST).is_file():
        return {}
    old = PublishedStore(out_dir)
    if old.manifest.get("benchmark") != bench.name:
        raise ConfigError(f"{out_dir} publishes benchmark {old.manifest.get('benchmark')!r}, not {bench.name!r}: "
                          f"pass another --out")
    by_train = {e["train_id"]: e for e in old.manifest["cells"]}
    kept = {key: by_train[rec.train_id] for key, rec in match_cells(bench, old).items() if key not in fresh}
    if kept:
        log.info("keeping %d published cells of %s that the store does not hold", len(kept), bench.name)
    return kept


def _copy_model(store, run_id: str, tmp: Path, out_dir: Path, stem: str) -> List[Tuple[str, Path]]:
    """Copy the cell's model directory (``model.safetensors`` + ``model.json``) from the store to
    ``out_dir/<stem>.model/``; returns its files as ``(name relative to out_dir, path)``."""
    from ..checkpoint import MODEL_META, MODEL_WEIGHTS

    model = store.fetch_dir(run_id, "model", tmp)
    target = make_dir(out_dir / f"{stem}{MODEL_SUFFIX}")
    out = []
    for name in (MODEL_WEIGHTS, MODEL_META):
        with atomic_path(target / name) as t:
            shutil.copyfile(model / name, t)
        out.append((f"{target.name}/{name}", target / name))
    return out


def _fsl_tags(tags) -> Dict[str, str]:
    return {k: v for k, v in tags.items() if k.startswith(TAG_PREFIX)}


class PublishedStore:
    """A published results directory as a :class:`~fsl_lsskd.record.ResultStore` (what
    :func:`~fsl_lsskd.report.collect.collect` and ``fsl-bench publish`` read). Every file's sha256 is checked
    against the manifest when it is opened: :class:`~fsl_lsskd.errors.DataError` names a missing or changed file,
    a missing or unreadable manifest, or another manifest format."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not self.dir.is_dir():
            raise DataError(f"{self.dir} does not exist: pass the directory `fsl-bench publish` wrote (e.g. "
                            f"results/weights/<benchmark>; `fsl-bench publish BENCHMARK --published-dir DIR` writes one)")
        if not path.is_file():
            raise DataError(f"{self.dir} has no {MANIFEST}: pass the directory `fsl-bench publish` wrote (e.g. "
                            f"results/weights/<benchmark>)")
        try:
            self.manifest = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DataError(f"{path} is not valid JSON ({exc}); publish again") from None
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"{path} has format {self.manifest.get('format')!r}; this fsl-bench reads {FORMAT}")
        for e in self.manifest["cells"]:
            for name, info in e["files"].items():
                p = self.dir / name
                if not p.is_file() or sha256(p) != info["sha256"]:
                    raise DataError(f"{p} is missing or differs from {MANIFEST} (sha256); restore it (git checkout) "
                                    f"or publish again")
        self._cells = {e["train_id"]: e for e in self.manifest["cells"]}
        self._runs = {e["run_id"]: e for e in self.manifest["cells"]}

    def trainings(self, train_ids: Optional[Iterable[str]] = None) -> Dict[str, TrainingRecord]:
        """train id -> the published cell's training record (its manifest entry's tags and portable params)."""
        ids = self._cells if train_ids is None else [t for t in train_ids if t in self._cells]
        return {t: TrainingRecord(run_id=self._cells[t]["run_id"], experiment_id="published", train_id=t,
                                  tags=dict(self._cells[t]["tags"]), params=dict(self._cells[t]["params"]),
                                  complete=True, start_time=int(self._cells[t]["start_time"])) for t in ids}

    def scores(self, train_ids: Optional[Iterable[str]] = None) -> Dict[str, ScoreRecord]:
        """score id -> the published score record of the given cells (all when None), as the store held it."""
        out = {}
        for t in (self._cells if train_ids is None else train_ids):
            e = self._cells.get(t)
            for s in (e or {}).get("scores", []):
                out[s["score_id"]] = ScoreRecord(run_id=s["run_id"], score_id=s["score_id"], train_id=t,
                                                 tags=dict(s["tags"]), metrics=dict(s["metrics"]),
                                                 start_time=int(s["start_time"]))
        return out

    def score_arrays(self, record: ScoreRecord, cache: Dict[str, Any]) -> Dict[str, np.ndarray]:
        """The score's per-episode arrays from ``<stem>.scores.npz`` (``<score id>.<array>``; read once per file
        into ``cache``)."""
        e = self._cells[record.train_id]
        key = f"npz:{e['stem']}"
        if key not in cache:
            with np.load(self.dir / f"{e['stem']}.scores.npz", allow_pickle=False) as z:
                cache[key] = {k: z[k] for k in z.files}
        z = cache[key]
        return {k: z[f"{record.score_id}.{k}"] for k in ARRAYS if f"{record.score_id}.{k}" in z}

    def metric_history(self, run_id: str, metric: str) -> List[Tuple[int, float]]:
        """``[(step, value)]`` of a published training curve (the manifest's ``curves``); empty when absent."""
        e = self._runs.get(run_id, {})
        return [(int(step), float(value)) for step, value in e.get("curves", {}).get(metric, [])]

    def latest_fingerprints(self, experiment: str) -> Dict[str, str]:
        """Empty: a published directory holds one training per cell, so there is no data version to choose."""
        return {}


def collect_published(bench: Benchmark, directory: Path, data=None):
    """The :class:`~fsl_lsskd.report.results.ResultSet` of a published directory (no store; data only to rebuild
    generated episodes' classes, see :func:`~fsl_lsskd.report.collect.collect`)."""
    from .collect import collect

    store = PublishedStore(directory)
    if store.manifest.get("benchmark") != bench.name:
        raise ConfigError(f"{directory} holds benchmark {store.manifest.get('benchmark')!r}, not {bench.name!r}")
    return collect(bench, store=store, data=data)
