"""Statistics against numpy (and against trtexec's own definitions) on synthetic timings."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engines import stats

timings = st.lists(st.floats(0.01, 1000.0, allow_nan=False), min_size=1, max_size=200)


def trtexec_percentile(values: list[float], p: float) -> float:
    """A literal transcription of trtexec's findPercentile: float32 arithmetic, int truncation."""
    ordered = sorted(values)
    n = len(ordered)
    exclude = int((np.float32(1) - np.float32(p) / np.float32(100)) * np.float32(n))
    return ordered[max(n - 1 - exclude, 0)]


@given(timings)
def test_mean_median_min_max_match_numpy(values: list[float]) -> None:
    s = stats.summarize(values, [90])
    assert s.min == np.min(values)
    assert s.max == np.max(values)
    assert s.mean == pytest.approx(np.mean(values), rel=1e-12)
    assert s.median == pytest.approx(np.median(values), rel=1e-12)


@given(timings)
def test_cov_is_population_std_over_mean_in_percent(values: list[float]) -> None:
    expected = np.std(values, ddof=0) / np.mean(values) * 100
    assert stats.coefficient_of_variation(values) == pytest.approx(expected, rel=1e-9, abs=1e-9)


@given(timings, st.sampled_from([0.0, 50.0, 90.0, 95.0, 99.0, 99.9, 100.0]))
def test_percentile_is_trtexec_order_statistic(values: list[float], p: float) -> None:
    got = stats.percentile(sorted(values), p)
    assert got == trtexec_percentile(values, p)
    assert got in values  # never interpolated


@settings(max_examples=300)
@given(st.integers(1, 500), st.sampled_from([50, 90, 95, 99]))
def test_percentile_is_numpy_inverted_cdf_off_rank_boundaries(n: int, p: int) -> None:
    """In exact arithmetic trtexec's rank n-1-floor((1-q)n) equals ceil(qn)-1, numpy's inverted_cdf.
    Where (1-q)n is a whole number only float32 rounding decides, so those n are checked above."""
    values = np.arange(1, n + 1, dtype=float)[::-1].copy()  # distinct values, unsorted input
    on_boundary = ((100 - p) * n) % 100 == 0
    if not on_boundary:
        assert stats.percentile(sorted(values), p) == float(np.percentile(values, p, method="inverted_cdf"))


def test_percentile_worked_example() -> None:
    """10 timings 1..10 ms: p90 excludes int(float32(0.1)*10)=1 -> 9th value; p99 excludes 0 -> max."""
    ordered = [float(v) for v in range(1, 11)]
    assert stats.percentile(ordered, 90) == 9.0
    assert stats.percentile(ordered, 99) == 10.0
    assert stats.percentile(ordered, 50) == 5.0  # exclude 5 -> 5th value (the median averages 5 and 6)
    assert stats.median(ordered) == 5.5


def test_throughput_is_queries_over_walltime() -> None:
    assert stats.throughput_qps(300, 3000.0) == pytest.approx(100.0)
    assert stats.throughput_qps(1, 0.0) == math.inf


def test_cov_of_constant_timings_is_zero_and_of_empty_is_zero() -> None:
    assert stats.coefficient_of_variation([2.0] * 7) == 0.0
    assert stats.coefficient_of_variation([]) == 0.0


def test_bad_percentile_is_rejected() -> None:
    with pytest.raises(ValueError, match="not in"):
        stats.percentile([1.0], 101)


def test_format_percent_prints_like_ostream() -> None:
    assert [stats.format_percent(p) for p in (90.0, 99.9, 50.0)] == ["90", "99.9", "50"]
