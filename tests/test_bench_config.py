"""Benchmark files, grid expansion, sharding, seed-aware statistics and table rendering (no training)."""
from pathlib import Path

import numpy as np
import pytest

from fsl_lsskd.bench.config import load_benchmark
from fsl_lsskd.bench.grid import expand, shard, training_config, with_teachers
from fsl_lsskd.report.stats import hierarchical_bootstrap
from fsl_lsskd.errors import ConfigError
from fsl_lsskd.eval.base import mean_ci
from fsl_lsskd.report.results import ResultSet, paired_vs, readout_effects, reference_readout, variant_effects
from fsl_lsskd.report.tables import render

REPO = Path(__file__).resolve().parent.parent

GOOD = """
name: t
datasets: [tiny_imagenet]
backbones: [conv4]
methods: [ce, lsskd]
seeds: [0, 1, 2]
train: {epochs: 2}
eval: {n_shot: [1, 5], n_episodes: 100}
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
    p = _write(tmp_path, GOOD.replace("eval: {n_shot: [1, 5], n_episodes: 100}", "eval: {shots: [1, 5]}"))
    with pytest.raises(ConfigError, match=r"renamed: use n_shot"):
        load_benchmark(p)


def test_missing_benchmark_file_names_the_ones_that_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"no benchmarks/ folder here: run from the repository root"):
        load_benchmark("cpu_tiny_imagenet")
    (tmp_path / "benchmarks").mkdir()
    _write(tmp_path / "benchmarks", GOOD, "cpu_tiny_imagenet.yaml")
    _write(tmp_path / "benchmarks", GOOD, "smoke.yaml")
    # the folder or the suffix left out: the file meant is named
    for given in ("cpu_tiny_imagenet", "cpu_tiny_imagenet.yaml", "benchmarks/cpu_tiny_imagenet"):
        with pytest.raises(ConfigError, match=r"did you mean benchmarks/cpu_tiny_imagenet\.yaml\?"):
            load_benchmark(given)
    with pytest.raises(ConfigError, match=r"not found; benchmark files here: benchmarks/cpu_tiny_imagenet\.yaml, "
                                          r"benchmarks/smoke\.yaml$"):
        load_benchmark("benchmarks/nope.yaml")


def test_wrong_type_is_an_error(tmp_path):
    p = _write(tmp_path, GOOD.replace("epochs: 2", "epochs: two"))
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer"):
        load_benchmark(p)


def test_grid_expansion_and_shards_partition(tmp_path):
    b = load_benchmark(_write(tmp_path, GOOD))
    cells = expand(b)
    assert len(cells) == 6 and len({c.key for c in cells}) == 6
    assert [c.key for c in expand(b)] == [c.key for c in cells]
    parts = [shard(cells, f"{i}/4") for i in range(1, 5)]
    assert sorted(map(str, (c.key for p in parts for c in p))) == sorted(map(str, (c.key for c in cells)))
    with pytest.raises(ConfigError):
        shard(cells, "5/4")


def test_one_function_from_cell_to_config(tmp_path):
    """Every training setting of the benchmark reaches the TrainConfig (and so the training identity)."""
    b = load_benchmark(_write(tmp_path, GOOD.replace("train: {epochs: 2}", "train: {epochs: 2, batch_size: 16, "
                                                     "heldout: 0.2, precision: bf16}") +
                              "method_overrides: {lsskd: {alpha_T: 0.5}}\nimage_size: 24\n"))
    cell = [c for c in expand(b) if c.row == "lsskd"][0]
    cfg = training_config(b, cell, tmp_path, data={})
    assert (cfg.epochs, cfg.batch_size, cfg.heldout, cfg.precision, cfg.image_size) == (2, 16, 0.2, "bf16", 24)
    assert dict(cfg.method_overrides) == {"alpha_T": 0.5} and cfg.seed == cell.seed


def test_filters_must_be_subsets(tmp_path):
    b = load_benchmark(_write(tmp_path, GOOD))
    assert b.with_filters(methods=["lsskd"]).methods == ("lsskd",)
    with pytest.raises(ConfigError, match="pskd"):
        b.with_filters(methods=["pskd"])


def test_variants_are_rows_with_settings(tmp_path):
    b = load_benchmark(_write(tmp_path, GOOD.replace("[ce, lsskd]", "[ce, lsskd, lsskd_dense]") +
                              "variants: {lsskd_dense: {method: lsskd, settings: {store_layout: dense}}}\n"))
    dense = [c for c in expand(b) if c.row == "lsskd_dense"][0]
    assert dense.method == "lsskd" and dict(dense.settings) == {"store_layout": "dense"}
    with pytest.raises(ConfigError, match="name of a registered method"):
        load_benchmark(_write(tmp_path, GOOD + "variants: {pskd: {method: lsskd}}\n", "v.yaml"))


def test_mean_ci_matches_hand_computation():
    x = np.array([0.2, 0.4, 0.6, 0.8])
    m, h = mean_ci(x)
    # t(0.975, 3) = 3.182446305; sd = 0.2581989; sem = 0.1290994
    assert m == pytest.approx(0.5)
    assert h == pytest.approx(3.182446305 * 0.2581988897 / 2, rel=1e-6)


def test_hierarchical_bootstrap_includes_seed_variation():
    rng = np.random.default_rng(0)
    episodes = rng.normal(0, 10, size=2000)
    same = np.stack([episodes, episodes, episodes])           # three identical training runs
    spread = np.stack([episodes - 3, episodes, episodes + 3])  # training runs disagree by 3 points
    lo_s, hi_s = hierarchical_bootstrap(same)
    lo_d, hi_d = hierarchical_bootstrap(spread)
    assert (hi_d - lo_d) > 3 * (hi_s - lo_s)  # the seed level widens the interval
    assert lo_s < episodes.mean() < hi_s and hierarchical_bootstrap(same) == (lo_s, hi_s)  # deterministic


def _col(shot=5):
    return ("tiny", "tiny", f"5w{shot}s15q", "protonet")


def test_render_bold_only_when_seed_aware_intervals_separate_and_pairs_against_ce():
    rs = ResultSet()
    rng = np.random.default_rng(0)
    base = rng.uniform(30, 70, size=200)
    for seed in (0, 1):
        rs.add(("ce", "conv4"), _col(), seed, {"accuracy": base})
        rs.add(("lsskd", "conv4"), _col(), seed, {"accuracy": base + 5})
    out = render(rs, {"ce": {"paper 5-shot": "72.0±0.6"}}, "caption")
    lsskd_line = [line for line in out["md"].splitlines() if line.startswith("| lsskd | conv4 | 2 |")][0]
    assert "**" in lsskd_line  # 5 points better on every seed: intervals separate
    diff = paired_vs(rs)[("lsskd", "conv4")][_col()]
    assert diff.mean == pytest.approx(5.0) and diff.verdict == 1 and diff.per_seed == pytest.approx({0: 5.0, 1: 5.0})
    assert "▲" in out["md"] and "seeds +5.00/+5.00" in out["md"]
    assert "published: paper 5-shot" in out["md"] and "72.0±0.6" in out["md"]
    csv = out["csv"].splitlines()
    assert csv[0].startswith("method,backbone") and csv[0].endswith("seed_std,seed_means")
    assert "\\textbf" in out["tex"] and "Paired difference to ce" in out["tex"]  # the .tex has the paired table


def test_no_bold_when_seeds_disagree_or_single_entry():
    rs = ResultSet()
    rng = np.random.default_rng(2)
    base = rng.uniform(30, 70, size=500)
    for seed, shift in ((0, -4.0), (1, 0.0), (2, 4.5)):  # seeds disagree by more than the gap between methods
        rs.add(("ce", "conv4"), _col(), seed, {"accuracy": base})
        rs.add(("lsskd", "conv4"), _col(), seed, {"accuracy": base + 1.0 + shift})
    rs.add(("pskd", "conv4"), _col(1), 0, {"accuracy": base})  # the only entry of its column
    md = render(rs, {}, "c")["md"]
    assert "**" not in md.split("Paired difference")[0].split("| method |", 1)[1]
    d = paired_vs(rs)[("lsskd", "conv4")][_col()]
    # "significant" over episodes (a tiny episode interval), not over training runs: the seed-level p decides
    assert abs(d.mean) > 10 * d.ci95 and d.p > 0.05 and d.verdict is None and d.word == "no evidence of a difference"


def test_paired_uses_only_shared_seeds():
    rs = ResultSet()
    rng = np.random.default_rng(1)
    per_seed = {s: rng.uniform(30, 70, size=100) for s in (0, 1, 2)}
    for s, acc in per_seed.items():
        rs.add(("ce", "conv4"), _col(1), s, {"accuracy": acc})
    rs.add(("byot", "conv4"), _col(1), 1, {"accuracy": per_seed[1] + 2})  # one seed: compared with ce's seed 1
    d = paired_vs(rs)[("byot", "conv4")][_col(1)]
    assert list(d.per_seed) == [1] and d.mean == pytest.approx(2.0)


def test_fractions_are_a_grid_dimension_and_teachers_see_the_full_data(tmp_path):
    plain = expand(load_benchmark(_write(tmp_path, GOOD)))
    limited = expand(load_benchmark(_write(tmp_path, GOOD + "fractions: [0.25, 0.5, 1.0]\n", "l.yaml")))
    assert len(limited) == 3 * len(plain)
    full = [c for c in limited if c.fraction == 1.0]
    assert [c.key for c in full] == [c.key for c in plain]  # the 100% cells are the plain grid's cells
    quarter = [c for c in limited if c.fraction == 0.25]
    assert quarter[0].data_label == "tiny_imagenet@25%" and "@25%" in quarter[0].label
    bench = load_benchmark(_write(tmp_path, GOOD.replace("[ce, lsskd]", "[kd, hsakd]") + "fractions: [0.5]\n",
                                  "k.yaml"))
    cells = expand(bench)
    assert {c.teacher.method for c in cells} == {"ce", "hsakd_teacher"}
    assert all(c.fraction == 0.5 and c.teacher.fraction == 1.0 and c.teacher.role == "teacher" for c in cells)
    same = load_benchmark(_write(tmp_path, GOOD.replace("[ce, lsskd]", "[kd]") + "fractions: [0.5]\n"
                                 "teachers: {kd: {method: ce, fraction: same}}\n", "s.yaml"))
    assert expand(same)[0].teacher.fraction == 0.5
    assert len(with_teachers(cells)) == len(cells) + 6  # one teacher per seed and method (ce, hsakd_teacher)
    with pytest.raises(ConfigError, match="fractions must be in"):
        load_benchmark(_write(tmp_path, GOOD + "fractions: [0.0, 1.5]\n", "bad.yaml"))


def test_filters_carry_per_row_seeds_along(tmp_path):
    """``--methods``/``--seeds`` on a file with ``method_seeds``: the filtered grid stays valid (a row filtered
    out loses its entry; a row keeps only the selected seeds) and expands to the file's cells of that selection."""
    from fsl_lsskd.bench.validate import validate_benchmark

    bench = load_benchmark(_write(tmp_path, GOOD.replace("[ce, lsskd]", "[ce, lsskd, pskd]")
                                  + "method_seeds: {lsskd: [0, 2]}\n"))
    ce_only = bench.with_filters(methods=["ce"])
    assert dict(ce_only.method_seeds) == {} and len(expand(ce_only)) == 3
    validate_benchmark(ce_only, data=False)  # before: "`method_seeds` names 'lsskd', which is not in `methods`"
    seed1 = bench.with_filters(seeds=[1])
    assert dict(seed1.method_seeds) == {"lsskd": ()} and {c.row for c in expand(seed1)} == {"ce", "pskd"}
    validate_benchmark(seed1, data=False)
    both = bench.with_filters(methods=["lsskd"], seeds=[2, 1])
    assert [(c.row, c.seed) for c in expand(both)] == [("lsskd", 2)]
    full = {c.key for c in expand(bench)}
    assert {c.key for c in expand(both)} <= full and {c.key for c in expand(seed1)} <= full


def test_readout_effects_pair_each_readout_with_its_reference_on_the_same_checkpoint():
    assert reference_readout("finetune") == "protonet"
    assert reference_readout("logreg_batched(n_aug_support=5)") == "logreg_batched"
    assert reference_readout("protonet") is None and reference_readout("logreg_batched") is None
    rs = ResultSet()
    rng = np.random.default_rng(3)
    acc = rng.uniform(30, 70, size=300)
    col = ("tiny", "tiny", "5w1s15q", "protonet")
    for seed in (0, 1):
        rs.add(("ce", "conv4"), col, seed, {"accuracy": acc})
        rs.add(("ce", "conv4"), col[:3] + ("finetune",), seed, {"accuracy": acc[:200] - 1.5})  # image-level: prefix
        rs.add(("ce", "conv4"), col[:3] + ("logreg_batched",), seed, {"accuracy": acc + 0.5})
        rs.add(("ce", "conv4"), col[:3] + ("logreg_batched(n_aug_support=5)",), seed, {"accuracy": acc + 2.5})
    eff = readout_effects(rs)[("ce", "conv4")]
    assert set(eff) == {col[:3] + ("finetune",), col[:3] + ("logreg_batched(n_aug_support=5)",)}
    assert eff[col[:3] + ("finetune",)].mean == pytest.approx(-1.5) and eff[col[:3] + ("finetune",)].verdict == -1
    assert eff[col[:3] + ("logreg_batched(n_aug_support=5)",)].mean == pytest.approx(2.0)
    out = render(rs, {}, "c")
    assert "Readout effects" in out["md"] and "tiny 5w1s15q finetune − protonet" in out["md"] and "-1.50" in out["md"]
    tex_rows = [x for x in out["tex"].split("Readout effects")[1].splitlines() if " & " in x]
    assert len(tex_rows) == 2 and all(x.endswith(" \\\\") for x in tex_rows)  # LaTeX rows are terminated


def test_variant_effects_pair_each_ablation_with_its_own_method():
    rs = ResultSet()
    rng = np.random.default_rng(5)
    acc, images = rng.uniform(30, 70, size=300), (rng.uniform(size=400) < 0.3).astype(float)
    flip = np.zeros(400)
    flip[:8] = 1.0 - images[:8]  # the variant gets 8 more held-out images right... where the method got them wrong
    gain = np.where(flip > 0, 1.0, images)
    for seed in (0, 1):
        rs.add(("ce", "conv4"), _col(1), seed, {"accuracy": acc + 3.0})
        rs.add(("pskd", "conv4"), _col(1), seed, {"accuracy": acc})
        rs.add(("pskd_topk", "conv4"), _col(1), seed, {"accuracy": acc - 0.5 + seed})
        rs.add_base(("pskd", "conv4"), "tiny", seed, {"accuracy": 100.0 * images})
        rs.add_base(("pskd_topk", "conv4"), "tiny", seed, {"accuracy": 100.0 * gain})
    rs.variant_of["pskd_topk"] = ("pskd", {"store_layout": "topk"})
    eff = variant_effects(rs)
    assert set(eff) == {("pskd_topk", "conv4")}  # ce is no variant; pskd is the variant's method
    d = eff[("pskd_topk", "conv4")]
    assert d[_col(1)].mean == pytest.approx(0.0) and d[_col(1)].per_seed == pytest.approx({0: -0.5, 1: 0.5})
    assert d[("tiny", "base", "top-1", "")].mean == pytest.approx(100.0 * (gain - images).mean())
    out = render(rs, {}, "c")
    line = [x for x in out["md"].splitlines() if x.startswith("| pskd_topk − pskd (store_layout: topk) | conv4 |")]
    assert len(line) == 1 and "seeds -0.50/+0.50" in line[0] and "tiny base top-1" in out["md"]
    assert "Variant effects" in out["tex"] and "−" not in out["tex"]  # a Unicode minus would break older LaTeX
    tex_rows = [x for x in out["tex"].splitlines() if " & " in x]
    assert tex_rows and all(x.endswith(" \\\\") for x in tex_rows)  # every LaTeX row is terminated
    rs.variant_of["pskd_topk"] = ("lsskd", {})  # its method has no row: nothing to pair with
    assert variant_effects(rs) == {} and "Variant effects" not in render(rs, {}, "c")["md"]


def test_caption_names_readouts_scored_on_fewer_episodes():
    from fsl_lsskd.bench.commands import fewer_episodes

    rs = ResultSet()
    for seed in (0, 1):
        rs.add(("ce", "conv4"), _col(1), seed, {"accuracy": np.full(300, 50.0)})
        rs.add(("ce", "conv4"), _col(1)[:3] + ("finetune",), seed, {"accuracy": np.full(200, 50.0)})
        rs.add(("ce", "conv4"), _col(1)[:3] + ("logreg_batched(n_aug_support=5)",), seed,
               {"accuracy": np.full(300, 50.0)})
        rs.add(("ce", "conv4"), ("tiny", "omniglot_runs", "20w1s1q", "protonet"), seed, {"accuracy": np.full(20, 9.0)})
    assert fewer_episodes(rs) == [("finetune", 200)]  # not the support augmentation, not another target's protocol


def test_curve_points_get_a_table_and_csv_rows():
    rs = ResultSet()
    rng = np.random.default_rng(4)
    for seed in (0, 1):
        rs.add(("ce", "conv4"), _col(1), seed, {"accuracy": rng.uniform(30, 70, size=50)})
        for shot, level in ((1, 40.0), (5, 60.0)):
            rs.add_curve(("ce", "conv4"), ("tiny", "tiny", 10, shot, "protonet"), seed,
                         {"accuracy": np.full(100, level + seed)})
    out = render(rs, {}, "c")
    assert "tiny, 10-way, protonet:" in out["md"] and "| 1-shot | 5-shot |" in out["md"]
    assert "| ce | conv4 | 40.50" in out["md"] and "60.50" in out["md"]
    rows = [line for line in out["csv"].splitlines() if line.startswith("ce,conv4,tiny,tiny,10,")]
    assert len(rows) == 2 and rows[0].split(",")[5:9] == ["1", "protonet", "2", "40.5000"]


@pytest.mark.parametrize("curve_first", [True, False])
def test_curve_point_prefers_its_own_episodes_whatever_the_order(curve_first):
    """A 5-way 1-shot curve point has two candidates: the curve's 600 published episodes and the main protocol's
    2,000. The curve's always win, so seeds never mix the two sets (the table depended on store order before)."""
    rs = ResultSet()
    row, point = ("ce", "conv4"), ("tiny", "tiny", 5, 1, "protonet")
    main, curve = {"accuracy": np.full(2000, 50.0)}, {"accuracy": np.full(600, 40.0)}
    for seed in (0, 1):
        calls = [(curve, True), (main, False)] if curve_first else [(main, False), (curve, True)]
        for arrays, own in calls:
            rs.add_curve(row, point, seed, arrays, curve_episodes=own)
    assert rs.curve_points[row][point].stacked().shape == (2, 600)
    rs.add_curve(row, ("tiny", "tiny", 5, 5, "protonet"), 0, main, curve_episodes=False)  # no curve score: main fills
    assert rs.curve_points[row][("tiny", "tiny", 5, 5, "protonet")].stacked().shape == (1, 2000)


def test_fractions_figure_leaves_a_gap_where_a_row_has_no_cell(tmp_path, monkeypatch):
    """A method trained at 25 % and 100 % only gets two points, not a line (and band) through 50 and 75 %; each
    legend entry says how many training seeds its points have."""
    import math

    from matplotlib.axes import Axes

    from fsl_lsskd.report import figures

    rs = ResultSet()
    for frac in ("@25%", "@50%", "@75%", ""):
        for seed in (0, 1, 2):
            rs.add(("ce", "conv4"), (f"tiny{frac}", "tiny", "5w1s15q", "protonet"), seed, {"accuracy": np.full(50, 40.0)})
    for frac, seeds in (("@25%", (0, 1, 2)), ("", (0,))):
        for seed in seeds:
            rs.add(("pskd", "conv4"), (f"tiny{frac}", "tiny", "5w1s15q", "protonet"), seed, {"accuracy": np.full(50, 39.0)})
    for frac in ("@25%", ""):
        rs.add(("lsskd", "conv4"), (f"tiny{frac}", "tiny", "5w1s15q", "protonet"), 0, {"accuracy": np.full(50, 41.0)})
    # a student trained at one fraction and its teacher at another are points, not dropped for having one each
    rs.add(("hsakd", "conv4"), ("tiny@25%", "tiny", "5w1s15q", "protonet"), 0, {"accuracy": np.full(50, 45.0)})
    rs.add(("hsakd_teacher", "conv4"), ("tiny", "tiny", "5w1s15q", "protonet"), 0, {"accuracy": np.full(50, 47.0)})
    rs.teacher_rows.add(("hsakd_teacher", "conv4"))
    lines = {}
    real_plot = Axes.plot

    def plot(self, x, y, *args, **kwargs):
        lines[kwargs.get("label")] = (list(x), list(y))
        return real_plot(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", plot)
    written = []
    figures._fractions(rs, tmp_path / "grid", written)
    assert [p.suffix for p in written] == [".png", ".pdf"]
    assert lines["ce, 3 seeds"][0] == [25.0, 50.0, 75.0, 100.0] and lines["ce, 3 seeds"][1] == [40.0] * 4
    assert lines["pskd, 1–3 seeds"][1][0] == 39.0  # fewer seeds at some fraction: the legend says so
    ys = lines["lsskd, 1 seed"][1]
    assert ys[0] == 41.0 and ys[3] == 41.0 and math.isnan(ys[1]) and math.isnan(ys[2])
    assert lines["hsakd, 1 seed"][1][0] == 45.0 and all(math.isnan(y) for y in lines["hsakd, 1 seed"][1][1:])
    teacher = lines["hsakd_teacher (teacher), 1 seed"][1]
    assert teacher[3] == 47.0 and all(math.isnan(y) for y in teacher[:3])


def test_fractions_figure_needs_more_than_one_fraction(tmp_path):
    """A grid trained on full data only (every point at 100 %) gets no fractions figure."""
    from fsl_lsskd.report import figures

    rs = ResultSet()
    for method in ("ce", "pskd"):
        rs.add((method, "conv4"), ("tiny", "tiny", "5w1s15q", "protonet"), 0, {"accuracy": np.full(50, 40.0)})
    written = []
    figures._fractions(rs, tmp_path / "grid", written)
    assert written == []


def test_fractions_figure_panels_do_not_depend_on_the_order_results_load(tmp_path, monkeypatch):
    """Panels are sorted (base-class top-1 first, then way, shot, query, readout), whatever order the rows and
    columns were added in: the figure's bytes were once different on every rebuild of the published files."""
    from matplotlib.axes import Axes

    from fsl_lsskd.report import figures

    cols = [("tiny", "tiny", "5w5s15q", "protonet"), ("tiny", "tiny", "5w1s15q", "protonet"),
            ("tiny", "tiny", "20w1s15q", "logreg"), ("tiny", "tiny", "5w1s15q", "logreg")]

    def results(order):
        rs = ResultSet()
        for method in order:
            for col in (cols if method == "ce" else cols[::-1]):
                for frac in ("@25%", ""):
                    rs.add((method, "conv4"), (f"tiny{frac}",) + col[1:], 0, {"accuracy": np.full(10, 40.0)})
                    rs.add_base((method, "conv4"), f"tiny{frac}", 0, {"accuracy": np.full(10, 50.0)})
        return rs

    titles = []
    real = Axes.set_title

    def set_title(self, label, *args, **kwargs):
        titles.append(label)
        return real(self, label, *args, **kwargs)

    monkeypatch.setattr(Axes, "set_title", set_title)
    seen = []
    for i, order in enumerate((["ce", "pskd"], ["pskd", "ce"])):
        titles.clear()
        written = []
        figures._fractions(results(order), tmp_path / f"grid{i}", written)
        seen.append((list(titles), [p.read_bytes() for p in written if p.suffix == ".png"]))
    assert seen[0][0] == ["base-class top-1 (held-out images)", "5-way 1-shot logreg", "5-way 1-shot protonet",
                          "5-way 5-shot protonet", "20-way 1-shot logreg"]
    assert seen[0] == seen[1]


def test_difference_captions_say_when_a_difference_rests_on_one_seed():
    """With one shared seed a difference is not decided: the caption says so, and only then."""
    rng = np.random.default_rng(7)

    def results(pskd_seeds):
        rs = ResultSet()
        for seed in (0, 1):
            rs.add(("ce", "conv4"), _col(1), seed, {"accuracy": rng.uniform(30, 70, size=40)})
        for seed in pskd_seeds:
            rs.add(("pskd", "conv4"), _col(1), seed, {"accuracy": rng.uniform(30, 70, size=40)})
        return rs

    caveat = "A difference on one training seed has no interval over seeds"
    one = render(results((0,)), {}, "c", baselines=("ce",))
    assert one["md"].count(caveat) == 1 and one["tex"].count(caveat) == 1
    two = render(results((0, 1)), {}, "c", baselines=("ce",))
    assert "Paired difference to `ce`" in two["md"] and caveat not in two["md"] and caveat not in two["tex"]


def test_interval_bound_that_excludes_zero_never_reads_as_zero():
    """A seed-level interval [-1.60, -0.004] is significant (▼); printed to 2 decimals it read [-1.60, -0.00]."""
    from fsl_lsskd.report.stats import SeedInterval
    from fsl_lsskd.report.results import Paired
    from fsl_lsskd.report.tables import _interval, _signed

    assert _signed(-0.004) == "-0.004" and _signed(0.0031) == "+0.003" and _signed(-4e-5) == "-4e-05"
    assert _signed(0.0) == "+0.00" and _signed(-1.6) == "-1.60" and _signed(0.005) == "+0.01"
    d = Paired(mean=-0.8, ci95=0.3, seed=SeedInterval(-0.8, -1.6, -0.004, 2, 0.1, 0.01, (-0.7, -0.9)),
               per_seed={0: -0.7, 1: -0.9})
    assert _interval(d) == "[-1.60, -0.004]" and d.verdict == -1


def test_accuracy_captions_say_when_a_cell_rests_on_one_seed():
    """A one-seed cell has no "(seeds ± …)" part and is never bold: the main and base captions say so (Markdown
    and LaTeX), and only when some cell has one seed."""
    rng = np.random.default_rng(3)

    def results(pskd_seeds):
        rs = ResultSet()
        for method, seeds in (("ce", (0, 1)), ("pskd", pskd_seeds)):
            for seed in seeds:
                rs.add((method, "conv4"), _col(1), seed, {"accuracy": rng.uniform(30, 70, size=40)})
                rs.add_base((method, "conv4"), "tiny", seed, {"accuracy": 100.0 * rng.integers(0, 2, size=60)})
        return rs

    note = "rests on one training seed: it has no interval over seeds and is never bold"
    one = render(results((0,)), {}, "c", baselines=())
    assert one["md"].count(note) == 2 and one["tex"].count(note) == 2  # accuracy table and base table
    assert "(seeds ±" in one["md"]                                      # ce still shows its seed interval
    two = render(results((0, 1)), {}, "c", baselines=())
    assert note not in two["md"] and note not in two["tex"]


def test_accuracy_caption_names_each_rows_seeds_where_they_differ():
    """A row with fewer seeds in some columns (LSSKD: 3 seeds at 25 %, 1 elsewhere) is named with those columns."""
    rng = np.random.default_rng(5)
    full, few = ("tiny", "tiny", "5w1s15q", "protonet"), ("tiny@25%", "tiny", "5w1s15q", "protonet")

    def results(lsskd_full_seeds):
        rs = ResultSet()
        for col in (full, few):
            for seed in (0, 1, 2):
                rs.add(("ce", "conv4"), col, seed, {"accuracy": rng.uniform(30, 70, size=40)})
        for col, seeds in ((few, (0, 1, 2)), (full, lsskd_full_seeds)):
            for seed in seeds:
                rs.add(("lsskd", "conv4"), col, seed, {"accuracy": rng.uniform(30, 70, size=40)})
        return rs

    one = render(results((0,)), {}, "c", baselines=())
    sentence = "Training seeds per row: ce 3; lsskd 1 (3 at tiny@25% 5w1s15q protonet)."
    assert sentence not in one["md"]  # ties go to the larger count: lsskd has one column of each
    assert "Training seeds per row: ce 3; lsskd 3 (1 at tiny 5w1s15q protonet)." in one["md"]
    assert "Training seeds per row" in one["tex"]
    same = render(results((0, 1, 2)), {}, "c", baselines=())
    assert "Training seeds per row" not in same["md"] and "Training seeds per row" not in same["tex"]


def test_figures_in_worker_processes_are_the_same_files_in_the_same_order(tmp_path):
    """`fsl-bench table` draws its figures in forked workers while it writes the tables: the files and the list
    of written paths are exactly those of drawing them in the process, and a worker's error reaches the caller."""
    from fsl_lsskd.report import figures

    rs = ResultSet()
    rng = np.random.default_rng(0)
    for method in ("ce", "pskd", "lsskd"):
        for seed in (0, 1, 2):
            for frac in ("@50%", ""):
                for proto in ("5w1s15q", "5w5s15q"):
                    rs.add((method, "conv4"), (f"tiny{frac}", "tiny", proto, "protonet"), seed,
                           {"accuracy": rng.uniform(30, 60, 40)})
    serial = figures.write_figures(rs, tmp_path / "a" / "grid", workers=1)
    parallel = figures.write_figures(rs, tmp_path / "b" / "grid", workers=2)
    assert len(serial) >= 4 and [p.name for p in serial] == [p.name for p in parallel]
    for a, b in zip(serial, parallel):
        assert a.read_bytes() == b.read_bytes(), a.name
    (tmp_path / "a file").write_text("")
    job = figures.start_figures(rs, tmp_path / "a file" / "grid", workers=2)  # the workers cannot write there
    with pytest.raises(OSError):
        job.wait()


def _signal_probe(name):
    """Stands in for a figure in a forked figure worker: which handlers the worker runs with."""
    import signal
    from pathlib import Path

    ignores_int = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    dies_on_term = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    return [Path(f"{name} int-ignored={ignores_int} term-default={dies_on_term}")]


def _mask_probe_init():
    """Stands in for the figure workers' initializer: records which signals are blocked when a worker starts."""
    import os
    import signal

    from fsl_lsskd.report import figures

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with open(os.environ["FSL_TEST_MASK_FILE"], "a") as fh:
        fh.write(f"{int(signal.SIGINT in blocked)}{int(signal.SIGTERM in blocked)}\n")
    figures._real_worker_init()


def test_figure_workers_start_with_interrupts_blocked(tmp_path, monkeypatch):
    """Between the fork and the worker's initializer a worker still has the CLI's handlers; a Ctrl-C there
    would make a copy of `table` run on. So the workers are forked with SIGINT and SIGTERM blocked, and the
    parent's mask is restored after."""
    import signal

    from fsl_lsskd.report import figures

    mask_file = tmp_path / "masks.txt"
    monkeypatch.setenv("FSL_TEST_MASK_FILE", str(mask_file))
    monkeypatch.setattr(figures, "_real_worker_init", figures._worker_init, raising=False)
    monkeypatch.setattr(figures, "_worker_init", _mask_probe_init)
    rs = ResultSet()
    rs.add(("ce", "conv4"), ("tiny", "tiny", "5w1s15q", "protonet"), 0, {"accuracy": np.full(40, 45.0)})
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    figures.start_figures(rs, tmp_path / "grid", workers=2).wait()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    assert mask_file.read_text().split() == ["11", "11"]


def test_figure_workers_leave_interrupts_to_table_and_end_quietly(tmp_path, capfd, monkeypatch):
    """The CLI turns SIGTERM and Ctrl-C into exceptions; forked figure workers must not inherit that: they ignore
    SIGINT (the parent, which gets it too, cancels them) and die on SIGTERM (the pool's terminate), so an
    interrupted `table` prints no worker tracebacks and no worker hangs on the pool's queue lock."""
    import multiprocessing
    import signal

    from fsl_lsskd.errors import Terminated
    from fsl_lsskd.report import figures

    def raise_terminated(signum, frame):
        raise Terminated()

    rs = ResultSet()
    for method in ("ce", "pskd"):
        for seed in (0, 1):
            rs.add((method, "conv4"), ("tiny", "tiny", "5w1s15q", "protonet"), seed, {"accuracy": np.full(40, 45.0)})
    previous = signal.signal(signal.SIGTERM, raise_terminated)  # as fsl_lsskd.cli installs it
    try:
        with monkeypatch.context() as m:
            m.setattr(figures, "_render", _signal_probe)
            probed = figures.start_figures(rs, tmp_path / "probe", workers=2).wait()
        assert [p.name for p in probed] == [f"{n} int-ignored=True term-default=True" for n in figures._FIGURES]
        job = figures.start_figures(rs, tmp_path / "grid", workers=2)
        job.cancel()
    finally:
        signal.signal(signal.SIGTERM, previous)
    job.cancel()  # a second Ctrl-C runs it again: harmless
    assert multiprocessing.active_children() == []
    assert "Traceback" not in capfd.readouterr().err


def test_table_files_are_replaced_all_together_or_not_at_all(tmp_path, monkeypatch):
    """`fsl-bench table` stages every file and moves them into place at the end: a run that fails (or is
    interrupted) while drawing leaves the previous files exactly as they were, and no staging folder."""
    from fsl_lsskd.report import figures
    from fsl_lsskd.report.files import write_tables

    def results(acc):
        rs = ResultSet()
        for method in ("ce", "pskd"):
            for seed in (0, 1):
                rs.add((method, "conv4"), ("tiny", "tiny", "5w1s15q", "protonet"), seed,
                       {"accuracy": np.full(40, acc + seed)})
        return rs

    out = tmp_path / "results"
    first = write_tables(results(40.0), {}, "caption", out / "grid", workers=1)
    assert first and all(p.parent == out for p in first)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(name):
        raise RuntimeError("disk full while drawing")

    monkeypatch.setattr(figures, "_render", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_tables(results(50.0), {}, "caption", out / "grid", workers=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old set, whole; no staging folder


def _slow_render(name):
    import time

    time.sleep(60)
    return []


def test_a_killed_figure_worker_is_an_error_and_cancel_reaps_every_worker(tmp_path, monkeypatch):
    """A worker that dies without reporting (OOM killer, kill -9) makes wait() raise instead of waiting
    forever, and the others are killed and reaped; cancel() of busy workers returns at once, twice over."""
    import multiprocessing
    import os
    import signal

    from fsl_lsskd.report import figures

    monkeypatch.setattr(figures, "_render", _slow_render)
    rs = ResultSet()
    rs.add(("ce", "conv4"), ("tiny", "tiny", "5w1s15q", "protonet"), 0, {"accuracy": np.full(40, 45.0)})
    job = figures.start_figures(rs, tmp_path / "grid", workers=2)
    os.kill(job._procs[0].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="ended without reporting"):
        job.wait()
    assert multiprocessing.active_children() == []
    busy = figures.start_figures(rs, tmp_path / "grid", workers=2)
    busy.cancel()
    busy.cancel()
    assert multiprocessing.active_children() == []
