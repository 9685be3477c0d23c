"""Telemetry: per-interval aggregates of the frame loop and the board, queued in the outbox.

:class:`IntervalDrain` reads an interval out of a loop's :class:`~agent.pipeline.loop.LoopStats`
(read-and-reset: stage histograms are drained, counters become deltas against the previous
drain), so every frame is counted in exactly one interval. :class:`TelemetryAggregator` turns an
interval plus a system snapshot into a :class:`~agent.protocol.messages.TelemetryMessage` with
this process's ``boot_id`` and a ``seq`` that grows by exactly 1 per message. Both are pure.

:class:`TelemetryService` runs them every ``[telemetry] interval_s`` in a thread and ``put``s
the encoded message into the outbox; the outbox flusher publishes it. When the running model
changes, the inference worker hands a final interval of the old model to :meth:`cut`, so
``metrics.model`` always names the model that produced the interval.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.daemon.outbox import Outbox, OutboxError
from agent.daemon.sysinfo import SystemProbe, SystemSnapshot
from agent.daemon.worker import ServiceThread
from agent.pipeline.histogram import LatencyHistogram
from agent.pipeline.loop import LoopStats
from agent.protocol.messages import (
    LatencyStats,
    TelemetryMessage,
    TelemetryMetrics,
    ThrottleFlags,
    encode,
)
from agent.protocol.topics import Topics

__all__ = [
    "TELEMETRY_STAGES",
    "IntervalDrain",
    "IntervalSample",
    "TelemetryAggregator",
    "TelemetryService",
    "latency_stats",
]

logger = logging.getLogger(__name__)

#: stage histograms reported, in ``metrics.latency_ms``
TELEMETRY_STAGES = ("wait", "preprocess", "invoke", "postprocess", "total")


def latency_stats(histogram: LatencyHistogram) -> LatencyStats:
    """p50/p95/p99/max in milliseconds of one (drained) histogram."""
    summary = histogram.summary()
    return LatencyStats(
        count=summary.count,
        p50=round(summary.p50_ms, 4),
        p95=round(summary.p95_ms, 4),
        p99=round(summary.p99_ms, 4),
        max=round(summary.max_ms, 4),
    )


@dataclass(frozen=True)
class IntervalSample:
    """What the loop did during one interval."""

    model: str | None
    interval_s: float
    frames: int = 0
    drops: int = 0
    errors: int = 0
    latency_ms: dict[str, LatencyStats] = field(default_factory=dict)


class IntervalDrain:
    """Reads consecutive intervals of one loop: counters as deltas, histograms drained."""

    def __init__(self, stats: LoopStats, *, started: float) -> None:
        self.stats = stats
        self._frames = stats.results_out
        self._drops = stats.dropped
        self._errors = stats.inference_errors
        self._since = started

    def drain(self, model: str | None, now: float) -> IntervalSample:
        """The interval since the previous drain (or creation), ending ``now`` (monotonic s)."""
        stats = self.stats
        histograms = stats.histograms
        latency = {stage: latency_stats(histograms[stage].drain()) for stage in TELEMETRY_STAGES}
        histograms["overhead"].reset()
        frames, drops, errors = stats.results_out, stats.dropped, stats.inference_errors
        sample = IntervalSample(
            model=model,
            interval_s=max(0.0, now - self._since),
            frames=frames - self._frames,
            drops=drops - self._drops,
            errors=errors - self._errors,
            latency_ms=latency,
        )
        self._frames, self._drops, self._errors, self._since = frames, drops, errors, now
        return sample


class TelemetryAggregator:
    """Builds telemetry messages: ``seq`` is 0, 1, 2... for this ``boot_id``."""

    def __init__(self, boot_id: str) -> None:
        self.boot_id = boot_id
        self.seq = 0

    def build(
        self,
        sample: IntervalSample,
        *,
        ts: float,
        system: SystemSnapshot | None = None,
        outbox_backlog: int = 0,
        reconnects: int = 0,
    ) -> TelemetryMessage:
        """The next message, for ``sample`` (wall-clock ``ts``); advances ``seq`` by one."""
        throttled = None
        if system is not None and system.throttle is not None:
            throttled = ThrottleFlags.from_bitmask(system.throttle.raw)
        fps = sample.frames / sample.interval_s if sample.interval_s > 0 else 0.0
        metrics = TelemetryMetrics(
            interval_s=round(sample.interval_s, 3),
            latency_ms=dict(sample.latency_ms),
            fps=round(fps, 3),
            frames=sample.frames,
            drops=sample.drops,
            errors=sample.errors,
            cpu_percent=None
            if system is None or system.cpu_percent is None
            else round(system.cpu_percent, 2),
            rss_bytes=None if system is None else system.rss_bytes,
            temperature_c=None if system is None else system.temperature_c,
            throttled=throttled,
            outbox_backlog=outbox_backlog,
            reconnects=reconnects,
            model=sample.model,
        )
        message = TelemetryMessage(boot_id=self.boot_id, seq=self.seq, ts=ts, metrics=metrics)
        self.seq += 1
        return message


class TelemetryService(ServiceThread):
    """Every interval: drain the loop, read the board, queue one message in the outbox."""

    thread_name = "edge-telemetry"

    def __init__(
        self,
        *,
        outbox: Outbox,
        topics: Topics,
        device_id: str,
        boot_id: str,
        interval_s: float,
        drain: Callable[[], IntervalSample | None],
        reconnects: Callable[[], int],
        probe: SystemProbe | None = None,
        wall_clock: Callable[[], float],
    ) -> None:
        super().__init__()
        self._outbox = outbox
        self._topic = topics.telemetry(device_id)
        self._drain = drain
        self._reconnects = reconnects
        self._probe = probe or SystemProbe()
        self._wall = wall_clock
        self.interval_s = interval_s
        self.aggregator = TelemetryAggregator(boot_id)
        self._cuts: queue.SimpleQueue[IntervalSample] = queue.SimpleQueue()

    def cut(self, sample: IntervalSample) -> None:
        """Queue an interval ended early (a model change); thread-safe and quick."""
        self._cuts.put(sample)
        self._wake.set()

    def set_interval(self, interval_s: float) -> None:
        """Apply a reloaded ``[telemetry] interval_s`` from the next interval on."""
        self.interval_s = interval_s
        self._wake.set()

    def report(self, sample: IntervalSample) -> TelemetryMessage | None:
        """Build and queue one message; returns it (None if the outbox refused it)."""
        backlog = self._outbox.backlog().messages
        message = self.aggregator.build(
            sample,
            ts=self._wall(),
            system=self._probe.snapshot(),
            outbox_backlog=backlog,
            reconnects=self._reconnects(),
        )
        try:
            self._outbox.put(self._topic, encode(message), qos=1)
        except OutboxError as exc:
            logger.warning("telemetry seq %d not queued: %s", message.seq, exc)
            return None
        return message

    def _run(self) -> None:
        deadline = time.monotonic() + self.interval_s
        while not self._stop.is_set():
            self._wake.wait(max(0.0, deadline - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                while True:
                    self.report(self._cuts.get_nowait())
            except queue.Empty:
                pass
            if time.monotonic() < deadline:
                continue
            deadline = time.monotonic() + self.interval_s
            sample = self._drain()
            if sample is not None:
                try:
                    self.report(sample)
                except Exception:
                    logger.exception("telemetry report failed")
