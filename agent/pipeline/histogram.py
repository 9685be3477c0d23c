"""Fixed log-bucket latency histograms: bounded memory, O(1) record, mergeable.

Values are nanoseconds (``time.perf_counter_ns`` differences). Bucketing follows the HDR
histogram idea: values below 32 ns each get their own bucket, above that every power of two is
split into 16 linear sub-buckets, so a bucket is at most 1/16 (6.25 %) of its value wide and a
percentile read back is within about 3 % of the exact one. Values past ~18 minutes land in the
last bucket. The bucket array has a fixed size, so a histogram costs the same after a billion
frames as after one.

A histogram is safe to share between one writer (the inference worker) and readers (telemetry):
every method takes the histogram's own lock. :meth:`LatencyHistogram.drain` copies and resets in
one step, which is how telemetry reads an interval without losing records in between.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

__all__ = ["HistogramSummary", "LatencyHistogram"]

_SUB_BITS = 4
_SUB = 1 << _SUB_BITS  # sub-buckets per power of two
_LINEAR = 2 * _SUB  # values below this have one bucket each
_MAX_EXP = 40  # 2**40 ns ~ 18 minutes; larger values share the last bucket
_BUCKETS = _LINEAR + (_MAX_EXP - _SUB_BITS - 1) * _SUB + 1  # the last one is for overflow


def _bucket_of(value: int) -> int:
    if value < _LINEAR:
        return value if value > 0 else 0
    exp = value.bit_length() - 1
    if exp >= _MAX_EXP:
        return _BUCKETS - 1
    shift = exp - _SUB_BITS
    return _LINEAR + (exp - _SUB_BITS - 1) * _SUB + ((value >> shift) & (_SUB - 1))


def _bucket_bounds(index: int) -> tuple[int, int]:
    """Lowest value of bucket ``index`` and its width."""
    if index < _LINEAR:
        return index, 1
    offset = index - _LINEAR
    exp = offset // _SUB + _SUB_BITS + 1
    shift = exp - _SUB_BITS
    return (_SUB + offset % _SUB) << shift, 1 << shift


def _order_statistic(counts: list[int], k: int, low: int, high: int) -> float:
    """Estimate of the k-th smallest record (0-based): records spread evenly in a bucket."""
    seen = 0
    for index, n in enumerate(counts):
        if n and seen + n > k:
            start, width = _bucket_bounds(index)
            if width == 1:
                return float(start)
            value = start + width * (k - seen + 0.5) / n
            return float(min(max(value, low), high))
        seen += n
    return float(high)


@dataclass(frozen=True)
class HistogramSummary:
    """Count and latency figures of one histogram, in milliseconds."""

    count: int
    mean_ms: float
    min_ms: float
    max_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float

    def as_dict(self) -> dict[str, float | int]:
        """Plain JSON-ready mapping (values rounded to microseconds)."""
        return {
            "count": self.count,
            "mean_ms": round(self.mean_ms, 3),
            "min_ms": round(self.min_ms, 3),
            "max_ms": round(self.max_ms, 3),
            "p50_ms": round(self.p50_ms, 3),
            "p95_ms": round(self.p95_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
        }


class LatencyHistogram:
    """Latencies in nanoseconds, bucketed on a fixed log scale."""

    __slots__ = ("_counts", "_lock", "count", "max_ns", "min_ns", "total_ns")

    def __init__(self, *, lock: threading.Lock | None = None) -> None:
        """``lock``: share one lock between histograms recorded together (see :meth:`add`)."""
        self._lock = lock or threading.Lock()
        self._counts = [0] * _BUCKETS
        self.count = 0
        self.total_ns = 0
        self.min_ns = 0
        self.max_ns = 0

    @property
    def lock(self) -> threading.Lock:
        """The lock guarding this histogram (hold it around :meth:`add`)."""
        return self._lock

    def record(self, value_ns: int) -> None:
        """Add one latency (negative values count as 0)."""
        with self._lock:
            self.add(value_ns)

    def add(self, value_ns: int) -> None:
        """Like :meth:`record`, for a caller that already holds :attr:`lock`."""
        value = value_ns if value_ns > 0 else 0
        self._counts[_bucket_of(value)] += 1
        if self.count == 0 or value < self.min_ns:
            self.min_ns = value
        if value > self.max_ns:  # noqa: PLR1730 - cheaper than max() on the hot path
            self.max_ns = value
        self.count += 1
        self.total_ns += value

    def merge(self, other: LatencyHistogram) -> None:
        """Add every record of ``other`` to this histogram."""
        if other is self:
            raise ValueError("merge: expected another histogram, got the same one")
        counts, count, total, low, high = other._state()
        if count == 0:
            return
        with self._lock:
            mine = self._counts
            for index, n in enumerate(counts):
                if n:
                    mine[index] += n
            self.min_ns = low if self.count == 0 else min(self.min_ns, low)
            self.max_ns = max(self.max_ns, high)
            self.count += count
            self.total_ns += total

    def reset(self) -> None:
        """Forget every record."""
        with self._lock:
            self._reset_locked()

    def drain(self) -> LatencyHistogram:
        """Return a copy of this histogram (with its own lock) and reset it, atomically."""
        copy = LatencyHistogram()
        with self._lock:
            copy._counts = self._counts
            copy.count, copy.total_ns = self.count, self.total_ns
            copy.min_ns, copy.max_ns = self.min_ns, self.max_ns
            self._counts = [0] * _BUCKETS
            self._reset_locked()
        return copy

    def percentile(self, q: float) -> float:
        """Estimated ``q``-th percentile (0..100) in nanoseconds; 0.0 when empty."""
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile: expected q in 0..100, got {q}")
        counts, count, _total, low, high = self._state()
        if count == 0:
            return 0.0
        if q == 0.0:
            return float(low)
        if q == 100.0:
            return float(high)
        # Same convention as numpy's default ("linear"): interpolate between the order
        # statistics around rank q/100 * (n - 1).
        rank = q / 100.0 * (count - 1)
        below = int(rank)
        value = _order_statistic(counts, below, low, high)
        if rank > below:
            above = _order_statistic(counts, below + 1, low, high)
            value += (above - value) * (rank - below)
        return value

    def summary(self) -> HistogramSummary:
        """Count, mean, min, max, p50, p95 and p99 in milliseconds."""
        with self._lock:
            count, total, low, high = self.count, self.total_ns, self.min_ns, self.max_ns
        mean = total / count if count else 0.0
        return HistogramSummary(
            count=count,
            mean_ms=mean / 1e6,
            min_ms=low / 1e6,
            max_ms=high / 1e6,
            p50_ms=self.percentile(50) / 1e6,
            p95_ms=self.percentile(95) / 1e6,
            p99_ms=self.percentile(99) / 1e6,
        )

    def _state(self) -> tuple[list[int], int, int, int, int]:
        with self._lock:
            return list(self._counts), self.count, self.total_ns, self.min_ns, self.max_ns

    def _reset_locked(self) -> None:
        for index in range(_BUCKETS):
            self._counts[index] = 0
        self.count = 0
        self.total_ns = 0
        self.min_ns = 0
        self.max_ns = 0
