"""End-to-end delivery: the Ack message, the outbox's in-flight/ack state and the flusher."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.daemon.delivery import OutboxFlusher, ack_key_function
from agent.daemon.outbox import AckKey, Outbox
from agent.protocol.errors import MessageError
from agent.protocol.messages import (
    MAX_ACK_RANGES,
    MAX_MESSAGE_BYTES,
    Ack,
    TelemetryMessage,
    TelemetryMetrics,
    decode,
    encode,
    seq_ranges,
)
from agent.protocol.topics import Topics
from agent.transport import MemoryBroker, MemoryTransport, MessageProperties

TOPICS = Topics()
DEVICE = "pi-01"


# ---- the Ack message ---------------------------------------------------------------------------


def test_ack_round_trips_and_merges_ranges() -> None:
    ack = Ack(boot_id="b1", telemetry=tuple(seq_ranges([5, 1, 2, 3, 9, 8])), events=((0, 0),))
    assert ack.telemetry == ((1, 3), (5, 5), (8, 9))
    assert decode(Ack, encode(ack)) == ack
    assert encode(ack).startswith(b'{"boot_id":"b1"')


@pytest.mark.parametrize(
    "payload",
    [
        b'{"boot_id":"b","telemetry":[[3,1]]}',  # first > last
        b'{"boot_id":"b","telemetry":[[-1,2]]}',
        b'{"boot_id":"b","events":[[1]]}',
        b'{"boot_id":"","events":[]}',
        b'{"telemetry":[[1,2]]}',
    ],
)
def test_malformed_acks_are_refused(payload: bytes) -> None:
    with pytest.raises(MessageError):
        decode(Ack, payload)


def test_ack_range_lists_are_bounded_and_fit_a_message() -> None:
    too_many = [[2 * i, 2 * i] for i in range(MAX_ACK_RANGES + 1)]
    with pytest.raises(MessageError, match="telemetry"):
        decode(Ack, b'{"boot_id":"b","telemetry":%s}' % str(too_many).encode())
    big = 2**62
    widest = tuple((big + 2 * i, big + 2 * i) for i in range(MAX_ACK_RANGES))
    assert len(encode(Ack(boot_id="b" * 64, telemetry=widest, events=widest))) < MAX_MESSAGE_BYTES


# ---- outbox ------------------------------------------------------------------------------------


def telemetry(seq: int, boot: str = "boot-1") -> bytes:
    return encode(TelemetryMessage(boot_id=boot, seq=seq, ts=1.0, metrics=TelemetryMetrics()))


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(
        tmp_path / "outbox.sqlite",
        max_bytes=1 << 20,
        max_messages=100,
        ack_key=ack_key_function(TOPICS),
    )
    yield box
    box.close()


def test_outbox_derives_keys_and_acks_by_kind_boot_and_seq(outbox: Outbox) -> None:
    for seq in range(4):
        outbox.put(TOPICS.telemetry(DEVICE), telemetry(seq))
    outbox.put(TOPICS.results(DEVICE), b'{"boot_id":"boot-1","seq":1}')  # not acknowledged kind
    keys = [m.key for m in outbox.peek()]
    assert keys == [AckKey("telemetry", "boot-1", s) for s in range(4)] + [None]
    assert outbox.ack_seqs("events", "boot-1", [(0, 3)]) == 0  # other kind
    assert outbox.ack_seqs("telemetry", "boot-0", [(0, 3)]) == 0  # other boot
    assert outbox.ack_seqs("telemetry", "boot-1", [(1, 2)]) == 2
    assert [m.key.seq for m in outbox.peek() if m.key] == [0, 3]
    assert outbox.backlog().messages == 3


def test_outbox_in_flight_marks_and_reset(outbox: Outbox) -> None:
    ids = [outbox.put(TOPICS.telemetry(DEVICE), telemetry(s)) for s in range(3)]
    outbox.mark_sent(ids[:2], 50.0)
    assert [(m.sent_at, m.attempts) for m in outbox.peek()] == [(50.0, 1), (50.0, 1), (None, 0)]
    assert outbox.backlog().in_flight == 2
    assert outbox.reset_in_flight() == 2
    assert [(m.sent_at, m.attempts) for m in outbox.peek()] == [(None, 1)] * 2 + [(None, 0)]


def test_discarded_messages_count_as_dropped(outbox: Outbox) -> None:
    first = outbox.put(TOPICS.telemetry(DEVICE), telemetry(0))
    outbox.put(TOPICS.telemetry(DEVICE), telemetry(1))
    assert outbox.discard([first, 999]) == 1
    backlog = outbox.backlog()
    assert (backlog.messages, backlog.dropped_messages) == (1, 1)


def test_a_version_1_outbox_is_migrated_and_its_messages_kept(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
        " payload BLOB NOT NULL, qos INTEGER NOT NULL, size INTEGER NOT NULL,"
        " created REAL NOT NULL);"
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"
        "INSERT INTO messages (topic, payload, qos, size, created) VALUES ('t', X'6f6c64', 1, 4, 1);"
        "PRAGMA user_version=1;"
    )
    db.close()
    with Outbox(path, max_bytes=1 << 20, max_messages=10) as box:
        (old,) = box.peek()
        assert (old.payload, old.key, old.sent_at) == (b"old", None, None)
        assert box.ack([old.id]) == 1


# ---- the flusher over the in-memory broker -----------------------------------------------------


class Link:
    """A device flusher and a controller that records telemetry and acks on demand."""

    def __init__(self, outbox: Outbox, *, window: int = 32, max_attempts: int = 5) -> None:
        self.now = 100.0
        self.broker = MemoryBroker()
        self.received: list[int] = []
        self.controller = MemoryTransport(broker=self.broker, client_id="ctl")
        self.controller.subscribe(
            TOPICS.controller_filters()["telemetry"], self._on_telemetry, qos=1
        )
        self.controller.connect()
        self.device = MemoryTransport(broker=self.broker, client_id=DEVICE)
        self.outbox = outbox
        self.flusher = self.new_flusher(window=window, max_attempts=max_attempts)
        self.device.connect()

    def new_flusher(self, *, window: int = 32, max_attempts: int = 5) -> OutboxFlusher:
        flusher = OutboxFlusher(
            self.outbox,
            self.device,
            TOPICS,
            DEVICE,
            window=window,
            ack_timeout_s=10.0,
            max_attempts=max_attempts,
            clock=lambda: self.now,
        )
        flusher.subscribe()
        self.device.on_connected(lambda _present: flusher.reconnected())
        return flusher

    def _on_telemetry(self, _topic: str, payload: bytes, _props: MessageProperties) -> None:
        self.received.append(decode(TelemetryMessage, payload).seq)

    def ack(self, *seqs: int, boot: str = "boot-1") -> None:
        ack = Ack(boot_id=boot, telemetry=tuple(seq_ranges(seqs)))
        self.controller.publish(TOPICS.ack(DEVICE), encode(ack), qos=1)

    def queue(self, *seqs: int, boot: str = "boot-1") -> None:
        for seq in seqs:
            self.outbox.put(TOPICS.telemetry(DEVICE), telemetry(seq, boot))


def queued(outbox: Outbox) -> list[int]:
    return [m.key.seq for m in outbox.peek() if m.key is not None]


def test_messages_stay_until_the_controller_acks_them(outbox: Outbox) -> None:
    link = Link(outbox)
    link.queue(0, 1, 2)
    assert link.flusher.flush_once() == 3
    assert link.received == [0, 1, 2]
    assert queued(outbox) == [0, 1, 2]  # the broker took them: not enough
    assert link.flusher.flush_once() == 0  # in flight, not timed out
    link.ack(0, 1)
    assert queued(outbox) == [2]
    assert link.flusher.acked == 2


def test_unacknowledged_messages_are_resent_after_the_timeout_in_order(outbox: Outbox) -> None:
    link = Link(outbox)
    link.queue(0, 1, 2)
    link.flusher.flush_once()
    link.ack(1)
    link.now += 9.9
    assert link.flusher.flush_once() == 0
    link.now += 0.2
    assert link.flusher.flush_once() == 2
    assert link.received == [0, 1, 2, 0, 2]
    assert link.flusher.resent == 2


def test_a_reconnect_resends_everything_in_flight_at_once(outbox: Outbox) -> None:
    link = Link(outbox)
    link.queue(0, 1)
    link.flusher.flush_once()
    link.broker.go_down()  # the controller's subscription is lost with it
    link.broker.come_up()
    assert link.flusher.flush_once() == 2  # no timeout to wait for
    assert queued(outbox) == [0, 1]


def test_the_window_bounds_unacknowledged_messages(outbox: Outbox) -> None:
    link = Link(outbox, window=4)
    link.queue(*range(10))
    assert link.flusher.flush_once() == 4
    assert link.flusher.flush_once() == 0
    link.ack(0, 1)
    assert link.flusher.flush_once() == 2
    assert link.received == [0, 1, 2, 3, 4, 5]


def test_nothing_is_published_or_lost_while_offline(outbox: Outbox) -> None:
    link = Link(outbox)
    link.broker.go_down()
    link.queue(0, 1)
    assert link.flusher.flush_once() == 0
    assert queued(outbox) == [0, 1]
    link.broker.come_up()
    assert link.flusher.flush_once() == 2


def test_messages_of_a_previous_boot_are_resent_and_acked(outbox: Outbox) -> None:
    link = Link(outbox)
    link.queue(7, boot="boot-0")
    link.flusher.flush_once()
    restarted = link.new_flusher()  # a new process on the same outbox
    link.queue(0)
    assert restarted.flush_once() == 2  # the old boot's in-flight mark meant nothing
    link.ack(7, boot="boot-0")
    assert [m.key for m in outbox.peek()] == [AckKey("telemetry", "boot-1", 0)]


def test_a_message_the_controller_keeps_rejecting_is_discarded(outbox: Outbox) -> None:
    link = Link(outbox, max_attempts=2)
    link.queue(0, 1)
    for _ in range(2):
        link.flusher.flush_once()
        link.now += 6.0
        link.ack(1)  # the controller is alive and acknowledges other messages
        link.now += 5.0
    assert link.flusher.flush_once() == 0
    assert link.flusher.rejected == 1
    assert queued(outbox) == []
    assert outbox.backlog().dropped_messages == 1


def test_a_malformed_ack_removes_nothing(outbox: Outbox) -> None:
    link = Link(outbox)
    link.queue(0)
    link.flusher.flush_once()
    link.controller.publish(TOPICS.ack(DEVICE), b'{"boot_id":"boot-1","telemetry":[[0]]}', qos=1)
    assert queued(outbox) == [0]
    assert link.device.stats().dropped_malformed == 1
