"""Intervals for small samples: the mean of a few seeds' results with its Student-t interval (the unit is the
seed; with 3 seeds the 95% interval is mean +- 4.30 standard errors, wide on purpose)."""

from __future__ import annotations

import math
import statistics


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


__all__ = ["mean_interval"]
