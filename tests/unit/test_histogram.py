"""Latency histogram: percentiles against numpy, exact counters, merge and drain."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.pipeline.histogram import LatencyHistogram

pytestmark = pytest.mark.inference

# Buckets are at most 1/16 of their value wide; spreading records across a bucket keeps the
# estimate well inside that.
TOLERANCE = 1 / 16


def _filled(values: np.ndarray) -> LatencyHistogram:
    histogram = LatencyHistogram()
    for value in values.tolist():
        histogram.record(int(value))
    return histogram


@pytest.mark.parametrize(
    "values",
    [
        np.random.default_rng(1).lognormal(13.0, 1.0, 20_000).astype(np.int64),
        np.random.default_rng(2).integers(1_000, 5_000_000, 20_000),
        np.random.default_rng(3).exponential(200_000.0, 20_000).astype(np.int64) + 50,
    ],
    ids=["lognormal", "uniform", "exponential"],
)
def test_percentiles_match_numpy(values: np.ndarray) -> None:
    histogram = _filled(values)
    for q in (1, 50, 90, 95, 99, 99.9):
        exact = float(np.percentile(values, q))
        assert histogram.percentile(q) == pytest.approx(exact, rel=TOLERANCE), q


def test_counters_are_exact() -> None:
    values = np.array([5, 17, 40, 1_000, 123_456_789, 3], dtype=np.int64)
    histogram = _filled(values)
    assert histogram.count == 6
    assert histogram.total_ns == int(values.sum())
    assert histogram.min_ns == 3
    assert histogram.max_ns == 123_456_789
    assert histogram.percentile(0) == 3
    assert histogram.percentile(100) == 123_456_789
    summary = histogram.summary()
    assert summary.count == 6
    assert summary.mean_ms == pytest.approx(values.mean() / 1e6)
    assert summary.max_ms == pytest.approx(123.456789)


def test_small_values_are_exact() -> None:
    histogram = _filled(np.arange(0, 32))
    assert histogram.percentile(50) == pytest.approx(np.percentile(np.arange(0, 32), 50), abs=0.5)


def test_empty_histogram() -> None:
    histogram = LatencyHistogram()
    assert histogram.percentile(99) == 0.0
    assert histogram.summary().count == 0
    with pytest.raises(ValueError, match=r"0\.\.100"):
        histogram.percentile(101)


def test_negative_and_huge_values() -> None:
    histogram = LatencyHistogram()
    histogram.record(-5)
    histogram.record(2**50)
    assert histogram.min_ns == 0
    assert histogram.max_ns == 2**50
    assert histogram.percentile(100) == 2**50


def test_merge_equals_recording_everything_in_one() -> None:
    rng = np.random.default_rng(4)
    a_values = rng.lognormal(12.0, 0.5, 5_000).astype(np.int64)
    b_values = rng.lognormal(14.0, 0.5, 3_000).astype(np.int64)
    merged = _filled(a_values)
    merged.merge(_filled(b_values))
    together = _filled(np.concatenate([a_values, b_values]))
    assert merged.count == together.count
    assert merged.total_ns == together.total_ns
    assert (merged.min_ns, merged.max_ns) == (together.min_ns, together.max_ns)
    for q in (50, 95, 99):
        assert merged.percentile(q) == together.percentile(q)
    with pytest.raises(ValueError, match="same one"):
        merged.merge(merged)


def test_drain_returns_records_and_resets() -> None:
    histogram = _filled(np.array([10_000, 20_000, 30_000]))
    drained = histogram.drain()
    assert drained.count == 3
    assert drained.percentile(50) == pytest.approx(20_000, rel=TOLERANCE)
    assert histogram.count == 0
    assert histogram.percentile(50) == 0.0
    histogram.record(7)
    assert histogram.count == 1
    assert drained.count == 3


def test_reset_forgets_everything() -> None:
    histogram = _filled(np.array([1, 2, 3]))
    histogram.reset()
    assert (histogram.count, histogram.total_ns, histogram.max_ns) == (0, 0, 0)


@given(st.lists(st.integers(min_value=0, max_value=2**40 - 1), min_size=1, max_size=200))
def test_any_percentile_lies_within_the_recorded_range(values: list[int]) -> None:
    histogram = LatencyHistogram()
    for value in values:
        histogram.record(value)
    for q in (0, 25, 50, 75, 100):
        assert min(values) <= histogram.percentile(q) <= max(values)
    median = float(np.percentile(values, 50))
    if median >= 32:
        # Interpolating between two records can fall in a gap; allow one bucket either side.
        low = float(np.percentile(values, 50, method="lower"))
        high = float(np.percentile(values, 50, method="higher"))
        assert low * (1 - TOLERANCE) <= histogram.percentile(50) <= high * (1 + TOLERANCE)


def test_few_records_interpolate_like_numpy() -> None:
    values = np.array([37_000, 148_000, 361_000])
    histogram = _filled(values)
    for q in (10, 50, 95, 99):
        assert histogram.percentile(q) == pytest.approx(np.percentile(values, q), rel=TOLERANCE)
