"""An in-process MQTT broker and a transport for it: unit tests and simulated fleets.

:class:`MemoryBroker` implements the parts of MQTT the product relies on: topic filters with
``+``/``#`` (one matcher: :func:`agent.protocol.topics.topic_matches`), retained messages
(an empty retained payload clears), shared subscriptions (``$share/{group}/...``, each message
to one member of the group, round robin; no retained messages on them), the Last Will on an
abrupt disconnect, client-id takeover, and outages: :meth:`MemoryBroker.go_down` drops every
client and refuses connections until :meth:`MemoryBroker.come_up`, at which point transports
that want to be connected reconnect (and replay subscriptions) like the real client would.

QoS is recorded but every message is delivered (no loss to simulate). Delivery is synchronous on
the publisher's thread, outside the broker's lock, so handlers may publish.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass

from agent.protocol.topics import split_shared, topic_matches
from agent.transport.base import (
    MessageProperties,
    NotConnectedError,
    QoS,
    Transport,
    Will,
)

__all__ = ["MemoryBroker", "MemoryTransport"]

logger = logging.getLogger(__name__)


@dataclass
class _Delivery:
    transport: MemoryTransport
    topic: str
    payload: bytes
    properties: MessageProperties


class MemoryBroker:
    """A thread-safe in-process MQTT broker."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._clients: dict[str, MemoryTransport] = {}
        self._wanting: dict[str, MemoryTransport] = {}  # want a connection, even during outages
        self._subscriptions: dict[str, dict[str, int]] = {}  # client id -> filter -> qos
        self._retained: dict[str, tuple[bytes, int]] = {}
        self._round_robin = itertools.count()
        self._up = True
        self.published = 0

    # ---- operator / test controls --------------------------------------------------------------

    @property
    def is_up(self) -> bool:
        """Whether the broker accepts connections."""
        return self._up

    def go_down(self) -> None:
        """Simulate a broker outage: drop every client (no Last Will), refuse connections."""
        with self._lock:
            self._up = False
            victims = list(self._clients.values())
            self._clients.clear()
            self._subscriptions.clear()
        for transport in victims:
            transport._lost("broker unavailable")

    def come_up(self) -> None:
        """End an outage; every transport that wants a connection reconnects now."""
        with self._lock:
            self._up = True
            waiting = list(self._wanting.values())
        for transport in waiting:
            transport._try_connect()

    def drop(self, client_id: str, *, reconnect: bool = True) -> None:
        """Cut one client's connection abruptly: its Last Will fires.

        With ``reconnect=False`` the client stays away (a crashed or powered-off device).
        """
        with self._lock:
            transport = self._clients.get(client_id)
            if transport is None:
                return
            self._remove(transport)
            if not reconnect:
                self._wanting.pop(client_id, None)
        self._publish_will(transport)
        transport._lost("connection lost", reconnect=reconnect)

    def retained(self, topic: str) -> bytes | None:
        """The retained payload of ``topic``, if any."""
        with self._lock:
            entry = self._retained.get(topic)
            return None if entry is None else entry[0]

    def connected_clients(self) -> list[str]:
        """Ids of connected clients."""
        with self._lock:
            return sorted(self._clients)

    # ---- used by MemoryTransport ---------------------------------------------------------------

    def _connect(self, transport: MemoryTransport) -> bool:
        with self._lock:
            self._wanting[transport.client_id] = transport
            if not self._up:
                return False
            previous = self._clients.get(transport.client_id)
            if previous is not None and previous is not transport:
                self._remove(previous)
                self._wanting.pop(transport.client_id, None)
                self._wanting[transport.client_id] = transport
            self._clients[transport.client_id] = transport
            self._subscriptions[transport.client_id] = {}
        if previous is not None and previous is not transport:
            self._publish_will(previous)  # a takeover is not a clean disconnect
            previous._lost("session taken over", reconnect=False)
        return True

    def _disconnect(self, transport: MemoryTransport) -> None:
        with self._lock:
            if self._clients.get(transport.client_id) is transport:
                self._remove(transport)
            if self._wanting.get(transport.client_id) is transport:
                del self._wanting[transport.client_id]

    def _remove(self, transport: MemoryTransport) -> None:
        del self._clients[transport.client_id]
        self._subscriptions.pop(transport.client_id, None)

    def _publish_will(self, transport: MemoryTransport) -> None:
        will = transport.will
        if will is not None:
            self._publish(will.topic, will.payload, will.qos, will.retain)

    def _subscribe(self, transport: MemoryTransport, topic_filter: str, qos: int) -> None:
        with self._lock:
            subs = self._subscriptions.get(transport.client_id)
            if subs is None or self._clients.get(transport.client_id) is not transport:
                return
            subs[topic_filter] = qos
            group, _inner = split_shared(topic_filter)
            retained = (
                []
                if group is not None
                else [
                    (t, p, min(q, qos))
                    for t, (p, q) in self._retained.items()
                    if topic_matches(topic_filter, t)
                ]
            )
        for topic, payload, q in retained:
            transport._dispatch(topic, payload, MessageProperties(qos=q, retain=True))

    def _unsubscribe(self, transport: MemoryTransport, topic_filter: str) -> None:
        with self._lock:
            self._subscriptions.get(transport.client_id, {}).pop(topic_filter, None)

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        deliveries: list[_Delivery] = []
        with self._lock:
            self.published += 1
            if retain:
                if payload:
                    self._retained[topic] = (payload, qos)
                else:
                    self._retained.pop(topic, None)
            groups: dict[tuple[str, str], list[tuple[str, int]]] = {}
            for client_id, subs in self._subscriptions.items():
                best: int | None = None
                for topic_filter, sub_qos in subs.items():
                    if not topic_matches(topic_filter, topic):
                        continue
                    group, inner = split_shared(topic_filter)
                    if group is not None:
                        groups.setdefault((group, inner), []).append((client_id, sub_qos))
                    else:
                        best = sub_qos if best is None else max(best, sub_qos)
                if best is not None:
                    deliveries.append(self._delivery(client_id, topic, payload, min(qos, best)))
            turn = next(self._round_robin)
            for (_group, _inner), members in sorted(groups.items()):
                client_id, sub_qos = sorted(members)[turn % len(members)]
                deliveries.append(self._delivery(client_id, topic, payload, min(qos, sub_qos)))
        for delivery in deliveries:
            delivery.transport._dispatch(delivery.topic, delivery.payload, delivery.properties)

    def _delivery(self, client_id: str, topic: str, payload: bytes, qos: int) -> _Delivery:
        return _Delivery(
            self._clients[client_id], topic, payload, MessageProperties(qos=qos, retain=False)
        )


class MemoryTransport(Transport):
    """A :class:`~agent.transport.base.Transport` connected to a :class:`MemoryBroker`."""

    def __init__(
        self,
        *,
        broker: MemoryBroker,
        client_id: str,
        will: Will | None = None,
        max_message_bytes: int = 1024 * 1024 + 1024,
    ) -> None:
        super().__init__(client_id=client_id, max_message_bytes=max_message_bytes)
        self.broker = broker
        self.will = will
        self._want_connection = False

    def connect(self) -> None:
        """Connect now if the broker is up; otherwise as soon as it comes up."""
        self._want_connection = True
        self._try_connect()

    def disconnect(self) -> None:
        """Clean disconnect: no Last Will, no reconnect."""
        self._want_connection = False
        self.broker._disconnect(self)
        self._handle_disconnected("client disconnected")

    def publish(self, topic: str, payload: bytes, *, qos: QoS, retain: bool = False) -> None:
        """Deliver to every matching subscriber before returning."""
        self._check_publish(topic, payload)
        if not self.is_connected:
            raise NotConnectedError(f"cannot publish to {topic!r}: not connected to the broker")
        self._count(messages_out=1, bytes_out=len(payload))
        self.broker._publish(topic, bytes(payload), qos, retain)

    def wait_subscribed(self, timeout: float) -> bool:
        """Subscriptions take effect immediately; waits only for the connection."""
        return self._replayed_event.wait(timeout)

    def _try_connect(self) -> None:
        if self._want_connection and not self.is_connected and self.broker._connect(self):
            self._handle_connected(False)

    def _lost(self, reason: str, *, reconnect: bool = True) -> None:
        self._handle_disconnected(reason)
        if not reconnect:
            self._want_connection = False
        elif self._want_connection and self.broker.is_up:
            self._try_connect()

    def _send_subscribe(self, topic_filter: str, qos: int) -> None:
        self.broker._subscribe(self, topic_filter, qos)

    def _send_unsubscribe(self, topic_filter: str) -> None:
        self.broker._unsubscribe(self, topic_filter)
