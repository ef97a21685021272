"""Latency statistics exactly as trtexec computes them (TensorRT samples/common/sampleReporting.cpp).

trtexec's definitions differ from numpy's defaults in two places, and we follow trtexec so numbers are
comparable with a GPU engine's trtexec summary:

- percentile(p): no interpolation. With n sorted timings, `exclude = int((1 - p/100) * n)` and the
  value is `sorted[max(n - 1 - exclude, 0)]`, an order statistic. In exact arithmetic that is numpy's
  `method="inverted_cdf"`; where `(1 - p/100) * n` is a whole number, trtexec's float32 rounding
  decides the rank (p90 of 10 timings is the 9th), so we compute the rank in float32 as it does.
- coefficient of variation: population standard deviation (divide by n, numpy's `ddof=0`) over the
  mean, in percent. trtexec warns when it exceeds 1%.

Median is the usual one (mean of the two middle values for even n); throughput is queries over the
host walltime of the timed phase, in queries per second (one query = one inference call).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

UNSTABLE_COV_PERCENT = 1.0  # trtexec's kUNSTABLE_PERF_REPORTING_THRESHOLD


@dataclasses.dataclass(frozen=True)
class Summary:
    """min/max/mean/median, the requested percentiles (keyed by p) and CoV (%) of one metric, in ms."""

    min: float
    max: float
    mean: float
    median: float
    percentiles: dict[float, float]
    cov_percent: float

    def to_dict(self) -> dict[str, object]:
        return {
            "min": self.min,
            "max": self.max,
            "mean": self.mean,
            "median": self.median,
            "percentiles": {format_percent(p): v for p, v in self.percentiles.items()},
            "coefficientOfVariationPercent": self.cov_percent,
        }


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """trtexec's `findPercentile`: the order statistic that leaves `int((1 - p/100) * n)` values above it."""
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile {p} is not in [0, 100]")
    n = len(sorted_values)
    if n == 0:
        return math.inf
    f32 = np.float32
    exclude = int((f32(1.0) - f32(p) / f32(100.0)) * f32(n))  # float32, as trtexec's C++ computes it
    return float(sorted_values[max(n - 1 - exclude, 0)])


def median(sorted_values: Sequence[float]) -> float:
    """trtexec's `findMedian`: the middle value, or the mean of the two middle values."""
    n = len(sorted_values)
    if n == 0:
        return math.inf
    m = n // 2
    if n % 2:
        return float(sorted_values[m])
    return (float(sorted_values[m - 1]) + float(sorted_values[m])) / 2.0


def median_ci(sorted_values: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """Distribution-free confidence interval of the median (order statistics of a Binomial(n, 1/2) rank;
    z = 1.96: about 95%), as (low, high); the whole range when n is too small to say more."""
    n = len(sorted_values)
    if n == 0:
        return math.inf, math.inf
    half = z * math.sqrt(n) / 2.0
    low = max(math.floor(n / 2.0 - half), 0)  # 0-based rank
    high = min(math.ceil(n / 2.0 + half), n - 1)
    return float(sorted_values[low]), float(sorted_values[high])


def median_ci_relative(values: Sequence[float], z: float = 1.96) -> float:
    """Half-width of the median's confidence interval over the median (0.05: the median is known to ±5%)."""
    ordered = sorted(values)
    low, high = median_ci(ordered, z)
    middle = median(ordered)
    return (high - low) / (2.0 * middle) if middle > 0 else math.inf


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.inf


def coefficient_of_variation(values: Sequence[float]) -> float:
    """Population standard deviation / mean, in percent (trtexec's `findCoeffOfVariance`)."""
    if not values:
        return 0.0
    mu = mean(values)
    if mu == 0.0:
        return math.inf
    variance = math.fsum((v - mu) ** 2 for v in values) / len(values)
    return math.sqrt(variance) / mu * 100.0


def throughput_qps(queries: int, walltime_ms: float) -> float:
    """Queries per second over the timed phase's host walltime (trtexec: batch 1 per explicit-batch query)."""
    return queries / walltime_ms * 1000.0 if walltime_ms > 0 else math.inf


def summarize(values_ms: Sequence[float], percentiles: Sequence[float]) -> Summary:
    """All statistics of one metric; `values_ms` need not be sorted."""
    if not values_ms:
        raise ValueError("no timings to summarize")
    ordered = sorted(values_ms)
    return Summary(
        min=float(ordered[0]),
        max=float(ordered[-1]),
        mean=mean(ordered),
        median=median(ordered),
        percentiles={float(p): percentile(ordered, p) for p in percentiles},
        cov_percent=coefficient_of_variation(ordered),
    )


def format_percent(p: float) -> str:
    """90.0 -> "90", 99.9 -> "99.9": as trtexec's ostream prints the float."""
    return f"{p:g}"
