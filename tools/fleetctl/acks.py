"""Acknowledgements to devices: "these telemetry reports and events are in the database".

Devices keep telemetry and events in their outbox until the controller acknowledges them (see
agent.daemon.delivery), because the broker may drop QoS 1 messages. :class:`AckBatcher`
collects what ingest stored (or found to be a duplicate: the device may forget those too) and
publishes, per device and boot, one :class:`~agent.protocol.messages.Ack` with merged seq
ranges on ``{p}/dev/{d}/ack`` — coalesced: the service flushes it after each ingest batch, at
most every ``interval_s`` while messages keep arriving. Ranges beyond
:data:`~agent.protocol.messages.MAX_ACK_RANGES` per list go in further Acks.

A lost Ack costs a re-send by the device, which ingest drops as a duplicate and acknowledges
again, so publishing is best effort.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.protocol.messages import ACK_KINDS, MAX_ACK_RANGES, Ack, encode, seq_ranges
from agent.protocol.topics import Topics
from agent.transport.base import Transport, TransportError

__all__ = ["AckBatcher", "AckCounters"]

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.2


@dataclass
class AckCounters:
    """What was acknowledged since the service started."""

    acks_sent: int = 0
    seqs_acked: int = 0
    acks_failed: int = 0


class AckBatcher:
    """Pending acknowledgements per (device, boot, kind); thread-safe."""

    def __init__(
        self,
        transport: Callable[[], Transport | None],
        topics: Topics,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``transport`` returns the transport to publish on (None: not running, keep pending)."""
        self._transport = transport
        self._topics = topics
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], dict[str, set[int]]] = {}
        self._first_pending_at: float | None = None
        self.counters = AckCounters()

    def add(self, device_id: str, kind: str, boot_id: str, seq: int) -> None:
        """Remember that ``seq`` of ``kind`` (``telemetry`` or ``events``) is stored."""
        if kind not in ACK_KINDS:
            raise ValueError(f"ack kind {kind!r}: expected one of {', '.join(ACK_KINDS)}")
        with self._lock:
            kinds = self._pending.setdefault((device_id, boot_id), {})
            kinds.setdefault(kind, set()).add(seq)
            if self._first_pending_at is None:
                self._first_pending_at = self._clock()

    @property
    def pending(self) -> int:
        """Sequence numbers waiting to be acknowledged."""
        with self._lock:
            return sum(len(s) for kinds in self._pending.values() for s in kinds.values())

    def due(self) -> bool:
        """Whether the oldest pending acknowledgement has waited ``interval_s``."""
        with self._lock:
            first = self._first_pending_at
        return first is not None and self._clock() - first >= self.interval_s

    def flush(self) -> int:
        """Publish every pending acknowledgement; returns how many Acks were published."""
        transport = self._transport()
        if transport is None:
            return 0
        with self._lock:
            pending, self._pending = self._pending, {}
            self._first_pending_at = None
        sent = 0
        for (device_id, boot_id), kinds in pending.items():
            for ack in self.acks_for(boot_id, kinds):
                try:
                    transport.publish(self._topics.ack(device_id), encode(ack), qos=1)
                except TransportError as exc:
                    # The device re-sends after its timeout; the duplicate is acknowledged then.
                    self.counters.acks_failed += 1
                    logger.debug("ack to %s not sent: %s", device_id, exc)
                    continue
                sent += 1
                self.counters.acks_sent += 1
                self.counters.seqs_acked += sum(
                    last - first + 1 for kind in ACK_KINDS for first, last in getattr(ack, kind)
                )
        return sent

    @staticmethod
    def acks_for(boot_id: str, kinds: dict[str, set[int]]) -> list[Ack]:
        """The Acks (each within the range bound) covering ``kinds``' seqs of ``boot_id``."""
        ranges = {kind: seq_ranges(kinds.get(kind, ())) for kind in ACK_KINDS}
        acks = []
        start = 0
        while start == 0 or any(len(r) > start for r in ranges.values()):
            chunk = {kind: tuple(r[start : start + MAX_ACK_RANGES]) for kind, r in ranges.items()}
            if not any(chunk.values()):
                break
            acks.append(Ack(boot_id=boot_id, telemetry=chunk["telemetry"], events=chunk["events"]))
            start += MAX_ACK_RANGES
        return acks
