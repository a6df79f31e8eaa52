"""Statistics of the benchmark tables: mean ± sd over seeds, and paired differences to a control with 95 % intervals.

A method and its control are paired by seed (same split, same test set): the per-seed difference of their mean Dice
gives a t-interval over seeds, and the per-(seed, test case) differences a bootstrap interval that resamples seeds
and test cases. With one seed there is no interval: the functions return None and the tables print
``"n/a (1 seed)"``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PairedDiff", "bootstrap_interval", "mean_sd", "paired_diff", "t_interval"]

#: Bootstrap resamples and the seed of their generator (reports are reproducible).
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of ``values``."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Two-sided t-interval of the mean: ``mean ± t_{(1+level)/2, n-1} * sd / sqrt(n)``.

    Args:
        values: one value per seed (e.g. the paired differences method - control).
        level: confidence level.

    Returns:
        ``(low, high)``, or None for fewer than 2 values (no interval exists).
    """
    from scipy.stats import t

    n = len(values)
    if n < 2:
        return None
    mean, sd = mean_sd(values)
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def bootstrap_interval(
    diffs: np.ndarray,
    level: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of a seeds x cases matrix, resampling seeds and cases (crossed).

    Each resample draws ``S`` rows (seeds) and ``K`` columns (test cases) with replacement and takes the mean of the
    ``S x K`` sub-matrix (NaN entries, e.g. a case without a foreground class, are left out of that mean).

    Args:
        diffs: ``(S, K)`` array of paired differences per seed and test case.
        level: confidence level.
        resamples: number of bootstrap resamples.
        seed: seed of the resampling generator.

    Returns:
        ``(low, high)``, or None for fewer than 2 seeds or no case.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] < 2 or d.shape[1] < 1:
        return None
    rng = np.random.default_rng(seed)
    s, k = d.shape
    stats = np.empty(resamples)
    for b in range(resamples):
        rows, cols = rng.integers(0, s, s), rng.integers(0, k, k)
        stats[b] = np.nanmean(d[np.ix_(rows, cols)])
    alpha = (1.0 - level) / 2
    low, high = np.nanquantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)


@dataclass(frozen=True)
class PairedDiff:
    """A method vs its control over the seeds both ran.

    Attributes:
        n: number of paired seeds.
        mean: mean over seeds of (method - control) mean Dice.
        t_ci: 95 % t-interval over seeds, None with one seed.
        bootstrap_ci: 95 % bootstrap interval over test cases x seeds, None with one seed or without per-case Dice.
        wins: seeds where the method's Dice is higher than the control's.
    """

    n: int
    mean: float
    t_ci: tuple[float, float] | None
    bootstrap_ci: tuple[float, float] | None
    wins: int


def paired_diff(
    method: Mapping[int, float],
    control: Mapping[int, float],
    method_cases: Mapping[int, Mapping[str, float]] | None = None,
    control_cases: Mapping[int, Mapping[str, float]] | None = None,
) -> PairedDiff | None:
    """Paired difference of a method to its control over their common seeds.

    Args:
        method: seed -> the method's mean Dice.
        control: seed -> the control's mean Dice.
        method_cases: seed -> {test case -> Dice} of the method, for the bootstrap (optional).
        control_cases: the same for the control.

    Returns:
        a :class:`PairedDiff`, or None when no seed is common. The bootstrap uses the cases every common seed
        scored for both (the test set is the same for all seeds); without such cases its interval is None.
    """
    seeds = sorted(set(method) & set(control))
    if not seeds:
        return None
    diffs = [float(method[s]) - float(control[s]) for s in seeds]
    boot = None
    if method_cases and control_cases and all(s in method_cases and s in control_cases for s in seeds):
        cases = sorted(set.intersection(*(set(method_cases[s]) & set(control_cases[s]) for s in seeds)))
        if cases:
            matrix = np.array([[method_cases[s][c] - control_cases[s][c] for c in cases] for s in seeds], dtype=float)
            boot = bootstrap_interval(matrix)
    return PairedDiff(
        n=len(seeds),
        mean=statistics.fmean(diffs),
        t_ci=t_interval(diffs),
        bootstrap_ci=boot,
        wins=sum(d > 0 for d in diffs),
    )
