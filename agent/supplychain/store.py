"""The device state directory: identity, TUF metadata, ciphertexts and the install record.

Layout (a provisioning bundle from ``fleetctl device add`` is a seed of it)::

    identity/x25519.key, identity/ed25519.key   device private keys, 0600 (dir 0700)
    tuf/image/root.json, tuf/director/root.json  ngclient metadata dirs and trust anchors
    models/{sha256}.enc                          verified ciphertexts only, never plaintext
    installed.json                               current and previous installed target

Invariants:
    * Every file written here goes through :func:`agent.atomicio.atomic_write`.
    * ``installed.json`` changes only in :func:`DeviceState.record_install`, after the caller has
      verified, decrypted and self-tested the new model; the previous entry and its ciphertext
      are kept for rollback, older ciphertexts are pruned.
    * An installed model can be decrypted again from its record (:meth:`decrypt_installed`);
      the ciphertext is re-hashed against the record first, so a file swapped at rest fails.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent.atomicio import atomic_write, ensure_private_dir
from agent.modelcard import ModelCard
from agent.schema import SchemaError, dump, field_meta, load
from agent.supplychain.envelope import decrypt_to_memory
from agent.supplychain.errors import GrantError, StateError, TargetHashError, TargetMetadataError
from agent.supplychain.grants import Grant, open_grant
from agent.supplychain.identity import DeviceIdentity
from agent.supplychain.targets import EncryptionInfo

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found]

__all__ = ["DeviceState", "InstallRecord", "InstalledTarget"]

logger = logging.getLogger(__name__)

_MAX_RECORD_BYTES = 2 * 1024 * 1024
_MAX_CONFIG_BYTES = 64 * 1024
_CIPHERTEXT_SUFFIX = ".enc"


@dataclass(frozen=True)
class InstalledTarget:
    """One installed model: what was verified, and what is needed to decrypt it again."""

    target_path: str = field(metadata=field_meta("image/director target path", max_len=512))
    version: str = field(metadata=field_meta("model version", max_len=64))
    length: int = field(metadata=field_meta("ciphertext length in bytes", min=0))
    hashes: dict[str, str] = field(metadata=field_meta("ciphertext hashes", max_len=8))
    card: ModelCard
    encryption: EncryptionInfo
    grant: Grant
    ciphertext_file: str = field(metadata=field_meta("file name under models/", max_len=80))

    @property
    def sha256(self) -> str:
        """The ciphertext sha256 (every target carries one)."""
        return self.hashes["sha256"]

    def same_target(self, path: str, length: int, hashes: dict[str, str]) -> bool:
        """True when this is the target ``path`` with exactly that length and hashes."""
        return (self.target_path, self.length, self.hashes) == (path, length, hashes)


@dataclass(frozen=True)
class InstallRecord:
    """``installed.json``: the running model and the one before it."""

    schema_version: Literal[1] = 1
    current: InstalledTarget | None = None
    previous: InstalledTarget | None = None


class DeviceState:
    """Paths and records of one device state directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @property
    def identity_dir(self) -> Path:
        """Device private keys."""
        return self.root / "identity"

    def tuf_dir(self, repository: Literal["image", "director"]) -> Path:
        """ngclient's metadata directory for ``image`` or ``director``."""
        return self.root / "tuf" / repository

    @property
    def models_dir(self) -> Path:
        """Verified ciphertexts, by sha256."""
        return self.root / "models"

    @property
    def installed_path(self) -> Path:
        """The install record."""
        return self.root / "installed.json"

    def ciphertext_path(self, sha256: str) -> Path:
        """Where the ciphertext with this sha256 is kept."""
        return self.models_dir / f"{sha256}{_CIPHERTEXT_SUFFIX}"

    def load_identity(self) -> DeviceIdentity:
        """The device keys (raises :class:`~agent.supplychain.errors.IdentityError`)."""
        return DeviceIdentity.load(self.identity_dir)

    def device_id(self) -> str:
        """``[device] id`` from the state directory's ``agent.toml`` (a provisioning bundle)."""
        path = self.root / "agent.toml"
        try:
            raw = path.read_bytes()[: _MAX_CONFIG_BYTES + 1]
        except FileNotFoundError as exc:
            raise StateError(f"{path}: not found; expected [device] id here") from exc
        if len(raw) > _MAX_CONFIG_BYTES:
            raise StateError(f"{path}: expected at most {_MAX_CONFIG_BYTES} bytes")
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise StateError(f"{path}: expected TOML, got a parse error ({exc})") from exc
        device = data.get("device")
        device_id = device.get("id") if isinstance(device, dict) else None
        if not isinstance(device_id, str) or not device_id:
            raise StateError(f"{path}: expected a [device] table with an id string")
        return device_id

    def bootstrap_root(self, repository: Literal["image", "director"]) -> Path:
        """The trusted root of ``repository``; raises :class:`StateError` if absent."""
        path = self.tuf_dir(repository) / "root.json"
        if not path.exists():
            raise StateError(f"{path}: not found; expected the provisioned {repository} root")
        return path

    def read_installed(self) -> InstallRecord:
        """The install record (empty when nothing was installed yet)."""
        path = self.installed_path
        try:
            raw = path.read_bytes()[: _MAX_RECORD_BYTES + 1]
        except FileNotFoundError:
            return InstallRecord()
        if len(raw) > _MAX_RECORD_BYTES:
            raise StateError(f"{path}: expected at most {_MAX_RECORD_BYTES} bytes")
        try:
            return load(InstallRecord, json.loads(raw), path="installed")
        except (
            json.JSONDecodeError,
            UnicodeDecodeError,
            SchemaError,
            GrantError,
            TargetMetadataError,
        ) as exc:
            raise StateError(f"{path}: expected a valid install record ({exc})") from exc

    def record_install(self, installed: InstalledTarget) -> InstallRecord:
        """Make ``installed`` current (the old current becomes previous); prune other files."""
        old = self.read_installed()
        if old.current is not None and old.current.same_target(
            installed.target_path, installed.length, installed.hashes
        ):
            record = InstallRecord(current=installed, previous=old.previous)
        else:
            record = InstallRecord(current=installed, previous=old.current)
        text = json.dumps(dump(record), indent=2, sort_keys=True) + "\n"
        atomic_write(self.installed_path, text, mode=0o600)
        self.prune_ciphertexts(record)
        logger.info("recorded install of %s", installed.target_path)
        return record

    def prune_ciphertexts(self, record: InstallRecord) -> list[Path]:
        """Delete ciphertexts (and leftovers) that neither installed entry refers to."""
        keep = {t.ciphertext_file for t in (record.current, record.previous) if t is not None}
        removed = []
        if self.models_dir.is_dir():
            for entry in sorted(self.models_dir.iterdir()):
                if entry.name not in keep and entry.is_file():
                    entry.unlink()
                    removed.append(entry)
        return removed

    def store_ciphertext(self, sha256: str, data: bytes) -> Path:
        """Keep a verified ciphertext under its digest (atomically, 0600)."""
        ensure_private_dir(self.models_dir)
        path = self.ciphertext_path(sha256)
        atomic_write(path, data, mode=0o600)
        return path

    def decrypt_installed(
        self,
        identity: DeviceIdentity,
        device_id: str,
        which: Literal["current", "previous"] = "current",
    ) -> tuple[bytearray, InstalledTarget]:
        """Decrypt an installed model into memory from its record, ciphertext and grant.

        Raises:
            StateError: nothing installed in that slot, or the ciphertext file is missing.
            TargetHashError: the ciphertext changed at rest.
            GrantError, DecryptionError: the grant or the ciphertext do not open.
        """
        entry = getattr(self.read_installed(), which)
        if entry is None:
            raise StateError(f"{self.installed_path}: expected a {which} model, found none")
        assert isinstance(entry, InstalledTarget)
        path = self.models_dir / entry.ciphertext_file
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise StateError(f"{path}: not found; expected the {which} ciphertext") from exc
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != entry.length or digest != entry.sha256:
            raise TargetHashError(
                f"{path}: expected {entry.length} bytes with sha256 {entry.sha256},"
                f" got {len(data)} bytes with sha256 {digest}"
            )
        key = open_grant(
            entry.grant,
            identity.x25519,
            device_id=device_id,
            target_path=entry.target_path,
            ciphertext_sha256=entry.sha256,
        )
        plaintext = decrypt_to_memory(
            data,
            key,
            expected_plaintext_length=entry.encryption.plaintext_length,
            expected_plaintext_sha256=entry.encryption.plaintext_sha256,
        )
        return plaintext, entry
