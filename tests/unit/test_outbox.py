"""The SQLite outbox: FIFO order, bounds with counted drops, restarts, crashes, corruption."""

from __future__ import annotations

import logging
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.daemon.outbox import KEEP_CORRUPT_COPIES, Outbox, OutboxError


def _outbox(path: Path, *, max_bytes: int = 1 << 20, max_messages: int = 1000) -> Outbox:
    return Outbox(path / "outbox.db", max_bytes=max_bytes, max_messages=max_messages)


def test_fifo_order_and_ack(tmp_path: Path) -> None:
    with _outbox(tmp_path) as box:
        ids = [box.put("edge/v1/dev/d/telemetry", f"m{i}".encode()) for i in range(5)]
        assert ids == sorted(ids)
        assert [m.payload for m in box.peek(3)] == [b"m0", b"m1", b"m2"]
        assert box.ack([ids[1], ids[3]]) == 2
        assert [m.payload for m in box.peek(10)] == [b"m0", b"m2", b"m4"]
        assert box.ack([ids[1], 999_999]) == 0  # already acked / unknown: ignored
        assert box.backlog().messages == 3


def test_peek_keeps_topic_and_qos(tmp_path: Path) -> None:
    with _outbox(tmp_path) as box:
        box.put("a/events", b"\x00\xff", qos=1)
        box.put("a/results", b"", qos=0)
        first, second = box.peek(2)
        assert (first.topic, first.payload, first.qos) == ("a/events", b"\x00\xff", 1)
        assert (second.topic, second.payload, second.qos) == ("a/results", b"", 0)


def test_count_bound_drops_oldest_and_counts(tmp_path: Path) -> None:
    with _outbox(tmp_path, max_messages=3) as box:
        for i in range(5):
            box.put("t", bytes([i]) * 10)
        assert [m.payload[0] for m in box.peek(10)] == [2, 3, 4]
        backlog = box.backlog()
        assert (backlog.messages, backlog.bytes) == (3, 3 * 11)
        assert (backlog.dropped_messages, backlog.dropped_bytes) == (2, 2 * 11)


def test_byte_bound_drops_oldest(tmp_path: Path) -> None:
    with _outbox(tmp_path, max_bytes=100) as box:
        for i in range(4):
            box.put("t", bytes([i]) * 39)  # 40 bytes each with the topic
        assert [m.payload[0] for m in box.peek(10)] == [2, 3]
        assert box.backlog().bytes == 80
        box.put("t", b"x" * 99)  # needs the whole outbox
        assert [m.payload for m in box.peek(10)] == [b"x" * 99]
        assert box.backlog().dropped_messages == 4


def test_message_larger_than_outbox_is_refused(tmp_path: Path) -> None:
    with _outbox(tmp_path, max_bytes=100) as box:
        box.put("t", b"keep")
        with pytest.raises(OutboxError, match="at most 100 bytes, got 101"):
            box.put("t", b"x" * 100)
        assert [m.payload for m in box.peek(10)] == [b"keep"]


def test_bad_qos_and_bounds_are_refused(tmp_path: Path) -> None:
    with _outbox(tmp_path) as box, pytest.raises(OutboxError, match="expected qos 0, 1 or 2"):
        box.put("t", b"", qos=3)
    with pytest.raises(OutboxError, match="max_bytes and max_messages >= 1"):
        Outbox(tmp_path / "x.db", max_bytes=0, max_messages=1)


def test_ack_of_dropped_id_cannot_remove_newer_message(tmp_path: Path) -> None:
    with _outbox(tmp_path, max_messages=1) as box:
        first = box.put("t", b"old")
        box.ack([first])
        second = box.put("t", b"new")
        assert second > first  # ids are never reused
        box.ack([first])
        assert [m.payload for m in box.peek(1)] == [b"new"]


def test_survives_restart_with_counters(tmp_path: Path) -> None:
    with _outbox(tmp_path, max_messages=2) as box:
        for i in range(3):
            box.put("t", bytes([i]))
        last = box.put("t", b"last")
        box.ack([last])
    with _outbox(tmp_path, max_messages=2) as box:
        assert [m.payload for m in box.peek(10)] == [b"\x02"]
        backlog = box.backlog()
        assert backlog.dropped_messages == 2 and backlog.messages == 1 and backlog.bytes == 2
        assert box.put("t", b"next") > last


def test_lowered_bound_on_reopen_evicts(tmp_path: Path) -> None:
    with _outbox(tmp_path) as box:
        for i in range(10):
            box.put("t", bytes([i]))
    with _outbox(tmp_path, max_messages=4) as box:
        assert [m.payload[0] for m in box.peek(10)] == [6, 7, 8, 9]
        assert box.backlog().dropped_messages == 6


def test_committed_messages_survive_a_killed_process(tmp_path: Path) -> None:
    script = (
        "import os, sys\n"
        "from agent.daemon.outbox import Outbox\n"
        "box = Outbox(sys.argv[1], max_bytes=1 << 20, max_messages=100)\n"
        "for i in range(20): box.put('t', str(i).encode())\n"
        "box.ack([m.id for m in box.peek(5)])\n"
        "os._exit(0)  # no close(), no WAL checkpoint\n"
    )
    db = tmp_path / "outbox.db"
    subprocess.run([sys.executable, "-c", script, str(db)], check=True, timeout=60)
    with Outbox(db, max_bytes=1 << 20, max_messages=100) as box:
        assert [int(m.payload) for m in box.peek(100)] == list(range(5, 20))


def test_file_is_private(tmp_path: Path) -> None:
    with _outbox(tmp_path) as box:
        box.put("t", b"x")
    assert stat.S_IMODE((tmp_path / "outbox.db").stat().st_mode) == 0o600


def test_garbage_file_is_moved_aside_and_recreated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = b"this is not an sqlite database" * 100
    (tmp_path / "outbox.db").write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="agent.daemon.outbox"), _outbox(tmp_path) as box:
        assert box.peek(10) == []
        box.put("t", b"fresh")
    copies = list(tmp_path.glob("outbox.db.corrupt-*Z"))
    assert len(copies) == 1 and copies[0].read_bytes() == garbage
    assert "moved to outbox.db.corrupt-" in caplog.text
    with _outbox(tmp_path) as box:
        assert [m.payload for m in box.peek(10)] == [b"fresh"]


def test_foreign_database_is_moved_aside(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "outbox.db")
    conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, body TEXT)")
    conn.commit()
    conn.close()
    with _outbox(tmp_path) as box:
        box.put("t", b"x")
        assert box.backlog().messages == 1
    assert len(list(tmp_path.glob("outbox.db.corrupt-*Z"))) == 1


def test_newer_schema_version_is_moved_aside(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "outbox.db")
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with _outbox(tmp_path) as box:
        assert box.backlog().messages == 0
    assert len(list(tmp_path.glob("outbox.db.corrupt-*Z"))) == 1


def test_only_a_few_corrupt_copies_are_kept(tmp_path: Path) -> None:
    for day in range(1, 6):
        (tmp_path / f"outbox.db.corrupt-202001{day:02d}T000000Z").write_bytes(b"old")
    (tmp_path / "outbox.db").write_bytes(b"garbage" * 200)
    _outbox(tmp_path).close()
    copies = sorted(p.name for p in tmp_path.glob("outbox.db.corrupt-*Z"))
    assert len(copies) == KEEP_CORRUPT_COPIES
    assert "outbox.db.corrupt-20200101T000000Z" not in copies
    assert any(not name.startswith("outbox.db.corrupt-2020") for name in copies)


def test_concurrent_producers_and_consumer(tmp_path: Path) -> None:
    box = _outbox(tmp_path, max_messages=150)
    producers, per_producer = 4, 100
    done = threading.Event()
    acked: list[int] = []  # messages removed per ack() call
    errors: list[BaseException] = []

    def produce(n: int) -> None:
        try:
            for i in range(per_producer):
                box.put(f"t/{n}", i.to_bytes(2, "big"))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    def consume() -> None:
        while not done.is_set() or box.backlog().messages:
            # A message peeked here may be dropped by a producer before the ack: count what
            # ack() actually removed, never what was peeked.
            acked.append(box.ack(m.id for m in box.peek(7)))

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(producers)]
    consumer = threading.Thread(target=consume)
    consumer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    done.set()
    consumer.join(timeout=60)
    assert not errors and not consumer.is_alive()
    backlog = box.backlog()
    assert backlog.messages == 0 and backlog.bytes == 0
    assert sum(acked) + backlog.dropped_messages == producers * per_producer
    box.close()
