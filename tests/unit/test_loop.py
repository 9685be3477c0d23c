"""The frame loop with in-test sources and predictors: order, drops, swap, errors, stop."""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import pytest

from agent.pipeline import loop as loop_module
from agent.pipeline.loop import STAGES, CaptureMode, FrameLoop, FrameResult, overlap_pays
from agent.pipeline.sources import Sample, Source, SourceError

pytestmark = pytest.mark.inference

WAIT = 10.0  # generous upper bound for events; tests finish in milliseconds
MODES: tuple[CaptureMode, ...] = ("auto", "thread", "inline")


class ListSource(Source):
    """Samples from a list; ``exhausted`` is set when ``read`` has returned the end."""

    def __init__(self, count: int, *, live: bool = False, fail_at: int | None = None) -> None:
        super().__init__()
        self.live = live
        self.samples = [np.full((2, 2), i, np.int64) for i in range(count)]
        self.fail_at = fail_at
        self.exhausted = threading.Event()
        self.closed = False
        self._next = 0

    def describe(self) -> str:
        return "list"

    def _open(self) -> None:
        self._next = 0

    def _close(self) -> None:
        self.closed = True

    def read(self) -> Sample | None:
        if self._next == self.fail_at:
            raise SourceError("list: expected a sample, the device went away")
        if self._next >= len(self.samples):
            self.exhausted.set()
            return None
        sample = self.samples[self._next]
        self._next += 1
        return sample


class BlockingSource(Source):
    """A live source whose read blocks until interrupted (a camera that never delivers)."""

    live = True

    def __init__(self) -> None:
        super().__init__()
        self.reading = threading.Event()
        self.closed = False

    def describe(self) -> str:
        return "blocking"

    def _open(self) -> None:
        pass

    def _close(self) -> None:
        self.closed = True

    def read(self) -> Sample | None:
        self.reading.set()
        self._interrupted.wait()
        return None


class TagPredictor:
    """Tags every stage with its name, so a result shows which predictor made it."""

    def __init__(self, tag: str, *, gate: threading.Event | None = None) -> None:
        self.tag = tag
        self.gate = gate
        self.calls = 0

    def preprocess(self, sample: Any) -> Any:
        self.calls += 1
        if self.gate is not None:
            assert self.gate.wait(WAIT)
            self.gate = None  # only the first frame waits
        return (self.tag, int(np.asarray(sample).flat[0]))

    def infer(self, prepared: Any) -> list[Any]:
        return [np.array([prepared[1]]), self.tag]

    def postprocess(self, outputs: Any, prepared: Any) -> dict[str, Any]:
        return {"value": int(outputs[0][0]), "tags": [prepared[0], outputs[1], self.tag]}


class FailingPredictor(TagPredictor):
    def preprocess(self, sample: Any) -> Any:
        if int(np.asarray(sample).flat[0]) % 3 == 0:
            raise ValueError("every third frame is bad")
        return super().preprocess(sample)


def _collect() -> tuple[list[FrameResult], Any]:
    results: list[FrameResult] = []
    return results, results.append


@pytest.mark.parametrize("capture", MODES)
def test_file_mode_processes_every_frame_in_order(capture: CaptureMode) -> None:
    results, sink = _collect()
    source = ListSource(200)
    stats = FrameLoop(source, TagPredictor("a"), sink, capture=capture).run()
    assert [r.frame for r in results] == list(range(200))
    assert [r.payload["value"] for r in results] == list(range(200))
    assert stats.frames_in == stats.results_out == 200
    assert stats.dropped == 0
    assert stats.inference_errors == 0
    for stage in STAGES:
        assert stats.histograms[stage].count == 200
    assert all(r.latency_ms >= 0 for r in results)
    assert results[0].as_dict().keys() >= {"frame", "ts", "latency_ms", "value"}
    assert source.closed
    assert stats.fps > 0


def test_realtime_keeps_only_the_newest_frame_and_counts_drops() -> None:
    results, sink = _collect()
    source = ListSource(50)
    # The first frame blocks the worker until the source has delivered everything.
    predictor = TagPredictor("slow", gate=source.exhausted)
    stats = FrameLoop(source, predictor, sink, realtime=True).run()
    assert stats.frames_in == 50
    assert results[-1].frame == 49
    assert stats.results_out == len(results) <= 2
    assert stats.dropped == 50 - stats.results_out
    assert stats.dropped >= 48


def test_live_sources_default_to_realtime_and_files_do_not() -> None:
    assert FrameLoop(ListSource(1, live=True), TagPredictor("a"), print).realtime
    assert not FrameLoop(ListSource(1), TagPredictor("a"), print).realtime


@pytest.mark.parametrize("capture", MODES)
def test_max_frames_stops_after_that_many_results(capture: CaptureMode) -> None:
    results, sink = _collect()
    loop = FrameLoop(ListSource(100), TagPredictor("a"), sink, max_frames=7, capture=capture)
    stats = loop.run()
    assert [r.frame for r in results] == list(range(7))
    assert stats.results_out == 7


def test_frame_errors_are_counted_not_fatal() -> None:
    results, sink = _collect()
    loop = FrameLoop(ListSource(30), FailingPredictor("f"), sink)
    stats = loop.run()
    assert stats.inference_errors == 10
    assert [r.frame for r in results] == [i for i in range(30) if i % 3]
    assert loop.last_error == "ValueError: every third frame is bad"


def test_sink_errors_are_counted_not_fatal() -> None:
    seen: list[int] = []

    def sink(result: FrameResult) -> None:
        seen.append(result.frame)
        if result.frame == 2:
            raise RuntimeError("downstream full")

    stats = FrameLoop(ListSource(5), TagPredictor("a"), sink).run()
    assert seen == [0, 1, 2, 3, 4]
    assert stats.sink_errors == 1


@pytest.mark.parametrize("capture", MODES)
def test_source_failure_ends_the_run_and_is_reported(capture: CaptureMode) -> None:
    results, sink = _collect()
    loop = FrameLoop(ListSource(10, fail_at=4), TagPredictor("a"), sink, capture=capture)
    loop.run()
    assert [r.frame for r in results] == [0, 1, 2, 3]
    assert loop.failure is not None and "device went away" in loop.failure


@pytest.mark.parametrize("capture", [*MODES, "auto-switching"])
def test_swap_takes_effect_at_a_frame_boundary(
    capture: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    results: list[FrameResult] = []
    swapped = threading.Event()
    loop: FrameLoop

    def sink(result: FrameResult) -> None:
        results.append(result)

    first, second = TagPredictor("first"), TagPredictor("second")
    if capture == "auto-switching":  # every source counts as decode-heavy: a capture thread
        monkeypatch.setattr(loop_module, "OVERLAP_MIN_NS", 0)
    mode: CaptureMode = "auto" if capture == "auto-switching" else capture  # type: ignore[assignment]
    loop = FrameLoop(ListSource(2000), first, sink, capture=mode)
    loop.start()
    tags = ["first", "second"]
    swaps = 0
    while not loop.wait(0):
        old = loop.swap(second if loop.predictor is first else first)
        assert old.tag in tags  # type: ignore[attr-defined]
        swaps += 1
        swapped.set()
    loop.stop()
    assert swapped.is_set()
    assert [r.frame for r in results] == list(range(2000))
    for result in results:
        tag_pre, tag_infer, tag_post = result.payload["tags"]
        assert tag_pre == tag_infer == tag_post
    assert loop.stats.swaps == swaps
    assert loop.stats.inference_errors == 0
    assert first.calls + second.calls == 2000


def test_swap_returns_only_after_the_old_predictor_is_idle() -> None:
    gate = threading.Event()
    entered = threading.Event()

    class Busy(TagPredictor):
        def preprocess(self, sample: Any) -> Any:
            entered.set()
            assert gate.wait(WAIT)
            return super().preprocess(sample)

    busy = Busy("busy")
    loop = FrameLoop(ListSource(1), busy, lambda r: None)
    loop.start()
    assert entered.wait(WAIT)
    with pytest.raises(TimeoutError, match="still busy"):
        loop.swap(TagPredictor("new"), timeout=0.05)
    gate.set()
    assert loop.swap(TagPredictor("newer")).tag == "new"  # type: ignore[attr-defined]
    assert loop.wait(WAIT)
    loop.stop()
    assert busy.calls == 1


def test_stop_interrupts_a_blocked_source_and_closes_it() -> None:
    source = BlockingSource()
    loop = FrameLoop(source, TagPredictor("a"), lambda r: None)
    loop.start()
    assert source.reading.wait(WAIT)
    loop.stop(timeout=WAIT)
    assert source.closed
    assert loop.wait(0)
    assert loop.stats.results_out == 0


def test_a_loop_starts_once() -> None:
    loop = FrameLoop(ListSource(1), TagPredictor("a"), lambda r: None)
    loop.run()
    with pytest.raises(RuntimeError, match="not started yet"):
        loop.start()


def test_stats_as_dict_is_json_ready() -> None:
    stats = FrameLoop(ListSource(3), TagPredictor("a"), lambda r: None).run()
    data = json.loads(json.dumps(stats.as_dict()))
    assert data["frames"] == 3
    assert set(data["latency"]) == set(STAGES)
    assert data["latency"]["total"]["count"] == 3


def test_source_counters_are_read_live() -> None:
    source = ListSource(3)
    loop = FrameLoop(source, TagPredictor("a"), lambda r: None)
    stats = loop.stats
    source.errors, source.malformed = 2, 7
    assert (stats.source_errors, stats.malformed) == (2, 7)
    loop.run()
    source.errors += 1
    assert stats.source_errors == 3
    assert stats.as_dict()["malformed"] == 7


def test_capture_thread_only_when_both_steps_are_slow_and_a_second_core_exists() -> None:
    slow = loop_module.OVERLAP_MIN_NS
    assert overlap_pays(3 * slow, slow, cores=2)
    assert not overlap_pays(3 * slow, slow, cores=1)
    assert not overlap_pays(100 * slow, slow - 1, cores=4)  # little to overlap
    assert not overlap_pays(slow - 1, 100 * slow, cores=4)


@pytest.mark.parametrize("threshold", [0, 10**12])
def test_auto_capture_measures_the_first_frames_then_keeps_every_frame_in_order(
    threshold: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop_module, "OVERLAP_MIN_NS", threshold)
    results, sink = _collect()
    loop = FrameLoop(ListSource(300), TagPredictor("a"), sink)
    assert loop.capture_mode == "auto"
    stats = loop.run()
    expected = "thread" if threshold == 0 and overlap_pays(1, 1) else "inline"
    assert loop.capture_mode == expected
    assert [r.frame for r in results] == list(range(300))
    assert stats.frames_in == stats.results_out == 300


def test_realtime_always_captures_on_its_own_thread() -> None:
    loop = FrameLoop(ListSource(3), TagPredictor("a"), print, realtime=True, capture="inline")
    assert loop.capture_mode == "thread"
