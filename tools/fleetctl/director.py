"""The director: one signed TUF namespace per device, all under the same director keys.

Uptane's director repository: ``repo/director/{device_id}/metadata`` holds a device's own
targets (the model it must run, with its sealed grant), and ``director-root/metadata`` the
canonical director root chain that every namespace copies. Each namespace is a
:class:`~tools.fleetctl.repository.TufRepository`, so the invariants of
:mod:`tools.fleetctl.repository` (atomic writes, no version reuse, thresholds, snapshot and
timestamp re-signed after every targets change) hold per device. Assigning ``{}`` revokes.

Binding: a namespace is a :class:`DeviceNamespace`, which writes ``"device_id": "<id>"`` into the
signed part of every timestamp, snapshot and targets it signs (python-tuf keeps unrecognized
fields of ``Signed`` and signs them). Devices refuse director metadata without their own id
(:mod:`agent.supplychain.namespace`), so a broker cannot serve one device another's namespace.
Namespaces written before the binding existed are re-signed in full (targets, snapshot,
timestamp) the first time they are assigned, refreshed or rotated (:meth:`DeviceNamespace.bind`;
``fleetctl timestamp refresh`` binds every namespace at once).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from tuf.api.metadata import (  # type: ignore[attr-defined]
    Metadata,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from agent.atomicio import ensure_private_dir
from agent.supplychain.namespace import DEVICE_ID_FIELD
from tools.fleetctl.keys import KeyStore
from tools.fleetctl.repository import (
    DIRECTOR_EXPIRY,
    ROLES,
    ExpiryPolicy,
    RepositoryError,
    TargetEntry,
    TufRepository,
    _is_device_id,
    _utcnow,
    check_device_id,
    check_target_path,
)

__all__ = ["DeviceNamespace", "DirectorRepository"]

logger = logging.getLogger(__name__)

_BOUND_ROLES = (Targets.type, Snapshot.type, Timestamp.type)


class DeviceNamespace(TufRepository):
    """One device's director namespace: every non-root role it signs names the device.

    Args:
        metadata_dir: ``repo/director/{device_id}/metadata``.
        keys: the key store with the director keys.
        device_id: the device this namespace belongs to (written as signed ``device_id``).
        expiry: validity periods per role.
        clock: the current time (UTC).
    """

    def __init__(
        self,
        metadata_dir: str | os.PathLike[str],
        keys: KeyStore,
        *,
        device_id: str,
        expiry: ExpiryPolicy,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        super().__init__(metadata_dir, keys, key_namespace="director", expiry=expiry, clock=clock)
        self.device_id = check_device_id(device_id)

    def commit(
        self,
        md: Metadata[Any],
        *,
        expires: datetime | timedelta | None = None,
        bump: bool = True,
    ) -> Metadata[Any]:
        """Like :meth:`TufRepository.commit`, with the signed ``device_id`` set first."""
        if md.signed.type in _BOUND_ROLES:
            md.signed.unrecognized_fields[DEVICE_ID_FIELD] = self.device_id
        return super().commit(md, expires=expires, bump=bump)

    def is_bound(self) -> bool:
        """True when the latest targets, snapshot and timestamp all name this device."""
        return all(
            self.open(role).signed.unrecognized_fields.get(DEVICE_ID_FIELD) == self.device_id
            for role in _BOUND_ROLES
        )

    def bind(self) -> bool:
        """Re-sign targets, snapshot and timestamp if any lacks the device id; True if it did."""
        if self.is_bound():
            return False
        self.publish_targets(self.targets())
        logger.info("director/%s: re-signed with the signed device id", self.device_id)
        return True

    def refresh_timestamp(self, expires: datetime | timedelta | None = None) -> Timestamp:
        """Re-sign the timestamp (binding the whole namespace first if it is not yet)."""
        self.bind()
        return super().refresh_timestamp(expires)

    def refresh_expiring(self, margin: timedelta) -> list[str]:
        """Re-sign what expires within ``margin``; everything if the namespace was unbound."""
        if self.bind():
            return [Targets.type, Snapshot.type, Timestamp.type]
        return super().refresh_expiring(margin)

    def resign_after_rotation(self, role: str) -> None:
        """Re-sign after ``role``'s rotation (all of targets/snapshot/timestamp if unbound)."""
        if not self.bind():
            super().resign_after_rotation(role)


class DirectorRepository:
    """The director: one TUF namespace per device, all under the same director keys."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        root_chain_dir: str | os.PathLike[str],
        keys: KeyStore,
        *,
        expiry: ExpiryPolicy = DIRECTOR_EXPIRY,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.keys = keys
        self.expiry = expiry
        self._clock = clock
        self.root_chain = TufRepository(
            Path(root_chain_dir) / "metadata",
            keys,
            key_namespace="director",
            expiry=expiry,
            clock=clock,
        )

    @classmethod
    def create(
        cls,
        base_dir: str | os.PathLike[str],
        root_chain_dir: str | os.PathLike[str],
        keys: KeyStore,
        *,
        thresholds: Mapping[str, tuple[int, int]] | None = None,
        expiry: ExpiryPolicy = DIRECTOR_EXPIRY,
        clock: Callable[[], datetime] = _utcnow,
    ) -> DirectorRepository:
        """Create the director keys and root chain (no devices yet)."""
        director = cls(base_dir, root_chain_dir, keys, expiry=expiry, clock=clock)
        chain = director.root_chain
        if chain.exists():
            raise RepositoryError(f"{chain.metadata_dir}: a director root exists already")
        root = Root(expires=chain.now() + expiry.root, consistent_snapshot=True)
        for role in ROLES:
            threshold, count = (thresholds or {}).get(role, (1, 1))
            if not 1 <= threshold <= count:
                raise RepositoryError(
                    f"{role}: threshold {threshold} of {count} keys; expected 1 <= k <= n"
                )
            for _ in range(count):
                root.add_key(keys.generate("director", role).public_key, role)
            root.roles[role].threshold = threshold
        root_md = Metadata(root)
        chain._sign_checked(root_md, [root])
        chain.write(root_md)
        ensure_private_dir(director.base_dir, mode=0o755)
        return director

    def namespace(self, device_id: str) -> DeviceNamespace:
        """The TUF repository of one device (``repo/director/{device_id}/metadata``)."""
        check_device_id(device_id)
        return DeviceNamespace(
            self.base_dir / device_id / "metadata",
            self.keys,
            device_id=device_id,
            expiry=self.expiry,
            clock=self._clock,
        )

    def devices(self) -> list[str]:
        """Ids of every device namespace, sorted."""
        if not self.base_dir.is_dir():
            return []
        return sorted(
            name
            for name in os.listdir(self.base_dir)
            if _is_device_id(name) and (self.base_dir / name / "metadata").is_dir()
        )

    def add_device(self, device_id: str) -> DeviceNamespace:
        """Create a device namespace: the root chain plus empty targets, snapshot, timestamp."""
        ns = self.namespace(device_id)
        if ns.exists():
            raise RepositoryError(f"device {device_id!r} has a director namespace already")
        for version in range(1, self.root_chain.latest_version(Root.type) + 1):
            ns.write(self.root_chain.open(Root.type, version))
        ns.publish_targets(Targets(), initial=True)
        return ns

    def remove_device_namespace(self, device_id: str) -> None:
        """Delete a device's namespace entirely (prefer :meth:`assign` with ``{}`` to revoke)."""
        shutil.rmtree(self.namespace(device_id).metadata_dir.parent, ignore_errors=True)

    def assign(self, device_id: str, entries: Mapping[str, TargetEntry]) -> Targets:
        """Make ``entries`` (``{path: (length, hashes, custom)}``) the device's target list."""
        ns = self.namespace(device_id)
        if not ns.exists():
            raise RepositoryError(f"device {device_id!r} has no director namespace; add it first")
        files = {}
        for path, entry in entries.items():
            check_target_path(path)
            length, hashes, custom = entry
            files[path] = TargetFile(
                length, dict(hashes), path, unrecognized_fields={"custom": dict(custom)}
            )
        return ns.set_targets(files)

    def refresh_timestamps(self, expires: datetime | timedelta | None = None) -> list[str]:
        """Re-sign every device's timestamp; returns the device ids."""
        devices = self.devices()
        for device_id in devices:
            self.namespace(device_id).refresh_timestamp(expires)
        return devices

    def bind_namespaces(self) -> list[str]:
        """Re-sign every namespace that lacks the signed device id; returns those device ids."""
        return [d for d in self.devices() if self.namespace(d).bind()]

    def refresh_expiring(self, margin: timedelta) -> dict[str, list[str]]:
        """Per device, re-sign what expires within ``margin`` (timestamps always)."""
        return {d: self.namespace(d).refresh_expiring(margin) for d in self.devices()}

    def rotate_keys(self, role: str, *, key_count: int = 1, threshold: int = 1) -> Root:
        """Rotate a director role's keys: one new root, copied into every namespace."""
        chain = self.root_chain
        old_root = chain.root()
        new_keys = [self.keys.generate("director", role) for _ in range(key_count)]
        root_md = chain.rotated_root(role, new_keys, threshold)
        chain.write(root_md)
        for device_id in self.devices():
            ns = self.namespace(device_id)
            ns.write(root_md)
            ns.resign_after_rotation(role)
        chain.retire_unused_keys(old_root)
        return root_md.signed
