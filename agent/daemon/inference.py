"""The daemon's inference service: the frame loop, which model it runs, and hot swaps.

:class:`InferenceService` owns one :class:`~agent.pipeline.loop.FrameLoop` on the configured
source. The first :meth:`~InferenceService.activate` starts it; later ones swap the predictor
between two frames (no frame is lost) and return the model that was running, which the updater
keeps ready for an instant rollback. A model whose input kind differs (image vs sensor window)
restarts the loop on a source built for it.

Every predictor runs wrapped in a :class:`_TaggedPredictor` that marks, in the worker thread,
which model produced the frame. The result sink therefore knows the exact model of every
result, and when that changes it cuts the telemetry interval before the first frame of the new
model is recorded (the loop records a frame's latencies after calling the sink).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from agent.daemon.config import SourceConfig
from agent.daemon.telemetry import IntervalDrain, IntervalSample
from agent.modelcard import SensorPreprocess
from agent.pipeline.histogram import LatencyHistogram
from agent.pipeline.loop import FrameLoop, FrameResult
from agent.pipeline.predictor import Predictor

__all__ = ["InferenceService", "LoopHealth", "RunningModel"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class RunningModel:
    """A loaded model ready to run, with what reports say about it."""

    predictor: Predictor
    name: str
    version: str
    target: str
    sha256: str

    @property
    def label(self) -> str:
        """``name@version`` (telemetry's ``metrics.model``)."""
        return f"{self.name}@{self.version}"

    @property
    def backend(self) -> str:
        """The runtime in use."""
        return str(getattr(self.predictor.model, "runtime_name", ""))

    def close(self) -> None:
        """Release the runtime."""
        self.predictor.model.close()


@dataclass(frozen=True)
class LoopHealth:
    """Cumulative counters of the running loop, for the post-update watch."""

    results: int
    errors: int


class _TaggedPredictor:
    """Runs a model's predictor and records, per frame, which model produced the result."""

    def __init__(self, running: RunningModel, service: InferenceService) -> None:
        self.running = running
        self._inner = running.predictor
        self._service = service

    def preprocess(self, sample: Any) -> Any:
        return self._inner.preprocess(sample)

    def infer(self, prepared: Any) -> Sequence[npt.NDArray[Any]]:
        return self._inner.infer(prepared)

    def postprocess(self, outputs: Any, prepared: Any) -> dict[str, Any]:
        payload = self._inner.postprocess(outputs, prepared)
        self._service._producer = self.running  # read by the sink, same thread, next call
        return payload


class InferenceService:
    """Runs the current model on the source; swaps models atomically."""

    def __init__(
        self,
        source: SourceConfig,
        *,
        on_result: Callable[[FrameResult, RunningModel], None],
        on_model_change: Callable[[IntervalSample], None] | None = None,
    ) -> None:
        self._source_config = source
        self._on_result = on_result
        self._on_model_change = on_model_change
        self._lock = threading.RLock()
        self._loop: FrameLoop | None = None
        self._drain: IntervalDrain | None = None
        self._running: RunningModel | None = None
        self._producer: RunningModel | None = None
        self._last_producer: RunningModel | None = None
        #: ``total`` latency of every result, drained by the post-update watch
        self.watch_latency = LatencyHistogram()

    @property
    def running(self) -> RunningModel | None:
        """The model new frames run on (None before the first activation)."""
        return self._running

    @property
    def loop(self) -> FrameLoop | None:
        """The frame loop (None while no model runs)."""
        return self._loop

    def activate(self, model: RunningModel) -> RunningModel | None:
        """Run ``model`` from the next frame on; returns the model that ran before (not closed).

        :attr:`running` stays true to what the loop runs when this raises: ``model`` after a
        timed-out swap (the swap itself has happened), None when the loop had to restart for
        ``model`` and the new source did not open.

        Raises:
            SourceError: the source cannot be opened for this model.
            TimeoutError: the old model's frame in progress did not finish in time.
        """
        with self._lock:
            previous = self._running
            loop = self._loop
            if loop is not None and self._sensor_of(previous) == self._sensor_of(model):
                try:
                    loop.swap(_TaggedPredictor(model, self))
                finally:
                    self._running = model
            else:
                try:
                    self._start_loop(model)
                except Exception:
                    if self._loop is None:  # the old loop stopped and the new one did not start
                        self._running = None
                    raise
            logger.info(
                "running %s (%s)%s",
                model.label,
                model.backend,
                f", was {previous.label}" if previous is not None else "",
            )
            return previous

    def deactivate(self) -> RunningModel | None:
        """Stop inference altogether (no model to fall back to); returns the model stopped."""
        with self._lock:
            previous = self._running
            self._stop_loop()
            self._running = None
            return previous

    def reload_source(self, source: SourceConfig) -> None:
        """Restart the loop on a new ``[source]`` with the same model (SIGHUP)."""
        with self._lock:
            self._source_config = source
            if self._running is not None:
                self._start_loop(self._running)

    def health(self) -> LoopHealth:
        """Results and inference errors since the loop started."""
        loop = self._loop
        if loop is None:
            return LoopHealth(0, 0)
        stats = loop.stats
        return LoopHealth(stats.results_out, stats.inference_errors)

    def drain_interval(self) -> IntervalSample | None:
        """The telemetry interval since the last drain (None while nothing runs)."""
        with self._lock:
            drain, running = self._drain, self._running
        if drain is None:
            return None
        label = running.label if running is not None else None
        return drain.drain(label, time.monotonic())

    def describe(self) -> str:
        """One line for ``STATUS=``: the model and its frame rate."""
        running, loop = self._running, self._loop
        if running is None or loop is None:
            return "no model"
        state = "source ended" if loop.wait(0) else f"{loop.stats.fps:.1f} fps"
        return f"running {running.label}, {state}"

    def stop(self) -> None:
        """Stop the loop (the source is closed); models are not closed."""
        with self._lock:
            self._stop_loop()

    # ---- internals ---------------------------------------------------------------------------

    @staticmethod
    def _sensor_of(model: RunningModel | None) -> SensorPreprocess | None:
        if model is None:
            return None
        preprocess = model.predictor.card.preprocess
        return preprocess if isinstance(preprocess, SensorPreprocess) else None

    def _start_loop(self, model: RunningModel) -> None:
        from agent.pipeline.sources import parse_source  # noqa: PLC0415 - cv2 on first use

        self._stop_loop()
        config = self._source_config
        source = parse_source(config.spec, loop=config.loop, sensor=self._sensor_of(model))
        loop = FrameLoop(
            source, _TaggedPredictor(model, self), self._sink, realtime=config.realtime
        )
        loop.start()
        self._loop = loop
        self._drain = IntervalDrain(loop.stats, started=time.monotonic())
        self._running = model
        self._last_producer = model

    def _stop_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        loop.stop()
        drain, self._drain = self._drain, None
        if drain is not None and self._on_model_change is not None and self._last_producer:
            self._on_model_change(drain.drain(self._last_producer.label, time.monotonic()))

    def _sink(self, result: FrameResult) -> None:
        producer = self._producer
        if producer is None:
            return
        if producer is not self._last_producer:
            drain = self._drain
            old = self._last_producer
            self._last_producer = producer
            if drain is not None and old is not None and self._on_model_change is not None:
                self._on_model_change(drain.drain(old.label, time.monotonic()))
        self.watch_latency.record(int(result.latency_ms * 1e6))
        self._on_result(result, producer)
