"""The SQLite registry: schema version, permissions, models, devices, assignments."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from tools.fleetctl.registry import MIGRATIONS, SCHEMA_VERSION, Registry, RegistryError

KEY = bytes(range(32))


def _model(registry: Registry, version: str = "1") -> None:
    registry.add_model(
        name="digits",
        version=version,
        format="tflite",
        target_path=f"models/digits/{version}/model.tflite.enc",
        plaintext_sha256="a" * 64,
        plaintext_size=10,
        ciphertext_sha256=version * 64,
        ciphertext_size=46,
        card={"name": "digits", "version": version},
        content_key=KEY,
    )


def _device(registry: Registry, device_id: str = "pi-01") -> None:
    registry.add_device(device_id, tags=("lab",), x25519_public="x", ed25519_public="e")


def test_created_private_wal_and_versioned(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    with Registry.open(path, create=True) as registry:
        assert registry.schema_version() == SCHEMA_VERSION
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(RegistryError, match="not found"):
        Registry.open(tmp_path / "other.sqlite")


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    Registry.open(path, create=True).close()
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RegistryError, match="newer fleetctl"):
        Registry.open(path)


def test_models_are_unique_and_keep_their_content_key(tmp_path: Path) -> None:
    with Registry.open(tmp_path / "r.sqlite", create=True) as registry:
        _model(registry)
        with pytest.raises(RegistryError, match="exists already"):
            _model(registry)
        _model(registry, "2")
        assert [m.ref for m in registry.list_models()] == ["digits@1", "digits@2"]
        assert registry.content_key("digits", "1") == KEY
        assert "content_key" not in registry.get_model("digits", "1").to_dict()
        with pytest.raises(RegistryError, match="not found"):
            registry.get_model("digits", "9")


def test_assignments_keep_history_and_refuse_removed_devices(tmp_path: Path) -> None:
    with Registry.open(tmp_path / "r.sqlite", create=True) as registry:
        _model(registry)
        _model(registry, "2")
        _device(registry)
        _device(registry, "pi-02")
        with pytest.raises(RegistryError, match="exists already"):
            _device(registry)
        registry.assign("pi-01", "digits", "1")
        registry.assign("pi-01", "digits", "2")
        registry.assign("pi-02", "digits", "2")
        history = registry.assignment_history("pi-01")
        assert [(a.version, a.current) for a in history] == [("1", False), ("2", True)]
        assert registry.devices_running("digits", "2") == ["pi-01", "pi-02"]
        removed = registry.remove_device("pi-02")
        assert removed.removed and removed.removed_at
        assert registry.devices_running("digits", "2") == ["pi-01"]
        with pytest.raises(RegistryError, match="removed"):
            registry.assign("pi-02", "digits", "1")
        with pytest.raises(RegistryError, match="not found"):
            registry.assign("pi-01", "digits", "7")
        assert [d.id for d in registry.list_devices(include_removed=False)] == ["pi-01"]
        assert registry.get_device("pi-01").tags == ("lab",)


def test_certificates_are_recorded_and_revoked_with_the_device(tmp_path: Path) -> None:
    with Registry.open(tmp_path / "r.sqlite", create=True) as registry:
        _device(registry, "pi-01")
        _device(registry, "pi-02")
        serial = (1 << 158) + 5  # serials have up to 159 bits: more than SQLite's integers
        registry.add_certificate("pi-01", serial)
        registry.add_certificate("pi-01", 7)
        registry.add_certificate("pi-02", 9)
        with pytest.raises(RegistryError, match="recorded already"):
            registry.add_certificate("pi-02", 7)
        with pytest.raises(RegistryError, match="not found"):
            registry.add_certificate("pi-99", 11)
        assert [c.serial for c in registry.certificates("pi-01")] == [serial, 7]
        assert registry.revoked_certificates() == []
        registry.remove_device("pi-01")
        revoked = registry.revoked_certificates()
        assert {c.serial for c in revoked} == {serial, 7}
        assert all(c.revoked_at is not None and c.device_id == "pi-01" for c in revoked)
        assert registry.certificates("pi-02")[0].revoked_at is None
        with pytest.raises(RegistryError, match="removed"):
            registry.add_certificate("pi-01", 13)


def test_a_version_1_registry_gains_the_certificate_table(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    with sqlite3.connect(path) as raw:
        raw.executescript(MIGRATIONS[0])
        raw.execute("PRAGMA user_version = 1")
        raw.execute(
            "INSERT INTO devices (id, x25519_public, ed25519_public, enrolled_at)"
            " VALUES ('old', 'x', 'e', '2026-01-01T00:00:00+00:00')"
        )
    with Registry.open(path) as registry:
        assert registry.schema_version() == SCHEMA_VERSION == 3
        registry.add_certificate("old", 42)
        registry.set_broker_credential("old", "scrypt$hash")
        assert registry.broker_credentials() == {"old": "scrypt$hash"}
        registry.remove_device("old")
        assert [c.serial for c in registry.revoked_certificates()] == [42]
        assert registry.broker_credentials() == {}  # a removed device has no login
        with pytest.raises(RegistryError, match="removed"):
            registry.set_broker_credential("old", "scrypt$other")


def test_unassign_ends_the_current_assignment_and_keeps_history(tmp_path: Path) -> None:
    with Registry.open(tmp_path / "r.sqlite", create=True) as registry:
        _model(registry)
        _device(registry, "pi-01")
        _device(registry, "pi-02")
        registry.assign("pi-01", "digits", "1")
        registry.assign("pi-02", "digits", "1")
        ended = registry.unassign("pi-01")
        assert ended is not None and (ended.model, ended.version, ended.current) == (
            "digits",
            "1",
            False,
        )
        assert registry.current_assignment("pi-01") is None
        assert registry.devices_running("digits", "1") == ["pi-02"]
        assert [a.current for a in registry.assignment_history("pi-01")] == [False]
        assert registry.unassign("pi-01") is None  # nothing left to end
        with pytest.raises(RegistryError, match="not found"):
            registry.unassign("pi-99")
        registry.assign("pi-01", "digits", "1")  # a device can be assigned again
        assert registry.devices_running("digits", "1") == ["pi-01", "pi-02"]
