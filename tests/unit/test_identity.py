"""Device identity: key files, permissions, the public-key document."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.supplychain.errors import IdentityError
from agent.supplychain.identity import DeviceIdentity, DevicePublicKeys


def _mode(path: os.PathLike[str] | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_save_load_round_trip_with_private_modes(tmp_path: Path) -> None:
    identity = DeviceIdentity.generate()
    directory = identity.save(tmp_path / "identity")
    assert _mode(directory) == 0o700
    assert _mode(directory / "x25519.key") == 0o600
    assert _mode(directory / "ed25519.key") == 0o600
    assert len((directory / "x25519.key").read_bytes()) == 32
    loaded = DeviceIdentity.load(directory)
    assert loaded.public_keys() == identity.public_keys()


def test_public_keys_document_round_trip() -> None:
    keys = DeviceIdentity.generate().public_keys()
    text = json.dumps(keys.to_dict())
    parsed = DevicePublicKeys.from_json(text)
    assert parsed == keys
    assert (
        parsed.x25519_key().public_bytes_raw()
        == DevicePublicKeys.from_dict(keys.to_dict()).x25519_key().public_bytes_raw()
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"x25519": "AAAA"}, "ed25519: required key is missing"),
        ({"x25519": "AAAA", "ed25519": "AAAA"}, "expected a 32-byte public key, got 3"),
        ({"x25519": "@@", "ed25519": "AAAA"}, "expected base64"),
        ({"x25519": "A", "ed25519": "A", "rsa": "A"}, "unknown key 'rsa'"),
    ],
)
def test_public_keys_are_strict(data: object, message: str) -> None:
    with pytest.raises(IdentityError, match=message):
        DevicePublicKeys.from_dict(data)


def test_readable_key_file_is_refused(tmp_path: Path) -> None:
    directory = DeviceIdentity.generate().save(tmp_path / "identity")
    os.chmod(directory / "ed25519.key", 0o644)
    with pytest.raises(IdentityError, match="mode 0644 lets others read the key; expected 0600"):
        DeviceIdentity.load(directory)


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="private key not found"):
        DeviceIdentity.load(tmp_path)


def test_pem_keys_are_accepted_and_type_checked(tmp_path: Path) -> None:
    identity = DeviceIdentity.generate()
    directory = identity.save(tmp_path / "identity")
    pem = identity.ed25519.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (directory / "ed25519.key").write_bytes(pem)
    assert DeviceIdentity.load(directory).public_keys() == identity.public_keys()
    (directory / "x25519.key").write_bytes(pem)  # an Ed25519 key where X25519 belongs
    with pytest.raises(IdentityError, match="expected a X25519 key"):
        DeviceIdentity.load(directory)
