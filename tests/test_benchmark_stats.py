"""Benchmark statistics: the t-interval against a hand computation, the bootstrap, paired differences, the report."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from medcl.benchmark.report import markdown_table
from medcl.benchmark.stats import bootstrap_interval, mean_sd, paired_diff, t_interval


def test_t_interval_against_a_hand_computed_example():
    # differences over 3 seeds: 0.10, 0.08, 0.04 -> mean 0.22 / 3, deviations +0.08/3, +0.02/3, -0.10/3
    mean = 0.22 / 3
    sd = math.sqrt(((0.08 / 3) ** 2 + (0.02 / 3) ** 2 + (0.10 / 3) ** 2) / 2)  # = sqrt(0.0168 / 18)
    # t quantile p with 2 degrees of freedom in closed form: (2p - 1) * sqrt(2 / (4 p (1 - p))) (tables: 4.303)
    t975 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))
    assert t975 == pytest.approx(stats.t.ppf(0.975, 2), abs=1e-9) and t975 == pytest.approx(4.302653, abs=1e-6)
    half = t975 * sd / math.sqrt(3)
    assert half == pytest.approx(0.0758918, abs=1e-6)
    low, high = t_interval([0.10, 0.08, 0.04])
    assert low == pytest.approx(mean - half, abs=1e-12) and high == pytest.approx(mean + half, abs=1e-12)
    assert (low, high) == pytest.approx((-0.0025585, 0.1492251), abs=1e-6)
    # two seeds: t(0.975, 1) = 12.7062; differences 0.1, 0.2 -> 0.15 ± 12.7062 * 0.0707107 / sqrt(2)
    assert t_interval([0.1, 0.2]) == pytest.approx((0.15 - 12.706205 * 0.05, 0.15 + 12.706205 * 0.05), abs=1e-5)


def test_no_interval_from_one_seed():
    assert t_interval([0.3]) is None and t_interval([]) is None
    assert bootstrap_interval(np.array([[0.1, 0.2, 0.3]])) is None
    assert mean_sd([0.3]) == (0.3, 0.0)


def test_bootstrap_interval_is_seeded_and_resamples_seeds_and_cases():
    d = np.array([[0.1, 0.0, 0.2], [0.05, -0.05, 0.1]])
    a, b = bootstrap_interval(d), bootstrap_interval(d)
    assert a == b and a[0] < d.mean() < a[1]
    assert bootstrap_interval(d, seed=1) != a
    # a reference loop: rows then columns drawn from one generator, percentile 2.5 / 97.5
    rng = np.random.default_rng(0)
    means = []
    for _ in range(2000):
        rows, cols = rng.integers(0, 2, 2), rng.integers(0, 3, 3)
        means.append(np.mean([[d[r, c] for c in cols] for r in rows]))
    assert a == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])), abs=1e-12)
    assert bootstrap_interval(np.full((3, 4), 0.07)) == pytest.approx((0.07, 0.07))  # no spread, no width


def test_paired_diff_pairs_by_seed_and_counts_wins():
    method, control = {0: 0.60, 1: 0.70, 2: 0.65, 3: 0.9}, {0: 0.50, 1: 0.62, 2: 0.61}
    d = paired_diff(method, control)
    assert d.n == 3 and d.mean == pytest.approx(0.22 / 3) and d.wins == 3
    assert d.t_ci == pytest.approx(t_interval([0.10, 0.08, 0.04])) and d.bootstrap_ci is None  # no per-case Dice
    one = paired_diff({0: 0.4}, {0: 0.5})
    assert one.n == 1 and one.wins == 0 and one.t_ci is None and one.bootstrap_ci is None
    assert paired_diff({0: 0.4}, {1: 0.5}) is None
    cases_m = {s: {"a": 0.5 + s / 10, "b": 0.6} for s in (0, 1)}
    cases_c = {s: {"a": 0.5, "b": 0.5, "c": 0.1} for s in (0, 1)}  # "c" only scored for the control: left out
    d = paired_diff({0: 0.55, 1: 0.6}, {0: 0.5, 1: 0.5}, cases_m, cases_c)
    expected = bootstrap_interval(np.array([[0.0, 0.1], [0.1, 0.1]]))
    assert d.bootstrap_ci == pytest.approx(expected)


def _rows(seeds):
    out = []
    for m, dice in {"a": [0.5, 0.7, 0.6], "a_scratch": [0.4, 0.5, 0.55]}.items():
        for s in seeds:
            out.append(
                {
                    "method": m,
                    "backbone": "B",
                    "label_fraction": 0.1,
                    "seed": s,
                    "eval_split": "test",
                    "num_test": 2,
                    "mean_dice": dice[s],
                    "mean_dice_final": dice[s] - 0.1,
                    "case_dice": {"x": dice[s] - 0.05, "y": dice[s] + 0.05},
                    "case_dice_final": {"x": dice[s] - 0.15, "y": dice[s] - 0.05},
                }
            )
    return out


def test_report_gives_both_checkpoints_the_paired_difference_and_its_intervals():
    table = markdown_table(_rows([0, 1, 2]), {"a": "a_scratch", "a_scratch": None})
    assert "Mean Dice on the **test** split (2 cases" in table
    assert "| a | B | 10% | **0.600 ± 0.100 (3)** | 0.500 ± 0.100 (3) |" in table
    assert "| a_scratch | B | 10% | 0.483 ± 0.076 (3) | 0.383 ± 0.076 (3) |" in table
    low, high = t_interval([0.1, 0.2, 0.05])
    for ckpt in ("model.pt", "model_final.pt"):
        assert f"| a | a_scratch | 10% | {ckpt} | +0.117 | [{low:+.3f}, {high:+.3f}] | [" in table
    assert table.count("| 3/3 |") == 2


def test_report_with_one_seed_prints_no_interval():
    table = markdown_table(_rows([0]), {"a": "a_scratch", "a_scratch": None})
    assert "| a | a_scratch | 10% | model.pt | +0.100 | n/a (1 seed) | n/a (1 seed) | 1/1 |" in table
    assert "[" not in table.split("| model.pt | +0.100 |")[1].splitlines()[0]
