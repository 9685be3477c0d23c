"""The binary frame of repository responses (``{p}/dev/{d}/repo/resp``).

Sans-I/O. One frame answers one :class:`~agent.protocol.messages.RepoRequest`: a fixed
40-byte header followed by raw payload bytes (no base64). All integers are big-endian::

    offset size field
         0    2 magic         b"ER"
         2    1 version       FRAME_VERSION (1)
         3    1 status        0 ok, 1 not-found, 2 too-large, 3 error
         4   16 request_id    the request's 16 random bytes
        20    8 offset        u64: where in the file the payload starts
        28    8 total_length  u64: length of the whole file (0 unless status is ok)
        36    4 payload_len   u32: bytes following the header
        40    n payload       file bytes (ok) or a one-line UTF-8 reason (any other status)

A frame is valid only if ``payload_len`` equals the bytes that follow, the payload is at most
:data:`MAX_FRAME_PAYLOAD`, and for ``ok``: ``offset + payload_len <= total_length``.
Request ids are 16 random bytes, so a stale response from an earlier boot never matches.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from agent.protocol.errors import FrameError
from agent.protocol.messages import MAX_REQUEST_LENGTH, REQUEST_ID_BYTES

__all__ = [
    "FRAME_HEADER_BYTES",
    "FRAME_MAGIC",
    "FRAME_VERSION",
    "MAX_FRAME_PAYLOAD",
    "MAX_REASON_BYTES",
    "FrameStatus",
    "RepoFrame",
    "decode_frame",
    "encode_frame",
]

FRAME_MAGIC = b"ER"
FRAME_VERSION = 1
MAX_FRAME_PAYLOAD = MAX_REQUEST_LENGTH
MAX_REASON_BYTES = 1024
MAX_OFFSET = 2**62

_HEADER = struct.Struct(f"!2sBB{REQUEST_ID_BYTES}sQQI")
FRAME_HEADER_BYTES = _HEADER.size


class FrameStatus(enum.IntEnum):
    """Outcome of a fetch request."""

    OK = 0
    NOT_FOUND = 1
    TOO_LARGE = 2
    ERROR = 3


@dataclass(frozen=True)
class RepoFrame:
    """A decoded response frame. For a status other than OK, ``payload`` is the UTF-8 reason."""

    request_id: bytes
    status: FrameStatus
    offset: int
    total_length: int
    payload: bytes

    @property
    def reason(self) -> str:
        """The one-line reason of a failed request ('' for OK)."""
        if self.status is FrameStatus.OK:
            return ""
        return self.payload.decode("utf-8", errors="replace")

    @property
    def is_last(self) -> bool:
        """Whether this OK frame reaches the end of the file."""
        return self.status is FrameStatus.OK and (
            self.offset + len(self.payload) == self.total_length
        )


def _check(frame: RepoFrame, max_payload: int) -> None:
    if len(frame.request_id) != REQUEST_ID_BYTES:
        raise FrameError(
            f"request id is {len(frame.request_id)} bytes: expected {REQUEST_ID_BYTES}"
        )
    if not 0 <= frame.offset <= MAX_OFFSET or not 0 <= frame.total_length <= MAX_OFFSET:
        raise FrameError(
            f"offset {frame.offset} / total {frame.total_length}: expected 0..{MAX_OFFSET}"
        )
    if len(frame.payload) > max_payload:
        raise FrameError(
            f"frame payload is {len(frame.payload)} bytes: expected at most {max_payload}"
        )
    if frame.status is FrameStatus.OK:
        end = frame.offset + len(frame.payload)
        if end > frame.total_length:
            raise FrameError(
                f"frame covers bytes {frame.offset}..{end}: expected them within the "
                f"file's {frame.total_length} bytes"
            )
    else:
        if frame.total_length != 0:
            raise FrameError(
                f"{frame.status.name} frame has total length {frame.total_length}: expected 0"
            )
        if len(frame.payload) > MAX_REASON_BYTES:
            raise FrameError(
                f"{frame.status.name} reason is {len(frame.payload)} bytes: "
                f"expected at most {MAX_REASON_BYTES}"
            )


def encode_frame(frame: RepoFrame, *, max_payload: int = MAX_FRAME_PAYLOAD) -> bytes:
    """Serialize ``frame``; raises :class:`FrameError` if it breaks the frame's rules."""
    _check(frame, max_payload)
    header = _HEADER.pack(
        FRAME_MAGIC,
        FRAME_VERSION,
        int(frame.status),
        frame.request_id,
        frame.offset,
        frame.total_length,
        len(frame.payload),
    )
    return header + frame.payload


def decode_frame(data: bytes, *, max_payload: int = MAX_FRAME_PAYLOAD) -> RepoFrame:
    """Parse an untrusted frame; raises :class:`FrameError` with a one-line reason."""
    if len(data) < FRAME_HEADER_BYTES:
        raise FrameError(f"frame is {len(data)} bytes: expected a {FRAME_HEADER_BYTES}-byte header")
    magic, version, status, request_id, offset, total, payload_len = _HEADER.unpack_from(data)
    if magic != FRAME_MAGIC:
        raise FrameError(f"frame magic {magic!r}: expected {FRAME_MAGIC!r}")
    if version != FRAME_VERSION:
        raise FrameError(f"frame version {version}: expected {FRAME_VERSION}")
    try:
        frame_status = FrameStatus(status)
    except ValueError:
        raise FrameError(
            f"frame status {status}: expected one of {[int(s) for s in FrameStatus]}"
        ) from None
    if payload_len > max_payload:
        raise FrameError(f"frame payload is {payload_len} bytes: expected at most {max_payload}")
    actual = len(data) - FRAME_HEADER_BYTES
    if actual != payload_len:
        raise FrameError(
            f"frame header says {payload_len} payload bytes: got {actual} "
            f"({'truncated' if actual < payload_len else 'trailing data'})"
        )
    frame = RepoFrame(
        request_id=request_id,
        status=frame_status,
        offset=offset,
        total_length=total,
        payload=bytes(data[FRAME_HEADER_BYTES:]),
    )
    _check(frame, max_payload)
    return frame
