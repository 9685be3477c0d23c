"""Key grants: a model's content key sealed to one device with HPKE (RFC 9180, base mode).

Suite: DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / ChaCha20-Poly1305. The HPKE ``info`` is the
canonical JSON ``["edge-agent grant v1", device_id, target_path, ciphertext_sha256]``, so a grant
opens only for the device it was sealed to, for that target path and for that exact ciphertext:
a grant copied to another device, to another model or to another version fails with
:class:`GrantError`. Grants travel in the director's signed targets metadata and rest on the
device next to the ciphertext; neither reveals the content key without the device's X25519 key.

Sans-I/O: bytes and key objects in, bytes and dataclasses out.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from agent.schema import SchemaError, dump, field_meta, load
from agent.supplychain.errors import GrantError

__all__ = ["GRANT_SCHEME", "Grant", "grant_info", "open_grant", "seal_content_key"]

GRANT_SCHEME: Final = "hpke-x25519-sha256-chacha20poly1305-v1"
_INFO_LABEL = "edge-agent grant v1"
_CONTENT_KEY_LENGTH = 32
# HPKE enc (32-byte X25519 public key) + sealed key (32) + AEAD tag (16).
_SEALED_LENGTH = 32 + _CONTENT_KEY_LENGTH + 16
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)


@dataclass(frozen=True)
class Grant:
    """A content key sealed to one device; ``sealed`` is base64 of HPKE ``enc || ciphertext``."""

    scheme: Literal["hpke-x25519-sha256-chacha20poly1305-v1"]
    sealed: str = field(metadata=field_meta("base64 HPKE enc || sealed key", max_len=256))

    def __post_init__(self) -> None:
        self.sealed_bytes()  # validates the encoding and length at construction

    def sealed_bytes(self) -> bytes:
        """The raw HPKE output; raises :class:`GrantError` if malformed."""
        try:
            raw = base64.b64decode(self.sealed.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise GrantError(f"grant.sealed: expected base64, got {self.sealed[:20]!r}") from exc
        if len(raw) != _SEALED_LENGTH:
            raise GrantError(f"grant.sealed: expected {_SEALED_LENGTH} bytes, got {len(raw)}")
        return raw

    @classmethod
    def from_dict(cls, data: Any) -> Grant:
        """Strictly load a grant from parsed JSON; raises :class:`GrantError`."""
        try:
            return load(cls, data, path="grant")
        except GrantError:
            raise
        except SchemaError as exc:
            raise GrantError(str(exc)) from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible data (what travels in the director's metadata)."""
        out: dict[str, Any] = dump(self)
        return out


def grant_info(*, device_id: str, target_path: str, ciphertext_sha256: str) -> bytes:
    """The HPKE ``info`` binding a grant to a device, a target path and a ciphertext."""
    for name, value in (
        ("device_id", device_id),
        ("target_path", target_path),
        ("ciphertext_sha256", ciphertext_sha256),
    ):
        if not value:
            raise GrantError(f"grant {name}: expected a non-empty string, got {value!r}")
    return json.dumps(
        [_INFO_LABEL, device_id, target_path, ciphertext_sha256.lower()],
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode("ascii")


def seal_content_key(
    key: bytes | bytearray,
    device_public_key: X25519PublicKey | bytes,
    *,
    device_id: str,
    target_path: str,
    ciphertext_sha256: str,
) -> Grant:
    """Seal ``key`` to the device's X25519 public key (object or 32 raw bytes)."""
    if len(key) != _CONTENT_KEY_LENGTH:
        raise GrantError(f"content key: expected {_CONTENT_KEY_LENGTH} bytes, got {len(key)}")
    if isinstance(device_public_key, (bytes, bytearray)):
        raw = bytes(device_public_key)
        try:
            device_public_key = X25519PublicKey.from_public_bytes(raw)
        except ValueError as exc:
            raise GrantError(
                f"device public key: expected 32 raw X25519 bytes, got {len(raw)}"
            ) from exc
    info = grant_info(
        device_id=device_id, target_path=target_path, ciphertext_sha256=ciphertext_sha256
    )
    sealed = _SUITE.encrypt(bytes(key), device_public_key, info=info)
    return Grant(scheme=GRANT_SCHEME, sealed=base64.b64encode(sealed).decode("ascii"))


def open_grant(
    grant: Grant,
    device_private_key: X25519PrivateKey,
    *,
    device_id: str,
    target_path: str,
    ciphertext_sha256: str,
) -> bytes:
    """Recover the content key; raises :class:`GrantError` if it was sealed for anything else."""
    if grant.scheme != GRANT_SCHEME:
        raise GrantError(f"grant.scheme: expected {GRANT_SCHEME!r}, got {grant.scheme!r}")
    info = grant_info(
        device_id=device_id, target_path=target_path, ciphertext_sha256=ciphertext_sha256
    )
    try:
        key = _SUITE.decrypt(grant.sealed_bytes(), device_private_key, info=info)
    except (InvalidTag, ValueError) as exc:
        raise GrantError(
            f"grant for {target_path!r}: does not open for device {device_id!r} and ciphertext"
            f" {ciphertext_sha256[:16]}...; expected a grant sealed to this device, target and"
            " ciphertext"
        ) from exc
    if len(key) != _CONTENT_KEY_LENGTH:
        raise GrantError(f"content key: expected {_CONTENT_KEY_LENGTH} bytes, got {len(key)}")
    return bytes(key)
