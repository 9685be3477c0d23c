"""End-to-end delivery of the outbox: publish, wait for the controller's ``Ack``, re-send.

The broker is not trusted to keep anything: with clean sessions it drops QoS 1 messages nobody
is subscribed to (a controller still re-subscribing after a broker restart), and a PUBACK only
says the broker took the message. So a telemetry report or an event leaves the outbox only
when the controller says it stored it: an ``Ack`` on ``{p}/dev/{d}/ack`` names
``boot_id`` + seq ranges per kind (:class:`agent.protocol.messages.Ack`).

:class:`OutboxFlusher`, while connected:

* publishes the oldest queued messages in order, at most ``window`` unacknowledged at a time
  (so a long outage's backlog does not overrun the broker's per-client queues: mosquitto keeps
  20 in flight and 1000 queued per client, and the controller is one client for the whole
  fleet), and marks them in flight;
* re-publishes a message not acknowledged within ``ack_timeout_s``, and every in-flight message
  at once after each (re)connect, in order;
* removes messages as the controller's Acks arrive (messages of an earlier boot included: their
  ``boot_id`` travels with them);
* discards, counted as dropped, a message published ``max_attempts`` times that the controller
  keeps not acknowledging while it acknowledges others (it rejected it; otherwise it would hold
  a window slot for ever);
* publishes messages without an ack key (see :func:`ack_key_function`) once and removes them
  when the transport accepted them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from agent.daemon.outbox import AckKey, AckKeyFunction, Outbox
from agent.daemon.worker import ServiceThread
from agent.protocol.errors import ProtocolError
from agent.protocol.messages import ACK_KINDS, Ack, decode
from agent.protocol.topics import Topics
from agent.transport.base import (
    MessageProperties,
    NotConnectedError,
    PublishQueueFullError,
    QoS,
    Transport,
)

__all__ = ["DEFAULT_ACK_TIMEOUT_S", "DEFAULT_WINDOW", "OutboxFlusher", "ack_key_function"]

logger = logging.getLogger(__name__)

#: unacknowledged messages per device; 32 devices flushing at once stay within mosquitto's
#: 1000 queued messages for the controller
DEFAULT_WINDOW = 32
DEFAULT_ACK_TIMEOUT_S = 10.0
DEFAULT_MAX_ATTEMPTS = 5
_IDLE_WAIT_S = 0.2


def ack_key_function(topics: Topics) -> AckKeyFunction:
    """The outbox's key for our own telemetry and event messages (None for anything else)."""

    def key_of(topic: str, payload: bytes) -> AckKey | None:
        try:
            kind = topics.parse(topic).kind
        except ProtocolError:
            return None
        if kind not in ACK_KINDS:
            return None
        try:
            data = json.loads(payload)
        except ValueError:
            return None
        boot_id = data.get("boot_id") if isinstance(data, dict) else None
        seq = data.get("seq") if isinstance(data, dict) else None
        if not isinstance(boot_id, str) or not isinstance(seq, int) or isinstance(seq, bool):
            return None
        return AckKey(kind, boot_id, seq)

    return key_of


class OutboxFlusher(ServiceThread):
    """Publishes the outbox in order while connected; forgets messages once acknowledged."""

    thread_name = "edge-outbox"

    def __init__(
        self,
        outbox: Outbox,
        transport: Transport,
        topics: Topics,
        device_id: str,
        *,
        window: int = DEFAULT_WINDOW,
        ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window < 1 or ack_timeout_s <= 0 or max_attempts < 1:
            raise ValueError(
                f"outbox flusher: expected window >= 1, ack_timeout_s > 0 and max_attempts >= 1,"
                f" got {window}, {ack_timeout_s} and {max_attempts}"
            )
        super().__init__()
        self._outbox = outbox
        self._transport = transport
        self._ack_topic = topics.ack(device_id)
        self._window = window
        self._ack_timeout_s = ack_timeout_s
        self._max_attempts = max_attempts
        self._clock = clock
        self._last_ack_at: float | None = None
        self.published = 0  # publishes, re-sends included
        self.resent = 0
        self.acked = 0
        self.rejected = 0
        # A previous process's in-flight marks mean nothing to this one: send those again.
        outbox.reset_in_flight()

    def subscribe(self) -> None:
        """Subscribe to this device's Acks (before the transport connects)."""
        self._transport.subscribe(self._ack_topic, self.on_ack, qos=1)

    def on_ack(self, _topic: str, payload: bytes, _properties: MessageProperties) -> None:
        """Remove what an Ack names; a malformed Ack raises (the transport counts it)."""
        ack = decode(Ack, payload)
        removed = sum(
            self._outbox.ack_seqs(kind, ack.boot_id, getattr(ack, kind)) for kind in ACK_KINDS
        )
        self._last_ack_at = self._clock()
        self.acked += removed
        if removed:
            self._wake.set()  # the window has room

    def wake(self) -> None:
        """Something was queued: flush now."""
        self._wake.set()

    def reconnected(self) -> None:
        """The connection came back: whatever was in flight may be lost, publish it again now."""
        self._outbox.reset_in_flight()
        self._wake.set()

    def flush_once(self) -> int:
        """Publish what the window allows; returns how many were published (0: nothing/offline)."""
        if not self._transport.is_connected:
            return 0
        now = self._clock()
        in_flight: list[int] = []
        accepted: list[int] = []
        rejected: list[int] = []
        try:
            for message in self._outbox.peek(self._window):
                if message.key is not None and message.sent_at is not None:
                    if now - message.sent_at < self._ack_timeout_s:
                        continue  # waiting for its Ack
                    if self._rejected(message.attempts, message.sent_at):
                        rejected.append(message.id)
                        continue
                    self.resent += 1
                qos: QoS = 1 if message.qos else 0
                self._transport.publish(message.topic, message.payload, qos=qos)
                (in_flight if message.key is not None else accepted).append(message.id)
        except (NotConnectedError, PublishQueueFullError) as exc:
            logger.debug("outbox flush paused: %s", exc)
        finally:
            self._outbox.mark_sent(in_flight, now)
            self._outbox.ack(accepted)
            if rejected:
                self.rejected += self._outbox.discard(rejected)
                logger.warning(
                    "outbox: discarded %d message(s) the controller did not acknowledge after %d"
                    " attempts while acknowledging others",
                    len(rejected),
                    self._max_attempts,
                )
            self.published += len(in_flight) + len(accepted)
        return len(in_flight) + len(accepted)

    def _rejected(self, attempts: int, sent_at: float) -> bool:
        """Sent often enough, and the controller acknowledged others well after the last send."""
        return (
            attempts >= self._max_attempts
            and self._last_ack_at is not None
            and self._last_ack_at > sent_at + self._ack_timeout_s / 2
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.flush_once()
            except Exception:
                logger.exception("outbox flush failed")
            self._wake.wait(_IDLE_WAIT_S)
            self._wake.clear()
