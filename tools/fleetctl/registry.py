"""The controller's registry: models, devices and assignments in one SQLite file.

``registry.sqlite`` lives in the controller home with mode 0600 (WAL mode; SQLite gives its
``-wal``/``-shm`` files the database's permissions). It is a secret: the ``models`` table keeps
each model version's 32-byte content key in the ``content_key`` column, because the controller
must be able to seal new grants for devices enrolled later. The key is never logged, printed or
returned by the listing methods; only :meth:`Registry.content_key` reads it.

The schema is versioned with ``PRAGMA user_version``; :data:`MIGRATIONS` lists the steps, and
opening an older file applies the missing ones in one transaction (version 2 adds
``device_certificates``: the serial of every client certificate issued to a device, revoked when
the device is removed; version 3 ``broker_credentials``: the scrypt hash of each device's
embedded-broker password). The rollout and telemetry tables are created by their own modules.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tools.fleetctl import FleetctlError

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "AssignmentRecord",
    "CertificateRecord",
    "DeviceRecord",
    "ModelRecord",
    "Registry",
    "RegistryError",
]

logger = logging.getLogger(__name__)

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE models (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        format TEXT NOT NULL,
        target_path TEXT NOT NULL UNIQUE,
        plaintext_sha256 TEXT NOT NULL,
        plaintext_size INTEGER NOT NULL,
        ciphertext_sha256 TEXT NOT NULL,
        ciphertext_size INTEGER NOT NULL,
        card_json TEXT NOT NULL,
        content_key BLOB NOT NULL CHECK (length(content_key) = 32),
        created_at TEXT NOT NULL,
        UNIQUE (name, version)
    );
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        tags_json TEXT NOT NULL DEFAULT '[]',
        x25519_public TEXT NOT NULL,
        ed25519_public TEXT NOT NULL,
        enrolled_at TEXT NOT NULL,
        removed INTEGER NOT NULL DEFAULT 0,
        removed_at TEXT
    );
    CREATE TABLE assignments (
        id INTEGER PRIMARY KEY,
        device_id TEXT NOT NULL REFERENCES devices(id),
        model_id INTEGER NOT NULL REFERENCES models(id),
        assigned_at TEXT NOT NULL,
        current INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX assignments_device ON assignments(device_id, current);
    CREATE INDEX assignments_model ON assignments(model_id, current);
    """,
    # Every MQTT client certificate issued to a device (serial as lowercase hex: serials have
    # up to 159 bits), so removing the device can revoke them all in the fleet CRL.
    """
    CREATE TABLE device_certificates (
        serial TEXT PRIMARY KEY,
        device_id TEXT NOT NULL REFERENCES devices(id),
        issued_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE INDEX device_certificates_device ON device_certificates(device_id);
    """,
    # The embedded broker's login of each device: a salted scrypt hash of its password
    # (tools.fleetctl.broker_acl.hash_password); the password itself is only in the bundle.
    """
    CREATE TABLE broker_credentials (
        device_id TEXT PRIMARY KEY REFERENCES devices(id),
        password_hash TEXT NOT NULL,
        set_at TEXT NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
_DB_MODE = 0o600


class RegistryError(FleetctlError):
    """A registry lookup or change is not possible (unknown, duplicate, newer schema...)."""


@dataclass(frozen=True)
class ModelRecord:
    """One model version as registered (without its content key)."""

    name: str
    version: str
    format: str
    target_path: str
    plaintext_sha256: str
    plaintext_size: int
    ciphertext_sha256: str
    ciphertext_size: int
    card: dict[str, Any]
    created_at: str

    @property
    def ref(self) -> str:
        """``NAME@VERSION``."""
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible view (for ``--json`` output)."""
        return {
            "name": self.name,
            "version": self.version,
            "format": self.format,
            "target_path": self.target_path,
            "plaintext_sha256": self.plaintext_sha256,
            "plaintext_size": self.plaintext_size,
            "ciphertext_sha256": self.ciphertext_sha256,
            "ciphertext_size": self.ciphertext_size,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class DeviceRecord:
    """One enrolled device."""

    id: str
    tags: tuple[str, ...]
    x25519_public: str
    ed25519_public: str
    enrolled_at: str
    removed: bool
    removed_at: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible view."""
        return {
            "id": self.id,
            "tags": list(self.tags),
            "x25519_public": self.x25519_public,
            "ed25519_public": self.ed25519_public,
            "enrolled_at": self.enrolled_at,
            "removed": self.removed,
            "removed_at": self.removed_at,
        }


@dataclass(frozen=True)
class AssignmentRecord:
    """A device -> model version assignment (``current`` False once superseded)."""

    device_id: str
    model: str
    version: str
    assigned_at: str
    current: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible view."""
        return {
            "device_id": self.device_id,
            "model": self.model,
            "version": self.version,
            "assigned_at": self.assigned_at,
            "current": self.current,
        }


@dataclass(frozen=True)
class CertificateRecord:
    """A client certificate issued to a device (``revoked_at`` set once the device is removed)."""

    device_id: str
    serial: int
    issued_at: str
    revoked_at: str | None


def _utcnow_text() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


class Registry:
    """A connection to ``registry.sqlite``; use as a context manager or call :meth:`close`."""

    def __init__(self, connection: sqlite3.Connection, now: Callable[[], str]) -> None:
        self._db = connection
        self._now = now

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        create: bool = False,
        now: Callable[[], str] = _utcnow_text,
    ) -> Registry:
        """Open (or, with ``create``, create 0600) the registry and bring its schema up to date.

        Raises:
            RegistryError: missing file without ``create``, or a schema newer than this code.
        """
        db_path = Path(path)
        if not db_path.exists():
            if not create:
                raise RegistryError(f"{db_path}: registry not found; expected `fleetctl init`")
            # Created 0600 before SQLite touches it, so the content keys are never exposed.
            os.close(os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _DB_MODE))
        connection = sqlite3.connect(db_path, isolation_level=None)
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA foreign_keys = ON")
        connection.execute("PRAGMA busy_timeout = 5000")
        registry = cls(connection, now)
        registry._migrate(db_path)
        return registry

    def _migrate(self, path: Path) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RegistryError(
                f"{path}: schema version {version}; expected at most {SCHEMA_VERSION}"
                " (a newer fleetctl wrote it)"
            )
        for number in range(version, SCHEMA_VERSION):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number + 1}")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            logger.info("registry schema migrated to version %d", number + 1)

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def schema_version(self) -> int:
        """The ``PRAGMA user_version`` of the open file."""
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    # -- models ----------------------------------------------------------------------------------

    def add_model(
        self,
        *,
        name: str,
        version: str,
        format: str,
        target_path: str,
        plaintext_sha256: str,
        plaintext_size: int,
        ciphertext_sha256: str,
        ciphertext_size: int,
        card: dict[str, Any],
        content_key: bytes,
    ) -> ModelRecord:
        """Register a model version and its content key; refuses a duplicate NAME@VERSION."""
        if self.find_model(name, version) is not None:
            raise RegistryError(f"model {name}@{version} exists already; expected a new version")
        created = self._now()
        try:
            self._db.execute(
                "INSERT INTO models (name, version, format, target_path, plaintext_sha256,"
                " plaintext_size, ciphertext_sha256, ciphertext_size, card_json, content_key,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    version,
                    format,
                    target_path,
                    plaintext_sha256,
                    plaintext_size,
                    ciphertext_sha256,
                    ciphertext_size,
                    json.dumps(card, sort_keys=True),
                    bytes(content_key),
                    created,
                ),
            )
        except sqlite3.IntegrityError as exc:
            raise RegistryError(f"model {name}@{version}: {exc}; expected unique values") from exc
        record = self.find_model(name, version)
        assert record is not None
        return record

    @staticmethod
    def _model(row: sqlite3.Row) -> ModelRecord:
        return ModelRecord(
            name=row["name"],
            version=row["version"],
            format=row["format"],
            target_path=row["target_path"],
            plaintext_sha256=row["plaintext_sha256"],
            plaintext_size=row["plaintext_size"],
            ciphertext_sha256=row["ciphertext_sha256"],
            ciphertext_size=row["ciphertext_size"],
            card=json.loads(row["card_json"]),
            created_at=row["created_at"],
        )

    _MODEL_QUERY = (
        "SELECT name, version, format, target_path, plaintext_sha256, plaintext_size,"
        " ciphertext_sha256, ciphertext_size, card_json, created_at FROM models"
    )

    def find_model(self, name: str, version: str) -> ModelRecord | None:
        """The model version, or None."""
        row = self._db.execute(
            self._MODEL_QUERY + " WHERE name = ? AND version = ?",
            (name, version),
        ).fetchone()
        return None if row is None else self._model(row)

    def get_model(self, name: str, version: str) -> ModelRecord:
        """The model version; raises :class:`RegistryError` if unknown."""
        record = self.find_model(name, version)
        if record is None:
            raise RegistryError(f"model {name}@{version} not found; expected a registered model")
        return record

    def list_models(self) -> list[ModelRecord]:
        """Every model version, by name then registration order."""
        rows = self._db.execute(self._MODEL_QUERY + " ORDER BY name, id")
        return [self._model(row) for row in rows]

    def content_key(self, name: str, version: str) -> bytes:
        """The model version's content key (a secret: seal it, never print it)."""
        row = self._db.execute(
            "SELECT content_key FROM models WHERE name = ? AND version = ?", (name, version)
        ).fetchone()
        if row is None:
            raise RegistryError(f"model {name}@{version} not found; expected a registered model")
        return bytes(row["content_key"])

    # -- devices ---------------------------------------------------------------------------------

    def add_device(
        self, device_id: str, *, tags: Sequence[str], x25519_public: str, ed25519_public: str
    ) -> DeviceRecord:
        """Enrol a device; refuses an id that exists (removed devices included)."""
        if self.find_device(device_id) is not None:
            raise RegistryError(f"device {device_id!r} exists already; expected a new device id")
        self._db.execute(
            "INSERT INTO devices (id, tags_json, x25519_public, ed25519_public, enrolled_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (device_id, json.dumps(list(tags)), x25519_public, ed25519_public, self._now()),
        )
        return self.get_device(device_id)

    @staticmethod
    def _device(row: sqlite3.Row) -> DeviceRecord:
        return DeviceRecord(
            id=row["id"],
            tags=tuple(json.loads(row["tags_json"])),
            x25519_public=row["x25519_public"],
            ed25519_public=row["ed25519_public"],
            enrolled_at=row["enrolled_at"],
            removed=bool(row["removed"]),
            removed_at=row["removed_at"],
        )

    def find_device(self, device_id: str) -> DeviceRecord | None:
        """The device, or None."""
        row = self._db.execute("SELECT * FROM devices WHERE id = ?", (device_id,)).fetchone()
        return None if row is None else self._device(row)

    def get_device(self, device_id: str) -> DeviceRecord:
        """The device; raises :class:`RegistryError` if unknown."""
        record = self.find_device(device_id)
        if record is None:
            raise RegistryError(f"device {device_id!r} not found; expected an enrolled device")
        return record

    def list_devices(self, *, include_removed: bool = True) -> list[DeviceRecord]:
        """Every device, sorted by id."""
        query = "SELECT * FROM devices"
        if not include_removed:
            query += " WHERE removed = 0"
        return [self._device(row) for row in self._db.execute(query + " ORDER BY id")]

    def remove_device(self, device_id: str) -> DeviceRecord:
        """Mark a device removed, end its current assignment and revoke its certificates."""
        device = self.get_device(device_id)
        if device.removed:
            raise RegistryError(f"device {device_id!r} is removed already")
        now = self._now()
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute(
            "UPDATE devices SET removed = 1, removed_at = ? WHERE id = ?", (now, device_id)
        )
        self._db.execute("UPDATE assignments SET current = 0 WHERE device_id = ?", (device_id,))
        self._db.execute(
            "UPDATE device_certificates SET revoked_at = ? WHERE device_id = ?"
            " AND revoked_at IS NULL",
            (now, device_id),
        )
        self._db.execute("COMMIT")
        return self.get_device(device_id)

    # -- device certificates ---------------------------------------------------------------------

    def add_certificate(self, device_id: str, serial: int) -> CertificateRecord:
        """Record a client certificate issued to an active device."""
        device = self.get_device(device_id)
        if device.removed:
            raise RegistryError(f"device {device_id!r} is removed; expected an active device")
        if serial <= 0:
            raise RegistryError(f"certificate serial {serial}: expected a positive integer")
        issued = self._now()
        try:
            self._db.execute(
                "INSERT INTO device_certificates (serial, device_id, issued_at) VALUES (?, ?, ?)",
                (format(serial, "x"), device_id, issued),
            )
        except sqlite3.IntegrityError as exc:
            raise RegistryError(
                f"certificate serial {serial:x} is recorded already; expected a new serial"
            ) from exc
        return CertificateRecord(device_id, serial, issued, None)

    @staticmethod
    def _certificate(row: sqlite3.Row) -> CertificateRecord:
        return CertificateRecord(
            device_id=row["device_id"],
            serial=int(row["serial"], 16),
            issued_at=row["issued_at"],
            revoked_at=row["revoked_at"],
        )

    def certificates(self, device_id: str) -> list[CertificateRecord]:
        """The client certificates issued to the device, oldest first."""
        rows = self._db.execute(
            "SELECT * FROM device_certificates WHERE device_id = ? ORDER BY rowid", (device_id,)
        )
        return [self._certificate(row) for row in rows]

    def revoked_certificates(self) -> list[CertificateRecord]:
        """Every revoked client certificate (what the fleet CRL lists), oldest first."""
        rows = self._db.execute(
            "SELECT * FROM device_certificates WHERE revoked_at IS NOT NULL"
            " ORDER BY revoked_at, rowid"
        )
        return [self._certificate(row) for row in rows]

    # -- embedded broker credentials -------------------------------------------------------------

    def set_broker_credential(self, device_id: str, password_hash: str) -> None:
        """Record (or replace) the hash of an active device's embedded-broker password."""
        if self.get_device(device_id).removed:
            raise RegistryError(f"device {device_id!r} is removed; expected an active device")
        self._db.execute(
            "INSERT INTO broker_credentials (device_id, password_hash, set_at) VALUES (?, ?, ?)"
            " ON CONFLICT(device_id) DO UPDATE SET password_hash = excluded.password_hash,"
            " set_at = excluded.set_at",
            (device_id, password_hash, self._now()),
        )

    def broker_credentials(self) -> dict[str, str]:
        """Password hash per active (not removed) device: who may log in to the broker."""
        rows = self._db.execute(
            "SELECT c.device_id, c.password_hash FROM broker_credentials c"
            " JOIN devices d ON d.id = c.device_id WHERE d.removed = 0 ORDER BY c.device_id"
        )
        return {str(row[0]): str(row[1]) for row in rows}

    # -- assignments -----------------------------------------------------------------------------

    def assign(self, device_id: str, name: str, version: str) -> AssignmentRecord:
        """Record that ``device_id`` must run NAME@VERSION (the previous one becomes history)."""
        device = self.get_device(device_id)
        if device.removed:
            raise RegistryError(f"device {device_id!r} is removed; expected an active device")
        row = self._db.execute(
            "SELECT id FROM models WHERE name = ? AND version = ?", (name, version)
        ).fetchone()
        if row is None:
            raise RegistryError(f"model {name}@{version} not found; expected a registered model")
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("UPDATE assignments SET current = 0 WHERE device_id = ?", (device_id,))
        self._db.execute(
            "INSERT INTO assignments (device_id, model_id, assigned_at) VALUES (?, ?, ?)",
            (device_id, row["id"], self._now()),
        )
        self._db.execute("COMMIT")
        current = self.current_assignment(device_id)
        assert current is not None
        return current

    def unassign(self, device_id: str) -> AssignmentRecord | None:
        """End the device's current assignment (it now runs nothing); returns the ended one."""
        current = self.current_assignment(device_id)
        if current is None:
            self.get_device(device_id)  # unknown ids raise; a device with nothing is a no-op
            return None
        self._db.execute(
            "UPDATE assignments SET current = 0 WHERE device_id = ? AND current = 1", (device_id,)
        )
        return replace(current, current=False)

    _ASSIGNMENT_QUERY = (
        "SELECT a.device_id, m.name, m.version, a.assigned_at, a.current"
        " FROM assignments a JOIN models m ON m.id = a.model_id"
    )

    @staticmethod
    def _assignment(row: sqlite3.Row) -> AssignmentRecord:
        return AssignmentRecord(
            device_id=row["device_id"],
            model=row["name"],
            version=row["version"],
            assigned_at=row["assigned_at"],
            current=bool(row["current"]),
        )

    def current_assignment(self, device_id: str) -> AssignmentRecord | None:
        """What the device runs now, if anything."""
        row = self._db.execute(
            self._ASSIGNMENT_QUERY + " WHERE a.device_id = ? AND a.current = 1", (device_id,)
        ).fetchone()
        return None if row is None else self._assignment(row)

    def assignment_history(self, device_id: str) -> list[AssignmentRecord]:
        """Every assignment of the device, oldest first."""
        rows = self._db.execute(
            self._ASSIGNMENT_QUERY + " WHERE a.device_id = ? ORDER BY a.id", (device_id,)
        )
        return [self._assignment(row) for row in rows]

    def devices_running(self, name: str, version: str) -> list[str]:
        """Ids of devices currently assigned NAME@VERSION."""
        rows = self._db.execute(
            self._ASSIGNMENT_QUERY + " WHERE m.name = ? AND m.version = ? AND a.current = 1"
            " ORDER BY a.device_id",
            (name, version),
        )
        return [row["device_id"] for row in rows]
