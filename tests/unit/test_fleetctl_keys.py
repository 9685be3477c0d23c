"""Key storage: 0600 PEM files named after their key id, strict loading."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from agent.atomicio import atomic_write
from tools.fleetctl.keys import KeyStore, KeyStoreError


def test_generated_key_is_private_and_loads_back(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    signer = store.generate("image", "root")
    keyid = signer.public_key.keyid
    path = store.path_of("image", "root", keyid)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert path.name == f"image-root-{keyid[:16]}.pem"
    loaded = store.load("image", "root", keyid)
    assert loaded.public_key == signer.public_key
    signature = loaded.sign(b"payload")
    signer.public_key.verify_signature(signature, b"payload")
    assert store.list_keys() == [("image", "root", keyid[:16])]


def test_group_readable_key_is_refused(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    keyid = store.generate("director", "timestamp").public_key.keyid
    os.chmod(store.path_of("director", "timestamp", keyid), 0o640)
    with pytest.raises(KeyStoreError, match="expected 0600"):
        store.load("director", "timestamp", keyid)


def test_key_file_holding_another_key_is_refused(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    first = store.generate("image", "targets").public_key.keyid
    second = store.generate("image", "targets").public_key.keyid
    os.replace(store.path_of("image", "targets", second), store.path_of("image", "targets", first))
    with pytest.raises(KeyStoreError, match="expected " + first):
        store.load("image", "targets", first)


def test_non_ed25519_key_is_refused(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    keyid = "ab" * 32
    pem = generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write(store.path_of("image", "root", keyid), pem, mode=0o600)
    with pytest.raises(KeyStoreError, match="Ed25519"):
        store.load("image", "root", keyid)


def test_missing_key_and_bad_names(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    assert not store.has("image", "root", "cd" * 32)
    with pytest.raises(KeyStoreError, match="not found"):
        store.load("image", "root", "cd" * 32)
    with pytest.raises(KeyStoreError, match="key name"):
        store.path_of("image", "../root", "cd" * 32)
    store.remove("image", "root", "cd" * 32)  # absent: no error


def test_error_messages_never_contain_key_material(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    signer = store.generate("image", "snapshot")
    path = store.path_of("image", "snapshot", signer.public_key.keyid)
    os.chmod(path, 0o644)
    with pytest.raises(KeyStoreError) as info:
        store.load("image", "snapshot", signer.public_key.keyid)
    assert "PRIVATE KEY" not in str(info.value)
    assert signer.private_bytes.decode().splitlines()[1] not in str(info.value)
