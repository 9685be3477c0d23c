"""Binary repository-response frames: round trip, and every malformed frame rejected."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.protocol.errors import FrameError
from agent.protocol.framing import (
    FRAME_HEADER_BYTES,
    MAX_FRAME_PAYLOAD,
    FrameStatus,
    RepoFrame,
    decode_frame,
    encode_frame,
)

RID = bytes(range(16))


def ok_frame(payload: bytes = b"abc", offset: int = 10, total: int = 100) -> RepoFrame:
    return RepoFrame(
        request_id=RID, status=FrameStatus.OK, offset=offset, total_length=total, payload=payload
    )


def test_header_is_40_bytes_and_payload_is_raw() -> None:
    data = encode_frame(ok_frame(b"\x00\xffraw"))
    assert FRAME_HEADER_BYTES == 40
    assert len(data) == 40 + 5
    assert data[:4] == b"ER\x01\x00"
    assert data[4:20] == RID
    assert data[40:] == b"\x00\xffraw"


@given(
    payload=st.binary(max_size=2048),
    offset=st.integers(min_value=0, max_value=2**40),
    extra=st.integers(min_value=0, max_value=2**20),
)
def test_ok_round_trip(payload: bytes, offset: int, extra: int) -> None:
    frame = ok_frame(payload, offset, offset + len(payload) + extra)
    assert decode_frame(encode_frame(frame)) == frame


@pytest.mark.parametrize(
    "status", [FrameStatus.NOT_FOUND, FrameStatus.TOO_LARGE, FrameStatus.ERROR]
)
def test_error_frames_carry_a_reason(status: FrameStatus) -> None:
    frame = RepoFrame(RID, status, 0, 0, b"no such target: x.json")
    decoded = decode_frame(encode_frame(frame))
    assert decoded.status is status
    assert decoded.reason == "no such target: x.json"
    assert not decoded.is_last


def test_is_last() -> None:
    assert ok_frame(b"abc", 97, 100).is_last
    assert not ok_frame(b"abc", 96, 100).is_last
    assert ok_frame(b"", 0, 0).is_last


def test_full_size_payload_is_accepted() -> None:
    payload = os.urandom(MAX_FRAME_PAYLOAD)
    assert decode_frame(encode_frame(ok_frame(payload, 0, len(payload)))).payload == payload


def test_truncated_frames_are_rejected() -> None:
    data = encode_frame(ok_frame(b"x" * 100, 0, 100))
    for cut in (0, 1, 39, 40, 139):
        with pytest.raises(FrameError, match=r"expected|truncated"):
            decode_frame(data[:cut])


def test_trailing_data_is_rejected() -> None:
    with pytest.raises(FrameError, match="trailing data"):
        decode_frame(encode_frame(ok_frame()) + b"!")


def test_oversized_frames_are_rejected_from_the_header() -> None:
    header = struct.pack("!2sBB16sQQI", b"ER", 1, 0, RID, 0, 2**40, MAX_FRAME_PAYLOAD + 1)
    with pytest.raises(FrameError, match="at most"):
        decode_frame(header)  # rejected before any payload is looked at
    with pytest.raises(FrameError, match="at most 10"):
        decode_frame(encode_frame(ok_frame(b"x" * 11)), max_payload=10)
    with pytest.raises(FrameError, match="at most"):
        encode_frame(ok_frame(b"x" * 11), max_payload=10)


def test_bad_header_fields_are_rejected() -> None:
    good = encode_frame(ok_frame())
    with pytest.raises(FrameError, match="magic"):
        decode_frame(b"XX" + good[2:])
    with pytest.raises(FrameError, match="version 2"):
        decode_frame(good[:2] + b"\x02" + good[3:])
    with pytest.raises(FrameError, match="status 9"):
        decode_frame(good[:3] + b"\x09" + good[4:])


def test_inconsistent_frames_are_rejected() -> None:
    with pytest.raises(FrameError, match="within"):
        encode_frame(ok_frame(b"abcd", 98, 100))
    beyond = struct.pack("!2sBB16sQQI", b"ER", 1, 0, RID, 98, 100, 4) + b"abcd"
    with pytest.raises(FrameError, match="within"):
        decode_frame(beyond)
    with pytest.raises(FrameError, match="expected 16"):
        encode_frame(RepoFrame(b"short", FrameStatus.OK, 0, 3, b"abc"))
    with pytest.raises(FrameError, match="total length"):
        encode_frame(RepoFrame(RID, FrameStatus.ERROR, 0, 5, b"boom"))
    with pytest.raises(FrameError, match="reason"):
        encode_frame(RepoFrame(RID, FrameStatus.ERROR, 0, 0, b"x" * 2000))
