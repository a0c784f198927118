"""The multi-machine path on a real database: a throw-away PostgreSQL cluster (initdb in a temporary directory,
loopback and a unix socket only), `mlflow server` on it with proxied artifacts, and three shards of a grid
running at once against it. Every cell must run exactly once and every metric and artifact must arrive.

Runs when PostgreSQL's server binaries (initdb, postgres) are on PATH or in /usr/lib/postgresql/*/bin;
skipped otherwise. Everything started here is stopped by its process id."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fsl_lsskd.data.fake import write_fake_cifar100

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import mlflow_server, postgres_binaries, postgres_cluster  # noqa: E402
from test_runner import cli, write_bench  # noqa: E402

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(postgres_binaries() is None,
                       reason="PostgreSQL server binaries (initdb, postgres) not found on PATH or in "
                              "/usr/lib/postgresql/*/bin; install postgresql to run this test"),
]


def test_three_shards_through_mlflow_on_postgresql(tmp_path, monkeypatch):
    pytest.importorskip("psycopg2", reason="psycopg2 (PostgreSQL driver of MLflow's server) is not installed")
    from fsl_lsskd.record import open_store

    archive = write_fake_cifar100(tmp_path, per_class_train=6, per_class_test=2, seed=3)
    monkeypatch.chdir(tmp_path)
    with postgres_cluster(tmp_path) as db_uri, mlflow_server(tmp_path, db_uri) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        bench = write_bench(tmp_path / "grid.yaml", archive, methods=("ce", "pskd"), seeds=(0, 1, 2), epochs=1,
                            heldout=0.25, readouts="[protonet, logreg_batched], base: true")
        procs = [subprocess.Popen([sys.executable, "-m", "fsl_lsskd.cli", "run", str(bench), "--shard", f"{i}/3",
                                   "--out", str(tmp_path / f"runs{i}")], cwd=tmp_path, env=dict(os.environ),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (1, 2, 3)]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-2000:] for o in outs)
        # a second round, all shards at once without --shard: nothing is trained again
        procs = [subprocess.Popen([sys.executable, "-m", "fsl_lsskd.cli", "run", str(bench), "--out",
                                   str(tmp_path / "again")], cwd=tmp_path, env=dict(os.environ),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert all("0 trained, 0 resumed, 0 re-scored, 6 reused" in o for o in outs), outs
        st = open_store(create=False)
        trains = st._search("tags.`fsl.kind` = 'train'")
        assert len(trains) == 6 and len({r.data.tags["fsl.train_id"] for r in trains}) == 6
        assert all(r.data.tags.get("fsl.status") == "complete" and r.info.status == "FINISHED" for r in trains)
        for r in trains:
            assert r.data.metrics.get("train_loss") is not None
            names = {a.path for a in st.client.list_artifacts(r.info.run_id)}
            assert {"model", "export"} <= names, names
        scores = st.scores()
        assert len(scores) == 6 * (2 + 1)  # 2 readouts of the 1-shot protocol + base classes, per cell
        for rec in scores.values():
            arrays = st.score_arrays(rec, {})
            assert rec.metrics["accuracy"] == pytest.approx(arrays["accuracy"].mean(), abs=1e-6)
        res = cli("table", bench, "--out", tmp_path / "results")
        assert res.exit_code == 0 and "Cells found: 6/6" in res.output, res.output
        assert not (tmp_path / "mlruns").exists()  # artifacts went through the server, not a local folder
