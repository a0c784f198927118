"""``fsl-bench store migrate``: bring a store written by an older fsl-bench up to date, without retraining.

Two steps, each idempotent (a second run changes nothing):

1. **Record format 1 -> 2** (:func:`migrate_store`), below.
2. **Keys** (:func:`backfill_keys`): every training run gets its data-free cell key (``fsl.cell_key``) and every
   score run its measure key (``fsl.measure``), both computed from the run's recorded identity
   (:mod:`fsl_lsskd.bench.measures`), as ``fsl-bench run`` writes them today. Readers derive the same keys from
   identities where the tags are missing, so an older store reads the same before and after; the tags make every
   record say what it is (an MLflow search can filter on them).

Record format 1 (fsl-bench before train-once-score-many) kept one run per cell, tagged ``fsl.cell_id`` and
``fsl.cell_status=complete``, with the whole resume checkpoint (``checkpoint/last.pt``), the export and the
evaluation arrays. Migration gives every finished cell run a format-2 training record in place: its training
identity (computed from the recorded config and data fingerprint, with the method version and data-subset rule
of the code that trained it), the finished model (``model/``: weights without prediction memories) and a fresh
export. Methods whose training maths changed since (a higher ``training_version``) keep their old identity, so
the next ``fsl-bench run`` trains them again; every other cell is reused. Scores are not migrated: the next
``fsl-bench run`` scores the migrated cells (seconds per cell) with the readouts of the current code. The old
runs' artifacts stay where they are.
"""
from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import click

log = logging.getLogger(__name__)

LEGACY_SAMPLER = "numpy-default_rng(seed)-round-per-class-v1"
#: settings added since record format 1, at the values that reproduce what that code did
LEGACY_SETTINGS = {"pskd": {"store_layout": "dense"}, "lsskd": {"store_layout": "dense"},
                   "byot": {"head": "stages", "feat_loss": "mean_sq"}}


def legacy_identity(meta: Dict[str, Any], teacher_train_id: Optional[str]) -> Dict[str, Any]:
    """The format-2 training identity of a format-1 checkpoint's ``meta``."""
    from .train.config import ENGINE_VERSION, IDENTITY_FORMAT, TrainConfig, build_method_config, method_class

    old = dict(meta["config"])
    fingerprint = str(meta["identity"]["data_fingerprint"]).split("|")[0]
    fingerprint = re.sub(r":resized\d+$", "", fingerprint)
    cls = method_class(meta["method"])
    fields = set(cls.config_cls.__dataclass_fields__)
    recorded = {**LEGACY_SETTINGS.get(meta["method"], {}),
                **{k: v for k, v in dict(meta.get("method_config", {})).items() if k in fields}}
    cfg = TrainConfig(method=meta["method"], backbone=meta["backbone"], method_overrides=recorded)
    mcfg = build_method_config(cls.config_cls, cfg)
    identity = {
        "format": IDENTITY_FORMAT, "engine_version": ENGINE_VERSION, "dataset": meta["dataset"],
        "split_fingerprint": fingerprint, "heldout": float(old.get("heldout", 0.1)),
        "fraction": float(old.get("fraction", 1.0)), "backbone": meta["backbone"],
        "image_size": int(meta["image_size"]), "method": meta["method"], "method_version": 1,
        "method_config": mcfg.identity_dict(), "seed": int(old.get("seed", 0)), "precision": "fp32",
    }
    if identity["fraction"] < 1.0:
        identity["fraction_sampler"] = LEGACY_SAMPLER
    if teacher_train_id:
        identity["teacher"] = teacher_train_id
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


def migrate_store(store, dry_run: bool = False, device: str = "cpu") -> List[Dict[str, str]]:
    """Convert every unmigrated format-1 cell run of ``store``; returns one report per cell (run id, label,
    train id, whether its method's training changed since)."""
    from .checkpoint import build_method, export_backbone, read_training_state, save_model
    from .record import (COMPLETE, KIND_TRAIN, LEGACY_CELL_ID, LEGACY_TEACHER, RECORD_FORMAT, TAG_BACKBONE,
                         TAG_DATASET, TAG_FORMAT, TAG_FRACTION, TAG_IDENTITY, TAG_KIND, TAG_METHOD,
                         TAG_MIGRATED_FROM, TAG_ROW, TAG_SEED, TAG_STATUS, TAG_TEACHER, TAG_TRAIN_ID)
    from .train.config import method_class, train_id

    runs = store.legacy_runs()
    # teachers before students: a student's identity holds its teacher's new id
    runs.sort(key=lambda r: LEGACY_TEACHER in r.data.tags)
    new_ids: Dict[str, str] = {}
    reports = []
    for run in runs:
        tags = run.data.tags
        with tempfile.TemporaryDirectory(prefix="fsl-migrate-") as tmp:
            ckpt_path = store.fetch_dir(run.info.run_id, "checkpoint/last.pt", Path(tmp) / "ckpt")
            ckpt = read_training_state(ckpt_path)
            meta = dict(ckpt["meta"])
            teacher_old = tags.get(LEGACY_TEACHER)
            teacher_tid = new_ids.get(teacher_old) if teacher_old else None
            if teacher_old and teacher_tid is None:
                log.warning("run %s: teacher cell %s is not in the store; migrated without a teacher id",
                            run.info.run_id, teacher_old)
            identity = legacy_identity(meta, teacher_tid)
            tid = train_id(identity)
            new_ids[tags.get(LEGACY_CELL_ID, run.info.run_id)] = tid
            changed = int(getattr(method_class(meta["method"]), "training_version", 1)) != 1
            reports.append({"run_id": run.info.run_id, "cell": tags.get("mlflow.runName", ""), "train_id": tid,
                            "method": meta["method"], "retrained_next_run": str(changed)})
            if dry_run:
                continue
            meta["method_config"] = identity["method_config"]  # with the legacy settings: the old architecture
            method = build_method(meta)
            method.load_state_dict(ckpt["model"], strict=False)
            history = [{**h, "epoch": h.get("epoch", i) + 1} for i, h in enumerate(ckpt.get("history", []))]
            model_meta = {k: meta[k] for k in ("method", "backbone", "num_classes", "num_samples", "image_size",
                                               "dataset", "class_names", "mean", "std", "method_config") if k in meta}
            model_meta.update(identity=identity, train_id=tid, history=history, mlflow_run_id=run.info.run_id,
                              migrated_from="record format 1")
            model_dir = save_model(method, model_meta, Path(tmp) / "model")
            export_dir = Path(tmp) / "export"
            export_backbone(method.export_backbone(), meta["backbone"], int(meta["image_size"]), export_dir,
                            extra={"method": meta["method"], "train_id": tid, "dataset": meta["dataset"],
                                   "mean": meta["mean"], "std": meta["std"]})
            rid = run.info.run_id
            store.log_artifacts(rid, model_dir, "model")
            store.log_artifacts(rid, export_dir, "export")
            new_tags = {TAG_FORMAT: str(RECORD_FORMAT), TAG_KIND: KIND_TRAIN, TAG_TRAIN_ID: tid,
                        TAG_IDENTITY: json.dumps(identity, sort_keys=True), TAG_METHOD: meta["method"],
                        TAG_BACKBONE: meta["backbone"], TAG_DATASET: meta["dataset"],
                        TAG_SEED: str(identity["seed"]), TAG_FRACTION: str(identity["fraction"]),
                        TAG_MIGRATED_FROM: "record format 1", TAG_ROW: meta["method"]}
            if teacher_tid:
                new_tags[TAG_TEACHER] = teacher_tid
            store.set_tags(rid, new_tags)
            store.set_tags(rid, {TAG_STATUS: COMPLETE})  # last
    return reports


def backfill_keys(store, dry_run: bool = False) -> Dict[str, int]:
    """Tag every training run that lacks it with its cell key (``fsl.cell_key``) and every score run with its
    measure key (``fsl.measure``), computed from the run's identity (:func:`fsl_lsskd.bench.measures.cell_key`,
    :func:`~fsl_lsskd.bench.measures.measure_key_of`); runs without an identity (a training killed before it
    recorded one) are left alone. Returns the number of runs tagged (or, with ``dry_run``, to tag) per tag."""
    from .bench.measures import cell_key, measure_key_of
    from .record import KIND_SCORE, KIND_TRAIN, TAG_CELL_KEY, TAG_MEASURE, ScoreRecord, TrainingRecord

    counts = {TAG_CELL_KEY: 0, TAG_MEASURE: 0}
    for run_id, tags in store.runs_without(KIND_TRAIN, TAG_CELL_KEY):
        identity = TrainingRecord(run_id, "", "", tags, {}, False).identity
        if identity:
            counts[TAG_CELL_KEY] += 1
            if not dry_run:
                store.set_tags(run_id, {TAG_CELL_KEY: cell_key(identity)})
    for run_id, tags in store.runs_without(KIND_SCORE, TAG_MEASURE):
        key = measure_key_of(ScoreRecord(run_id, "", "", tags))
        if key is not None:
            counts[TAG_MEASURE] += 1
            if not dry_run:
                store.set_tags(run_id, {TAG_MEASURE: key})
    return counts


@click.group("store")
def store() -> None:
    """Maintain the MLflow store (MLFLOW_TRACKING_URI, default ./mlflow.db).

    \b
    Example:
      fsl-bench store migrate --dry-run
      fsl-bench store migrate
    """


@store.command("migrate")
@click.option("--dry-run", is_flag=True, help="List what would be converted and change nothing.")
def migrate_cmd(dry_run: bool) -> None:
    """Bring a store written by an older fsl-bench up to date: convert cells of record format 1 so that
    `fsl-bench run` and `table` can use them (nothing is retrained; methods whose training changed since are
    retrained by the next run, and every converted cell is re-scored by it), then tag every training and score run
    with the keys the tables look it up by (fsl.cell_key, fsl.measure). Running it again changes nothing.

    \b
    Example:
      fsl-bench store migrate
    """
    from .record import describe_store, open_store

    from .record import TAG_CELL_KEY, TAG_MEASURE

    st = open_store(create=False)
    reports = migrate_store(st, dry_run=dry_run)
    for r in reports:
        note = "training changed since: retrained by the next run" if r["retrained_next_run"] == "True" else "reused"
        click.echo(f"  {r['cell']:<44} -> training id {r['train_id']}  ({note})")
    if reports:
        verb = "would convert" if dry_run else "converted"
        click.echo(f"{verb} {len(reports)} cell(s) in {describe_store()}; the next `fsl-bench run` scores them")
    keys = backfill_keys(st, dry_run=dry_run)
    if any(keys.values()):
        verb = "would tag" if dry_run else "tagged"
        click.echo(f"{verb} {keys[TAG_CELL_KEY]} training run(s) with {TAG_CELL_KEY} and {keys[TAG_MEASURE]} score "
                   f"run(s) with {TAG_MEASURE} in {describe_store()}")
    if not reports and not any(keys.values()):
        click.echo(f"nothing to migrate in {describe_store()}")
