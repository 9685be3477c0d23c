"""``EmbeddedBroker``: a compact MQTT 3.1.1 broker so one machine needs nothing installed.

``fleetctl serve`` starts it when no broker URL is configured. It runs an asyncio server on its
own thread and event loop; :meth:`EmbeddedBroker.start` returns once it listens (port 0 picks a
free port, see ``.port``) and :meth:`EmbeddedBroker.stop` closes every connection and joins.

What it does (MQTT 3.1.1; a CONNECT for any other protocol level gets CONNACK 0x01, which makes
``PahoTransport(protocol="auto")`` fall back to 3.1.1):
    * clean sessions only (a CONNECT without the clean flag is served as clean, session_present
      is always 0); keepalive enforced at 1.5 x the client's value; client-id takeover (the old
      connection is closed and its Last Will published) - with auth on, only by the same user.
    * PUBLISH QoS 0 and 1 (PUBACK); a QoS 2 PUBLISH closes the connection (3.1.1 has no way to
      refuse it), a QoS 2 subscription is granted QoS 1. One delivery per client per message,
      at the highest QoS among its matching subscriptions.
    * ``+``/``#`` filters (:func:`agent.protocol.topics.topic_matches`), ``$share/{group}/{filter}``
      (one member per group and filter, round robin; retained messages are not sent on them).
    * retained messages (an empty retained payload clears), Last Will on any close that is not
      a DISCONNECT (socket loss, keepalive expiry, malformed packet, takeover).
    * per-client bounds like mosquitto: ``max_inflight`` unacknowledged QoS 1 messages, then a
      queue of ``max_queued`` messages / ``max_queued_bytes``; past it messages are dropped and
      counted. Packets above ``max_packet_bytes`` and malformed packets close that connection
      with a log line.
    * optional :class:`BrokerAuth`: username/password-hash table and ACL rules with mosquitto's
      semantics (``pattern`` lines with ``%u``; denied publishes are acknowledged and dropped,
      subscriptions are granted and filtered at delivery, as mosquitto 2.0 does). The client id
      must be the username (mosquitto's ``use_username_as_clientid``) unless the user is in
      ``free_client_ids``; a client id held by another user cannot be taken over (CONNACK 2).
      Passwords are checked off the event loop (scrypt). :meth:`EmbeddedBroker.set_auth`
      replaces the table while running and closes the connections of users it no longer
      accepts (removed devices, changed passwords).

Packet encoding and decoding live in :mod:`tools.fleetctl.mqtt_codec`, authentication and ACL
rules in :mod:`tools.fleetctl.broker_acl` (re-exported here).

A PyPI broker (amqtt) was considered; a small broker of our own keeps the bounded queues, drop
counters, shared subscriptions and thread lifecycle under test, on the one topic matcher the
rest of the product uses, without pulling in a framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from agent.protocol.errors import TopicError
from agent.protocol.topics import split_shared, topic_matches, validate_filter
from tools.fleetctl import FleetctlError
from tools.fleetctl.broker_acl import AclRule, BrokerAuth, fleet_acl_rules
from tools.fleetctl.mqtt_codec import (
    CONNACK,
    CONNACK_BAD_ID,
    CONNACK_BAD_LOGIN,
    CONNACK_BAD_VERSION,
    CONNACK_NOT_AUTHORIZED,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBLISH,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    MalformedPacketError,
    PacketReader,
    encode_packet,
    encode_string,
)

__all__ = [
    "AclRule",
    "BrokerAuth",
    "BrokerError",
    "BrokerStats",
    "EmbeddedBroker",
    "fleet_acl_rules",
]

logger = logging.getLogger(__name__)


class BrokerError(FleetctlError):
    """The embedded broker cannot start, or was configured with impossible values."""


@dataclass(frozen=True)
class BrokerStats:
    """Counters since the broker started."""

    clients: int
    connections: int
    messages_in: int
    messages_out: int
    bytes_in: int
    bytes_out: int
    dropped_queue_full: int
    dropped_acl: int
    closed_malformed: int
    retained: int


@dataclass
class _Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass
class _Session:
    client_id: str
    username: str | None
    writer: asyncio.StreamWriter
    will: _Message | None
    subscriptions: dict[str, int] = field(default_factory=dict)
    queue: deque[_Message] = field(default_factory=deque)
    queued_bytes: int = 0
    inflight: set[int] = field(default_factory=set)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    next_mid: int = 0
    closed: bool = False
    last_seen: float = field(default_factory=lambda: asyncio.get_running_loop().time())

    def take_mid(self) -> int:
        self.next_mid = self.next_mid % 65535 + 1
        return self.next_mid


class EmbeddedBroker:
    """An MQTT 3.1.1 broker on its own thread; see the module docstring for what it covers."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        auth: BrokerAuth | None = None,
        max_packet_bytes: int = 2 * 1024 * 1024,
        max_inflight: int = 20,
        max_queued: int = 1000,
        max_queued_bytes: int = 64 * 1024 * 1024,
        start_timeout: float = 10.0,
    ) -> None:
        if max_inflight < 1 or max_queued < 0 or max_packet_bytes < 1024:
            raise BrokerError(
                f"max_inflight={max_inflight}, max_queued={max_queued}, max_packet_bytes="
                f"{max_packet_bytes}: expected >= 1, >= 0 and >= 1024"
            )
        self.host = host
        self.port = port
        self._auth = auth
        self._max_packet = max_packet_bytes
        self._max_inflight = max_inflight
        self._max_queued = max_queued
        self._max_queued_bytes = max_queued_bytes
        self._start_timeout = start_timeout
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, _Message] = {}
        self._share_turn: dict[tuple[str, str], int] = {}
        self._counts = dict.fromkeys(
            ("connections", "messages_in", "messages_out", "bytes_in", "bytes_out",
             "dropped_queue_full", "dropped_acl", "closed_malformed"), 0,
        )  # fmt: skip
        self._anon_ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop_event: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- lifecycle (any thread) ----------------------------------------------------------------

    def start(self) -> None:
        """Start listening; returns once the socket is bound (``.port`` is then the real port)."""
        if self._thread is not None:
            raise BrokerError("the embedded broker is already running; expected one start()")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._main(ready))
            except BaseException as exc:
                failure.append(exc)
                ready.set()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="mqtt-broker", daemon=True)
        self._thread.start()
        if not ready.wait(self._start_timeout) or failure:
            self._thread.join(self._start_timeout)
            self._thread = None
            reason = failure[0] if failure else "timed out"
            raise BrokerError(f"embedded broker cannot listen on {self.host}:{self.port}: {reason}")
        logger.info("embedded MQTT broker listening on %s:%d", self.host, self.port)

    def stop(self) -> None:
        """Close every connection (no Last Wills) and stop the thread."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None or loop is None or stop_event is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(stop_event.set)
        thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stats(self) -> BrokerStats:
        """A snapshot of the counters."""
        counts = dict(self._counts)
        return BrokerStats(clients=len(self._sessions), retained=len(self._retained), **counts)

    # ---- event loop ----------------------------------------------------------------------------

    async def _main(self, ready: threading.Event) -> None:
        self._stop_event = asyncio.Event()
        server = await asyncio.start_server(
            self._serve_connection, self.host, self.port, limit=self._max_packet + 16
        )
        self.port = int(server.sockets[0].getsockname()[1])
        ready.set()
        await self._stop_event.wait()
        server.close()
        for session in list(self._sessions.values()):
            session.will = None
            self._close(session)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        peer = writer.get_extra_info("peername")
        session: _Session | None = None
        clean = False
        try:
            kind, flags, body = await asyncio.wait_for(self._readencode_packet(reader), 30)
            if kind != CONNECT:
                raise MalformedPacketError(f"first packet is type {kind}, expected CONNECT")
            session, keepalive = await self._connect(body, writer)
            if session is None:
                return
            self._spawn(self._send_loop(session))
            if keepalive:
                self._watch_keepalive(session, keepalive * 1.5)
            while True:
                kind, flags, body = await self._readencode_packet(reader)
                session.last_seen = asyncio.get_running_loop().time()
                if kind == DISCONNECT:
                    clean = True
                    return
                self._handle(session, kind, flags, body)
        except MalformedPacketError as exc:
            self._counts["closed_malformed"] += 1
            who = session.client_id if session else peer
            logger.warning("closing MQTT connection of %s: malformed packet: %s", who, exc)
        except asyncio.TimeoutError:
            who = session.client_id if session else peer
            logger.info("closing MQTT connection of %s: keepalive expired", who)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass  # the broker is stopping; ending normally keeps asyncio's callback quiet
        finally:
            if session is not None:
                if clean:
                    session.will = None
                self._close(session)
            writer.close()

    def _watch_keepalive(self, session: _Session, limit: float) -> None:
        # One timer per client instead of a timeout per read: reads stay cheap.
        loop = asyncio.get_running_loop()
        idle = loop.time() - session.last_seen
        if session.closed:
            return
        if idle < limit:
            loop.call_later(limit - idle, self._watch_keepalive, session, limit)
            return
        logger.info("closing MQTT connection of %s: keepalive expired", session.client_id)
        session.writer.close()  # the reader ends; its cleanup publishes the Last Will

    async def _readencode_packet(self, reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
        first = (await reader.readexactly(1))[0]
        length, multiplier = 0, 1
        for _ in range(4):
            digit = (await reader.readexactly(1))[0]
            length += (digit & 0x7F) * multiplier
            if not digit & 0x80:
                break
            multiplier *= 128
        else:
            raise MalformedPacketError("remaining length longer than 4 bytes")
        if length > self._max_packet:
            raise MalformedPacketError(
                f"packet of {length} bytes, expected at most {self._max_packet}"
            )
        body = await reader.readexactly(length)
        self._counts["bytes_in"] += length + 2
        return first >> 4, first & 0x0F, body

    # ---- packets -------------------------------------------------------------------------------

    async def _connect(
        self, body: bytes, writer: asyncio.StreamWriter
    ) -> tuple[_Session | None, int]:
        r = PacketReader(body)
        protocol, level, flags, keepalive = r.text(), r.take(1)[0], r.take(1)[0], r.u16()
        if protocol not in ("MQTT", "MQIsdp"):
            raise MalformedPacketError(f"protocol name {protocol!r}, expected 'MQTT'")
        if level != 4 or flags & 0x01:
            writer.write(encode_packet(CONNACK << 4, bytes((0, CONNACK_BAD_VERSION))))
            return None, 0
        client_id = r.text()
        will = None
        if flags & 0x04:
            will_topic, will_payload = r.text(), r.blob()
            will_qos = (flags >> 3) & 0x03
            if will_qos > 1:
                raise MalformedPacketError(f"will QoS {will_qos}: only 0 and 1 are supported")
            will = _Message(will_topic, will_payload, will_qos, bool(flags & 0x20))
        username = r.text() if flags & 0x80 else None
        password = r.blob() if flags & 0x40 else None
        if not client_id:
            client_id = f"auto-{next(self._anon_ids)}"
        refusal = await self._refusal(client_id, username, password)
        if refusal:
            logger.info("refused MQTT client %s (user %r): rc %d", client_id, username, refusal)
            writer.write(encode_packet(CONNACK << 4, bytes((0, refusal))))
            return None, 0
        old = self._sessions.get(client_id)
        if old is not None:
            logger.info("client id %s taken over by a new connection", client_id)
            self._close(old)
        session = _Session(client_id, username, writer, will)
        self._sessions[client_id] = session
        self._counts["connections"] += 1
        writer.write(encode_packet(CONNACK << 4, b"\x00\x00"))
        logger.debug("MQTT client %s connected (user %r)", client_id, username)
        return session, keepalive

    async def _refusal(self, client_id: str, username: str | None, password: bytes | None) -> int:
        """The CONNACK code refusing this login, or 0 to accept it."""
        auth = self._auth
        if auth is None:
            return 0
        if username is None:
            return CONNACK_NOT_AUTHORIZED
        if not await asyncio.to_thread(auth.login_ok, username, password):
            return CONNACK_BAD_LOGIN
        if auth is not self._auth and username not in (self._auth or auth).password_hashes:
            return CONNACK_BAD_LOGIN  # the table changed during the check
        if not auth.client_id_ok(username, client_id):
            return CONNACK_BAD_ID
        holder = self._sessions.get(client_id)
        if holder is not None and holder.username != username:
            return CONNACK_BAD_ID  # no takeover of another user's client id
        return 0

    def set_auth(self, auth: BrokerAuth | None) -> None:
        """Replace the login table and ACL (any thread); closes connections it no longer accepts.

        A connection is closed (without its Last Will) when its user is gone from the new table
        or has a different password hash.
        """
        loop = self._loop
        if loop is None or self._thread is None:
            self._auth = auth
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(self._apply_auth, auth)

    def _apply_auth(self, auth: BrokerAuth | None) -> None:
        old, self._auth = self._auth, auth
        if auth is None:
            return
        for session in list(self._sessions.values()):
            user = session.username
            new_hash = None if user is None else auth.password_hashes.get(user)
            old_hash = None if old is None or user is None else old.password_hashes.get(user)
            if new_hash is None or (old is not None and new_hash != old_hash):
                logger.info("closing MQTT connection of %s: user %r no longer accepted",
                            session.client_id, user)  # fmt: skip
                session.will = None
                self._close(session)

    def _handle(self, session: _Session, kind: int, flags: int, body: bytes) -> None:
        if kind == PUBLISH:
            self._on_publish(session, flags, body)
        elif kind == PUBACK:
            session.inflight.discard(PacketReader(body).u16())
            session.wakeup.set()
        elif kind == SUBSCRIBE:
            self._on_subscribe(session, flags, body)
        elif kind == UNSUBSCRIBE:
            r = PacketReader(body)
            mid = r.u16()
            while r.pos < len(body):
                session.subscriptions.pop(r.text(), None)
            session.writer.write(encode_packet(UNSUBACK << 4, mid.to_bytes(2, "big")))
        elif kind == PINGREQ:
            session.writer.write(encode_packet(PINGRESP << 4, b""))
        else:
            raise MalformedPacketError(f"unexpected packet type {kind} from a client")

    def _on_publish(self, session: _Session, flags: int, body: bytes) -> None:
        qos, retain = (flags >> 1) & 0x03, bool(flags & 0x01)
        if qos > 1:
            raise MalformedPacketError(f"PUBLISH with QoS {qos}: this broker supports QoS 0 and 1")
        r = PacketReader(body)
        topic = r.text()
        if not topic or "+" in topic or "#" in topic:
            raise MalformedPacketError(f"PUBLISH topic {topic[:60]!r} is not a topic name")
        mid = r.u16() if qos else 0
        message = _Message(topic, r.rest(), qos, retain)
        self._counts["messages_in"] += 1
        self._publish(session.username, message)
        if qos:
            session.writer.write(encode_packet(PUBACK << 4, mid.to_bytes(2, "big")))

    def _on_subscribe(self, session: _Session, flags: int, body: bytes) -> None:
        if flags != 0x02:
            raise MalformedPacketError(f"SUBSCRIBE flags {flags:#x}, expected 0x2")
        r = PacketReader(body)
        mid = r.u16()
        granted = bytearray()
        new_filters: list[tuple[str, int]] = []
        while r.pos < len(body):
            topic_filter, qos = r.text(), r.take(1)[0] & 0x03
            try:
                validate_filter(topic_filter)
            except TopicError as exc:
                logger.info("refused subscription of %s: %s", session.client_id, exc)
                granted.append(0x80)
                continue
            qos = min(qos, 1)
            session.subscriptions[topic_filter] = qos
            new_filters.append((topic_filter, qos))
            granted.append(qos)
        if not granted:
            raise MalformedPacketError("SUBSCRIBE without any topic filter")
        session.writer.write(encode_packet(SUBACK << 4, mid.to_bytes(2, "big") + bytes(granted)))
        for topic_filter, qos in new_filters:
            if split_shared(topic_filter)[0] is not None:
                continue  # retained messages are not sent on shared subscriptions
            for message in list(self._retained.values()):
                if topic_matches(topic_filter, message.topic) and self._may_read(
                    session, message.topic
                ):
                    self._enqueue(session, message, min(qos, message.qos), retain=True)

    # ---- routing -------------------------------------------------------------------------------

    def _may_read(self, session: _Session, topic: str) -> bool:
        if self._auth is None:
            return True
        if session.username is not None and self._auth.allows(session.username, topic, "read"):
            return True
        self._counts["dropped_acl"] += 1
        return False

    def _publish(self, username: str | None, message: _Message) -> None:
        if self._auth is not None and (
            username is None or not self._auth.allows(username, message.topic, "write")
        ):
            self._counts["dropped_acl"] += 1
            logger.info("denied PUBLISH by %r to %s", username, message.topic)
            return
        if message.retain:
            if message.payload:
                self._retained[message.topic] = message
            else:
                self._retained.pop(message.topic, None)
        direct: dict[str, int] = {}
        groups: dict[tuple[str, str], list[tuple[str, int]]] = {}
        for client_id, session in self._sessions.items():
            for topic_filter, qos in session.subscriptions.items():
                if not topic_matches(topic_filter, message.topic):
                    continue
                group, inner = split_shared(topic_filter)
                if group is None:
                    direct[client_id] = max(direct.get(client_id, 0), qos)
                else:
                    groups.setdefault((group, inner), []).append((client_id, qos))
        for client_id, qos in direct.items():
            session = self._sessions[client_id]
            if self._may_read(session, message.topic):
                self._enqueue(session, message, min(qos, message.qos), retain=False)
        for key, members in groups.items():
            readers = [
                (c, q)
                for c, q in sorted(members)
                if self._may_read(self._sessions[c], message.topic)
            ]
            if readers:
                turn = self._share_turn.get(key, 0)
                self._share_turn[key] = turn + 1
                client_id, qos = readers[turn % len(readers)]
                self._enqueue(self._sessions[client_id], message, min(qos, message.qos), False)

    def _enqueue(self, session: _Session, message: _Message, qos: int, retain: bool) -> None:
        if session.closed:
            return
        size = len(message.payload)
        if (
            len(session.queue) >= self._max_queued
            or session.queued_bytes + size > self._max_queued_bytes
        ):
            self._counts["dropped_queue_full"] += 1
            logger.debug(
                "queue of %s full: dropped a message on %s", session.client_id, message.topic
            )
            return
        session.queue.append(_Message(message.topic, message.payload, qos, retain))
        session.queued_bytes += size
        session.wakeup.set()

    async def _send_loop(self, session: _Session) -> None:
        try:
            while not session.closed:
                await session.wakeup.wait()
                session.wakeup.clear()
                while session.queue and (
                    session.queue[0].qos == 0 or len(session.inflight) < self._max_inflight
                ):
                    message = session.queue.popleft()
                    session.queued_bytes -= len(message.payload)
                    header = (PUBLISH << 4) | (message.qos << 1) | int(message.retain)
                    body = encode_string(message.topic)
                    if message.qos:
                        mid = session.take_mid()
                        session.inflight.add(mid)
                        body += mid.to_bytes(2, "big")
                    packet = encode_packet(header, body + message.payload)
                    session.writer.write(packet)
                    self._counts["messages_out"] += 1
                    self._counts["bytes_out"] += len(packet)
                    await session.writer.drain()
        except (ConnectionError, OSError):
            self._close(session)

    def _close(self, session: _Session) -> None:
        if session.closed:
            return
        session.closed = True
        session.wakeup.set()
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]
        will, session.will = session.will, None
        session.writer.close()
        if will is not None:
            logger.debug("publishing the Last Will of %s on %s", session.client_id, will.topic)
            self._publish(session.username, will)
