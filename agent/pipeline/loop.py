"""The real-time frame loop: capture thread, inference worker, stage histograms, model swap.

Where frames are read (``capture``): in real-time mode always on a capture thread (the worker
gets the freshest frame). Otherwise, by default (``"auto"``), the worker itself reads the first
frames and measures decoding against its own processing (median over :data:`_PROBE_FRAMES`);
it starts a capture thread only when :func:`overlap_pays` (both steps cost at least
:data:`OVERLAP_MIN_NS` and a second core exists): overlapping saves at most the cheaper step,
and two threads trading the GIL every frame cost more than that for cheap decodes. Otherwise it
keeps reading inline: no hand-off at all.

The capture thread hands samples to the worker through a mailbox. In real-time
mode (the default for live sources) the mailbox has one slot and keeps only the newest sample: a
newer one replaces an unconsumed one and the replaced one is counted as dropped. Otherwise
(the default for files, so every frame is processed) the mailbox is a short queue (up to 32
samples and :data:`QUEUE_BYTES`) that capture blocks on when full, and the worker takes samples
in batches: one wake-up per batch instead of per frame keeps the two threads from trading the
GIL on every frame. A file read in real-time mode is paced at its frame rate, like a camera.

The worker owns the predictor. For each frame it reads the predictor reference once, under a
lock, and runs preprocess, infer and postprocess on that one object, so :meth:`FrameLoop.swap`
takes effect exactly at a frame boundary: no frame is lost and none runs on a half-swapped
model. ``swap`` returns the old predictor once the worker no longer uses it, so the caller may
close it.

Per-stage latencies (nanoseconds, :mod:`agent.pipeline.histogram`):
    ``wait``        sample captured -> taken by the worker (time spent in the mailbox)
    ``preprocess``, ``invoke``, ``postprocess``  the predictor's three steps
    ``overhead``    the worker's time per frame outside preprocess and invoke (postprocess,
                    result delivery, bookkeeping)
    ``total``       sample captured -> result ready (the result's ``latency_ms``)

A frame whose processing raises is counted in ``inference_errors`` and logged; the loop goes on.
"""

from __future__ import annotations

import collections
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

import numpy.typing as npt

from agent.pipeline.histogram import LatencyHistogram
from agent.pipeline.sources import Sample, Source, SourceError

__all__ = [
    "OVERLAP_MIN_NS",
    "QUEUE_BYTES",
    "STAGES",
    "CaptureMode",
    "FrameLoop",
    "FramePredictor",
    "FrameResult",
    "LoopStats",
    "ResultSink",
    "overlap_pays",
]

logger = logging.getLogger(__name__)

STAGES = ("wait", "preprocess", "invoke", "postprocess", "overhead", "total")
_JOIN_SECONDS = 5.0
#: upper bound on the bytes of samples waiting in the mailbox in non-real-time mode
QUEUE_BYTES = 8 * 1024 * 1024
_WAKE_BATCH = 8
_IDLE_WAKE_S = 0.001
_BATCH_WAIT_S = 0.02
#: frames (after the first) the ``auto`` capture mode measures before it decides
_PROBE_FRAMES = 16
#: a capture thread saves at most min(decode, processing) per frame and costs GIL hand-offs
#: between the two threads (measured 40-50 us a frame on a 2-core machine): below this, the
#: worker reads inline
OVERLAP_MIN_NS = 250_000

CaptureMode = Literal["auto", "thread", "inline"]


def overlap_pays(read_ns: float, process_ns: float, cores: int | None = None) -> bool:
    """Whether a capture thread beats reading inline, from median per-frame costs.

    Overlapping decoding with inference saves ``min(read, process)`` per frame at best; it needs
    a second core and pays the hand-offs between the threads, so it is used only when both
    steps cost at least :data:`OVERLAP_MIN_NS`.
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (cores or 1) >= 2 and min(read_ns, process_ns) >= OVERLAP_MIN_NS


class FramePredictor(Protocol):
    """What the worker needs from a predictor (``agent.pipeline.predictor.Predictor``)."""

    def preprocess(self, sample: Any) -> Any: ...

    def infer(self, prepared: Any) -> Sequence[npt.NDArray[Any]]: ...

    def postprocess(self, outputs: Any, prepared: Any) -> dict[str, Any]: ...


class FrameResult(NamedTuple):
    """One processed frame (a named tuple: cheap to build once per frame)."""

    frame: int  # index of the sample in its source, from 0
    ts: float  # unix time (seconds) when the sample was captured
    latency_ms: float  # capture -> result ready
    payload: dict[str, Any]  # the predictor's JSON-ready output

    def as_dict(self) -> dict[str, Any]:
        """``frame``, ``ts``, ``latency_ms`` and the payload's keys, for one JSON line."""
        return {
            "frame": self.frame,
            "ts": round(self.ts, 6),
            "latency_ms": round(self.latency_ms, 3),
            **self.payload,
        }


ResultSink = Callable[[FrameResult], None]


def _stage_histograms() -> dict[str, LatencyHistogram]:
    lock = threading.Lock()
    return {stage: LatencyHistogram(lock=lock) for stage in STAGES}


@dataclass
class LoopStats:
    """Counters and stage histograms of a loop; telemetry reads (and drains) them."""

    frames_in: int = 0
    results_out: int = 0
    dropped: int = 0
    inference_errors: int = 0
    sink_errors: int = 0
    swaps: int = 0
    started: float = 0.0  # perf_counter seconds
    ended: float = 0.0
    #: one histogram per stage, all sharing one lock so a frame is recorded in one step
    histograms: dict[str, LatencyHistogram] = field(default_factory=_stage_histograms)
    #: the source whose own counters (errors, malformed lines) are reported live
    source: Source | None = field(default=None, repr=False, compare=False)

    @property
    def source_errors(self) -> int:
        """Failed reads, drops and reconnect attempts of the source so far."""
        return self.source.errors if self.source is not None else 0

    @property
    def malformed(self) -> int:
        """Malformed sensor lines the source skipped so far."""
        return self.source.malformed if self.source is not None else 0

    @property
    def duration(self) -> float:
        """Seconds from start to end (or to now while running)."""
        if not self.started:
            return 0.0
        return (self.ended or time.perf_counter()) - self.started

    @property
    def fps(self) -> float:
        """Results per second over :attr:`duration`."""
        duration = self.duration
        return self.results_out / duration if duration > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Counters, duration, fps and per-stage latency summaries, JSON-ready."""
        return {
            "frames": self.results_out,
            "frames_in": self.frames_in,
            "duration_s": round(self.duration, 3),
            "fps": round(self.fps, 2),
            "dropped": self.dropped,
            "inference_errors": self.inference_errors,
            "sink_errors": self.sink_errors,
            "source_errors": self.source_errors,
            "malformed": self.malformed,
            "swaps": self.swaps,
            "latency": {name: h.summary().as_dict() for name, h in self.histograms.items()},
        }


class _Captured(NamedTuple):
    frame: int
    captured_ns: int
    wall: float
    sample: Sample


class _Mailbox:
    """Capture -> worker handoff: newest-only (drop stale) or blocking with ``depth`` slots."""

    def __init__(self, stats: LoopStats, *, drop_stale: bool, depth: int) -> None:
        self._stats = stats
        self._cond = threading.Condition(threading.Lock())
        self._items: collections.deque[_Captured] = collections.deque()
        self._drop_stale = drop_stale
        self._depth = 1 if drop_stale else max(1, depth)
        self._closed = False
        # Without a deadline (non-real-time), wake the worker for a batch rather than for every
        # sample: each wake-up costs a context switch and a GIL handover. A worker that has been
        # idle for a while (a slow source) is woken at once, and a partial batch waits at most
        # _BATCH_WAIT_S.
        self._idle_since = 0.0
        self._wake_at = 1 if drop_stale else max(1, min(_WAKE_BATCH, self._depth // 2))

    def limit_depth(self, depth: int) -> None:
        """Lower the number of slots (non-real-time mode), e.g. for large frames."""
        with self._cond:
            if not self._drop_stale:
                self._depth = max(1, min(self._depth, depth))
                self._wake_at = max(1, min(self._wake_at, self._depth // 2))

    def put(self, item: _Captured) -> bool:
        """Hand over ``item``; False once the mailbox is closed."""
        with self._cond:
            if self._drop_stale:
                if self._items:
                    self._items.clear()
                    self._stats.dropped += 1
            else:
                while len(self._items) >= self._depth and not self._closed:
                    self._cond.wait()
            if self._closed:
                return False
            self._items.append(item)
            idle = self._idle_since
            if len(self._items) >= self._wake_at or (
                idle and time.monotonic() - idle > _IDLE_WAKE_S
            ):
                self._cond.notify()
            return True

    def take_all(self) -> list[_Captured]:
        """Every waiting item, oldest first (waits for one); empty when closed and empty."""
        with self._cond:
            while not self._items:
                if self._closed:
                    return []
                if not self._idle_since:
                    self._idle_since = time.monotonic()
                self._cond.wait(_BATCH_WAIT_S)
            self._idle_since = 0.0
            items = list(self._items)
            self._items.clear()
            if not self._drop_stale:
                self._cond.notify()
            return items

    def close(self, *, discard: bool = False) -> None:
        """No more items; with ``discard`` pending ones are dropped too."""
        with self._cond:
            self._closed = True
            if discard:
                self._items.clear()
            self._cond.notify_all()


class FrameLoop:
    """Runs a predictor over a source: ``start()``, ``wait()``, ``stop()`` (or ``run()``)."""

    def __init__(
        self,
        source: Source,
        predictor: FramePredictor,
        sink: ResultSink,
        *,
        realtime: bool | None = None,
        max_frames: int | None = None,
        queue_depth: int = 32,
        capture: CaptureMode = "auto",
    ) -> None:
        """Args:
        source: opened by :meth:`start` if it is not yet.
        predictor: owned by the worker from :meth:`start` on; replace it with :meth:`swap`.
        sink: called in the worker thread with each result; keep it quick.
        realtime: drop stale frames; default: True for live sources, False for files.
        max_frames: stop after this many results.
        queue_depth: mailbox slots in non-real-time mode (fewer for large frames: the
            queued samples stay within :data:`QUEUE_BYTES`). A deep queue lets capture and
            inference hand over frames in batches, which costs far less than one by one.
        capture: where frames are read in non-real-time mode: ``"thread"`` (a capture thread
            overlapping decoding with inference), ``"inline"`` (the worker reads them itself:
            no hand-off), or ``"auto"`` (inline for the first frames, then a capture thread
            when :func:`overlap_pays`). Real-time mode always uses a capture thread.
        """
        self.source = source
        self.sink = sink
        self.realtime = source.live if realtime is None else realtime
        self.max_frames = max_frames
        self._stats = LoopStats(source=source)
        #: why the source ended abnormally (None after a clean end or a stop)
        self.failure: str | None = None
        #: the latest frame failure, as ``ExceptionType: message``
        self.last_error: str | None = None
        self._predictor = predictor
        self._active: FramePredictor | None = None
        self._ref_cond = threading.Condition(threading.Lock())
        self._swap_waiting = 0
        self._mailbox = _Mailbox(self._stats, drop_stale=self.realtime, depth=queue_depth)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        #: "thread" or "inline" once decided; "auto" while the first frames are measured
        self.capture_mode: CaptureMode = "thread" if self.realtime else capture
        hist = self._stats.histograms
        self._histograms = tuple(hist[stage] for stage in STAGES)
        self._record_lock = self._histograms[0].lock

    @property
    def stats(self) -> LoopStats:
        """Counters and histograms, updated live."""
        return self._stats

    @property
    def predictor(self) -> FramePredictor:
        """The predictor the next frame will use."""
        return self._predictor

    def start(self) -> None:
        """Open the source if needed and start the capture and worker threads."""
        if self._threads:
            raise RuntimeError("FrameLoop.start: expected a loop not started yet")
        self.source.open()
        self._stats.started = time.perf_counter()
        worker = threading.Thread(target=self._work, name="edge-infer", daemon=True)
        self._threads.append(worker)
        try:
            worker.start()
        except BaseException:
            # e.g. Ctrl-C while the thread starts: the caller never gets to stop() the loop,
            # and a daemon thread left inside native code at exit aborts the interpreter
            self.stop()
            raise

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the source ended and every frame was processed (or max_frames reached)."""
        return self._done.wait(timeout)

    def stop(self, timeout: float = _JOIN_SECONDS) -> None:
        """Stop capture and inference (the frame in progress finishes) and close the source."""
        self._stop.set()
        self.source.interrupt()
        self._mailbox.close(discard=True)
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):  # the worker may add the capture thread meanwhile
            thread.join(max(0.0, deadline - time.monotonic()))
        if not self._stats.ended:
            self._stats.ended = time.perf_counter()
        if all(not t.is_alive() for t in self._threads):
            self.source.close()
        else:
            logger.warning("%s: capture did not stop within %.1fs", self.source.describe(), timeout)

    def run(self) -> LoopStats:
        """Start, process until the source ends (or max_frames), stop; returns the stats."""
        self.start()
        try:
            while not self._done.wait(0.5):
                pass
        finally:
            self.stop()
        return self.stats

    def swap(self, predictor: FramePredictor, *, timeout: float = _JOIN_SECONDS) -> FramePredictor:
        """Make ``predictor`` run from the next frame on; return the old one once it is idle.

        Raises:
            TimeoutError: the frame in progress on the old predictor did not finish in time
                (the swap itself has happened).
        """
        deadline = time.monotonic() + timeout
        with self._ref_cond:
            old = self._predictor
            self._predictor = predictor
            self._stats.swaps += 1
            self._swap_waiting += 1
            try:
                while self._active is old and old is not predictor:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._done.is_set():
                        if self._active is old:
                            raise TimeoutError(
                                f"swap: old predictor still busy after {timeout:.1f}s"
                            )
                        break
                    self._ref_cond.wait(remaining)
            finally:
                self._swap_waiting -= 1
        return old

    def _capture(self, index: int) -> None:
        source, mailbox, stats, stop = self.source, self._mailbox, self._stats, self._stop
        pace = 1.0 / source.fps if self.realtime and not source.live and source.fps else 0.0
        limit = None if self.realtime else self.max_frames
        perf_ns, wall_time = time.perf_counter_ns, time.time
        first = True
        next_due = time.monotonic()
        try:
            while not stop.is_set():
                if limit is not None and index >= limit:
                    break
                sample = source.read()
                if sample is None:
                    break
                captured = _Captured(index, perf_ns(), wall_time(), sample)
                if first:
                    mailbox.limit_depth(QUEUE_BYTES // max(1, getattr(sample, "nbytes", 1)))
                    first = False
                stats.frames_in += 1
                if not mailbox.put(captured):
                    break
                index += 1
                if pace:
                    next_due += pace
                    if stop.wait(max(0.0, next_due - time.monotonic())):
                        break
        except Exception as exc:
            self._capture_failed(exc)
        finally:
            mailbox.close()

    def _capture_failed(self, exc: Exception) -> None:
        source = self.source
        if isinstance(exc, SourceError):
            self.failure = str(exc)
            logger.error("%s: %s", source.describe(), exc)
        else:
            self.failure = f"{source.describe()}: {exc!r}"
            logger.error("%s: capture failed", source.describe(), exc_info=exc)

    def _work(self) -> None:
        capture: threading.Thread | None = None
        try:
            if self.capture_mode == "thread":
                capture = self._start_capture(0)
            else:
                next_index = self._work_inline()
                if next_index is None:
                    return
                capture = self._start_capture(next_index)
            self._work_mailbox()
        finally:
            self._stats.ended = time.perf_counter()
            self._stop.set()
            self.source.interrupt()
            self._mailbox.close(discard=True)
            if capture is not None:
                capture.join(_JOIN_SECONDS)
            self._done.set()

    def _start_capture(self, index: int) -> threading.Thread:
        thread = threading.Thread(
            target=self._capture, args=(index,), name="edge-capture", daemon=True
        )
        self._threads.append(thread)  # before it starts: stop() joins every listed thread
        thread.start()
        return thread

    def _work_inline(self) -> int | None:
        """Read and process on this thread; returns the next frame index when capture should
        move to its own thread (the ``auto`` rule decided decoding is worth overlapping),
        None when the loop is over."""
        source, stats, stop = self.source, self._stats, self._stop
        perf_ns, wall_time = time.perf_counter_ns, time.time
        limit = self.max_frames
        probing = self.capture_mode == "auto"
        reads: list[int] = []
        works: list[int] = []
        index = 0
        while not stop.is_set():
            if limit is not None and index >= limit:
                return None
            try:
                before = perf_ns()
                sample = source.read()
                captured = perf_ns()
            except Exception as exc:
                self._capture_failed(exc)
                return None
            if sample is None:
                return None
            stats.frames_in += 1
            if self._process(_Captured(index, captured, wall_time(), sample), captured):
                return None
            index += 1
            if probing and index > 1:  # frame 0 was decoded by open()
                reads.append(captured - before)
                works.append(perf_ns() - captured)
                if len(reads) == _PROBE_FRAMES:
                    probing = False
                    if overlap_pays(statistics.median(reads), statistics.median(works)):
                        self.capture_mode = "thread"
                        logger.info(
                            "%s: decoding %.0f us, processing %.0f us a frame: capture thread",
                            source.describe(),
                            statistics.median(reads) / 1e3,
                            statistics.median(works) / 1e3,
                        )
                        return index
                    self.capture_mode = "inline"
        return None

    def _work_mailbox(self) -> None:
        mailbox, stop = self._mailbox, self._stop
        perf_ns = time.perf_counter_ns
        while not stop.is_set():
            batch = mailbox.take_all()
            if not batch:
                break
            for item in batch:
                if stop.is_set() or self._process(item, perf_ns()):
                    return

    def _process(self, item: _Captured, taken: int) -> bool:
        """Run one sample through the current predictor and deliver the result; True once
        ``max_frames`` results are out."""
        ref_cond, stats = self._ref_cond, self._stats
        perf_ns = time.perf_counter_ns
        with ref_cond:
            predictor = self._predictor
            self._active = predictor
        try:
            t0 = perf_ns()
            prepared = predictor.preprocess(item.sample)
            t1 = perf_ns()
            outputs = predictor.infer(prepared)
            t2 = perf_ns()
            payload = predictor.postprocess(outputs, prepared)
            t3 = perf_ns()
        except Exception as exc:
            self._inference_failed(item.frame, exc)
            return False
        finally:
            # No lock needed to let go: swap() counts itself in _swap_waiting before it checks
            # _active, so either it sees None or we see it waiting and wake it (under the lock,
            # which its wait() releases).
            self._active = None
            if self._swap_waiting:
                with ref_cond:
                    ref_cond.notify_all()
        captured = item.captured_ns
        try:
            self.sink(FrameResult(item.frame, item.wall, (t3 - captured) / 1e6, payload))
        except Exception:
            stats.sink_errors += 1
            logger.exception("result sink failed on frame %d", item.frame)
        stats.results_out += 1
        t4 = perf_ns()
        wait, pre, invoke, post, overhead, total = self._histograms
        with self._record_lock:
            wait.add(taken - captured)
            pre.add(t1 - t0)
            invoke.add(t2 - t1)
            post.add(t3 - t2)
            overhead.add((t4 - taken) - (t2 - t0))
            total.add(t3 - captured)
        if self.max_frames is not None and stats.results_out >= self.max_frames:
            self._stop.set()
            return True
        return False

    def _inference_failed(self, index: int, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._stats.inference_errors += 1
        count = self._stats.inference_errors
        if count == 1 or count % 1000 == 0:
            logger.warning(
                "frame %d failed (%d so far): %s", index, count, self.last_error, exc_info=True
            )
        else:
            logger.debug("frame %d failed", index, exc_info=True)
