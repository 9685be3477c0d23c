"""Telemetry aggregation: read-and-reset intervals, seq strictly +1, messages in the outbox."""

from __future__ import annotations

from pathlib import Path

from agent.daemon.outbox import Outbox
from agent.daemon.sysinfo import SystemProbe
from agent.daemon.telemetry import IntervalDrain, TelemetryAggregator, TelemetryService
from agent.pipeline.loop import LoopStats
from agent.protocol.messages import TelemetryMessage, decode
from agent.protocol.topics import Topics


def record_frames(stats: LoopStats, count: int, total_ms: float) -> None:
    for _ in range(count):
        for histogram in stats.histograms.values():
            histogram.record(int(total_ms * 1e6))
    stats.results_out += count


def test_drain_reads_each_frame_in_exactly_one_interval() -> None:
    stats = LoopStats()
    record_frames(stats, 7, 2.0)  # before the drain exists: counted in the first interval
    drain = IntervalDrain(stats, started=100.0)
    record_frames(stats, 3, 4.0)
    stats.dropped += 2
    stats.inference_errors += 1
    first = drain.drain("digits@1.0.0", 102.0)
    assert (first.frames, first.drops, first.errors, first.interval_s) == (3, 2, 1, 2.0)
    assert first.latency_ms["total"].count == 10
    assert set(first.latency_ms) == {"wait", "preprocess", "invoke", "postprocess", "total"}
    assert 3.8 < first.latency_ms["total"].max < 4.2
    second = drain.drain("digits@1.0.0", 103.0)  # nothing happened: all reset
    assert (second.frames, second.drops, second.errors) == (0, 0, 0)
    assert second.latency_ms["total"].count == 0
    assert stats.histograms["overhead"].count == 0


def test_seq_grows_by_one_per_message() -> None:
    stats = LoopStats()
    drain = IntervalDrain(stats, started=0.0)
    aggregator = TelemetryAggregator("b" * 32)
    messages = []
    for second in range(1, 6):
        record_frames(stats, 30, 1.0)
        sample = drain.drain("digits@1.0.0", float(second))
        messages.append(aggregator.build(sample, ts=1e9 + second, outbox_backlog=second))
    assert [m.seq for m in messages] == [0, 1, 2, 3, 4]
    assert {m.boot_id for m in messages} == {"b" * 32}
    assert [m.metrics.fps for m in messages] == [30.0] * 5
    assert messages[-1].metrics.model == "digits@1.0.0"
    assert messages[-1].metrics.outbox_backlog == 5


def test_service_reports_into_the_outbox(tmp_path: Path) -> None:
    stats = LoopStats()
    drain = IntervalDrain(stats, started=0.0)
    clock = iter(range(1, 100))
    with Outbox(tmp_path / "outbox.sqlite", max_bytes=1 << 20, max_messages=100) as outbox:
        service = TelemetryService(
            outbox=outbox,
            topics=Topics(),
            device_id="cam-01",
            boot_id="c" * 32,
            interval_s=30,
            drain=lambda: drain.drain("digits@2.0.0", float(next(clock))),
            reconnects=lambda: 4,
            probe=SystemProbe(thermal_root=tmp_path / "none", throttled_paths=(), vcgencmd=None),
            wall_clock=lambda: 1.7e9,
        )
        record_frames(stats, 5, 1.0)
        sample = drain.drain("digits@1.0.0", 0.5)  # a cut at a model change
        service.report(sample)
        service.report(service_sample := drain.drain("digits@2.0.0", 1.0))
        assert service_sample.frames == 0
        queued = outbox.peek()
    assert [m.topic for m in queued] == ["edge/v1/dev/cam-01/telemetry"] * 2
    decoded = [decode(TelemetryMessage, m.payload) for m in queued]
    assert [d.seq for d in decoded] == [0, 1]
    assert [d.metrics.model for d in decoded] == ["digits@1.0.0", "digits@2.0.0"]
    assert decoded[0].metrics.frames == 5
    assert decoded[0].metrics.reconnects == 4
    assert decoded[0].metrics.rss_bytes is not None and decoded[0].metrics.rss_bytes > 0
