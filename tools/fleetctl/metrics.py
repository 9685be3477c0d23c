"""Prometheus metrics of ``fleetctl serve``, computed from the controller's SQLite at scrape time.

A private :class:`prometheus_client.CollectorRegistry` (never the global one) with one collector
that opens ``registry.sqlite`` read-only on each scrape, so the numbers are whatever ingest and
the rollout engine committed, whichever replica wrote them:

* ``fleet_devices_online`` - enrolled, non-removed devices whose retained state says online.
* ``fleet_devices{model,version}`` - enrolled devices by the model they report running
  (``none`` when they report none).
* ``fleet_rollout_progress{rollout}`` - fraction of a running rollout's devices done (0..1).
* ``fleet_inference_latency_p95_ms{model,version}`` - mean over devices of the p95 latency in
  each device's latest telemetry of the last :data:`LATENCY_WINDOW_S` seconds.
* ``fleet_ingest_*_total`` - ingest counters of this process (messages per kind, duplicates,
  malformed, unknown devices, bad signatures, unsigned events).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from threading import Thread
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tools.fleetctl.ingest import IngestCounters
from tools.fleetctl.views import rollout_progress

__all__ = ["LATENCY_WINDOW_S", "FleetCollector", "MetricsServer", "fleet_registry"]

logger = logging.getLogger(__name__)

LATENCY_WINDOW_S = 300.0


def _split_ref(ref: str | None) -> tuple[str, str]:
    if not ref:
        return "none", "none"
    name, _sep, version = ref.rpartition("@")
    return (name, version) if name else (ref, "")


class FleetCollector(Collector):
    """Reads the fleet gauges from SQLite and the ingest counters from memory on every scrape."""

    def __init__(
        self,
        database: Path,
        counters: Callable[[], IngestCounters] | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._database = database
        self._counters = counters
        self._clock = clock

    def collect(self) -> Iterator[Any]:
        """Yield every metric family (called by the registry on each scrape)."""
        try:
            db = sqlite3.connect(f"file:{self._database}?mode=ro", uri=True, timeout=5)
        except sqlite3.Error as exc:
            logger.warning("metrics: cannot open %s: %s", self._database, exc)
            return
        db.row_factory = sqlite3.Row
        try:
            yield from self._fleet(db)
        except sqlite3.Error as exc:
            logger.warning("metrics: query failed: %s", exc)
        finally:
            db.close()
        if self._counters is not None:
            yield from self._ingest(self._counters())

    def _fleet(self, db: sqlite3.Connection) -> Iterator[Any]:
        online = db.execute(
            "SELECT COUNT(*) FROM devices d JOIN device_state s ON s.device_id = d.id"
            " WHERE d.removed = 0 AND s.online = 1"
        ).fetchone()[0]
        yield GaugeMetricFamily(
            "fleet_devices_online", "Enrolled devices whose retained state is online", value=online
        )
        by_model = GaugeMetricFamily(
            "fleet_devices",
            "Enrolled devices by the model they report running",
            labels=("model", "version"),
        )
        for row in db.execute(
            "SELECT json_extract(s.active_model_json, '$.name') AS name,"
            " json_extract(s.active_model_json, '$.version') AS version, COUNT(*) AS n"
            " FROM devices d LEFT JOIN device_state s ON s.device_id = d.id"
            " WHERE d.removed = 0 GROUP BY name, version"
        ):
            by_model.add_metric((row["name"] or "none", row["version"] or "none"), row["n"])
        yield by_model
        progress = GaugeMetricFamily(
            "fleet_rollout_progress",
            "Fraction of a running rollout's devices done (0..1)",
            labels=("rollout",),
        )
        for rollout in rollout_progress(db):
            progress.add_metric((rollout.name,), rollout.fraction)
        yield progress
        latency = GaugeMetricFamily(
            "fleet_inference_latency_p95_ms",
            f"Mean of devices' latest p95 inference latency (last {LATENCY_WINDOW_S:.0f} s), ms",
            labels=("model", "version"),
        )
        for row in db.execute(
            "SELECT t.model, AVG(t.p95_ms) AS p95 FROM telemetry t"
            " JOIN (SELECT device_id, MAX(ts) AS ts FROM telemetry WHERE ts >= ?"
            " GROUP BY device_id) latest ON latest.device_id = t.device_id AND latest.ts = t.ts"
            " WHERE t.p95_ms IS NOT NULL GROUP BY t.model",
            (self._clock() - LATENCY_WINDOW_S,),
        ):
            latency.add_metric(_split_ref(row["model"]), row["p95"])
        yield latency

    @staticmethod
    def _ingest(counters: IngestCounters) -> Iterator[Any]:
        messages = CounterMetricFamily(
            "fleet_ingest_messages", "Device messages stored, by topic kind", labels=("kind",)
        )
        for kind, count in sorted(counters.messages.items()):
            messages.add_metric((kind,), count)
        yield messages
        for name, value, text in (
            ("duplicates", counters.duplicates, "Telemetry/events already stored (replays)"),
            ("malformed", counters.malformed, "Messages dropped as malformed"),
            ("unknown_device", counters.unknown_device, "Messages from devices not enrolled"),
            ("bad_signatures", counters.bad_signatures, "Events whose signed report failed"),
            ("unsigned_events", counters.unsigned_events, "Events without a signed report"),
        ):
            yield CounterMetricFamily(f"fleet_ingest_{name}", text, value=value)


def fleet_registry(
    database: Path, counters: Callable[[], IngestCounters] | None = None
) -> CollectorRegistry:
    """A private registry holding only the fleet collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(database, counters))
    return registry


class MetricsServer:
    """``/metrics`` over HTTP on its own thread."""

    def __init__(self, registry: CollectorRegistry, *, host: str, port: int) -> None:
        self._registry = registry
        self.host = host
        self.port = port
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None

    def start(self) -> None:
        """Listen; ``port`` 0 picks a free port (then read ``.port``)."""
        self._server, self._thread = start_http_server(
            self.port, addr=self.host, registry=self._registry
        )
        self.port = int(self._server.server_port)
        logger.info("metrics on http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None
