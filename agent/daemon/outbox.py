"""Store-and-forward outbox: telemetry and events wait here in SQLite until the controller has them.

The publisher ``put``s messages; the delivery loop (:mod:`agent.daemon.delivery`) ``peek``s the
oldest, publishes them and marks them in flight (:meth:`Outbox.mark_sent`). A message that
carries an :class:`AckKey` (topic kind, ``boot_id``, ``seq``) stays queued until the controller
acknowledges that key end to end (:meth:`Outbox.ack_seqs`, from an ``Ack`` on ``{p}/dev/{d}/ack``);
a message without one is removed by id (:meth:`Outbox.ack`) once the transport accepted it.
Until then a message survives reconnects, broker restarts and process restarts, so delivery is
at-least-once; the controller deduplicates by ``boot_id``/``seq`` and acknowledges duplicates too.

Invariants:
    * Bounded by payload bytes (topic + payload) and by message count. A ``put`` that would
      exceed a bound drops the OLDEST messages first (in flight or not); drops are counted, and
      the counts are persisted with the queue, so telemetry can report what an outage cost.
    * Ids grow monotonically and are never reused (``AUTOINCREMENT``), so acking an id that was
      dropped meanwhile cannot remove a newer message. Acks by key match kind + boot + seq only.
    * Durability: WAL journal with ``synchronous=NORMAL``. A crash of the process loses nothing;
      a power cut may lose the last transactions before the next WAL checkpoint, never corrupts
      the database. ``FULL`` would fsync on every ``put`` and ``ack``: on an SD card that costs
      milliseconds and flash wear per telemetry message, for data that is re-sent or regenerated
      anyway (a lost ``ack`` means a duplicate, which the controller drops).
    * A version-1 outbox (no ack columns) is migrated in place; its messages have no key and
      are removed once the transport accepts them, as version 1 did.
    * A corrupt or foreign database file is moved aside (``<name>.corrupt-<UTC time>``, at most
      :data:`KEEP_CORRUPT_COPIES` kept) and a fresh outbox is created, with a WARNING: telemetry
      is not worth keeping the device offline for, and the copy allows a post-mortem.
    * All methods are thread-safe (one connection behind one lock).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = [
    "KEEP_CORRUPT_COPIES",
    "AckKey",
    "Outbox",
    "OutboxBacklog",
    "OutboxError",
    "OutboxMessage",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
KEEP_CORRUPT_COPIES = 3
# Raised on a file that is not SQLite at all, a damaged page, or a damaged header.
_CORRUPTION_ERRORS = (sqlite3.DatabaseError,)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    kind TEXT,
    boot_id TEXT,
    seq INTEGER,
    sent_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_ack ON messages(boot_id, kind, seq);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters (name, value) VALUES ('dropped_messages', 0), ('dropped_bytes', 0);
"""
_MIGRATE_V1 = """
ALTER TABLE messages ADD COLUMN kind TEXT;
ALTER TABLE messages ADD COLUMN boot_id TEXT;
ALTER TABLE messages ADD COLUMN seq INTEGER;
ALTER TABLE messages ADD COLUMN sent_at REAL;
ALTER TABLE messages ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
"""
_COLUMNS = ["id", "topic", "payload", "qos", "size", "created", "kind", "boot_id", "seq"]
_COLUMNS += ["sent_at", "attempts"]
_SELECT = "SELECT id, topic, payload, qos, created, kind, boot_id, seq, sent_at, attempts"


class OutboxError(Exception):
    """The outbox cannot be opened or used, or a message cannot be stored."""


@dataclass(frozen=True)
class AckKey:
    """What the controller's ``Ack`` names a message by: topic kind, boot and sequence number."""

    kind: str
    boot_id: str
    seq: int


#: derives a message's key from its topic and payload (None: no end-to-end acknowledgement)
AckKeyFunction = Callable[[str, bytes], "AckKey | None"]


@dataclass(frozen=True)
class OutboxMessage:
    """One queued message; ``id`` is what :meth:`Outbox.ack` takes."""

    id: int
    topic: str
    payload: bytes
    qos: int
    created: float
    key: AckKey | None = None
    sent_at: float | None = None  # last publish; None = not in flight
    attempts: int = 0  # publishes so far


@dataclass(frozen=True)
class OutboxBacklog:
    """Queue statistics, for telemetry."""

    messages: int
    bytes: int
    in_flight: int
    oldest_created: float | None
    dropped_messages: int
    dropped_bytes: int


class Outbox:
    """A bounded, persistent FIFO of MQTT messages in one SQLite file."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int,
        max_messages: int,
        clock: Callable[[], float] = time.time,
        ack_key: AckKeyFunction | None = None,
    ) -> None:
        """Open (or create) the outbox at ``path``.

        ``ack_key`` gives the key of a message ``put`` without one (see :class:`AckKey`).

        Raises:
            OutboxError: the bounds are not positive, or the file cannot be opened or recreated.
        """
        if max_bytes < 1 or max_messages < 1:
            raise OutboxError(
                f"outbox bounds: expected max_bytes and max_messages >= 1, "
                f"got {max_bytes} and {max_messages}"
            )
        self._path = Path(path)
        self._max_bytes = max_bytes
        self._max_messages = max_messages
        self._clock = clock
        self._ack_key = ack_key
        self._lock = threading.Lock()
        try:
            self._conn = self._open()
        except _CORRUPTION_ERRORS as exc:
            aside = self._move_aside(exc)
            log.warning("outbox %s was unreadable (%s); moved to %s", self._path, exc, aside.name)
            try:
                self._conn = self._open()
            except sqlite3.Error as again:
                raise OutboxError(
                    f"outbox {self._path}: cannot create a fresh one ({again})"
                ) from again
        count, size = self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages"
        ).fetchone()
        self._count: int = count
        self._bytes: int = size
        if count > max_messages or size > max_bytes:  # bounds lowered since last run
            with self._lock, self._transaction():
                self._evict(0, 0)

    # -- opening ---------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        if not self._path.exists():
            # Create the file 0600 ourselves: sqlite would use 0644 minus the umask, and its
            # -wal/-shm files copy the database file's mode.
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.close(fd)
        conn = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
            conn.execute("PRAGMA synchronous=NORMAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"schema version {version}, expected {SCHEMA_VERSION}")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
            if version == 1:
                conn.executescript(f"BEGIN IMMEDIATE;{_MIGRATE_V1}COMMIT;")
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._check_tables(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _check_tables(conn: sqlite3.Connection) -> None:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(messages)")]
        if columns != _COLUMNS:
            raise sqlite3.DatabaseError(f"unexpected messages columns {columns}")

    def _move_aside(self, reason: BaseException) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self._path.with_name(f"{self._path.name}.corrupt-{stamp}")
        try:
            os.replace(self._path, aside)
            for suffix in ("-wal", "-shm"):
                side = Path(f"{self._path}{suffix}")
                if side.exists():
                    os.replace(side, Path(f"{aside}{suffix}"))
        except OSError as exc:
            raise OutboxError(
                f"outbox {self._path}: unreadable ({reason}) and cannot be moved aside ({exc})"
            ) from exc
        copies = sorted(self._path.parent.glob(f"{self._path.name}.corrupt-*Z"))
        for old in copies[:-KEEP_CORRUPT_COPIES]:
            for side in (old, Path(f"{old}-wal"), Path(f"{old}-shm")):
                with contextlib.suppress(FileNotFoundError):
                    side.unlink()
        return aside

    # -- queue operations ------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def put(self, topic: str, payload: bytes, qos: int = 1, *, key: AckKey | None = None) -> int:
        """Queue a message, dropping the oldest ones if a bound would be exceeded.

        With a ``key`` (given, or derived by the outbox's ``ack_key`` function) the message stays
        queued until :meth:`ack_seqs` names it; without one, until :meth:`ack` names its id.

        Returns:
            The new message's id.

        Raises:
            OutboxError: the message alone is larger than ``max_bytes``, or ``qos`` is not 0-2.
        """
        if qos not in (0, 1, 2):
            raise OutboxError(f"outbox put: expected qos 0, 1 or 2, got {qos!r}")
        size = len(topic.encode()) + len(payload)
        if size > self._max_bytes:
            raise OutboxError(
                f"outbox put: expected a message of at most {self._max_bytes} bytes, got {size}"
            )
        if key is None and self._ack_key is not None:
            key = self._ack_key(topic, bytes(payload))
        keys = (None, None, None) if key is None else (key.kind, key.boot_id, key.seq)
        with self._lock:
            try:
                with self._transaction():
                    self._evict(1, size)
                    cursor = self._conn.execute(
                        "INSERT INTO messages (topic, payload, qos, size, created, kind, boot_id,"
                        " seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (topic, bytes(payload), qos, size, self._clock(), *keys),
                    )
            except sqlite3.Error as exc:
                self._resync()
                raise OutboxError(f"outbox put: the database refused the write ({exc})") from exc
            self._count += 1
            self._bytes += size
            return int(cursor.lastrowid or 0)

    def _evict(self, incoming_messages: int, incoming_bytes: int) -> None:
        """Drop the oldest messages until the incoming messages and bytes fit."""
        room_count = self._max_messages - incoming_messages
        room_bytes = self._max_bytes - incoming_bytes
        if self._count <= room_count and self._bytes <= room_bytes:
            return
        dropped = 0
        dropped_bytes = 0
        count = self._count
        total = self._bytes
        last_id = None
        for message_id, size in self._conn.execute("SELECT id, size FROM messages ORDER BY id"):
            if count <= room_count and total <= room_bytes:
                break
            last_id = message_id
            dropped += 1
            dropped_bytes += size
            count -= 1
            total -= size
        if last_id is None:
            return
        self._conn.execute("DELETE FROM messages WHERE id <= ?", (last_id,))
        self._conn.execute(
            "UPDATE counters SET value = value + CASE name "
            "WHEN 'dropped_messages' THEN ? WHEN 'dropped_bytes' THEN ? END",
            (dropped, dropped_bytes),
        )
        self._count = count
        self._bytes = total
        log.debug("outbox full: dropped %d oldest messages (%d bytes)", dropped, dropped_bytes)

    def _resync(self) -> None:
        count, size = self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages"
        ).fetchone()
        self._count, self._bytes = count, size

    def peek(self, limit: int = 100) -> list[OutboxMessage]:
        """The oldest ``limit`` messages, oldest first; they stay queued until acked."""
        with self._lock:
            rows = self._conn.execute(
                f"{_SELECT} FROM messages ORDER BY id LIMIT ?",
                (max(0, limit),),
            ).fetchall()
        return [
            OutboxMessage(
                id=int(i),
                topic=str(t),
                payload=bytes(p),
                qos=int(q),
                created=float(c),
                key=None if kind is None else AckKey(str(kind), str(boot), int(seq)),
                sent_at=None if sent is None else float(sent),
                attempts=int(attempts),
            )
            for i, t, p, q, c, kind, boot, seq, sent, attempts in rows
        ]

    def mark_sent(self, ids: Iterable[int], now: float) -> None:
        """Record that messages ``ids`` were published at ``now`` (in flight until acked)."""
        wanted = [(now, i) for i in sorted(set(ids))]
        if not wanted:
            return
        with self._lock, self._transaction():
            self._conn.executemany(
                "UPDATE messages SET sent_at = ?, attempts = attempts + 1 WHERE id = ?", wanted
            )

    def reset_in_flight(self) -> int:
        """Mark every in-flight message unsent (after a reconnect: publish them again now)."""
        with self._lock, self._transaction():
            cursor = self._conn.execute(
                "UPDATE messages SET sent_at = NULL WHERE sent_at IS NOT NULL"
            )
            return cursor.rowcount

    def ack_seqs(self, kind: str, boot_id: str, ranges: Iterable[tuple[int, int]]) -> int:
        """Remove the ``kind`` messages of ``boot_id`` whose seq lies in an inclusive range.

        Returns:
            How many messages were removed (already acked or dropped ones do not count).
        """
        spans = [(boot_id, kind, first, last) for first, last in ranges]
        if not spans:
            return 0
        with self._lock:
            removed = 0
            removed_bytes = 0
            with self._transaction():
                for span in spans:
                    where = "boot_id = ? AND kind = ? AND seq BETWEEN ? AND ?"
                    row = self._conn.execute(
                        f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages WHERE {where}",  # noqa: S608
                        span,
                    ).fetchone()
                    if row[0]:
                        self._conn.execute(f"DELETE FROM messages WHERE {where}", span)  # noqa: S608
                        removed += row[0]
                        removed_bytes += row[1]
            self._count -= removed
            self._bytes -= removed_bytes
            return removed

    def discard(self, ids: Iterable[int]) -> int:
        """Remove messages that will never be acknowledged, counting them as dropped."""
        wanted = sorted(set(ids))
        if not wanted:
            return 0
        with self._lock:
            count = 0
            size = 0
            with self._transaction():
                for message_id in wanted:
                    row = self._conn.execute(
                        "SELECT size FROM messages WHERE id = ?", (message_id,)
                    ).fetchone()
                    if row is not None:
                        self._conn.execute("DELETE FROM messages WHERE id = ?", (message_id,))
                        count += 1
                        size += int(row[0])
                self._conn.execute(
                    "UPDATE counters SET value = value + CASE name "
                    "WHEN 'dropped_messages' THEN ? WHEN 'dropped_bytes' THEN ? END",
                    (count, size),
                )
            self._count -= count
            self._bytes -= size
            return count

    def ack(self, ids: Iterable[int]) -> int:
        """Remove delivered messages; unknown ids (dropped or acked before) are ignored.

        Returns:
            How many messages were removed.
        """
        wanted = sorted(set(ids))
        if not wanted:
            return 0
        with self._lock:
            removed = 0
            removed_bytes = 0
            with self._transaction():
                for start in range(0, len(wanted), 500):
                    chunk = wanted[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    row = self._conn.execute(
                        f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages "  # noqa: S608
                        f"WHERE id IN ({marks})",
                        chunk,
                    ).fetchone()
                    self._conn.execute(
                        f"DELETE FROM messages WHERE id IN ({marks})",  # noqa: S608
                        chunk,
                    )
                    removed += row[0]
                    removed_bytes += row[1]
            self._count -= removed
            self._bytes -= removed_bytes
            return removed

    def backlog(self) -> OutboxBacklog:
        """Queued messages and bytes, the oldest message's time, and what was dropped so far."""
        with self._lock:
            oldest, in_flight = self._conn.execute(
                "SELECT MIN(created), COUNT(sent_at) FROM messages"
            ).fetchone()
            counters = dict(self._conn.execute("SELECT name, value FROM counters").fetchall())
            return OutboxBacklog(
                messages=self._count,
                bytes=self._bytes,
                in_flight=int(in_flight),
                oldest_created=None if oldest is None else float(oldest),
                dropped_messages=int(counters.get("dropped_messages", 0)),
                dropped_bytes=int(counters.get("dropped_bytes", 0)),
            )

    def close(self) -> None:
        """Checkpoint the WAL into the database and close it."""
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
