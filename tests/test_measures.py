"""The score matrix has one owner (`fsl_lsskd.bench.measures`): stable keys, the measures of a published benchmark,
and the run summary that filters them (a target with its own episode count no longer drops out of it)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from fsl_lsskd.bench.config import load_benchmark
from fsl_lsskd.bench.grid import expand
from fsl_lsskd.bench.measures import (BASE, CURVE, CURVE_FROM_MAIN, MAIN, Measure, bench_cell_key, cell_key,
                                      cell_key_of, measure_key_of, measures)
from fsl_lsskd.eval.scoring import ReadoutSpec, score_id, scoring_identity
from fsl_lsskd.protocol import EpisodeProtocol
from fsl_lsskd.record import TAG_CELL_KEY, TAG_IDENTITY, TAG_MEASURE, TAG_TARGET, ScoreRecord, TrainingRecord

REPO = Path(__file__).resolve().parent.parent
CPU_TINY = REPO / "benchmarks" / "cpu_tiny_imagenet.yaml"
PUBLISHED = REPO / "results" / "weights" / "cpu_tiny_imagenet" / "MANIFEST.json"


def test_measure_keys_are_stable_literals():
    """The keys are stored in the MLflow store (``fsl.measure``, ``fsl.cell_key``): a change of their format
    would orphan every stored score, so the format is pinned here."""
    protonet = Measure("tiny_imagenet", "test", EpisodeProtocol(5, 1, 15, 2000), ReadoutSpec.parse("protonet"), MAIN)
    assert protonet.key == "tiny_imagenet/test/5w1s15q_2000/protonet(n_aug_support=0,temperature=1.0)"
    assert protonet.label == "tiny_imagenet 5w1s15q protonet"
    aug = ReadoutSpec.parse({"readout": "logreg_batched", "n_aug_support": 5})
    assert Measure("cifar_fs", "test", EpisodeProtocol(5, 5, 6, 600, seed=3), aug, CURVE).key == \
        "cifar_fs/test/5w5s6q_600_seed3/logreg_batched(C=1.0,n_aug_support=5)"
    base = Measure("tiny_imagenet", "heldout", None, ReadoutSpec("heldout_base", (), "heldout_base"), BASE)
    assert base.key == "tiny_imagenet/heldout/base/heldout_base" and base.label == "base top-1 tiny_imagenet"
    # the kind is a part the score plays, not what it measures
    assert Measure("tiny_imagenet", "test", EpisodeProtocol(5, 1, 15, 2000), ReadoutSpec.parse("protonet"),
                   CURVE_FROM_MAIN).key == protonet.key
    # the cell key of the published ce-conv4-seed0 cell (its identity, data and teacher left out)
    entry = next(e for e in json.loads(PUBLISHED.read_text())["cells"] if e["stem"] == "ce-conv4-seed0")
    identity = json.loads(entry["tags"][TAG_IDENTITY])
    assert cell_key(identity) == "7d274608d6e48aaa"
    assert cell_key({**identity, "split_fingerprint": "another version of the data"}) == "7d274608d6e48aaa"
    assert cell_key({**identity, "seed": 1}) != "7d274608d6e48aaa"


def test_the_key_a_score_is_written_with_is_the_key_its_identity_gives():
    """A store written before the ``fsl.measure`` tag is read by the key derived from each score's identity: for
    every measure of a cell, the derived key equals the one the writer tags."""
    bench = load_benchmark(CPU_TINY)
    cell = next(c for c in expand(bench) if c.method == "maml")
    for m in measures(bench, cell):
        if m.kind == BASE:
            ident = {"format": 1, "train_id": "0" * 16, "readout": "heldout_base", "settings": {}}
        else:
            ident = scoring_identity("0" * 16, {"dataset": m.target, "split": m.split, "fingerprint": "f",
                                                "image_size": 32}, m.protocol, "sha", m.readout)
        untagged = ScoreRecord("run", score_id(ident), "0" * 16, {TAG_IDENTITY: json.dumps(ident),
                                                                  TAG_TARGET: m.target})
        assert measure_key_of(untagged) == m.key
        assert measure_key_of(ScoreRecord("run", "s", "t", {**untagged.tags, TAG_MEASURE: "tagged"})) == "tagged"
    training = TrainingRecord("run", "e", "t", {TAG_IDENTITY: json.dumps({"method": "ce"})}, {}, True)
    assert cell_key_of(training) == cell_key({"method": "ce"})
    assert cell_key_of(TrainingRecord("run", "e", "t", {**training.tags, TAG_CELL_KEY: "k"}, {}, True)) == "k"


def test_measures_of_cpu_tiny_imagenet():
    """The published CPU benchmark: per CE cell 14 columns (Tiny ImageNet 5-way 1/5-shot x 4 readouts, CIFAR-FS
    with 6 queries and Omniglot's 20 runs x 2 readouts each), 30 curve points (15 ways x shots on each target
    that has no fixed episodes; the CIFAR-FS ones are skipped by the writer, which cannot host 15 queries), 4 curve
    points a main score fills, and the base-class score."""
    bench = load_benchmark(CPU_TINY)
    cells = {c.method: c for c in expand(bench) if c.seed == 0}
    ce = measures(bench, cells["ce"])
    assert Counter(m.kind for m in ce) == {MAIN: 14, CURVE: 30, CURVE_FROM_MAIN: 4, BASE: 1}
    keys = [m.key for m in ce]
    assert len(set(keys)) == 45  # the curve points a main score fills share its key
    assert keys[:4] == [
        "tiny_imagenet/test/5w1s15q_2000/protonet(n_aug_support=0,temperature=1.0)",
        "tiny_imagenet/test/5w1s15q_2000/logreg_batched(C=1.0,n_aug_support=0)",
        "tiny_imagenet/test/5w1s15q_2000/logreg_batched(C=1.0,n_aug_support=5)",
        "tiny_imagenet/test/5w1s15q_2000/finetune(backbone_lr=0.001,batch_size=null,lr=0.01,max_episodes=200,"
        "momentum=0.9,n_aug_support=5,steps=100,temperature=1.0,weight_decay=0.001)"]
    assert keys[-1] == "tiny_imagenet/heldout/base/heldout_base"
    main = {(m.target, m.protocol.key, m.protocol.n_episodes, m.readout.label) for m in ce if m.kind == MAIN}
    assert ("omniglot_runs", "20w1s1q", 20, "protonet") in main and ("cifar_fs", "5w5s6q", 2000, "logreg_batched") \
        in main and not any(t == "omniglot_runs" and r.startswith("finetune") for t, _, _, r in main)
    assert {(m.target, m.protocol.key) for m in ce if m.kind == CURVE_FROM_MAIN} == {
        ("tiny_imagenet", "5w1s15q"), ("tiny_imagenet", "5w5s15q"), ("cifar_fs", "5w1s6q"), ("cifar_fs", "5w5s6q")}
    assert not any(m.target == "omniglot_runs" for m in ce if m.kind in (CURVE, CURVE_FROM_MAIN))
    maml = measures(bench, cells["maml"])
    assert Counter(m.kind for m in maml)[MAIN] == 12  # no RFS extras; MAML's own adaptation on Tiny ImageNet
    assert "tiny_imagenet/test/5w1s15q_2000/maml_finetune(inner_lr=null,max_episodes=500,steps=null)" in \
        [m.key for m in maml if m.kind == MAIN]
    # every score the published manifest holds for the cell that the benchmark still asks for is found by its key
    entry = next(e for e in json.loads(PUBLISHED.read_text())["cells"] if e["stem"] == "ce-conv4-seed0")
    stored = {measure_key_of(ScoreRecord(s["run_id"], s["score_id"], entry["train_id"], s["tags"]))
              for s in entry["scores"]}
    wanted = {m.key for m in ce if m.kind != CURVE or m.target == "tiny_imagenet"}  # CIFAR-FS hosts no curve
    assert wanted <= stored and len(stored - wanted) == 2  # logreg_batched(C=0.5), since dropped from the file
    assert bench_cell_key(bench, cells["ce"]) == cell_key(json.loads(entry["tags"][TAG_IDENTITY]))


def test_measures_module_imports_nothing_heavy():
    code = ("import sys, fsl_lsskd.bench.measures; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'mlflow'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


class _Scores:
    """A store holding the given score records of one training (what ``main_metrics`` reads)."""

    def __init__(self, records):
        self.records = records

    def scores(self, train_ids=None):
        return {r.score_id: r for r in self.records}


def test_the_run_summary_keeps_targets_with_their_own_episode_counts(tmp_path):
    """The run summary once told main scores from curve scores by the episode count: a target with its own
    ``n_episodes`` (CIFAR-FS at 600 here) and Omniglot's 20 fixed runs dropped out of it. It now lists every main
    and base measure it has a score of, and leaves curve points out."""
    from fsl_lsskd.bench.runner import main_metrics

    path = tmp_path / "summary.yaml"
    path.write_text(textwrap.dedent("""
        name: summary
        datasets: [tiny_imagenet]
        backbones: [conv4]
        methods: [ce]
        seeds: [0]
        eval:
          n_shot: [1]
          n_episodes: 2000
          readouts: [protonet]
          datasets: [tiny_imagenet, cifar_fs, omniglot_runs]
          targets: {cifar_fs: {n_query: 6, n_episodes: 600}}
          curves: {n_way: [5], n_shot: [1, 5], n_episodes: 600, readouts: [protonet]}
          base: true
    """))
    bench = load_benchmark(path)
    cell = expand(bench)[0]
    records = []
    for i, m in enumerate(measures(bench, cell)):  # the old writer's tags and identities, no fsl.measure
        if m.kind == CURVE_FROM_MAIN:
            continue
        if m.kind == BASE:
            ident = {"format": 1, "train_id": "t", "readout": "heldout_base", "settings": {}}
            tags = {"fsl.readout": "heldout_base", "fsl.label": "heldout_base", "fsl.protocol": "base"}
        else:
            ident = scoring_identity("t", {"dataset": m.target, "split": m.split, "fingerprint": "f",
                                           "image_size": 32}, m.protocol, "sha", m.readout)
            tags = {"fsl.readout": m.readout.name, "fsl.label": m.readout.label, "fsl.protocol": m.protocol.key}
        tags.update({TAG_TARGET: m.target, TAG_IDENTITY: json.dumps(ident)})
        records.append(ScoreRecord(f"run{i}", score_id(ident), "t", tags, {"accuracy": float(i)}, start_time=i))
    summary = main_metrics(_Scores(records), bench, cell, "t")
    assert sorted(summary) == ["base top-1 tiny_imagenet", "cifar_fs 5w1s6q protonet", "omniglot_runs 20w1s1q protonet",
                               "tiny_imagenet 5w1s15q protonet"]
    # the 2000-episode main score, not the 600-episode curve point of the same shape
    main = next(r for r in records if json.loads(r.tags[TAG_IDENTITY]).get("protocol", {}).get("n_episodes") == 2000)
    assert summary["tiny_imagenet 5w1s15q protonet"] == main.metrics["accuracy"]


@pytest.mark.parametrize("variant", ["override", "extra"])
def test_a_readout_or_target_override_changes_the_measures_only_where_it_applies(tmp_path, variant):
    """``eval.targets`` readouts replace a target's readouts; ``extra_readouts`` add to one row's."""
    path = tmp_path / "b.yaml"
    extra = ("targets: {cifar_fs: {readouts: [logreg_batched]}}" if variant == "override"
             else "extra_readouts: {pskd: [{readout: logreg_batched, C: 0.5}]}")
    path.write_text(textwrap.dedent(f"""
        name: b
        datasets: [tiny_imagenet]
        backbones: [conv4]
        methods: [ce, pskd]
        eval: {{n_shot: [1], readouts: [protonet], datasets: [tiny_imagenet, cifar_fs], {extra}}}
    """))
    bench = load_benchmark(path)
    got = {c.method: {(m.target, m.readout.label) for m in measures(bench, c)} for c in expand(bench)}
    if variant == "override":
        assert got["ce"] == got["pskd"] == {("tiny_imagenet", "protonet"), ("cifar_fs", "logreg_batched")}
    else:
        assert got["ce"] == {("tiny_imagenet", "protonet"), ("cifar_fs", "protonet")}
        assert got["pskd"] == got["ce"] | {("tiny_imagenet", "logreg_batched(C=0.5)"),
                                           ("cifar_fs", "logreg_batched(C=0.5)")}
