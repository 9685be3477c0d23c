"""The controller's signed TUF repositories: the TUF role store and the image repository.

The per-device director lives in :mod:`tools.fleetctl.director` (built on :class:`TufRepository`);
``DirectorRepository`` is re-exported here for existing imports.

Everything is built with python-tuf's ``tuf.api.metadata`` and signed with the role keys in a
:class:`~tools.fleetctl.keys.KeyStore`; devices verify it with ``tuf.ngclient``. On disk:

    repo/image/metadata/        1.root.json ... N.root.json, N.targets.json, N.snapshot.json,
                                timestamp.json (consistent snapshots: old versions stay)
    repo/image/targets/         models/{name}/{version}/{sha256}.model.{fmt}.enc
    repo/director/{device_id}/metadata/   the same four roles, one namespace per device
    director-root/metadata/     the canonical director root chain, copied into every namespace

Invariants: every write is atomic (``agent.atomicio``); a version is never reused; a role is
written only once its signatures meet the threshold of the root that delegates it (rotated
roots must also meet the threshold of the previous root, so devices can follow the chain);
snapshot and timestamp are re-signed after every targets change, so a device never sees a
targets version the snapshot does not name.

Using it in tests (every step is also a building block for attacks)::

    from datetime import timedelta
    from tools.fleetctl.keys import KeyStore

if TYPE_CHECKING:
    from tools.fleetctl.director import DirectorRepository
    from tools.fleetctl.repository import DirectorRepository, ImageRepository, TargetEntry

    keys = KeyStore(tmp_path / "keys")
    image = ImageRepository.create(tmp_path / "repo" / "image", keys)
    info = image.add_target("models/digits/1/model.tflite.enc", ciphertext, custom={...})
    director = DirectorRepository.create(tmp_path / "repo" / "director",
                                         tmp_path / "director-root", keys)
    director.add_device("pi-01")
    director.assign("pi-01", {info.path: TargetEntry(info.length, info.hashes, {...})})
    image.rotate_keys("root")                 # writes 2.root.json signed by old + new keys
    director.rotate_keys("timestamp")         # new root in every namespace, timestamps re-signed

    # attacks: sign with a key of your choice, set any expiry, write any version
    ns = director.namespace("pi-01")
    md = ns.open("timestamp")
    md.signed.version += 1
    md.signed.expires = ns.now() - timedelta(days=1)     # an expired timestamp
    ns.sign(md, [CryptoSigner.generate_ed25519()])      # an untrusted key
    ns.write(md)
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple

from securesystemslib.signer import Signer  # type: ignore[attr-defined]
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (  # type: ignore[attr-defined]
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import SerializationError
from tuf.api.serialization.json import JSONSerializer

from agent.atomicio import atomic_write, ensure_private_dir
from agent.protocol.errors import TopicError
from agent.protocol.topics import validate_device_id
from tools.fleetctl import FleetctlError
from tools.fleetctl.keys import KeyStore

__all__ = [
    "DIRECTOR_EXPIRY",
    "IMAGE_EXPIRY",
    "ROLES",
    "DirectorRepository",  # noqa: F822 - resolved by __getattr__ (tools.fleetctl.director)
    "ExpiryPolicy",
    "ImageRepository",
    "RepositoryError",
    "TargetEntry",
    "TufRepository",
    "check_device_id",
    "check_target_path",
]

logger = logging.getLogger(__name__)

ROLES = ("root", "targets", "snapshot", "timestamp")
_TARGET_PATH_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]*(/[A-Za-z0-9_][A-Za-z0-9._+-]*)*$")
_MAX_TARGET_PATH = 512
_VERSIONED = re.compile(r"^([1-9][0-9]*)\.(root|targets|snapshot)\.json$")
_SERIALIZER = JSONSerializer(compact=False)


class RepositoryError(FleetctlError):
    """A repository operation cannot be done; the message says what was wrong and expected."""


@dataclass(frozen=True)
class ExpiryPolicy:
    """How long each role's metadata stays valid after it is signed."""

    root: timedelta
    targets: timedelta
    snapshot: timedelta
    timestamp: timedelta

    def for_role(self, role: str) -> timedelta:
        """The validity period of ``role``."""
        period: timedelta = getattr(self, role)
        return period


IMAGE_EXPIRY = ExpiryPolicy(
    root=timedelta(days=365),
    targets=timedelta(days=90),
    snapshot=timedelta(days=7),
    timestamp=timedelta(days=1),
)
DIRECTOR_EXPIRY = ExpiryPolicy(
    root=timedelta(days=365),
    targets=timedelta(days=7),
    snapshot=timedelta(days=7),
    timestamp=timedelta(days=1),
)


class TargetEntry(NamedTuple):
    """What a director target says: length and hashes of the image target, plus ``custom``."""

    length: int
    hashes: Mapping[str, str]
    custom: Mapping[str, Any]


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` if valid (the protocol's ``validate_device_id``), else raise."""
    try:
        return validate_device_id(device_id)
    except TopicError as exc:
        raise RepositoryError(str(exc)) from None


def _is_device_id(name: str) -> bool:
    try:
        validate_device_id(name)
    except TopicError:
        return False
    return True


def check_target_path(path: str) -> str:
    """Return ``path`` if it is a safe relative target path (no ``..``, no absolute paths)."""
    if len(path) > _MAX_TARGET_PATH or not _TARGET_PATH_PATTERN.match(path):
        raise RepositoryError(
            f"target path {path!r}: expected a relative path of [A-Za-z0-9._+-] segments"
        )
    return path


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class TufRepository:
    """One TUF repository's metadata directory, signed with keys from a :class:`KeyStore`.

    Args:
        metadata_dir: where ``N.root.json`` ... ``timestamp.json`` live.
        keys: the key store holding (some of) the private keys.
        key_namespace: ``"image"`` or ``"director"`` (prefix of the key file names).
        expiry: validity periods per role.
        clock: the current time (UTC); tests pass a fixed or shifted clock.
    """

    def __init__(
        self,
        metadata_dir: str | os.PathLike[str],
        keys: KeyStore,
        *,
        key_namespace: str,
        expiry: ExpiryPolicy,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.metadata_dir = Path(metadata_dir)
        self.keys = keys
        self.key_namespace = key_namespace
        self.expiry = expiry
        self._clock = clock

    # -- reading -------------------------------------------------------------------------------

    def now(self) -> datetime:
        """The current time according to this repository's clock, whole seconds, UTC."""
        return self._clock().replace(microsecond=0)

    def exists(self) -> bool:
        """True when at least ``1.root.json`` is present."""
        return (self.metadata_dir / "1.root.json").is_file()

    def latest_version(self, role: str) -> int:
        """Highest version of ``root``, ``targets`` or ``snapshot`` on disk (0 if none)."""
        versions = [0]
        if self.metadata_dir.is_dir():
            for entry in os.listdir(self.metadata_dir):
                match = _VERSIONED.match(entry)
                if match and match.group(2) == role:
                    versions.append(int(match.group(1)))
        return max(versions)

    def metadata_path(self, role: str, version: int | None = None) -> Path:
        """File name of a role version (``timestamp.json`` is never versioned)."""
        if role == Timestamp.type:
            return self.metadata_dir / "timestamp.json"
        if role not in ROLES:
            raise RepositoryError(f"role {role!r}: expected one of {', '.join(ROLES)}")
        number = self.latest_version(role) if version is None else version
        return self.metadata_dir / f"{number}.{role}.json"

    def open(self, role: str, version: int | None = None) -> Metadata[Any]:
        """Load the latest (or a given) version of ``role`` as it is on disk (unverified)."""
        path = self.metadata_path(role, version)
        try:
            return Metadata.from_bytes(path.read_bytes())
        except FileNotFoundError as exc:
            raise RepositoryError(f"{path}: metadata not found; expected {role} here") from exc

    def root(self) -> Root:
        """The latest root."""
        signed: Root = self.open(Root.type).signed
        return signed

    def targets(self) -> Targets:
        """The latest targets."""
        signed: Targets = self.open(Targets.type).signed
        return signed

    def timestamp(self) -> Timestamp:
        """The current timestamp."""
        signed: Timestamp = self.open(Timestamp.type).signed
        return signed

    def snapshot(self) -> Snapshot:
        """The latest snapshot."""
        signed: Snapshot = self.open(Snapshot.type).signed
        return signed

    def verify(self, role: str) -> None:
        """Check the latest ``role`` against the latest root's keys and threshold.

        Raises:
            RepositoryError: fewer valid signatures than the threshold.
        """
        md = self.open(role)
        try:
            self.root().verify_delegate(role, md.signed_bytes, md.signatures)
        except UnsignedMetadataError as exc:
            raise RepositoryError(f"{self.metadata_dir.name}/{role}: {exc}") from exc

    # -- signing building blocks -----------------------------------------------------------------

    def signers(self, role: str, root: Root | None = None) -> list[Signer]:
        """The signers for ``role`` whose private keys are present in the key store."""
        delegating = root if root is not None else self.root()
        found: list[Signer] = []
        for keyid in delegating.roles[role].keyids:
            if self.keys.has(self.key_namespace, role, keyid):
                found.append(self.keys.load(self.key_namespace, role, keyid))
        return found

    @staticmethod
    def sign(md: Metadata[Any], signers: Sequence[Signer], *, append: bool = False) -> None:
        """Sign ``md`` with each of ``signers`` (replacing older signatures unless ``append``)."""
        if not append:
            md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)

    def write(self, md: Metadata[Any]) -> Path:
        """Write ``md`` under its consistent-snapshot name, atomically. No checks at all."""
        role = md.signed.type
        version = None if role == Timestamp.type else md.signed.version
        ensure_private_dir(self.metadata_dir, mode=0o755)
        path = self.metadata_path(role, version)
        atomic_write(path, md.to_bytes(_SERIALIZER), mode=0o644)
        logger.debug("wrote %s", path)
        return path

    def set_expiry(self, md: Metadata[Any], expires: datetime | timedelta | None = None) -> None:
        """Set ``md``'s expiry: a datetime, a period from now, or the role's policy."""
        if expires is None:
            expires = self.expiry.for_role(md.signed.type)
        if isinstance(expires, timedelta):
            expires = self.now() + expires
        md.signed.expires = expires.replace(microsecond=0)

    def _sign_checked(self, md: Metadata[Any], delegators: Sequence[Root]) -> None:
        """Sign ``md`` with every available key and check each delegator's threshold."""
        role = md.signed.type
        signers: dict[str, Signer] = {}
        for delegator in delegators:
            for signer in self.signers(role, delegator):
                signers[signer.public_key.keyid] = signer
        try:
            self.sign(md, list(signers.values()))
        except SerializationError as exc:
            raise RepositoryError(
                f"{role} v{md.signed.version}: cannot be serialized as canonical JSON; expected"
                " only strings, integers, booleans, lists and objects (no floats) in custom"
            ) from exc
        for delegator in delegators:
            try:
                delegator.verify_delegate(role, md.signed_bytes, md.signatures)
            except UnsignedMetadataError as exc:
                raise RepositoryError(
                    f"{role} v{md.signed.version}: {exc}; expected the private keys of at least"
                    f" {delegator.roles[role].threshold} {role} keys in {self.keys.directory}"
                ) from exc

    def commit(
        self,
        md: Metadata[Any],
        *,
        expires: datetime | timedelta | None = None,
        bump: bool = True,
    ) -> Metadata[Any]:
        """Bump ``md``'s version, renew its expiry, sign it to threshold and write it."""
        if bump:
            md.signed.version += 1
        self.set_expiry(md, expires)
        self._sign_checked(md, [self.root()])
        self.write(md)
        return md

    # -- operations -------------------------------------------------------------------------------

    def initialize(self, thresholds: Mapping[str, tuple[int, int]]) -> None:
        """Generate keys and write version 1 of all four roles.

        Args:
            thresholds: ``{role: (threshold, key_count)}``; missing roles get 1-of-1.
        """
        if self.exists():
            raise RepositoryError(f"{self.metadata_dir}: a repository exists already")
        root = Root(expires=self.now() + self.expiry.root, consistent_snapshot=True)
        for role in ROLES:
            threshold, count = thresholds.get(role, (1, 1))
            if not 1 <= threshold <= count:
                raise RepositoryError(
                    f"{role}: threshold {threshold} of {count} keys; expected 1 <= k <= n"
                )
            for _ in range(count):
                root.add_key(self.keys.generate(self.key_namespace, role).public_key, role)
            root.roles[role].threshold = threshold
        root_md = Metadata(root)
        self._sign_checked(root_md, [root])
        self.write(root_md)
        self.publish_targets(Targets(), initial=True)

    def publish_targets(self, targets: Targets, *, initial: bool = False) -> None:
        """Sign a new targets version, then the snapshot and timestamp that name it."""
        bump = not initial
        targets_md = self.commit(Metadata(targets), bump=bump)
        snapshot = Snapshot() if initial else self.snapshot()
        snapshot.meta["targets.json"] = MetaFile(version=targets_md.signed.version)
        snapshot_md = self.commit(Metadata(snapshot), bump=bump)
        timestamp = Timestamp() if initial else self.timestamp()
        timestamp.snapshot_meta = MetaFile(version=snapshot_md.signed.version)
        self.commit(Metadata(timestamp), bump=bump)

    def set_targets(self, entries: Mapping[str, TargetFile]) -> Targets:
        """Replace the whole targets list and publish it."""
        targets = self.targets()
        targets.targets = {path: entries[path] for path in entries}
        self.publish_targets(targets)
        return targets

    def refresh_timestamp(self, expires: datetime | timedelta | None = None) -> Timestamp:
        """Re-sign the timestamp with a new version and expiry (default: the policy)."""
        md = self.open(Timestamp.type)
        self.commit(md, expires=expires)
        signed: Timestamp = md.signed
        return signed

    def refresh_expiring(self, margin: timedelta) -> list[str]:
        """Re-sign targets/snapshot that expire within ``margin`` (if keys are here), then the
        timestamp; returns the roles re-signed."""
        renewed: list[str] = []
        deadline = self.now() + margin
        targets = self.targets()
        if targets.expires <= deadline and self.signers(Targets.type):
            self.publish_targets(targets)
            return ["targets", "snapshot", "timestamp"]
        snapshot_md = self.open(Snapshot.type)
        if snapshot_md.signed.expires <= deadline:
            self.commit(snapshot_md)
            renewed.append("snapshot")
            timestamp = self.timestamp()
            timestamp.snapshot_meta = MetaFile(version=snapshot_md.signed.version)
            self.commit(Metadata(timestamp))
        else:
            self.refresh_timestamp()
        renewed.append("timestamp")
        return renewed

    def rotated_root(self, role: str, new_keys: Sequence[Signer], threshold: int) -> Metadata[Root]:
        """A new root version where ``role``'s keys are replaced by ``new_keys`` (not written).

        It is signed by the current root keys (old threshold) and, for a root rotation, by the
        new keys too (new threshold), so devices trusting the old root accept it.
        """
        if role not in ROLES:
            raise RepositoryError(f"role {role!r}: expected one of {', '.join(ROLES)}")
        if not 1 <= threshold <= len(new_keys):
            raise RepositoryError(
                f"{role}: threshold {threshold} of {len(new_keys)} keys; expected 1 <= k <= n"
            )
        old_root = self.root()
        root_md: Metadata[Root] = self.open(Root.type)
        new_root = root_md.signed
        for keyid in list(new_root.roles[role].keyids):
            new_root.revoke_key(keyid, role)
        for signer in new_keys:
            new_root.add_key(signer.public_key, role)
        new_root.roles[role].threshold = threshold
        new_root.version += 1
        self.set_expiry(root_md)
        self._sign_checked(root_md, [old_root, new_root])
        return root_md

    def retire_unused_keys(self, old_root: Root) -> None:
        """Delete private keys that the latest root no longer lists for their role."""
        current = self.root()
        for role in ROLES:
            for keyid in old_root.roles[role].keyids:
                if keyid not in current.roles[role].keyids:
                    self.keys.remove(self.key_namespace, role, keyid)

    def resign_after_rotation(self, role: str) -> None:
        """Publish new versions signed with ``role``'s rotated keys (and what depends on it)."""
        if role == Targets.type:
            self.publish_targets(self.targets())
        elif role == Snapshot.type:
            snapshot_md = self.commit(self.open(Snapshot.type))
            timestamp = self.timestamp()
            timestamp.snapshot_meta = MetaFile(version=snapshot_md.signed.version)
            self.commit(Metadata(timestamp))
        elif role == Timestamp.type:
            self.refresh_timestamp()

    def rotate_keys(self, role: str, *, key_count: int = 1, threshold: int = 1) -> Root:
        """Replace ``role``'s keys with ``key_count`` new ones; devices follow the root chain."""
        old_root = self.root()
        new_keys = [self.keys.generate(self.key_namespace, role) for _ in range(key_count)]
        root_md = self.rotated_root(role, new_keys, threshold)
        self.write(root_md)
        self.resign_after_rotation(role)
        self.retire_unused_keys(old_root)
        logger.info(
            "rotated %s %s keys; root is now v%d", self.key_namespace, role, root_md.signed.version
        )
        return root_md.signed


class ImageRepository(TufRepository):
    """The image repository: signed, encrypted model artifacts under ``targets/``."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        keys: KeyStore,
        *,
        expiry: ExpiryPolicy = IMAGE_EXPIRY,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.targets_dir = self.base_dir / "targets"
        super().__init__(
            self.base_dir / "metadata", keys, key_namespace="image", expiry=expiry, clock=clock
        )

    @classmethod
    def create(
        cls,
        base_dir: str | os.PathLike[str],
        keys: KeyStore,
        *,
        thresholds: Mapping[str, tuple[int, int]] | None = None,
        expiry: ExpiryPolicy = IMAGE_EXPIRY,
        clock: Callable[[], datetime] = _utcnow,
    ) -> ImageRepository:
        """Create keys and a new, empty image repository (``{role: (k, n)}`` thresholds)."""
        repo = cls(base_dir, keys, expiry=expiry, clock=clock)
        repo.initialize(thresholds or {})
        ensure_private_dir(repo.targets_dir, mode=0o755)
        return repo

    def target_file(self, info: TargetFile) -> Path:
        """Where the bytes of ``info`` are stored (its consistent-snapshot name)."""
        prefixed = info.get_prefixed_paths()[0]
        return self.targets_dir / prefixed

    def get_target(self, path: str) -> TargetFile | None:
        """The signed entry for ``path`` in the latest targets, if any."""
        return self.targets().targets.get(path)

    def add_target(
        self, path: str, data: bytes | os.PathLike[str], custom: Mapping[str, Any]
    ) -> TargetFile:
        """Store ``data`` as target ``path`` with ``custom`` and publish new metadata.

        Raises:
            RepositoryError: the path is unsafe or already a target.
        """
        check_target_path(path)
        targets = self.targets()
        if path in targets.targets:
            raise RepositoryError(f"target {path!r} exists already; expected a new path")
        payload = data if isinstance(data, bytes) else Path(data).read_bytes()
        info = TargetFile.from_data(path, payload, ["sha256"])
        info.unrecognized_fields["custom"] = dict(custom)
        destination = self.target_file(info)
        ensure_private_dir(destination.parent, mode=0o755)
        atomic_write(destination, payload, mode=0o644)
        targets.targets[path] = info
        self.publish_targets(targets)
        logger.info("added image target %s (%d bytes)", path, info.length)
        return info

    def remove_target(self, path: str) -> None:
        """Drop ``path`` from the targets (its bytes stay for clients mid-update)."""
        targets = self.targets()
        if targets.targets.pop(path, None) is None:
            raise RepositoryError(f"target {path!r} not found; expected an existing target")
        self.publish_targets(targets)


def __getattr__(name: str) -> Any:
    # DirectorRepository moved to tools.fleetctl.director, which imports this module: resolve
    # it on first use instead of at import time to keep the import graph acyclic.
    if name == "DirectorRepository":
        from tools.fleetctl.director import DirectorRepository  # noqa: PLC0415

        return DirectorRepository
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
