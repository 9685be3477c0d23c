"""A device's identity: an X25519 key (opens key grants) and an Ed25519 key (signs reports).

On disk (``state/identity/``, mode 0700): ``x25519.key`` and ``ed25519.key``, each the 32 raw
private-key bytes (a PKCS#8 PEM file is accepted too), mode 0600, written through
:mod:`agent.atomicio`. Loading refuses key files that group or others can read. The public
half travels as :class:`DevicePublicKeys` (``public-keys.json``), the document an operator
hands to ``fleetctl device add``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from agent.atomicio import atomic_write, ensure_private_dir
from agent.schema import SchemaError, dump, field_meta, load
from agent.supplychain.errors import IdentityError

__all__ = [
    "ED25519_KEY_FILE",
    "PUBLIC_KEYS_FILE",
    "X25519_KEY_FILE",
    "DeviceIdentity",
    "DevicePublicKeys",
]

X25519_KEY_FILE = "x25519.key"
ED25519_KEY_FILE = "ed25519.key"
PUBLIC_KEYS_FILE = "public-keys.json"
_KEY_MODE = 0o600
_MAX_KEY_FILE_BYTES = 4096
_RAW = serialization.Encoding.Raw


def _b64_key(value: str, name: str) -> bytes:
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise IdentityError(f"{name}: expected base64, got {value[:20]!r}") from exc
    if len(raw) != 32:
        raise IdentityError(f"{name}: expected a 32-byte public key, got {len(raw)} bytes")
    return raw


@dataclass(frozen=True)
class DevicePublicKeys:
    """The public half of a device identity, as JSON-able base64 of the raw 32-byte keys."""

    x25519: str = field(metadata=field_meta("X25519 key grants are sealed to", max_len=64))
    ed25519: str = field(metadata=field_meta("Ed25519 key device reports verify with", max_len=64))

    def __post_init__(self) -> None:
        _b64_key(self.x25519, "x25519")
        _b64_key(self.ed25519, "ed25519")

    def x25519_key(self) -> X25519PublicKey:
        """The X25519 public key object."""
        return X25519PublicKey.from_public_bytes(_b64_key(self.x25519, "x25519"))

    def ed25519_key(self) -> Ed25519PublicKey:
        """The Ed25519 public key object."""
        return Ed25519PublicKey.from_public_bytes(_b64_key(self.ed25519, "ed25519"))

    @classmethod
    def from_dict(cls, data: Any) -> DevicePublicKeys:
        """Strictly load from parsed JSON; raises :class:`IdentityError`."""
        try:
            return load(cls, data, path="public_keys")
        except IdentityError:
            raise
        except SchemaError as exc:
            raise IdentityError(str(exc)) from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> DevicePublicKeys:
        """Parse ``public-keys.json`` text (bounded to 4 KiB)."""
        if len(text) > _MAX_KEY_FILE_BYTES:
            raise IdentityError(f"public keys: expected at most 4096 bytes, got {len(text)}")
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IdentityError(f"public keys: expected JSON, got a parse error ({exc})") from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible data."""
        out: dict[str, Any] = dump(self)
        return out


@dataclass(frozen=True)
class DeviceIdentity:
    """A device's two private keys."""

    x25519: X25519PrivateKey
    ed25519: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> DeviceIdentity:
        """Fresh random keys."""
        return cls(X25519PrivateKey.generate(), Ed25519PrivateKey.generate())

    def public_keys(self) -> DevicePublicKeys:
        """The public half, for enrolment."""
        x_pub = self.x25519.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
        e_pub = self.ed25519.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
        return DevicePublicKeys(
            x25519=base64.b64encode(x_pub).decode("ascii"),
            ed25519=base64.b64encode(e_pub).decode("ascii"),
        )

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write both key files (0600) into ``directory`` (created 0700); returns it."""
        target = ensure_private_dir(directory)
        none = serialization.NoEncryption()
        x_raw = self.x25519.private_bytes(_RAW, serialization.PrivateFormat.Raw, none)
        e_raw = self.ed25519.private_bytes(_RAW, serialization.PrivateFormat.Raw, none)
        atomic_write(target / X25519_KEY_FILE, x_raw, mode=_KEY_MODE)
        atomic_write(target / ED25519_KEY_FILE, e_raw, mode=_KEY_MODE)
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> DeviceIdentity:
        """Read both key files; raises :class:`IdentityError` if missing, exposed or malformed."""
        base = Path(directory)
        x_raw = _read_private_key(base / X25519_KEY_FILE)
        e_raw = _read_private_key(base / ED25519_KEY_FILE)
        return cls(
            x25519=_parse_key(x_raw, X25519PrivateKey, base / X25519_KEY_FILE),
            ed25519=_parse_key(e_raw, Ed25519PrivateKey, base / ED25519_KEY_FILE),
        )


def _read_private_key(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError as exc:
        raise IdentityError(f"{path}: private key not found; expected a device key file") from exc
    except OSError as exc:
        raise IdentityError(f"{path}: cannot open private key ({exc.strerror})") from exc
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            raise IdentityError(f"{path}: mode {mode:04o} lets others read the key; expected 0600")
        data = os.read(fd, _MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise IdentityError(f"{path}: expected a key under {_MAX_KEY_FILE_BYTES} bytes")
    return data


def _parse_key(
    data: bytes,
    kind: type[X25519PrivateKey] | type[Ed25519PrivateKey],
    path: Path,
) -> Any:
    if len(data) == 32:
        return kind.from_private_bytes(data)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{path}: expected 32 raw key bytes or a PKCS#8 PEM key") from exc
    if not isinstance(key, kind):
        raise IdentityError(f"{path}: expected a {kind.__name__[:-10]} key")
    return key
