"""Intervals for the numbers the toolkit reports, each at 95% unless asked otherwise:

* ``mean_interval``: the mean of a few seeds' results with its Student-t interval (the unit is the seed; with 3
  seeds the interval is mean +- 4.30 standard errors, wide on purpose);
* ``wilson_interval``: a proportion (an accuracy over n samples), Wilson's score interval, which stays inside
  [0, 1] and keeps its coverage at 0/n and n/n, where the normal interval collapses to a point;
* ``bootstrap_ratio_interval``: a ratio of sums over units (perplexity = exp(summed NLL / summed tokens) over
  documents; an acceptance rate over prompts), the percentile interval of resampled units (seeded);
* ``median_interval``: the median of a few repeats (a timing) with its distribution-free order-statistic
  interval, and the coverage that interval really has (5 repeats: min..max, 93.75%).
"""

from __future__ import annotations

import math
import statistics

import numpy as np

Z95 = 1.959964  # the standard normal's 97.5% quantile


def mean_interval(values, level: float = 0.95) -> tuple[float, list[float] | None]:
    """(mean, [lo, hi]) of ``values``: the Student-t interval of the mean at ``level`` (``None`` for one value)."""
    from scipy.stats import t

    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_interval: no values")
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, None
    half = float(t.ppf(0.5 + level / 2, len(xs) - 1)) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, [m - half, m + half]


def wilson_interval(successes, n, z=1.959964) -> tuple[float, float]:
    """Wilson's score interval of ``successes`` out of ``n`` (Wilson 1927; Brown, Cai & DasGupta 2001):
    centre (p + z^2/2n) / (1 + z^2/n), half-width z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2)."""
    if not n >= 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n and n >= 1, got {successes}/{n}")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # at 0/n and n/n one end is exactly 0 or 1 (the formula gives it up to rounding)
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def bootstrap_draws(n_units: int, resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, n_units) unit indices drawn with replacement (seeded: the same draws on every rank)."""
    return np.random.default_rng(seed).integers(0, n_units, size=(resamples, n_units))


def resampled_ratios(num, den, draws: np.ndarray) -> np.ndarray:
    """``num``, ``den``: (..., n_units) per-unit totals; returns (resamples, ...) ratios of the resampled sums
    (0 where a resample's denominator is 0)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    n_sum = num[..., draws].sum(-1)  # (..., resamples)
    d_sum = den[..., draws].sum(-1)
    r = np.divide(n_sum, d_sum, out=np.zeros_like(n_sum), where=d_sum > 0)
    return np.moveaxis(r, -1, 0)


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The central ``level`` interval of ``samples`` along axis 0."""
    a = (1.0 - level) / 2
    return np.quantile(samples, a, axis=0), np.quantile(samples, 1.0 - a, axis=0)


def bootstrap_ratio_interval(num, den, resamples: int = 1000, seed: int = 0, level: float = 0.95,
                             transform=None) -> tuple[float, float]:
    """Percentile bootstrap interval of ``transform(sum(num) / sum(den))`` over units resampled with their
    numerator and denominator together (perplexity: per-document NLL sums and token counts, ``transform=np.exp``;
    a plain mean: ``den`` all ones). ``transform`` is applied to every resample before the percentiles."""
    if len(num) != len(den) or not len(num):
        raise ValueError(f"bootstrap_ratio_interval: need equal, non-empty num and den, got {len(num)}, {len(den)}")
    if resamples < 1:
        raise ValueError(f"bootstrap_ratio_interval: resamples = {resamples} must be >= 1")
    r = resampled_ratios(num, den, bootstrap_draws(len(num), resamples, seed))
    lo, hi = percentile_interval(transform(r) if transform is not None else r, level)
    return float(lo), float(hi)


def median_interval(values, level: float = 0.95) -> tuple[float, list[float] | None, float | None]:
    """(median, [lo, hi], coverage): the order statistics x_(j) and x_(n+1-j) of ``values`` with the largest j
    whose coverage of the population median, 1 - 2 P(B <= j - 1) for B ~ Binomial(n, 1/2), is at least
    ``level``; with too few values for ``level`` (n < 6 at 95%) min..max and the coverage it has. One value:
    no interval."""
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("median_interval: no values")
    n, med = len(xs), statistics.median(xs)
    if n < 2:
        return med, None, None

    def coverage(j):  # P(x_(j) <= median <= x_(n+1-j))
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(j)) / 2.0 ** n

    j = 1
    while j + 1 <= n // 2 and coverage(j + 1) >= level:
        j += 1
    return med, [xs[j - 1], xs[n - j]], coverage(j)


__all__ = ["Z95", "bootstrap_draws", "bootstrap_ratio_interval", "mean_interval", "median_interval",
           "percentile_interval", "resampled_ratios", "wilson_interval"]
