"""rad_ds/core/intervals.py against oracles that share nothing with it: Wilson's interval written out here
from the closed formula and scipy's binomtest; the bootstrap on cases whose answer is known (equal documents,
a seeded rerun) and on a simulation whose true ratio is known (coverage); the median's order-statistic
interval against scipy's binomial distribution."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rad_ds.core.intervals import bootstrap_ratio_interval, median_interval, wilson_interval


def _wilson_by_hand(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    # Wilson (1927): the p0 solving |k/n - p0| = z sqrt(p0 (1 - p0) / n), i.e. the roots of the quadratic
    # (1 + z^2/n) p0^2 - (2k/n + z^2/n) p0 + (k/n)^2 = 0
    p = k / n
    a, b, c = 1 + z * z / n, -(2 * p + z * z / n), p * p
    d = math.sqrt(b * b - 4 * a * c)
    return (-b - d) / (2 * a), (-b + d) / (2 * a)


@pytest.mark.parametrize("k, n", [(8, 10), (0, 10), (10, 10), (1, 3), (37, 120)])
def test_wilson_against_the_quadratic_and_scipy(k, n):
    from scipy.stats import binomtest

    lo, hi = wilson_interval(k, n)
    hand = _wilson_by_hand(k, n)
    assert lo == pytest.approx(hand[0], abs=1e-12) and hi == pytest.approx(hand[1], abs=1e-12)
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert lo == pytest.approx(ci.low, abs=1e-6) and hi == pytest.approx(ci.high, abs=1e-6)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_known_values_and_ends():
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook 8/10 case
    lo, hi = wilson_interval(0, 10)
    z2 = 1.959964 ** 2
    assert lo == 0.0 and hi == pytest.approx(z2 / (10 + z2), abs=1e-12)  # 0/n: [0, z^2 / (n + z^2)]
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / (10 + z2), abs=1e-12)
    assert wilson_interval(8, 10, z=1.0)[1] - wilson_interval(8, 10, z=1.0)[0] < hi - lo  # z sets the width
    for bad in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError, match="wilson_interval"):
            wilson_interval(*bad)


def test_bootstrap_of_equal_documents_has_zero_width():
    # every document has the same NLL per token (1.5 nats), whatever its length: every resample gives 1.5
    tokens = [10, 40, 7, 33]
    lo, hi = bootstrap_ratio_interval([1.5 * t for t in tokens], tokens, resamples=500, seed=3, transform=np.exp)
    assert lo == pytest.approx(math.exp(1.5), rel=1e-12) and hi == pytest.approx(math.exp(1.5), rel=1e-12)


def test_bootstrap_is_seeded_and_contains_the_point():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 60, size=30)
    nll = tokens * rng.uniform(1.0, 3.0, size=30)
    a = bootstrap_ratio_interval(nll, tokens, resamples=400, seed=11, transform=np.exp)
    assert a == bootstrap_ratio_interval(nll, tokens, resamples=400, seed=11, transform=np.exp)
    assert a != bootstrap_ratio_interval(nll, tokens, resamples=400, seed=12, transform=np.exp)
    point = math.exp(nll.sum() / tokens.sum())
    assert a[0] < point < a[1]
    ratio_lo, ratio_hi = bootstrap_ratio_interval(nll, tokens, resamples=400, seed=11)  # exp is monotone
    assert a == pytest.approx((math.exp(ratio_lo), math.exp(ratio_hi)), rel=1e-3)


def test_bootstrap_resamples_documents_with_their_token_counts():
    """Two documents, 1 nat/token over 10 tokens and 3 nats/token over 100: a resample is {0,0} (ratio 1, p=1/4),
    {1,1} (3, p=1/4) or one of each (310/110, p=1/2), so the central 40% is 310/110 exactly; averaging the
    per-document ratios instead would give 2."""
    lo, hi = bootstrap_ratio_interval([10.0, 300.0], [10, 100], resamples=2000, seed=0, level=0.4)
    assert lo == pytest.approx(310 / 110) and hi == pytest.approx(310 / 110)
    assert bootstrap_ratio_interval([10.0, 300.0], [10, 100], resamples=2000, seed=0) == (1.0, 3.0)


def test_bootstrap_coverage_on_a_simulated_corpus():
    """Documents of 20..200 tokens whose per-token NLL is Exponential(mean 2): the true NLL per token is 2.
    Over 400 simulated corpora of 50 documents the 95% interval must hold 2 about 95% of the time."""
    rng = np.random.default_rng(2024)
    hits, trials = 0, 400
    for t in range(trials):
        tokens = rng.integers(20, 201, size=50)
        nll = rng.gamma(shape=tokens, scale=2.0)  # a sum of `tokens` Exponential(2) draws
        lo, hi = bootstrap_ratio_interval(nll, tokens, resamples=300, seed=t)
        hits += lo <= 2.0 <= hi
    assert 0.90 <= hits / trials <= 0.99, hits / trials


def test_median_interval_order_statistics():
    from scipy.stats import binom

    med, ci, cov = median_interval([3.0, 9.0, 1.0, 7.0, 5.0])
    assert med == 5.0 and ci == [1.0, 9.0] and cov == pytest.approx(1 - 2 * binom.cdf(0, 5, 0.5))  # 0.9375
    xs = list(range(10, 0, -1))
    med, ci, cov = median_interval(xs)  # n = 10: x_(2)..x_(9), coverage 1 - 2 P(B <= 1) = 0.9785
    assert med == 5.5 and ci == [2.0, 9.0] and cov == pytest.approx(1 - 2 * binom.cdf(1, 10, 0.5))
    assert 1 - 2 * binom.cdf(2, 10, 0.5) < 0.95  # x_(3)..x_(8) would fall short
    assert median_interval([4.0]) == (4.0, None, None)
