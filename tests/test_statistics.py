"""Inference at the right unit, with known answers: the seed-level t-interval and the test-class interval cover
the truth about 95% of the time on simulated seeds and classes drawn from a known distribution; the intervals
they replace do not. Verdict words, one seed, and the headline table (no training)."""
from __future__ import annotations

import numpy as np
import pytest

from fsl_lsskd.report.stats import (BETTER, NO_EVIDENCE, NOT_DECIDED, WORSE, class_interval, hierarchical_bootstrap,
                                   hierarchical_bootstrap_sum, t_interval, verdict)
from fsl_lsskd.report.results import ResultSet, paired
from fsl_lsskd.report.tables import headline


def test_t_interval_known_values_and_one_seed():
    iv = t_interval([1.0, 2.0, 3.0])  # t_{0.975, 2} = 4.3027; s = 1
    assert iv.mean == 2.0 and iv.n == 3 and iv.half == pytest.approx(4.302653 / np.sqrt(3), rel=1e-6)
    assert verdict(iv) == NO_EVIDENCE
    assert verdict(t_interval([1.0, 1.2, 0.9])) == BETTER and verdict(t_interval([-1.0, -1.2, -0.9])) == WORSE
    one = t_interval([5.0])
    assert one.n == 1 and not one.decided and np.isnan(one.lo) and verdict(one) == NOT_DECIDED
    # a bound that is 0 up to float error decides nothing
    assert verdict(t_interval([1e-17, 2e-17, 3e-17])) == NO_EVIDENCE
    with pytest.raises(ValueError):
        t_interval([])


@pytest.mark.parametrize("n_seeds", [3, 5])
def test_seed_t_interval_covers_the_truth_95_percent_and_a_bootstrap_over_few_seeds_does_not(n_seeds):
    """Per-seed means drawn from N(mu, sigma): the t-interval (df = seeds - 1) covers mu about 95% of the time;
    the percentile bootstrap over the same 3 or 5 values, which the tables used before, covers it far less."""
    rng = np.random.default_rng(2024)
    mu, sigma, sims = 1.0, 0.8, 2000
    t_hits = boot_hits = 0
    for i in range(sims):
        x = rng.normal(mu, sigma, n_seeds)
        iv = t_interval(x)
        t_hits += iv.lo <= mu <= iv.hi
        if i < 400:  # the bootstrap is slower; 400 draws tell it apart
            lo, hi = hierarchical_bootstrap(x[:, None], n_boot=400, seed=i)
            boot_hits += lo <= mu <= hi
    assert 0.935 <= t_hits / sims <= 0.965, t_hits / sims
    assert boot_hits / 400 < 0.88, boot_hits / 400


def _simulate(rng, n_classes, n_episodes, n_way, mu, tau, sigma):
    alpha = rng.normal(0.0, tau, n_classes)  # class levels drawn from a known distribution (truth: mean mu)
    classes = np.stack([rng.choice(n_classes, n_way, replace=False) for _ in range(n_episodes)])
    y = mu + alpha[classes].mean(1) + rng.normal(0.0, sigma, n_episodes)
    return y, classes


@pytest.mark.parametrize("tau,sigma,n_classes,n_episodes", [(12.0, 10.0, 24, 400), (4.0, 8.0, 40, 2000)])
def test_class_interval_covers_the_population_mean_95_percent_and_the_episode_interval_does_not(tau, sigma, n_classes,
                                                                                               n_episodes):
    """Episodes drawn from a few classes, each class's level drawn from N(0, tau): the truth is the mean of the
    class *distribution*. The test-class interval covers it about 95% of the time; the episode t-interval, which
    treats episodes as independent draws, covers it far less. (400 simulations: the standard error of a coverage
    near 0.95 is 0.011.)"""
    from fsl_lsskd.eval.base import mean_ci

    rng = np.random.default_rng(7)
    mu, sims = 50.0, 400
    hits = ep_hits = 0
    for _ in range(sims):
        y, classes = _simulate(rng, n_classes, n_episodes, 5, mu, tau, sigma)
        lo, hi = class_interval(y, classes)
        hits += lo <= mu <= hi
        m, h = mean_ci(y)
        ep_hits += m - h <= mu <= m + h
    assert 0.92 <= hits / sims <= 0.98, hits / sims
    assert ep_hits / sims < 0.8, ep_hits / sims


def test_class_interval_without_a_class_effect_is_about_the_episode_interval():
    """No class effect at all: the interval is about the episode interval (the estimation noise of each class's
    level is taken out), not wider."""
    from fsl_lsskd.eval.base import mean_ci

    rng = np.random.default_rng(3)
    y, classes = _simulate(rng, 40, 2000, 5, 0.0, 0.0, 10.0)
    lo, hi = class_interval(y, classes)
    _, h = mean_ci(y)
    assert 0.95 * h <= (hi - lo) / 2 <= 1.4 * h


def test_class_interval_with_disjoint_classes_is_the_interval_over_runs():
    """Omniglot's 20 runs each have their own 20 characters: no class occurs twice, so the runs are the clusters
    and the interval is the t-interval over them."""
    from fsl_lsskd.eval.base import mean_ci

    y = np.arange(20, dtype=float)
    lo, hi = class_interval(y, np.arange(400).reshape(20, 20))
    m, h = mean_ci(y)
    assert (lo, hi) == pytest.approx((m - h, m + h))
    with pytest.raises(ValueError):
        class_interval(np.zeros(5), np.zeros((3, 5)))


def _results(seeds_by_method, n_episodes=300, n_classes=20, effect=None):
    rng = np.random.default_rng(11)
    classes = np.stack([rng.choice(n_classes, 5, replace=False) for _ in range(n_episodes)])
    level = rng.normal(50, 8, n_classes)[classes].mean(1)
    rs = ResultSet()
    for method, seeds in seeds_by_method.items():
        for seed in seeds:
            shift = (effect or {}).get(method, 0.0) + rng.normal(0, 0.3)
            for shot in (1, 5):
                acc = level + 10 * (shot == 5) + shift + rng.normal(0, 6, n_episodes)
                rs.add((method, "conv4"), ("tiny", "tiny", f"5w{shot}s15q", "protonet"), seed, {"accuracy": acc})
    rs.episode_classes[("tiny", "5w1s15q")] = classes
    rs.episode_classes[("tiny", "5w5s15q")] = classes
    return rs


def test_headline_table_verdicts_and_one_seed():
    rs = _results({"ce": (0, 1, 2, 3, 4), "lsskd": (0, 1, 2, 3, 4), "pskd": (0, 1, 2), "maml": (0,)},
                  effect={"lsskd": 3.0, "maml": -20.0})
    out = headline(rs, "caption.", baseline="ce")
    blocks = out["md"].split("**5-way ")
    assert [b.split("**")[0] for b in blocks[1:]] == ["1-shot", "5-shot"]
    rows = [line for line in out["md"].splitlines() if line.startswith("| ")]
    head = "| method | seeds | accuracy | ± classes | Δ vs ce | ± classes | verdict |"
    assert rows.count(head) == 2 and len(rows) == 2 * (1 + 4) and len(head.split("|")) - 2 <= 8
    assert max(len(line) for line in out["md"].splitlines() if line.startswith("|")) <= 100
    one_shot = [r for r in blocks[1].splitlines() if r.startswith("| ") and r != head]
    five_shot = [r for r in blocks[2].splitlines() if r.startswith("| ") and r != head]
    by = {(r.split("|")[1].strip(), k): r for k, rs_ in (("1", one_shot), ("5", five_shot)) for r in rs_}
    assert by[("ce", "1")].endswith("| baseline |") and by[("ce", "1")].startswith("| ce | 5 |")
    assert by[("lsskd", "1")].endswith("| better |")
    assert by[("maml", "5")].endswith("| 1 seed: not decided |") and "[" not in by[("maml", "5")]
    d = paired(rs.cells[("lsskd", "conv4")][("tiny", "tiny", "5w1s15q", "protonet")],
               rs.cells[("ce", "conv4")][("tiny", "tiny", "5w1s15q", "protonet")])
    assert f"[{d.lo:+.2f}, {d.hi:+.2f}]" in by[("lsskd", "1")]
    # the verdict sentences are the table's numbers, and say no more than their interval
    assert f"95% interval over 5 training seeds [{d.lo:+.2f}, {d.hi:+.2f}]: **better**" in out["verdicts"]
    assert "**maml vs ce**, 5-way 1-shot ProtoNet (tiny):" in out["verdicts"]
    assert "on one training seed: not decided" in out["verdicts"]
    csv = out["csv"].splitlines()
    assert csv[0].startswith("method,backbone,train_data,n_way,n_shot,readout,seeds,") and len(csv) == 9
    assert "\\toprule" in out["tex"] and "\\bottomrule" in out["tex"]


def test_headline_pskd_example_from_the_issue_reads_no_evidence():
    """The issue's example: 3 seeds whose differences are -0.23 on average with a seed-level t-interval
    [-0.65, +0.20] must read 'no evidence of a difference', not ▼."""
    from fsl_lsskd.report.results import Paired

    d = Paired(mean=-0.23, ci95=0.2, seed=t_interval([-0.05, -0.41, -0.23]), per_seed={0: -0.05, 1: -0.41, 2: -0.23})
    assert d.seed.lo < 0 < d.seed.hi and d.word == NO_EVIDENCE and d.verdict is None


def test_vectorised_ece_bootstrap_draws_the_numbers_of_the_loop_it_replaced():
    """:func:`hierarchical_bootstrap_sum` (item counts times the data, per chunk of draws) gives the interval of the
    per-draw loop (copy the resampled items, sum them), from the same random numbers in the same order: the ECE
    intervals in the published tables did not move (up to float rounding of the sums)."""
    from fsl_lsskd.eval.calibration import ece_from_bins
    from fsl_lsskd.report.results import Series
    from fsl_lsskd.report.stats import hierarchical_bootstrap_sum

    def loop(x, stat, n_boot, seed=0):
        rng = np.random.default_rng(seed)
        S, E = x.shape[:2]
        vals = np.empty(n_boot)
        for b in range(n_boot):
            s = rng.integers(0, S, size=S)
            i = rng.integers(0, E, size=(S, E))
            vals[b] = stat(x[s[:, None], i].reshape((S * E,) + x.shape[2:]))
        return np.percentile(vals, 2.5), np.percentile(vals, 97.5)

    rng = np.random.default_rng(4)
    for S, E in ((3, 300), (1, 50), (5, 7), (2, 1)):
        rel = rng.integers(0, 4, size=(S, E, 16, 3)).astype(float)
        rel[..., 1] *= rng.uniform(0.2, 1.0, size=(S, E, 16))
        want = loop(rel, lambda r: 100.0 * ece_from_bins(r.sum(0)), 500)
        series = Series()
        for s in range(S):
            series.put(s, {"reliability": rel[s]})
        assert series.ece()[1:] == pytest.approx(want, abs=1e-9)
        # a chunk boundary inside the draws changes nothing
        x = rng.normal(size=(S, E))
        assert hierarchical_bootstrap_sum(x, lambda v: v, n_boot=250, chunk=7) == pytest.approx(
            loop(x, np.sum, 250), abs=1e-9)
    with pytest.raises(ValueError, match="n_seeds, n_items"):
        hierarchical_bootstrap_sum(np.zeros(3), lambda v: v)


def test_series_statistics_are_computed_once_and_forgotten_on_a_new_seed():
    from fsl_lsskd.report.results import Series

    s = Series()
    s.put(0, {"accuracy": np.array([40.0, 60.0])})
    first = s.summary()
    assert s.summary() is first  # kept, not recomputed
    s.put(1, {"accuracy": np.array([70.0, 90.0])})
    assert s.summary()[0] == pytest.approx(65.0) and s.summary() is not first


def test_class_interval_is_not_estimable_when_every_episode_holds_the_same_classes():
    """5 test classes and 5-way episodes: every episode holds all of them, so the class levels are confounded
    and their spread cannot be estimated. The interval is (nan, nan), not the narrower episode interval."""
    rng = np.random.default_rng(0)
    classes = np.tile(np.arange(5), (400, 1))
    lo, hi = class_interval(rng.normal(50, 10, 400), classes)
    assert np.isnan(lo) and np.isnan(hi)
    # one more class makes them estimable again (each 5-way episode leaves one of the 6 out)
    six = np.array([np.delete(np.arange(6), i % 6) for i in range(400)])
    lo, hi = class_interval(rng.normal(50, 10, 400), six)
    assert np.isfinite(lo) and np.isfinite(hi) and lo < 50 < hi


def test_hierarchical_bootstrap_sum_gives_the_same_interval_with_and_without_its_draw_cache(monkeypatch):
    """The draws of a shape are cached (they do not depend on the data): a second array of the same shape, and
    the same array with the cache switched off, give exactly the intervals of fresh draws."""
    from fsl_lsskd.report import stats

    def ece_like(s):
        return np.abs(s[..., 1] - s[..., 2]).sum(-1) / np.maximum(s[..., 0].sum(-1), 1)

    x = np.random.default_rng(3).random((3, 300, 15, 3))
    cached = [hierarchical_bootstrap_sum(x, ece_like), hierarchical_bootstrap_sum(2 * x, ece_like)]
    monkeypatch.setattr(stats, "COUNTS_CACHE_BYTES", 0)
    stats._cached_bootstrap_counts.cache_clear()
    assert [hierarchical_bootstrap_sum(x, ece_like), hierarchical_bootstrap_sum(2 * x, ece_like)] == cached
    assert stats._cached_bootstrap_counts.cache_info().currsize == 0
