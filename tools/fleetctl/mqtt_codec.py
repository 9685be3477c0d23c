"""MQTT 3.1.1 packet encoding and decoding for the embedded broker (sans-I/O: bytes only).

Packet type numbers, CONNACK return codes, the remaining-length encoding, length-prefixed UTF-8
strings and :class:`PacketReader`, a cursor over one packet body that raises
:class:`MalformedPacketError` on any overrun or invalid string. Reading packets off a socket
stays in :mod:`tools.fleetctl.broker`.
"""

from __future__ import annotations

__all__ = [
    "CONNACK",
    "CONNACK_BAD_ID",
    "CONNACK_BAD_LOGIN",
    "CONNACK_BAD_VERSION",
    "CONNACK_NOT_AUTHORIZED",
    "CONNECT",
    "DISCONNECT",
    "PINGREQ",
    "PINGRESP",
    "PUBACK",
    "PUBLISH",
    "SUBACK",
    "SUBSCRIBE",
    "UNSUBACK",
    "UNSUBSCRIBE",
    "MalformedPacketError",
    "PacketReader",
    "encode_length",
    "encode_packet",
    "encode_string",
]

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14
CONNACK_BAD_VERSION, CONNACK_BAD_ID, CONNACK_BAD_LOGIN, CONNACK_NOT_AUTHORIZED = 1, 2, 4, 5


class MalformedPacketError(Exception):
    """A packet broke MQTT 3.1.1 framing or rules; the connection is closed."""


def encode_length(n: int) -> bytes:
    """The MQTT remaining-length encoding of ``n`` (1-4 bytes)."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_packet(first: int, body: bytes) -> bytes:
    """A whole packet: first byte (type << 4 | flags), remaining length, body."""
    return bytes((first,)) + encode_length(len(body)) + body


def encode_string(text: str) -> bytes:
    """A UTF-8 string with its 2-byte big-endian length."""
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


class PacketReader:
    """Cursor over one packet body; any overrun is a malformed packet."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.body):
            raise MalformedPacketError(f"packet ends early: needed {n} more bytes")
        chunk = self.body[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def blob(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        try:
            value = self.blob().decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedPacketError("string is not valid UTF-8") from None
        if "\x00" in value:
            raise MalformedPacketError("string contains NUL")
        return value

    def rest(self) -> bytes:
        return self.take(len(self.body) - self.pos)
