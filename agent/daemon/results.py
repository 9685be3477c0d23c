"""Which inference results the daemon publishes, and publishing them on the results topic.

:class:`ResultsPolicy` is pure: it sees each result payload with its capture time and says
whether it goes out, per ``[results] policy``:

* ``every``: every result;
* ``on_change``: when the *summary* changed - the top-1 label (classification), the number of
  detections (detection), the anomaly flag (anomaly); raw outputs always count as changed;
* ``interval``: at most one result every ``interval_s`` seconds;
* ``above_score``: when the best score (top-1, best detection, anomaly score) is >= ``min_score``.

:class:`ResultPublisher` builds the :class:`~agent.protocol.messages.ResultMessage` and publishes
it directly on the transport at the configured QoS. Results never go through the outbox: a stale
result is worthless, so one produced while disconnected is counted and dropped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from agent.daemon.config import ResultsConfig
from agent.protocol.errors import ProtocolError
from agent.protocol.messages import ResultMessage, encode
from agent.protocol.topics import Topics
from agent.transport.base import Transport, TransportError

__all__ = ["ResultPublisher", "ResultsPolicy", "result_kind", "result_score", "result_summary"]

logger = logging.getLogger(__name__)


def result_kind(payload: dict[str, Any]) -> str:
    """The payload shape: ``classification``, ``detection``, ``anomaly`` or ``raw``."""
    if "top" in payload:
        return "classification"
    if "detections" in payload:
        return "detection"
    if "anomaly" in payload:
        return "anomaly"
    return "raw"


def result_summary(payload: dict[str, Any]) -> object:
    """What ``on_change`` compares: top-1 label, detection count or anomaly flag."""
    kind = result_kind(payload)
    if kind == "classification":
        top = payload["top"]
        return top[0].get("label", top[0].get("index")) if top else None
    if kind == "detection":
        return len(payload["detections"])
    if kind == "anomaly":
        return bool(payload["anomaly"])
    return object()  # raw: never equal to the previous one


def result_score(payload: dict[str, Any]) -> float:
    """The best score of the payload (0.0 when it has none)."""
    kind = result_kind(payload)
    if kind == "classification":
        return float(payload["top"][0]["score"]) if payload["top"] else 0.0
    if kind == "detection":
        return max((float(d["score"]) for d in payload["detections"]), default=0.0)
    if kind == "anomaly":
        return float(payload.get("score", 0.0))
    return 0.0


class ResultsPolicy:
    """Decides, result by result, what is published. Not thread-safe: one caller (the worker)."""

    def __init__(self, config: ResultsConfig) -> None:
        self.config = config
        self._last_summary: object = None
        self._has_last = False
        self._last_sent: float | None = None

    def reconfigure(self, config: ResultsConfig) -> None:
        """Apply a reloaded ``[results]`` section (the change/interval memory starts over)."""
        self.config = config
        self._has_last = False
        self._last_sent = None

    def should_publish(self, payload: dict[str, Any], ts: float) -> bool:
        """Whether the result ``payload`` captured at ``ts`` (seconds) goes out."""
        policy = self.config.policy
        if policy == "every":
            return True
        if policy == "on_change":
            summary = result_summary(payload)
            changed = not self._has_last or summary != self._last_summary
            self._last_summary, self._has_last = summary, True
            return changed
        if policy == "interval":
            if self._last_sent is not None and ts - self._last_sent < self.config.interval_s:
                return False
            self._last_sent = ts
            return True
        return result_score(payload) >= self.config.min_score


class ResultPublisher:
    """Applies the policy and publishes results; call :meth:`offer` from the inference worker."""

    def __init__(
        self,
        transport: Transport,
        topics: Topics,
        device_id: str,
        config: ResultsConfig,
        *,
        boot_id: str,
        clock: Callable[[], float],
    ) -> None:
        self._transport = transport
        self._topic = topics.results(device_id)
        self._boot_id = boot_id
        self._clock = clock
        self._lock = threading.Lock()
        self.policy = ResultsPolicy(config)
        self.seq = 0
        self.published = 0
        self.dropped_offline = 0

    def reconfigure(self, config: ResultsConfig) -> None:
        """Apply a reloaded ``[results]`` section."""
        with self._lock:
            self.policy.reconfigure(config)

    def offer(
        self,
        payload: dict[str, Any],
        *,
        frame: int,
        ts: float,
        latency_ms: float,
        model: str,
        model_version: str,
    ) -> bool:
        """Publish the result if the policy wants it; returns whether it went out."""
        with self._lock:
            if not self.policy.should_publish(payload, ts):
                return False
            qos = self.policy.config.qos
            if not self._transport.is_connected:
                self.dropped_offline += 1
                return False
            message = ResultMessage(
                boot_id=self._boot_id,
                seq=self.seq,
                ts=ts,
                kind=result_kind(payload),  # type: ignore[arg-type]
                result={**payload, "frame": frame},
                model=model,
                model_version=model_version,
                latency_ms=round(latency_ms, 3),
            )
            try:
                self._transport.publish(self._topic, encode(message), qos=qos)
            except (TransportError, ProtocolError) as exc:
                self.dropped_offline += 1
                logger.debug("result of frame %d not published: %s", frame, exc)
                return False
            self.seq += 1
            self.published += 1
            return True
