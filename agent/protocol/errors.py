"""The protocol's one exception root: anything malformed on the wire, arriving or leaving."""

from __future__ import annotations

__all__ = ["FrameError", "MessageError", "ProtocolError", "TopicError"]


class ProtocolError(ValueError):
    """Wire data or a wire name is malformed; one line: what was wrong, what was expected."""


class TopicError(ProtocolError):
    """A topic, topic filter or device id is malformed or not one of ours."""


class MessageError(ProtocolError):
    """A JSON message does not decode, is too large or does not match its schema."""


class FrameError(ProtocolError):
    """A binary repository-response frame is truncated, oversized or inconsistent."""
