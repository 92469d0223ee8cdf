"""How sure a number is: t-intervals over seeds, paired differences, verdicts, seeds that would tell.

Every interval comes from scipy.stats (Student's t, since a handful of seeds is far from a normal
limit); nothing here is computed by hand that scipy computes. One seed has no spread, so it has no
interval: NaN here, printed as "1 seed: no interval", never a fake ± 0.

A difference between two operators is **resolved** when the 95% interval of the paired
differences (the same seeds on both sides, so the noise of initialisation and data order cancels)
excludes 0, and **unresolved** otherwise. For an unresolved one, `seeds_to_resolve` says how many
paired seeds a difference of the observed size, at the observed spread, needs to be resolved 4 times
in 5 (the power of the paired t-test, from the noncentral t distribution): the seed count at which
the interval would just exclude 0 resolves it only half the time.

Differences without spread (every pair differs by exactly as much: accuracies are counts over a test
set, so two or three seeds can tie) make a t-interval of no width. That is a spread of 0 estimated
from a handful of draws, not a certainty: such a difference is unresolved, and no seed count follows
from it (the spread it would need is unknown).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["LEVEL", "POWER", "MAX_SEEDS", "Interval", "t_interval", "PairedDifference", "paired_difference",
           "seeds_to_resolve", "seeds_to_bound"]

LEVEL = 0.95   # the confidence level of every interval in the reports
POWER = 0.80   # the chance of resolving a real difference that `seeds_to_resolve` plans for
MAX_SEEDS = 1000  # beyond this, "more than MAX_SEEDS": the difference is too small for its noise


@dataclass(frozen=True)
class Interval:
    """The mean of n values and its t-interval (low, high: NaN for fewer than 2 values)."""

    n: int
    mean: float
    std: float
    low: float
    high: float


def _clean(values) -> np.ndarray:
    array = np.asarray(list(values), dtype=float)
    return array[np.isfinite(array)]


def t_interval(values, level: float = LEVEL) -> Interval:
    """Mean and `level` confidence interval of the mean over independent values (e.g. seeds):
    scipy's t-interval with n - 1 degrees of freedom around the mean, scaled by the standard error."""
    x = _clean(values)
    n = len(x)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Interval(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    if std == 0.0:  # identical values: scipy returns NaN bounds; the interval is the point itself
        return Interval(n, mean, 0.0, mean, mean)
    low, high = stats.t.interval(level, n - 1, loc=mean, scale=stats.sem(x))
    return Interval(n, mean, std, float(low), float(high))


@dataclass(frozen=True)
class PairedDifference:
    """The paired differences (to - from) of one comparison and what they resolve."""

    interval: Interval
    p_value: float
    verdict: str             # "resolved" or "unresolved"
    seeds_needed: float      # paired seeds for POWER at LEVEL (NaN: resolved, or not estimable; inf: never)


def paired_difference(deltas, level: float = LEVEL, power: float = POWER) -> PairedDifference:
    """The mean paired difference, its t-interval (scipy's one-sample t-test on the differences),
    the verdict, and for an unresolved difference the seeds that would resolve it."""
    x = _clean(deltas)
    interval = t_interval(x, level)
    p_value = math.nan
    if interval.n >= 2 and interval.std > 0:
        test = stats.ttest_1samp(x, 0.0)
        ci = test.confidence_interval(level)
        interval = Interval(interval.n, interval.mean, interval.std, float(ci.low), float(ci.high))
        p_value = float(test.pvalue)
    # a zero-width interval excludes 0 for any nonzero mean: the data would "resolve" by a tie
    resolved = interval.n >= 2 and interval.std > 0 and (interval.low > 0 or interval.high < 0)
    needed = math.nan
    if not resolved and interval.n >= 2:
        needed = seeds_to_resolve(interval.mean, interval.std, level, power)
    return PairedDifference(interval, p_value, "resolved" if resolved else "unresolved", needed)


def seeds_to_resolve(mean: float, std: float, level: float = LEVEL, power: float = POWER,
                     max_seeds: int = MAX_SEEDS) -> float:
    """The fewest paired seeds n >= 2 at which a paired t-test at `level` detects a true difference
    `mean` with spread `std` with probability `power`; inf for a zero difference or beyond max_seeds;
    NaN without a spread (one observed as 0 says nothing of the spread the test would meet).

    The test statistic of n paired differences follows a noncentral t distribution with n - 1
    degrees of freedom and noncentrality mean / std * sqrt(n); power is its mass beyond the
    two-sided critical value.
    """
    if not (math.isfinite(mean) and math.isfinite(std)) or std <= 0:
        return math.nan
    if mean == 0:
        return math.inf
    effect = abs(mean) / std

    def power_at(n: int) -> float:
        df = n - 1
        critical = stats.t.ppf(0.5 + level / 2, df)
        noncentrality = effect * math.sqrt(n)
        upper = float(stats.nct.sf(critical, df, noncentrality))
        lower = float(stats.nct.cdf(-critical, df, noncentrality))  # the wrong-sign tail: NaN far out
        return (upper if math.isfinite(upper) else 1.0) + (lower if math.isfinite(lower) else 0.0)

    return _first_reaching(power_at, power, max_seeds)


def _first_reaching(power_at, power: float, max_seeds: int) -> float:
    """The fewest n in [2, max_seeds] with power_at(n) >= power (power grows with n), or inf."""
    if power_at(max_seeds) < power:
        return math.inf
    low, high = 2, max_seeds
    while low < high:
        mid = (low + high) // 2
        if power_at(mid) >= power:
            high = mid
        else:
            low = mid + 1
    return float(low)


def seeds_to_bound(mean: float, std: float, tolerance: float, level: float = LEVEL, power: float = POWER,
                   max_seeds: int = MAX_SEEDS) -> float:
    """The fewest paired seeds at which the `level` interval of a true difference `mean` with spread
    `std` settles "within +-tolerance" with probability `power`: the whole interval inside the band when
    |mean| < tolerance (an equivalence), or wholly outside it when |mean| > tolerance; inf when the
    mean sits on the band's edge or beyond max_seeds; NaN without a spread (as seeds_to_resolve).

    The interval is mean_hat +- h with h = t(n - 1) std / sqrt(n); mean_hat is taken as normal with
    standard error std / sqrt(n) (the spread as observed), so the chance is a difference of normal
    probabilities.
    """
    if not (math.isfinite(mean) and math.isfinite(std) and tolerance > 0) or std <= 0:
        return math.nan
    inside = abs(mean) < tolerance
    if abs(mean) == tolerance:
        return math.inf

    def power_at(n: int) -> float:
        se = std / math.sqrt(n)
        h = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
        if inside:
            if h >= tolerance:
                return 0.0
            return float(stats.norm.cdf((tolerance - h - mean) / se)
                         - stats.norm.cdf((h - tolerance - mean) / se))
        return float(stats.norm.cdf((mean - tolerance - h) / se)
                     + stats.norm.cdf((-tolerance - h - mean) / se))

    return _first_reaching(power_at, power, max_seeds)
