"""Device message ingest: state, telemetry and events from MQTT into the controller's SQLite.

:class:`IngestStore` owns three tables in ``registry.sqlite`` (created here with
``CREATE TABLE IF NOT EXISTS``):

* ``device_state`` - one row per device: the last retained birth/will, hardware, active model,
  ``last_seen`` (any message from the device).
* ``telemetry`` - primary key ``(device_id, boot_id, seq)``, so an outbox replay is a duplicate
  and not a second row; :meth:`IngestStore.seq_gaps` lists holes in a boot's sequence.
* ``events`` - update lifecycle events, unique by ``(device_id, boot_id, seq)``, with
  ``verified`` = 1 only when the event's signed ``report`` verifies with the device's Ed25519 key
  from the registry and names the same device, kind, target, version, boot, seq and time, and
  also the same ``reason`` and ``previous_version`` whenever the event carries them.
  Unsigned or badly signed events are kept (flagged) for the operator, never used as evidence.

:class:`Ingest` turns one MQTT message into one store call. The device id comes from the topic
(the broker's ACL binds it to the client's identity) and must be enrolled and not removed;
anything malformed is dropped and counted. It never touches the network: the service hands it
messages from a queue (see tools.fleetctl.serve). Every telemetry report and event that is
committed, or found to be a duplicate, is reported to ``on_stored`` so the service can
acknowledge it to the device (tools.fleetctl.acks).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.protocol.errors import ProtocolError
from agent.protocol.messages import (
    EventMessage,
    ResultMessage,
    StateMessage,
    TelemetryMessage,
    decode,
)
from agent.protocol.topics import Topics
from agent.schema import dump
from agent.supplychain.errors import SupplyChainError
from agent.supplychain.reports import verify_report

__all__ = [
    "INGEST_SCHEMA",
    "EnrolledDevices",
    "Ingest",
    "IngestCounters",
    "IngestStore",
    "SeqGap",
    "open_database",
]

logger = logging.getLogger(__name__)

INGEST_SCHEMA = """
CREATE TABLE IF NOT EXISTS device_state (
    device_id TEXT PRIMARY KEY,
    online INTEGER NOT NULL,
    boot_id TEXT,
    agent_version TEXT,
    state_ts REAL,
    backends_json TEXT NOT NULL DEFAULT '[]',
    hardware_json TEXT,
    active_model_json TEXT,
    state_received_at REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS telemetry (
    device_id TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    received_at REAL NOT NULL,
    model TEXT,
    fps REAL NOT NULL,
    p95_ms REAL,
    metrics_json TEXT NOT NULL,
    PRIMARY KEY (device_id, boot_id, seq)
);
CREATE INDEX IF NOT EXISTS telemetry_device_ts ON telemetry(device_id, ts);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    received_at REAL NOT NULL,
    kind TEXT NOT NULL,
    target TEXT,
    version TEXT,
    previous_version TEXT,
    reason TEXT,
    verified INTEGER NOT NULL,
    verify_error TEXT,
    report_json TEXT,
    UNIQUE (device_id, boot_id, seq)
);
CREATE INDEX IF NOT EXISTS events_device_ts ON events(device_id, ts);
"""

# A message from a device without a state row yet (state arrives first, normally) still counts.
_TOUCH = (
    "INSERT INTO device_state (device_id, online, state_received_at, last_seen) VALUES (?, 0, 0, ?)"
    " ON CONFLICT(device_id) DO UPDATE SET last_seen = MAX(last_seen, ?)"
)

# Latency stage whose p95 stands for "inference latency" in views and metrics, in order.
P95_STAGES = ("total", "inference", "invoke")


def open_database(path: str | Path) -> sqlite3.Connection:
    """Open ``registry.sqlite`` (WAL) for ingest and views, creating the ingest tables."""
    connection = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA busy_timeout = 5000")
    connection.executescript(INGEST_SCHEMA)
    return connection


@dataclass(frozen=True)
class SeqGap:
    """Telemetry ``seq`` values missing between two received messages of one boot."""

    device_id: str
    boot_id: str
    after_seq: int
    before_seq: int

    @property
    def missing(self) -> int:
        """How many messages are missing."""
        return self.before_seq - self.after_seq - 1


def _p95(metrics: TelemetryMessage) -> float | None:
    for stage in P95_STAGES:
        stats = metrics.metrics.latency_ms.get(stage)
        if stats is not None and stats.count > 0:
            return stats.p95
    return None


class IngestStore:
    """Writes and reads the ingest tables; thread-safe (one connection behind a lock)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path) -> IngestStore:
        """Open the store in ``registry.sqlite`` at ``path``."""
        return cls(open_database(path))

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    @property
    def connection(self) -> sqlite3.Connection:
        """The underlying connection (read-only use by views and metrics)."""
        return self._db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def touch(self, device_id: str, now: float) -> None:
        """Record that ``device_id`` sent something at ``now``."""
        with self._transaction() as db:
            db.execute(_TOUCH, (device_id, now, now))

    def record_state(self, device_id: str, state: StateMessage, now: float) -> bool:
        """Store a birth or Last Will; returns False for a stale will (of an earlier boot)."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT online, boot_id FROM device_state WHERE device_id = ?", (device_id,)
            ).fetchone()
            if (
                not state.online
                and row is not None
                and row["online"]
                and state.boot_id is not None
                and row["boot_id"] != state.boot_id
            ):
                # The will of a previous boot arrived after the next boot's birth.
                return False
            hardware = None if state.hardware is None else json.dumps(dump(state.hardware))
            active = None if state.active_model is None else json.dumps(dump(state.active_model))
            if not state.online and row is not None:
                db.execute(
                    "UPDATE device_state SET online = 0, state_ts = ?, state_received_at = ?"
                    " WHERE device_id = ?",
                    (state.ts, now, device_id),
                )
                return True
            db.execute(
                "INSERT INTO device_state (device_id, online, boot_id, agent_version, state_ts,"
                " backends_json, hardware_json, active_model_json, state_received_at, last_seen)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(device_id) DO UPDATE SET online = excluded.online,"
                " boot_id = excluded.boot_id, agent_version = excluded.agent_version,"
                " state_ts = excluded.state_ts, backends_json = excluded.backends_json,"
                " hardware_json = excluded.hardware_json,"
                " active_model_json = excluded.active_model_json,"
                " state_received_at = excluded.state_received_at, last_seen = excluded.last_seen",
                (
                    device_id,
                    int(state.online),
                    state.boot_id,
                    state.agent_version,
                    state.ts,
                    json.dumps(list(state.backends)),
                    hardware,
                    active,
                    now,
                    now,
                ),
            )
            return True

    def record_telemetry(self, device_id: str, message: TelemetryMessage, now: float) -> bool:
        """Store one telemetry message; returns False if it is a duplicate."""
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO telemetry (device_id, boot_id, seq, ts, received_at,"
                " model, fps, p95_ms, metrics_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    device_id,
                    message.boot_id,
                    message.seq,
                    message.ts,
                    now,
                    message.metrics.model,
                    message.metrics.fps,
                    _p95(message),
                    json.dumps(dump(message.metrics), separators=(",", ":")),
                ),
            )
            db.execute(_TOUCH, (device_id, now, now))
            return cursor.rowcount == 1

    def record_event(
        self,
        device_id: str,
        event: EventMessage,
        now: float,
        *,
        verified: bool,
        verify_error: str | None,
    ) -> bool:
        """Store one event with its verification outcome; returns False if it is a duplicate."""
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO events (device_id, boot_id, seq, ts, received_at, kind,"
                " target, version, previous_version, reason, verified, verify_error, report_json)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    device_id,
                    event.boot_id,
                    event.seq,
                    event.ts,
                    now,
                    event.kind,
                    event.target,
                    event.version,
                    event.previous_version,
                    event.reason,
                    int(verified),
                    verify_error,
                    None if event.report is None else json.dumps(event.report),
                ),
            )
            db.execute(_TOUCH, (device_id, now, now))
            return cursor.rowcount == 1

    def seq_gaps(self, device_id: str | None = None) -> list[SeqGap]:
        """Holes in telemetry ``seq`` per (device, boot): messages that never arrived."""
        with self._lock:
            rows = self._db.execute(
                "SELECT device_id, boot_id, prev, seq FROM (SELECT device_id, boot_id, seq,"
                " LAG(seq) OVER (PARTITION BY device_id, boot_id ORDER BY seq) AS prev"
                " FROM telemetry WHERE ? IS NULL OR device_id = ?)"
                " WHERE prev IS NOT NULL AND seq > prev + 1"
                " ORDER BY device_id, boot_id, seq",
                (device_id, device_id),
            ).fetchall()
        return [SeqGap(r["device_id"], r["boot_id"], r["prev"], r["seq"]) for r in rows]


class EnrolledDevices:
    """Enrolled, non-removed devices and their report keys, read from the registry.

    Re-read when an unknown id shows up (at most every ``reload_interval`` seconds), so a device
    enrolled while the controller runs is accepted without a restart.
    """

    def __init__(
        self,
        load: Callable[[], dict[str, str]],
        *,
        reload_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._reload_interval = reload_interval
        self._clock = clock
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._loaded_at: float | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_registry(cls, registry_path: Path, **kwargs: Any) -> EnrolledDevices:
        """Read ``devices`` (id, ed25519_public, removed) from ``registry.sqlite``."""

        def load() -> dict[str, str]:
            connection = sqlite3.connect(f"file:{registry_path}?mode=ro", uri=True)
            try:
                rows = connection.execute(
                    "SELECT id, ed25519_public FROM devices WHERE removed = 0"
                ).fetchall()
            finally:
                connection.close()
            return {str(r[0]): str(r[1]) for r in rows}

        return cls(load, **kwargs)

    def _reload(self) -> None:
        keys: dict[str, Ed25519PublicKey] = {}
        for device_id, ed25519 in self._load().items():
            try:
                raw = base64.b64decode(ed25519.encode("ascii"), validate=True)
                keys[device_id] = Ed25519PublicKey.from_public_bytes(raw)
            except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
                logger.error("device %s: its registry Ed25519 key is unusable: %s", device_id, exc)
        self._keys = keys
        self._loaded_at = self._clock()

    def key(self, device_id: str) -> Ed25519PublicKey | None:
        """The device's report key, or None when it is not enrolled (or removed)."""
        with self._lock:
            # Re-read on a schedule: devices get enrolled and removed while the service runs.
            if self._loaded_at is None or self._clock() - self._loaded_at >= self._reload_interval:
                self._reload()
            return self._keys.get(device_id)


@dataclass
class IngestCounters:
    """What ingest saw since the service started (exported as Prometheus counters)."""

    messages: dict[str, int] = field(default_factory=dict)  # per topic kind, accepted
    duplicates: int = 0
    malformed: int = 0
    unknown_device: int = 0
    bad_signatures: int = 0
    unsigned_events: int = 0
    stale_wills: int = 0


_SIGNED_WHEN_PRESENT = ("reason", "previous_version")


def check_event_report(
    device_id: str, event: EventMessage, key: Ed25519PublicKey
) -> tuple[bool, str | None]:
    """Whether ``event.report`` is a valid signature by ``key`` over this very event.

    Returns ``(verified, why_not)``.
    """
    if event.report is None:
        return False, "unsigned: the event carries no report"
    try:
        report = verify_report(event.report, key)
    except SupplyChainError as exc:
        return False, str(exc)
    expected: dict[str, Any] = {
        "device_id": device_id,
        "kind": event.kind,
        "target": event.target,
        "version": event.version,
        "boot_id": event.boot_id,
        "seq": event.seq,
        "ts": event.ts,
    }
    # What the event shows besides must be signed too: a reason or previous version that the
    # report does not cover could have been rewritten on the way.
    for name in _SIGNED_WHEN_PRESENT:
        value = getattr(event, name)
        if value is not None:
            expected[name] = value
    for name, value in expected.items():
        if report.get(name) != value:
            return False, f"report.{name} is {report.get(name)!r}: expected {value!r} (the event's)"
    return True, None


class Ingest:
    """Validates device messages and stores them; see the module docstring."""

    def __init__(
        self,
        store: IngestStore,
        devices: EnrolledDevices,
        topics: Topics,
        *,
        clock: Callable[[], float] = time.time,
        on_stored: Callable[[str, str, str, int], None] | None = None,
    ) -> None:
        """``on_stored(device_id, kind, boot_id, seq)`` is called once a telemetry report or
        event is in the database (stored now or before: a duplicate)."""
        self.store = store
        self.devices = devices
        self.topics = topics
        self._on_stored = on_stored
        self.counters = IngestCounters()
        self._clock = clock
        self._lock = threading.Lock()

    def _count(self, name: str, kind: str | None = None) -> None:
        with self._lock:
            if kind is not None:
                self.counters.messages[kind] = self.counters.messages.get(kind, 0) + 1
            else:
                setattr(self.counters, name, getattr(self.counters, name) + 1)

    def _stored(self, device_id: str, kind: str, boot_id: str, seq: int) -> None:
        if self._on_stored is not None:
            self._on_stored(device_id, kind, boot_id, seq)

    def handle(self, topic: str, payload: bytes) -> str:
        """Process one message; returns what happened (``stored``, ``duplicate``, ``malformed``,
        ``unknown-device``, ``stale-will``, ``ignored``)."""
        try:
            parsed = self.topics.parse(topic)
        except ProtocolError as exc:
            self._count("malformed")
            logger.warning("dropped a message on %s: %s", topic[:120], exc)
            return "malformed"
        device_id, kind = parsed.device_id, parsed.kind
        if kind == "state" and not payload:
            return "ignored"  # a cleared retained state
        key = self.devices.key(device_id)
        if key is None:
            self._count("unknown_device")
            logger.warning("ignored %s from %s: not an enrolled device", kind, device_id)
            return "unknown-device"
        now = self._clock()
        try:
            if kind == "state":
                state = decode(StateMessage, payload)
                if not self.store.record_state(device_id, state, now):
                    self._count("stale_wills")
                    return "stale-will"
            elif kind == "telemetry":
                telemetry = decode(TelemetryMessage, payload)
                stored = self.store.record_telemetry(device_id, telemetry, now)
                self._stored(device_id, kind, telemetry.boot_id, telemetry.seq)
                if not stored:
                    self._count("duplicates")
                    return "duplicate"
            elif kind == "events":
                event = decode(EventMessage, payload)
                verified, why = check_event_report(device_id, event, key)
                if not verified:
                    self._count("unsigned_events" if event.report is None else "bad_signatures")
                    logger.warning(
                        "event %s from %s (seq %d) is not evidence: %s",
                        event.kind,
                        device_id,
                        event.seq,
                        why,
                    )
                stored = self.store.record_event(
                    device_id, event, now, verified=verified, verify_error=why
                )
                self._stored(device_id, kind, event.boot_id, event.seq)
                if not stored:
                    self._count("duplicates")
                    return "duplicate"
            elif kind == "results":
                decode(ResultMessage, payload)
                self.store.touch(device_id, now)
            else:
                return "ignored"
        except ProtocolError as exc:
            self._count("malformed")
            logger.warning("dropped a malformed %s from %s: %s", kind, device_id, exc)
            return "malformed"
        self._count("messages", kind)
        return "stored"
