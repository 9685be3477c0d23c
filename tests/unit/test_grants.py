"""HPKE key grants: they open only for the device, target and ciphertext they were sealed to."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.supplychain.envelope import new_content_key
from agent.supplychain.errors import GrantError
from agent.supplychain.grants import GRANT_SCHEME, Grant, open_grant, seal_content_key

PATH = "models/digits/1/model.onnx.enc"
SHA = "ab" * 32


@pytest.fixture
def device_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def _seal(key: bytes, device_key: X25519PrivateKey) -> Grant:
    return seal_content_key(
        key, device_key.public_key(), device_id="pi-01", target_path=PATH, ciphertext_sha256=SHA
    )


def test_round_trip_through_dict(device_key: X25519PrivateKey) -> None:
    key = new_content_key()
    grant = Grant.from_dict(_seal(key, device_key).to_dict())
    assert grant.scheme == GRANT_SCHEME
    opened = open_grant(
        grant, device_key, device_id="pi-01", target_path=PATH, ciphertext_sha256=SHA
    )
    assert opened == key


def test_raw_public_key_bytes_are_accepted(device_key: X25519PrivateKey) -> None:
    key = new_content_key()
    raw = device_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    grant = seal_content_key(key, raw, device_id="pi-01", target_path=PATH, ciphertext_sha256=SHA)
    assert (
        open_grant(grant, device_key, device_id="pi-01", target_path=PATH, ciphertext_sha256=SHA)
        == key
    )


@pytest.mark.parametrize(
    ("device_id", "path", "sha"),
    [
        ("pi-02", PATH, SHA),  # another device id
        ("pi-01", "models/digits/2/model.onnx.enc", SHA),  # another model version
        ("pi-01", PATH, "cd" * 32),  # another ciphertext
    ],
)
def test_grant_is_bound(device_key: X25519PrivateKey, device_id: str, path: str, sha: str) -> None:
    grant = _seal(new_content_key(), device_key)
    with pytest.raises(GrantError, match="does not open for device"):
        open_grant(grant, device_key, device_id=device_id, target_path=path, ciphertext_sha256=sha)


def test_another_devices_key_cannot_open(device_key: X25519PrivateKey) -> None:
    grant = _seal(new_content_key(), device_key)
    with pytest.raises(GrantError):
        open_grant(
            grant,
            X25519PrivateKey.generate(),
            device_id="pi-01",
            target_path=PATH,
            ciphertext_sha256=SHA,
        )


def test_tampered_sealed_bytes_fail(device_key: X25519PrivateKey) -> None:
    grant = _seal(new_content_key(), device_key)
    raw = bytearray(grant.sealed_bytes())
    raw[-1] ^= 1
    bad = Grant(scheme=GRANT_SCHEME, sealed=base64.b64encode(bytes(raw)).decode())
    with pytest.raises(GrantError):
        open_grant(bad, device_key, device_id="pi-01", target_path=PATH, ciphertext_sha256=SHA)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"scheme": GRANT_SCHEME}, "grant.sealed: required key is missing"),
        ({"scheme": "rsa", "sealed": "AAAA"}, "grant.scheme: expected one of"),
        ({"scheme": GRANT_SCHEME, "sealed": "not base64!"}, "grant.sealed: expected base64"),
        ({"scheme": GRANT_SCHEME, "sealed": "AAAA"}, "expected 80 bytes, got 3"),
        (
            {"scheme": GRANT_SCHEME, "sealed": base64.b64encode(bytes(80)).decode(), "x": 1},
            "unknown key 'x'",
        ),
        ([], "expected an object"),
    ],
)
def test_from_dict_is_strict(data: object, message: str) -> None:
    with pytest.raises(GrantError, match=message):
        Grant.from_dict(data)


def test_empty_binding_is_refused(device_key: X25519PrivateKey) -> None:
    with pytest.raises(GrantError, match="device_id: expected a non-empty string"):
        seal_content_key(
            new_content_key(),
            device_key.public_key(),
            device_id="",
            target_path=PATH,
            ciphertext_sha256=SHA,
        )
