"""Ingest: dedupe, malformed and unknown devices dropped and counted, signatures, seq gaps."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.protocol.messages import (
    MAX_ACK_RANGES,
    Ack,
    ActiveModel,
    EventMessage,
    LatencyStats,
    StateMessage,
    TelemetryMessage,
    TelemetryMetrics,
    decode,
    encode,
)
from agent.protocol.topics import Topics
from agent.supplychain.identity import DeviceIdentity
from agent.supplychain.reports import sign_report
from agent.transport import MemoryBroker, MemoryTransport, MessageProperties
from tools.fleetctl.acks import AckBatcher
from tools.fleetctl.ingest import EnrolledDevices, Ingest, IngestStore
from tools.fleetctl.registry import Registry

TOPICS = Topics()
BOOT = "b00t"


class Fleet:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.identities: dict[str, DeviceIdentity] = {}
        self.clock = 1000.0
        Registry.open(path, create=True).close()
        self.store = IngestStore.open(path)
        self.ingest = Ingest(
            self.store,
            EnrolledDevices.from_registry(path, reload_interval=0.0),
            TOPICS,
            clock=lambda: self.clock,
        )

    def enrol(self, device_id: str, *, removed: bool = False) -> DeviceIdentity:
        identity = DeviceIdentity.generate()
        keys = identity.public_keys()
        with Registry.open(self.path) as registry:
            registry.add_device(
                device_id, tags=("lab",), x25519_public=keys.x25519, ed25519_public=keys.ed25519
            )
            if removed:
                registry.remove_device(device_id)
        self.identities[device_id] = identity
        return identity


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path / "registry.sqlite")
    yield f
    f.store.close()


def telemetry(seq: int, *, p95: float = 12.5, boot: str = BOOT) -> bytes:
    metrics = TelemetryMetrics(
        interval_s=10.0,
        fps=29.5,
        model="digits@1",
        latency_ms={"total": LatencyStats(count=295, p50=8.0, p95=p95, p99=14.0, max=20.0)},
    )
    return encode(TelemetryMessage(boot_id=boot, seq=seq, ts=1000.0 + seq, metrics=metrics))


def signed_event(
    device_id: str,
    identity: DeviceIdentity,
    seq: int,
    *,
    kind: str = "committed",
    signed_extra: dict[str, str] | None = None,
) -> EventMessage:
    event = EventMessage(
        boot_id=BOOT, seq=seq, ts=2000.0 + seq, kind=kind, target="image/t.enc", version="2"
    )
    report = {
        **(signed_extra or {}),
        "device_id": device_id,
        "kind": kind,
        "target": event.target,
        "version": event.version,
        "sha256": "00" * 32,
        "boot_id": BOOT,
        "seq": seq,
        "ts": event.ts,
    }
    return replace(event, report=sign_report(report, identity.ed25519))


def event_rows(fleet: Fleet) -> list[tuple[int, str, int, str | None]]:
    rows = fleet.store.connection.execute(
        "SELECT seq, kind, verified, verify_error FROM events ORDER BY seq"
    ).fetchall()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def test_telemetry_replay_is_deduplicated(fleet: Fleet) -> None:
    fleet.enrol("pi-01")
    topic = TOPICS.telemetry("pi-01")
    assert [fleet.ingest.handle(topic, telemetry(s)) for s in (1, 2, 1, 2, 3)] == [
        "stored",
        "stored",
        "duplicate",
        "duplicate",
        "stored",
    ]
    count = fleet.store.connection.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0]
    assert count == 3
    assert fleet.ingest.counters.duplicates == 2
    assert fleet.ingest.counters.messages == {"telemetry": 3}
    # The same seq in another boot is a different message.
    assert fleet.ingest.handle(topic, telemetry(1, boot="other")) == "stored"


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b'{"boot_id": "b", "seq": -1, "ts": 1.0, "metrics": {}}',
        b'{"boot_id": "b", "seq": 1, "seq": 2, "ts": 1.0, "metrics": {}}',
        b'{"boot_id": "b", "seq": 1, "ts": NaN, "metrics": {}}',
        b"[]",
    ],
)
def test_malformed_telemetry_is_dropped_and_counted(fleet: Fleet, payload: bytes) -> None:
    fleet.enrol("pi-01")
    assert fleet.ingest.handle(TOPICS.telemetry("pi-01"), payload) == "malformed"
    assert fleet.ingest.counters.malformed == 1
    assert fleet.store.connection.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0] == 0


def test_unknown_and_removed_devices_are_ignored(fleet: Fleet) -> None:
    fleet.enrol("gone", removed=True)
    assert fleet.ingest.handle(TOPICS.telemetry("stranger"), telemetry(1)) == "unknown-device"
    assert fleet.ingest.handle(TOPICS.telemetry("gone"), telemetry(1)) == "unknown-device"
    assert fleet.ingest.handle("edge/v1/dev/UPPER/telemetry", telemetry(1)) == "malformed"
    assert fleet.ingest.counters.unknown_device == 2
    assert fleet.store.connection.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0] == 0


def test_device_enrolled_while_running_is_accepted(fleet: Fleet) -> None:
    assert fleet.ingest.handle(TOPICS.telemetry("late"), telemetry(1)) == "unknown-device"
    fleet.enrol("late")
    assert fleet.ingest.handle(TOPICS.telemetry("late"), telemetry(1)) == "stored"


def test_signed_event_is_verified(fleet: Fleet) -> None:
    identity = fleet.enrol("pi-01")
    event = signed_event("pi-01", identity, 5)
    assert fleet.ingest.handle(TOPICS.events("pi-01"), encode(event)) == "stored"
    assert fleet.ingest.handle(TOPICS.events("pi-01"), encode(event)) == "duplicate"
    assert event_rows(fleet) == [(5, "committed", 1, None)]
    assert fleet.ingest.counters.bad_signatures == 0


def test_bad_signatures_are_stored_flagged(fleet: Fleet) -> None:
    identity = fleet.enrol("pi-01")
    other = fleet.enrol("pi-02")
    topic = TOPICS.events("pi-01")
    # Signed by another device's key.
    fleet.ingest.handle(topic, encode(signed_event("pi-01", other, 1)))
    # A valid report of pi-02 replayed on pi-01's topic.
    fleet.ingest.handle(topic, encode(signed_event("pi-02", identity, 2)))
    # A valid signature over a different event (kind changed after signing).
    honest = signed_event("pi-01", identity, 3, kind="failed")
    fleet.ingest.handle(topic, encode(replace(honest, kind="committed")))
    # Tampered report body.
    tampered = signed_event("pi-01", identity, 4)
    assert tampered.report is not None
    body = {**tampered.report["report"], "version": "9"}
    fleet.ingest.handle(
        topic, encode(replace(tampered, report={**tampered.report, "report": body}))
    )
    # No report at all.
    fleet.ingest.handle(topic, encode(replace(signed_event("pi-01", identity, 6), report=None)))
    rows = event_rows(fleet)
    assert [r[2] for r in rows] == [0, 0, 0, 0, 0]
    assert "signature does not verify" in str(rows[0][3])
    assert "report.device_id" in str(rows[1][3])
    assert "report.kind" in str(rows[2][3])
    assert "signature does not verify" in str(rows[3][3])
    assert "unsigned" in str(rows[4][3])
    assert fleet.ingest.counters.bad_signatures == 4
    assert fleet.ingest.counters.unsigned_events == 1


def test_reason_and_previous_version_count_only_when_signed(fleet: Fleet) -> None:
    identity = fleet.enrol("pi-01")
    topic = TOPICS.events("pi-01")
    extra = {"reason": "self-test failed: accuracy 0.1", "previous_version": "1"}
    signed = signed_event("pi-01", identity, 1, kind="failed", signed_extra=extra)
    reason, previous = extra["reason"], extra["previous_version"]
    fleet.ingest.handle(topic, encode(replace(signed, reason=reason, previous_version=previous)))
    # The same fields added to an event whose report does not cover them.
    bare = signed_event("pi-01", identity, 2, kind="failed")
    fleet.ingest.handle(topic, encode(replace(bare, reason="made up")))
    bare3 = signed_event("pi-01", identity, 3, kind="failed")
    fleet.ingest.handle(topic, encode(replace(bare3, previous_version="0")))
    # Covered, but rewritten after signing.
    rewritten = signed_event("pi-01", identity, 4, kind="failed", signed_extra=extra)
    fleet.ingest.handle(
        topic, encode(replace(rewritten, reason="something else", previous_version=previous))
    )
    rows = event_rows(fleet)
    assert [r[2] for r in rows] == [1, 0, 0, 0]
    assert "report.reason is None" in str(rows[1][3])
    assert "report.previous_version is None" in str(rows[2][3])
    assert "report.reason is 'self-test failed" in str(rows[3][3])


def test_seq_gaps_are_listed(fleet: Fleet) -> None:
    fleet.enrol("pi-01")
    fleet.enrol("pi-02")
    for seq in (0, 1, 2, 5, 6, 9):
        fleet.ingest.handle(TOPICS.telemetry("pi-01"), telemetry(seq))
    for seq in (0, 1, 2):
        fleet.ingest.handle(TOPICS.telemetry("pi-02"), telemetry(seq))
    gaps = fleet.store.seq_gaps()
    assert [(g.device_id, g.after_seq, g.before_seq, g.missing) for g in gaps] == [
        ("pi-01", 2, 5, 2),
        ("pi-01", 6, 9, 2),
    ]
    assert fleet.store.seq_gaps("pi-02") == []
    # The replay that fills a hole closes it.
    for seq in (3, 4, 7, 8):
        fleet.ingest.handle(TOPICS.telemetry("pi-01"), telemetry(seq))
    assert fleet.store.seq_gaps() == []


def state(online: bool, boot: str) -> bytes:
    return encode(
        StateMessage(
            online=online,
            boot_id=boot,
            agent_version="0.1.0" if online else None,
            ts=1.0,
            active_model=ActiveModel(name="digits", version="1") if online else None,
        )
    )


def test_stale_will_does_not_mark_a_rebooted_device_offline(fleet: Fleet) -> None:
    fleet.enrol("pi-01")
    topic = TOPICS.state("pi-01")
    assert fleet.ingest.handle(topic, state(True, "boot-2")) == "stored"
    assert fleet.ingest.handle(topic, state(False, "boot-1")) == "stale-will"
    row = fleet.store.connection.execute("SELECT online, active_model_json FROM device_state")
    online, active = row.fetchone()
    assert online == 1 and json.loads(active)["version"] == "1"
    assert fleet.ingest.handle(topic, state(False, "boot-2")) == "stored"
    assert fleet.store.connection.execute("SELECT online FROM device_state").fetchone()[0] == 0


def test_ingest_over_the_memory_transport(fleet: Fleet) -> None:
    fleet.enrol("pi-01")
    broker = MemoryBroker()
    controller = MemoryTransport(broker=broker, client_id="ctl")

    def handler(topic: str, payload: bytes, _props: MessageProperties) -> None:
        fleet.ingest.handle(topic, payload)

    for topic_filter in TOPICS.controller_filters().values():
        controller.subscribe(topic_filter, handler, qos=1)
    device = MemoryTransport(broker=broker, client_id="pi-01")
    device.connect()
    device.publish(TOPICS.state("pi-01"), state(True, BOOT), qos=1, retain=True)
    controller.connect()  # the retained state reaches a late subscriber
    for seq in range(3):
        device.publish(TOPICS.telemetry("pi-01"), telemetry(seq), qos=1)
    assert fleet.ingest.counters.messages == {"state": 1, "telemetry": 3}
    assert fleet.store.connection.execute("SELECT online FROM device_state").fetchone()[0] == 1


# ---- acknowledgements --------------------------------------------------------------------------


class AckedFleet:
    """Ingest wired to an AckBatcher publishing over the in-memory broker; records device Acks."""

    def __init__(self, fleet: Fleet) -> None:
        self.now = 0.0
        broker = MemoryBroker()
        self.controller = MemoryTransport(broker=broker, client_id="ctl")
        self.controller.connect()
        self.acks = AckBatcher(lambda: self.controller, TOPICS, clock=lambda: self.now)
        fleet.ingest = Ingest(
            fleet.store,
            EnrolledDevices.from_registry(fleet.path, reload_interval=0.0),
            TOPICS,
            clock=lambda: fleet.clock,
            on_stored=self.acks.add,
        )
        self.received: list[tuple[str, Ack]] = []
        self.device = MemoryTransport(broker=broker, client_id="watcher")
        self.device.subscribe(f"{TOPICS.prefix}/dev/+/ack", self._on_ack, qos=1)
        self.device.connect()

    def _on_ack(self, topic: str, payload: bytes, _props: MessageProperties) -> None:
        self.received.append((TOPICS.parse(topic).device_id, decode(Ack, payload)))


def test_stored_and_duplicate_messages_are_acked_once_per_device_and_boot(fleet: Fleet) -> None:
    identity = fleet.enrol("pi-01")
    fleet.enrol("pi-02")
    acked = AckedFleet(fleet)
    for seq in (0, 1, 2, 4):
        assert fleet.ingest.handle(TOPICS.telemetry("pi-01"), telemetry(seq)) == "stored"
    assert fleet.ingest.handle(TOPICS.telemetry("pi-01"), telemetry(1)) == "duplicate"
    assert fleet.ingest.handle(TOPICS.telemetry("pi-02"), telemetry(9, boot="other")) == "stored"
    event = encode(signed_event("pi-01", identity, 3))
    assert fleet.ingest.handle(TOPICS.events("pi-01"), event) == "stored"
    assert fleet.ingest.handle(TOPICS.events("pi-01"), event) == "duplicate"  # events dedupe too
    assert acked.received == []  # coalesced until flushed
    assert acked.acks.flush() == 2
    assert sorted(acked.received, key=lambda r: r[0]) == [
        ("pi-01", Ack(boot_id=BOOT, telemetry=((0, 2), (4, 4)), events=((3, 3),))),
        ("pi-02", Ack(boot_id="other", telemetry=((9, 9),))),
    ]
    assert acked.acks.pending == 0 and acked.acks.flush() == 0
    # A replay after a lost Ack is a duplicate, and acknowledged again.
    assert fleet.ingest.handle(TOPICS.telemetry("pi-01"), telemetry(4)) == "duplicate"
    acked.acks.flush()
    assert acked.received[-1] == ("pi-01", Ack(boot_id=BOOT, telemetry=((4, 4),)))


def test_unknown_devices_and_malformed_messages_are_not_acked(fleet: Fleet) -> None:
    fleet.enrol("gone", removed=True)
    acked = AckedFleet(fleet)
    assert fleet.ingest.handle(TOPICS.telemetry("gone"), telemetry(0)) == "unknown-device"
    assert fleet.ingest.handle(TOPICS.telemetry("stranger"), telemetry(0)) == "unknown-device"
    fleet.enrol("pi-01")
    assert fleet.ingest.handle(TOPICS.telemetry("pi-01"), b'{"boot_id":"b","seq":1}') == (
        "malformed"
    )
    assert acked.acks.pending == 0
    assert acked.acks.flush() == 0 and acked.received == []


def test_acks_are_due_after_the_interval_and_split_past_the_range_bound() -> None:
    now = [0.0]
    published: list[Ack] = []
    broker = MemoryBroker()
    controller = MemoryTransport(broker=broker, client_id="ctl")
    controller.connect()
    device = MemoryTransport(broker=broker, client_id="pi-01")
    device.subscribe(
        TOPICS.ack("pi-01"), lambda _t, p, _pr: published.append(decode(Ack, p)), qos=1
    )
    device.connect()
    batcher = AckBatcher(lambda: controller, TOPICS, clock=lambda: now[0])
    assert not batcher.due()
    for seq in range(0, 2 * (MAX_ACK_RANGES + 10), 2):  # every other seq: one range each
        batcher.add("pi-01", "telemetry", "b", seq)
    now[0] = 0.1
    assert not batcher.due()
    now[0] = 0.2
    assert batcher.due()
    assert batcher.flush() == 2
    assert [len(a.telemetry) for a in published] == [MAX_ACK_RANGES, 10]
    assert published[1].telemetry[-1] == (2 * (MAX_ACK_RANGES + 9), 2 * (MAX_ACK_RANGES + 9))
    with pytest.raises(ValueError, match="ack kind"):
        batcher.add("pi-01", "results", "b", 1)
