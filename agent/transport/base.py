"""The transport interface every MQTT client of the product goes through.

:class:`Transport` is a small, typed publish/subscribe surface. Two implementations:
:class:`~agent.transport.mqtt.PahoTransport` (a real broker, the only module importing paho-mqtt)
and :class:`~agent.transport.memory.MemoryTransport` (an in-process broker for tests and fleet
simulation). The base class keeps what both share: the subscription table (replayed after every
reconnect), dispatch of incoming messages to handlers, connection listeners and statistics.

Threading: handlers and connection listeners run on the transport's network thread (paho's
loop thread; for the memory transport, the publisher's thread). They must be quick and must not
block on the network - hand work to a queue. They may call :meth:`Transport.publish`. An exception
in a handler is logged and counted, never propagated into the network loop; a handler raising
:class:`~agent.protocol.errors.ProtocolError` counts as a dropped malformed message.

Publishing while disconnected raises :class:`NotConnectedError`: store-and-forward is the job of
the daemon's outbox, which knows what is worth keeping. Messages accepted while connected are
retransmitted by the client after a reconnect (QoS 1).
"""

from __future__ import annotations

import abc
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from agent.protocol.errors import ProtocolError
from agent.protocol.topics import topic_matches, validate_filter, validate_topic

__all__ = [
    "Backoff",
    "ConnectedListener",
    "DisconnectedListener",
    "MessageHandler",
    "MessageProperties",
    "NotConnectedError",
    "PublishQueueFullError",
    "QoS",
    "Transport",
    "TransportError",
    "TransportStats",
    "Will",
]

logger = logging.getLogger(__name__)

QoS = Literal[0, 1, 2]


class TransportError(Exception):
    """Root of transport failures: not connected, queue full, bad configuration."""


class NotConnectedError(TransportError):
    """A publish was attempted while the transport is not connected to the broker."""


class PublishQueueFullError(TransportError):
    """The bounded queue of unacknowledged messages is full (backpressure)."""


@dataclass(frozen=True)
class MessageProperties:
    """What a handler learns about a message beyond topic and payload."""

    qos: int = 0
    retain: bool = False
    """True when the broker delivered a stored retained message (e.g. on subscribe)."""


@dataclass(frozen=True)
class Will:
    """The Last Will the broker publishes if the client vanishes without a clean disconnect."""

    topic: str
    payload: bytes
    qos: QoS = 1
    retain: bool = True


@dataclass(frozen=True)
class TransportStats:
    """Counters since the transport was created."""

    connects: int = 0
    reconnects: int = 0
    messages_in: int = 0
    messages_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped_malformed: int = 0
    dropped_oversize: int = 0
    handler_errors: int = 0
    subscriptions_refused: int = 0


MessageHandler = Callable[[str, bytes, MessageProperties], None]
ConnectedListener = Callable[[bool], None]  # argument: session_present
DisconnectedListener = Callable[[str], None]  # argument: one-line reason


class Backoff:
    """Capped exponential backoff with "equal jitter": each delay is in [d/2, d], d doubling.

    Jitter spreads a fleet's reconnects after a broker restart instead of a thundering herd.
    """

    def __init__(
        self,
        *,
        initial: float = 0.5,
        maximum: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < initial <= maximum:
            raise TransportError(
                f"backoff initial={initial}, maximum={maximum}: expected 0 < initial <= maximum"
            )
        self.initial = initial
        self.maximum = maximum
        self._rng = rng or random.Random()
        self._attempt = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; grows until reset."""
        ceiling = min(self.maximum, self.initial * 2.0 ** min(self._attempt, 62))
        self._attempt += 1
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        """Start over after a success."""
        self._attempt = 0


class Transport(abc.ABC):
    """Publish/subscribe over MQTT (or a stand-in). Constructors are keyword-only."""

    def __init__(self, *, client_id: str, max_message_bytes: int) -> None:
        self.client_id = client_id
        self.max_message_bytes = max_message_bytes
        self._lock = threading.RLock()
        self._subscriptions: dict[str, tuple[MessageHandler, int]] = {}
        self._connected_listeners: list[ConnectedListener] = []
        self._disconnected_listeners: list[DisconnectedListener] = []
        self._stats = TransportStats()
        self._connected_event = threading.Event()
        self._replayed_event = threading.Event()  # subscriptions re-sent on this connection

    # ---- interface -----------------------------------------------------------------------------

    @abc.abstractmethod
    def connect(self) -> None:
        """Start connecting in the background; reconnects automatically until disconnect()."""

    @abc.abstractmethod
    def disconnect(self) -> None:
        """Disconnect cleanly (the Last Will is not sent) and stop reconnecting."""

    @abc.abstractmethod
    def publish(self, topic: str, payload: bytes, *, qos: QoS, retain: bool = False) -> None:
        """Send a message.

        Raises:
            NotConnectedError: not connected now (nothing is queued).
            PublishQueueFullError: too many unacknowledged messages.
            TopicError: ``topic`` is not a valid topic name.
        """

    @abc.abstractmethod
    def _send_subscribe(self, topic_filter: str, qos: int) -> None:
        """Ask the broker for one subscription (only called while connected)."""

    @abc.abstractmethod
    def _send_unsubscribe(self, topic_filter: str) -> None:
        """Drop one subscription at the broker (only called while connected)."""

    @abc.abstractmethod
    def wait_subscribed(self, timeout: float) -> bool:
        """Wait until the broker acknowledged every subscription; False on timeout."""

    # ---- shared behaviour ----------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        """Whether the transport holds an accepted connection right now."""
        return self._connected_event.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected; False on timeout."""
        return self._connected_event.wait(timeout)

    def subscribe(self, topic_filter: str, handler: MessageHandler, *, qos: QoS) -> None:
        """Route messages matching ``topic_filter`` to ``handler``; kept across reconnects.

        Subscribing again to the same filter replaces its handler. Overlapping filters each get
        the message (and a broker may deliver it once per matching subscription).
        """
        validate_filter(topic_filter)
        with self._lock:
            self._subscriptions[topic_filter] = (handler, qos)
        # Never call into the client while holding our lock: its callbacks take our lock.
        if self.is_connected:
            self._send_subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        """Forget ``topic_filter``; a no-op if it was not subscribed."""
        with self._lock:
            known = self._subscriptions.pop(topic_filter, None) is not None
        if known and self.is_connected:
            self._send_unsubscribe(topic_filter)

    def on_connected(self, listener: ConnectedListener) -> None:
        """Call ``listener(session_present)`` after every accepted (re)connection.

        Listeners run after subscriptions are replayed; publish birth messages from here.
        """
        with self._lock:
            self._connected_listeners.append(listener)

    def on_disconnected(self, listener: DisconnectedListener) -> None:
        """Call ``listener(reason)`` whenever an established connection ends."""
        with self._lock:
            self._disconnected_listeners.append(listener)

    def stats(self) -> TransportStats:
        """A snapshot of the counters."""
        with self._lock:
            return self._stats

    # ---- for implementations -------------------------------------------------------------------

    def _count(self, **increments: int) -> None:
        with self._lock:
            self._stats = replace(
                self._stats,
                **{k: getattr(self._stats, k) + v for k, v in increments.items()},
            )

    def _check_publish(self, topic: str, payload: bytes) -> None:
        validate_topic(topic)
        if len(payload) > self.max_message_bytes:
            raise TransportError(
                f"payload of {len(payload)} bytes for {topic!r}: expected at most "
                f"{self.max_message_bytes}"
            )

    def _subscription_items(self) -> list[tuple[str, int]]:
        with self._lock:
            return [(f, qos) for f, (_h, qos) in self._subscriptions.items()]

    def _handle_connected(self, session_present: bool) -> None:
        """Mark connected, replay subscriptions, then tell listeners."""
        with self._lock:
            first = self._stats.connects == 0
            self._count(connects=1, reconnects=0 if first else 1)
            self._connected_event.set()
            subscriptions = self._subscription_items()
            listeners = list(self._connected_listeners)
        for topic_filter, qos in subscriptions:
            self._send_subscribe(topic_filter, qos)
        self._replayed_event.set()
        for listener in listeners:
            try:
                listener(session_present)
            except Exception:
                logger.exception("connected listener %r failed", listener)

    def _handle_disconnected(self, reason: str) -> None:
        """Mark disconnected and tell listeners (only if we were connected)."""
        with self._lock:
            was_connected = self._connected_event.is_set()
            self._connected_event.clear()
            self._replayed_event.clear()
            listeners = list(self._disconnected_listeners)
        if not was_connected:
            return
        for listener in listeners:
            try:
                listener(reason)
            except Exception:
                logger.exception("disconnected listener %r failed", listener)

    def _dispatch(self, topic: str, payload: bytes, properties: MessageProperties) -> None:
        """Hand one incoming message to every handler whose filter matches."""
        self._count(messages_in=1, bytes_in=len(payload))
        if len(payload) > self.max_message_bytes:
            self._count(dropped_oversize=1)
            logger.warning(
                "dropped a %d-byte message on %s: expected at most %d bytes",
                len(payload),
                topic,
                self.max_message_bytes,
            )
            return
        with self._lock:
            handlers = [h for f, (h, _q) in self._subscriptions.items() if topic_matches(f, topic)]
        for handler in handlers:
            try:
                handler(topic, payload, properties)
            except ProtocolError as exc:
                self._count(dropped_malformed=1)
                logger.warning("dropped a malformed message on %s: %s", topic, exc)
            except Exception:
                self._count(handler_errors=1)
                logger.exception("handler for %s failed", topic)
