"""Benchmark files, grid expansion, sharding and table rendering (no training involved)."""
from pathlib import Path

import numpy as np
import pytest

from fsl_lsskd.bench.config import load_benchmark
from fsl_lsskd.bench.grid import expand, shard
from fsl_lsskd.bench.tables import ResultSet, mean_ci, paired_vs, render
from fsl_lsskd.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

GOOD = """
name: t
datasets: [tiny_imagenet]
backbones: [conv4]
methods: [ce, lsskd]
seeds: [0, 1, 2]
train: {epochs: 2}
eval: {shots: [1, 5], episodes: 100}
"""


def _write(tmp_path, text, name="b.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_every_shipped_benchmark_parses():
    files = sorted((REPO / "benchmarks").glob("*.yaml"))
    assert files, "benchmarks/*.yaml missing"
    for f in files:
        b = load_benchmark(f)
        assert expand(b)


def test_unknown_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, GOOD + "trian: {epochs: 3}\n")
    with pytest.raises(ConfigError, match=r"b\.yaml.*unknown key 'trian'"):
        load_benchmark(p)
    p = _write(tmp_path, GOOD.replace("train: {epochs: 2}", "train: {epochz: 2}"))
    with pytest.raises(ConfigError, match=r"train: unknown key 'epochz'"):
        load_benchmark(p)


def test_wrong_type_is_an_error(tmp_path):
    p = _write(tmp_path, GOOD.replace("epochs: 2", "epochs: two"))
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer"):
        load_benchmark(p)


def test_grid_ids_are_content_derived_and_shards_partition(tmp_path):
    b = load_benchmark(_write(tmp_path, GOOD))
    cells = expand(b)
    assert len(cells) == 6
    assert len({c.id for c in cells}) == 6
    # the same content gives the same ids; a changed budget changes them
    assert [c.id for c in expand(b)] == [c.id for c in cells]
    b2 = load_benchmark(_write(tmp_path, GOOD.replace("epochs: 2", "epochs: 3"), "d.yaml"))
    assert not {c.id for c in expand(b2)} & {c.id for c in cells}
    parts = [shard(cells, f"{i}/4") for i in range(1, 5)]
    assert sorted(c.id for p in parts for c in p) == sorted(c.id for c in cells)
    with pytest.raises(ConfigError):
        shard(cells, "5/4")


def test_filters_must_be_subsets(tmp_path):
    b = load_benchmark(_write(tmp_path, GOOD))
    assert b.with_filters(methods=["lsskd"]).methods == ("lsskd",)
    with pytest.raises(ConfigError, match="pskd"):
        b.with_filters(methods=["pskd"])


def test_mean_ci_matches_hand_computation():
    x = np.array([0.2, 0.4, 0.6, 0.8])
    m, h = mean_ci(x)
    # t(0.975, 3) = 3.182446305; sd = 0.2581989; sem = 0.1290994
    assert m == pytest.approx(0.5)
    assert h == pytest.approx(3.182446305 * 0.2581988897 / 2, rel=1e-6)


def test_render_bolds_best_and_pairs_against_ce():
    rs = ResultSet()
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.7, size=200)
    for seed in (0, 1):
        rs.add(("ce", "conv4"), ("tiny", 5, "protonet"), seed, base)
        rs.add(("lsskd", "conv4"), ("tiny", 5, "protonet"), seed, base + 0.05)
    out = render(rs, {"ce": {"paper 5-shot": "72.0±0.6"}}, "caption")
    assert "**55" in out["md"] or "**5" in out["md"]
    lsskd_line = [l for l in out["md"].splitlines() if l.startswith("| lsskd | conv4 | 2 |")][0]
    assert "**" in lsskd_line
    diff = paired_vs(rs)[("lsskd", "conv4")][("tiny", 5, "protonet")]
    assert diff.mean == pytest.approx(5.0) and diff.p < 1e-6
    assert diff.per_seed == pytest.approx({0: 5.0, 1: 5.0})
    assert "p<1e-16; seeds +5.00/+5.00" in out["md"]
    assert "published: paper 5-shot" in out["md"] and "72.0±0.6" in out["md"]
    csv = out["csv"].splitlines()
    assert csv[0].startswith("method,backbone") and csv[0].endswith("seed_std,seed_means")
    assert csv[1].split(",")[-2] == "0.0000"  # identical seeds: no spread
    assert "Spread across training seeds" in out["md"]
    assert "\\textbf" in out["tex"]


def test_fractions_are_a_grid_dimension_and_keep_full_data_ids(tmp_path):
    plain = expand(load_benchmark(_write(tmp_path, GOOD)))
    limited = expand(load_benchmark(_write(tmp_path, GOOD + "fractions: [0.25, 0.5, 1.0]\n", "l.yaml")))
    assert len(limited) == 3 * len(plain)
    assert len({c.id for c in limited}) == len(limited)
    full = [c for c in limited if c.fraction == 1.0]
    # the 100% cells are the cells of the plain grid (same payload -> same id), so results are shared
    assert [c.id for c in full] == [c.id for c in plain]
    quarter = [c for c in limited if c.fraction == 0.25]
    assert {c.settings()["train"]["fraction"] for c in quarter} == {0.25}
    assert quarter[0].data_label == "tiny_imagenet@25%" and full[0].data_label == "tiny_imagenet"
    assert "@25%" in quarter[0].label


def test_teacher_follows_the_fraction_and_bad_fractions_are_rejected(tmp_path):
    bench = load_benchmark(_write(tmp_path, GOOD.replace("[ce, lsskd]", "[kd]") + "fractions: [0.5]\n"))
    (cell, *_) = expand(bench)
    assert cell.teacher.method == "ce" and cell.teacher.fraction == 0.5 and cell.teacher.role == "teacher"
    with pytest.raises(ConfigError, match="fractions must be in"):
        load_benchmark(_write(tmp_path, GOOD + "fractions: [0.0, 1.5]\n", "bad.yaml"))


def test_paired_uses_only_shared_seeds():
    rs = ResultSet()
    rng = np.random.default_rng(1)
    col = ("tiny", 1, "protonet")
    per_seed = {s: rng.uniform(0.3, 0.7, size=100) for s in (0, 1, 2)}
    for s, acc in per_seed.items():
        rs.add(("ce", "conv4"), col, s, acc)
    rs.add(("byot", "conv4"), col, 1, per_seed[1] + 0.02)  # one seed only: compared with ce's seed 1 alone
    d = paired_vs(rs)[("byot", "conv4")][col]
    assert list(d.per_seed) == [1] and d.mean == pytest.approx(2.0)
    md = render(rs, {}, "c")["md"]
    assert "| byot | conv4 | – |" in md  # no seed spread from a single seed
