"""MQTT transports behind one small interface (:class:`Transport`).

``agent.transport.mqtt.PahoTransport`` talks to a real broker (the only paho-mqtt import in the
product; import that module explicitly). :class:`MemoryTransport` on a :class:`MemoryBroker` is the
in-process stand-in for tests and fleet simulations.
"""

from agent.transport.base import (
    Backoff,
    MessageHandler,
    MessageProperties,
    NotConnectedError,
    PublishQueueFullError,
    QoS,
    Transport,
    TransportError,
    TransportStats,
    Will,
)
from agent.transport.memory import MemoryBroker, MemoryTransport

__all__ = [
    "Backoff",
    "MemoryBroker",
    "MemoryTransport",
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
