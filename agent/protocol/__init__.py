"""The wire protocol, sans-I/O: topic names, JSON message types and the binary repository frame.

Imports nothing from the project except :mod:`agent.schema`; both the agent and the controller
(``tools.fleetctl``) use it, so there is one source of truth for what goes over MQTT. See
``docs/protocol.md`` for the specification.
"""

from agent.protocol.errors import FrameError, MessageError, ProtocolError, TopicError
from agent.protocol.framing import FrameStatus, RepoFrame, decode_frame, encode_frame
from agent.protocol.messages import (
    PROTOCOL_VERSION,
    EventMessage,
    Notify,
    RepoRequest,
    ResultMessage,
    StateMessage,
    TelemetryMessage,
    decode,
    encode,
)
from agent.protocol.topics import Topics, topic_matches, validate_device_id

__all__ = [
    "PROTOCOL_VERSION",
    "EventMessage",
    "FrameError",
    "FrameStatus",
    "MessageError",
    "Notify",
    "ProtocolError",
    "RepoFrame",
    "RepoRequest",
    "ResultMessage",
    "StateMessage",
    "TelemetryMessage",
    "TopicError",
    "Topics",
    "decode",
    "decode_frame",
    "encode",
    "encode_frame",
    "topic_matches",
    "validate_device_id",
]
