"""The director: one signed TUF namespace per device, all under the same director keys.

Uptane's director repository: ``repo/director/{device_id}/metadata`` holds a device's own
targets (the model it must run, with its sealed grant), and ``director-root/metadata`` the
canonical director root chain that every namespace copies. Each namespace is a
:class:`~tools.fleetctl.repository.TufRepository`, so the invariants of
:mod:`tools.fleetctl.repository` (atomic writes, no version reuse, thresholds, snapshot and
timestamp re-signed after every targets change) hold per device. Assigning ``{}`` revokes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path

from tuf.api.metadata import Metadata, Root, TargetFile, Targets  # type: ignore[attr-defined]

from agent.atomicio import ensure_private_dir
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

__all__ = ["DirectorRepository"]


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

    def namespace(self, device_id: str) -> TufRepository:
        """The TUF repository of one device (``repo/director/{device_id}/metadata``)."""
        check_device_id(device_id)
        return TufRepository(
            self.base_dir / device_id / "metadata",
            self.keys,
            key_namespace="director",
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

    def add_device(self, device_id: str) -> TufRepository:
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
