"""The read contract (`fsl_lsskd.record.ResultStore`): a small grid read through the MLflow store and through its
published files gives the same ResultSet, with and without the key tags in the manifest; the writer tags every
training run with its cell key and every score run with its measure key, and names score runs for people."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from fsl_lsskd.cli import main

#: the grid of tests/data/keys_store_v2.zip (tests/test_migrate.py): main, curve, curve-from-main and base
#: measures, a target with its own episode count and readouts, a student with its teacher
BENCH = (Path(__file__).resolve().parent / "data" / "keys_v2.yaml").read_text()


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def flat(results) -> dict:
    """Everything a ResultSet holds, as one comparable mapping (arrays as lists)."""
    out = {}
    for name in ("cells", "base", "curve_points"):
        for row, by in getattr(results, name).items():
            for col, series in by.items():
                for seed, arrays in series.per_seed.items():
                    for k, a in arrays.items():
                        out[(name, row, col, seed, k)] = np.asarray(a).tolist()
    out["curves"] = results.curves
    out["teacher_rows"] = results.teacher_rows
    out["variant_of"] = results.variant_of
    out["meta"] = results.meta
    out["episode_classes"] = {k: np.asarray(v).tolist() for k, v in results.episode_classes.items()}
    return out


def test_mlflow_and_published_stores_give_the_same_results(tmp_path):
    from fsl_lsskd.report.collect import collect
    from fsl_lsskd.bench.config import load_benchmark
    from fsl_lsskd.bench.grid import expand, with_teachers
    from fsl_lsskd.bench.measures import CURVE, bench_cell_key, measures
    from fsl_lsskd.report.publish import PublishedStore
    from fsl_lsskd.record import (KIND_SCORE, KIND_TRAIN, TAG_CELL_KEY, TAG_KIND, TAG_MEASURE, TAG_TRAIN_ID,
                                  ResultStore, open_store)

    bench_path = tmp_path / "keys_v2.yaml"
    bench_path.write_text(BENCH)
    res = cli("run", bench_path, "--out", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    output = res.output
    bench = load_benchmark(bench_path)
    store = open_store(create=False)
    # the writer's tags: a cell key on every training run, a measure key on every score run
    cells = with_teachers(expand(bench))
    keys = {bench_cell_key(bench, c) for c in cells}
    runs = store._search(f"tags.`{TAG_KIND}` = '{KIND_TRAIN}'")
    assert len(runs) == 2 and {r.data.tags[TAG_CELL_KEY] for r in runs} == keys
    scores = store._search(f"tags.`{TAG_KIND}` = '{KIND_SCORE}'")
    wanted = {m.key for m in measures(bench, cells[0])}
    assert {r.data.tags[TAG_MEASURE] for r in scores} == wanted  # both test splits host every protocol
    # score runs are named for people: row, seed, readout, protocol, target
    ce_tid = next(r.data.tags[TAG_TRAIN_ID] for r in runs if r.data.tags["fsl.method"] == "ce")
    names = {r.info.run_name for r in scores if r.data.tags[TAG_TRAIN_ID] == ce_tid}
    assert {"ce seed0 protonet 5w1s3q tiny_imagenet", "ce seed0 protonet 5w2s3q tiny_imagenet",
            "ce seed0 heldout_base base tiny_imagenet", "ce seed0 protonet 5w1s3q cifar_fs"} <= names
    assert len([m for m in measures(bench, cells[0]) if m.kind == CURVE]) == 4
    # the run summary names the target with its own episode count (15) too
    ce_line = next(line for line in output.splitlines() if line.startswith("ce/conv4"))
    assert "cifar_fs 5w1s3q protonet=" in ce_line and "base top-1 tiny_imagenet=" in ce_line, output

    assert cli("publish", bench_path, "--out", tmp_path / "pub").exit_code == 0
    manifest_path = tmp_path / "pub" / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    assert all(TAG_CELL_KEY in e["tags"] and all(TAG_MEASURE in s["tags"] for s in e["scores"])
               for e in manifest["cells"])
    published = PublishedStore(tmp_path / "pub")
    assert isinstance(store, ResultStore) and isinstance(published, ResultStore)
    from_store = collect(bench, store)
    assert len(from_store.cells) == 2 and from_store.base and from_store.curve_points and from_store.curves
    assert flat(collect(bench, published)) == flat(from_store)
    # a manifest published before the key tags existed (results/weights/*) reads the same: keys from identities
    for e in manifest["cells"]:
        del e["tags"][TAG_CELL_KEY]
        for s in e["scores"]:
            del s["tags"][TAG_MEASURE]
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    assert flat(collect(bench, PublishedStore(tmp_path / "pub"))) == flat(from_store)
    # the published training curves are the store's
    ce = next(e for e in manifest["cells"] if e["method"] == "ce")
    assert published.metric_history(ce["run_id"], "train_loss") == store.metric_history(ce["run_id"], "train_loss")
    assert published.latest_fingerprints("fsl-bench/keys_v2") == {}
    assert set(store.latest_fingerprints("fsl-bench/keys_v2")) == {"tiny_imagenet"}

    # the same through the CLI: `table` from the store and `table --from-results` write the same files
    assert cli("table", bench_path, "--out", tmp_path / "a").exit_code == 0
    res = cli("table", bench_path, "--out", tmp_path / "b", "--from-results", tmp_path / "pub")
    assert res.exit_code == 0, res.output
    written = sorted(p for ext in ("csv", "md", "tex") for p in (tmp_path / "a").glob(f"*.{ext}"))
    assert len(written) >= 5
    for a in written:
        skip = 0 if a.suffix == ".csv" else 1  # the provenance line
        assert a.read_text().splitlines()[skip:] == (tmp_path / "b" / a.name).read_text().splitlines()[skip:], a.name
