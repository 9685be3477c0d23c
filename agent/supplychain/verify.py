"""Device-side verification: director + image repositories (Uptane on ``tuf.ngclient``).

:class:`DeviceUpdateClient` does, in order:

1. refresh the device's director namespace and the image repository with ``tuf.ngclient``
   (root chain, timestamp, snapshot, targets: signatures, thresholds, versions, expiry and
   lengths are ngclient's job, bounded by :class:`UpdateLimits`); director timestamp, snapshot
   and targets must name this device in their signed ``device_id``, checked before ngclient
   sees them (:mod:`agent.supplychain.namespace`);
2. take the director's one target for this device and require the image repository to sign a
   target with the same path, length and hashes (a director alone cannot install anything);
3. strictly parse both ``custom`` fields (card, encryption, grant) and cross-check them;
4. download the ciphertext through ngclient (length and hashes verified);
5. open the grant with the device's X25519 key, decrypt in memory, check plaintext sha256/length,
   and only then keep the ciphertext in ``models/``.

It returns the plaintext ``bytearray`` and card; recording the install is the caller's separate
step (:meth:`~agent.supplychain.store.DeviceState.record_install`) after its self-test.
Invariants: nothing here writes ``installed.json`` or touches the previous model's ciphertext;
plaintext never reaches disk; every failure is a :class:`VerificationError` subclass (or a
``GrantError``/``DecryptionError``) whose cause is the underlying ngclient exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from agent.atomicio import commit_file, ensure_private_dir
from agent.modelcard import ModelCard
from agent.supplychain import errors
from agent.supplychain.envelope import SegmentDecryptor, decrypt_to_memory
from agent.supplychain.grants import open_grant
from agent.supplychain.identity import DeviceIdentity
from agent.supplychain.namespace import DirectorNamespaceFetcher
from agent.supplychain.store import DeviceState, InstalledTarget
from agent.supplychain.targets import (
    MAX_MODEL_BYTES,
    DirectorTargetCustom,
    ImageTargetCustom,
    parse_target_path,
)

__all__ = [
    "DeviceUpdateClient",
    "UpdateLimits",
    "UpdatePlan",
    "VerifiedModel",
    "director_metadata_url",
]

logger = logging.getLogger(__name__)

IMAGE_METADATA_URL = "repo://image/metadata/"
IMAGE_TARGETS_URL = "repo://image/targets/"


def director_metadata_url(device_id: str) -> str:
    """The device's director namespace, as a ``repo://`` URL."""
    return f"repo://director/{device_id}/metadata/"


@dataclass(frozen=True)
class UpdateLimits:
    """Upper bounds on what a device downloads (endless-data protection)."""

    max_model_bytes: int = 1024**3
    root_max_length: int = 512 * 1024
    timestamp_max_length: int = 16 * 1024
    snapshot_max_length: int = 256 * 1024
    targets_max_length: int = 5 * 1024 * 1024

    def updater_config(self) -> UpdaterConfig:
        """The ngclient configuration with these bounds."""
        return UpdaterConfig(
            root_max_length=self.root_max_length,
            timestamp_max_length=self.timestamp_max_length,
            snapshot_max_length=self.snapshot_max_length,
            targets_max_length=self.targets_max_length,
        )


@dataclass(frozen=True)
class UpdatePlan:
    """The verified answer to "what must this device run?" (before downloading it)."""

    device_id: str
    target_path: str
    length: int
    hashes: dict[str, str]
    image: ImageTargetCustom
    director: DirectorTargetCustom
    up_to_date: bool

    @property
    def sha256(self) -> str:
        """The ciphertext's sha256."""
        return self.hashes["sha256"]

    @property
    def card(self) -> ModelCard:
        """The model card from the image repository."""
        return self.image.card


@dataclass(frozen=True)
class VerifiedModel:
    """A downloaded, verified and decrypted model, ready for load + self-test."""

    plan: UpdatePlan
    plaintext: bytearray
    ciphertext_file: Path

    def installed_target(self) -> InstalledTarget:
        """The record entry for :meth:`DeviceState.record_install`."""
        plan = self.plan
        return InstalledTarget(
            target_path=plan.target_path,
            version=plan.card.version,
            length=plan.length,
            hashes=dict(plan.hashes),
            card=plan.card,
            encryption=plan.image.encryption,
            grant=plan.director.grant,
            ciphertext_file=self.ciphertext_file.name,
        )


@contextlib.contextmanager
def _tuf_errors(what: str) -> Iterator[None]:
    """Turn ngclient exceptions into this package's, keeping them as the cause."""
    try:
        yield
    except tuf_exceptions.ExpiredMetadataError as exc:
        raise errors.ExpiredMetadataError(f"{what}: {exc}; expected unexpired metadata") from exc
    except tuf_exceptions.BadVersionNumberError as exc:
        raise errors.RollbackError(f"{what}: {exc}; expected no older version") from exc
    except tuf_exceptions.UnsignedMetadataError as exc:
        raise errors.SignatureError(f"{what}: {exc}") from exc
    except tuf_exceptions.LengthOrHashMismatchError as exc:
        raise errors.TargetHashError(f"{what}: {exc}") from exc
    except tuf_exceptions.RepositoryError as exc:
        raise errors.MetadataError(f"{what}: {exc}") from exc
    except tuf_exceptions.SlowRetrievalError as exc:
        raise errors.SlowRetrievalError(f"{what}: {exc}") from exc
    except tuf_exceptions.DownloadLengthMismatchError as exc:
        raise errors.EndlessDataError(f"{what}: {exc}") from exc
    except tuf_exceptions.DownloadError as exc:
        cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
        raise errors.FetchError(f"{what}: {exc}{cause}; expected the file") from exc


class DeviceUpdateClient:
    """Verifies and decrypts what the director says this device must run.

    Args:
        state: the device state directory (identity, ``tuf/``, ``models/``).
        fetcher: maps ``repo://`` URLs to bytes (local directory, MQTT).
        device_id: this device's id (its director namespace).
        identity: the device keys; read from ``state`` when omitted.
        limits: download bounds.
    """

    def __init__(
        self,
        state: DeviceState,
        fetcher: FetcherInterface,
        *,
        device_id: str,
        identity: DeviceIdentity | None = None,
        limits: UpdateLimits | None = None,
    ) -> None:
        self.state = state
        self.fetcher = fetcher
        self.device_id = device_id
        self.identity = identity if identity is not None else state.load_identity()
        self.limits = limits or UpdateLimits()
        self._image: Any = None

    def _updater(self, repository: Literal["image", "director"]) -> Any:
        self.state.bootstrap_root(repository)
        metadata_dir = self.state.tuf_dir(repository)
        fetcher = self.fetcher
        if repository == "image":
            base, targets_base = IMAGE_METADATA_URL, IMAGE_TARGETS_URL
        else:
            base, targets_base = director_metadata_url(self.device_id), None
            # Another namespace's metadata (same director keys) is refused before ngclient
            # trusts and persists it; see agent.supplychain.namespace.
            fetcher = DirectorNamespaceFetcher(fetcher, device_id=self.device_id, base_url=base)
        with _tuf_errors(f"{repository} trusted root"):
            try:
                # bootstrap=None: the cached root.json (provisioned, then advanced by
                # verified rotations) is this device's trust anchor.
                return Updater(
                    str(metadata_dir),
                    base,
                    target_base_url=targets_base,
                    fetcher=fetcher,
                    config=self.limits.updater_config(),
                    bootstrap=None,
                )
            except OSError as exc:
                raise errors.StateError(
                    f"{metadata_dir}: cannot load the trusted root ({exc.strerror})"
                ) from exc

    def refresh(self) -> UpdatePlan:
        """Refresh both repositories and resolve this device's target; nothing is downloaded.

        Raises:
            VerificationError: a subclass naming what failed (metadata, mismatch, no target).
        """
        director = self._updater("director")
        with _tuf_errors(f"director/{self.device_id}"):
            director.refresh()
        # ngclient has no public listing of targets; the trusted set holds only verified data.
        director_targets: dict[str, Any] = dict(director._trusted_set.targets.targets)
        if not director_targets:
            raise errors.NoUpdateError(
                f"director/{self.device_id}: lists no target; expected one model to run"
            )
        if len(director_targets) != 1:
            raise errors.TargetMetadataError(
                f"director/{self.device_id}: expected exactly one target, got"
                f" {len(director_targets)}"
            )
        ((path, director_info),) = director_targets.items()
        parse_target_path(path)
        director_custom = DirectorTargetCustom.from_dict(
            director_info.unrecognized_fields.get("custom")
        )
        if director_custom.device_id != self.device_id:
            raise errors.TargetMismatchError(
                f"director target {path!r}: expected device_id {self.device_id!r}, got"
                f" {director_custom.device_id!r}"
            )

        image = self._updater("image")
        with _tuf_errors("image"):
            image.refresh()
            image_info = image.get_targetinfo(path)
        if image_info is None:
            raise errors.TargetMismatchError(
                f"target {path!r}: the director lists it, the image repository does not;"
                " expected an image-signed target"
            )
        director_hashes = dict(director_info.hashes)
        image_hashes = dict(image_info.hashes)
        if director_info.length != image_info.length or director_hashes != image_hashes:
            raise errors.TargetMismatchError(
                f"target {path!r}: expected the director's length {director_info.length} and"
                f" hashes {director_hashes} to equal the image's {image_info.length}"
                f" {image_hashes}"
            )
        if "sha256" not in image_hashes:
            raise errors.TargetMetadataError(f"target {path!r}: expected a sha256 hash")
        max_bytes = min(self.limits.max_model_bytes, MAX_MODEL_BYTES)
        if image_info.length > max_bytes:
            raise errors.EndlessDataError(
                f"target {path!r}: expected at most {max_bytes} bytes, got {image_info.length}"
            )
        image_custom = ImageTargetCustom.from_dict(image_info.unrecognized_fields.get("custom"))
        image_custom.check_path(path)
        self._image = image
        current = self.state.read_installed().current
        up_to_date = current is not None and current.same_target(
            path, image_info.length, image_hashes
        )
        return UpdatePlan(
            device_id=self.device_id,
            target_path=path,
            length=image_info.length,
            hashes=image_hashes,
            image=image_custom,
            director=director_custom,
            up_to_date=up_to_date,
        )

    def fetch_and_decrypt(self, plan: UpdatePlan) -> VerifiedModel:
        """Download (verified), unseal and decrypt the planned target into memory.

        Raises:
            VerificationError: download or hash verification failed.
            GrantError: the grant was not sealed for this device, target and ciphertext.
            DecryptionError: the ciphertext is malformed or its plaintext is not the signed one.
        """
        if self._image is None:
            raise errors.StateError("fetch_and_decrypt: expected refresh() to be called first")
        with _tuf_errors(f"image target {plan.target_path}"):
            info = self._image.get_targetinfo(plan.target_path)
        ciphertext_file = self.state.ciphertext_path(plan.sha256)
        data = self._cached_ciphertext(ciphertext_file, plan)
        if data is not None:
            plaintext = self._decrypt(plan, data)
        else:
            ensure_private_dir(self.state.models_dir)
            download = self.state.models_dir / f".{plan.sha256}.download"
            try:
                os.close(os.open(download, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
                with _tuf_errors(f"image target {plan.target_path}"):
                    self._image.download_target(info, filepath=str(download))
                data = download.read_bytes()
                # ngclient verified the length and hashes of these bytes; they are not hashed a
                # second time: a change since then fails decryption (AEAD tags and the signed
                # plaintext sha256), and the file is kept only after decryption succeeded.
                if len(data) != plan.length:
                    raise errors.TargetHashError(
                        f"target {plan.target_path!r}: expected {plan.length} bytes, got"
                        f" {len(data)}"
                    )
                plaintext = self._decrypt(plan, data)
                commit_file(download, ciphertext_file, mode=0o600)
            finally:
                download.unlink(missing_ok=True)
        logger.info(
            "verified %s: %d ciphertext bytes, %d plaintext bytes",
            plan.target_path,
            plan.length,
            len(plaintext),
        )
        return VerifiedModel(plan=plan, plaintext=plaintext, ciphertext_file=ciphertext_file)

    def _decrypt(self, plan: UpdatePlan, data: bytes) -> bytearray:
        key = open_grant(
            plan.director.grant,
            self.identity.x25519,
            device_id=self.device_id,
            target_path=plan.target_path,
            ciphertext_sha256=plan.sha256,
        )
        encryption = plan.image.encryption
        header_segment_size = SegmentDecryptor.from_ciphertext(key, data).segment_size
        if header_segment_size != encryption.segment_size:
            raise errors.DecryptionError(
                f"segment 0: expected segment size {encryption.segment_size} (signed), got"
                f" {header_segment_size} in the header"
            )
        return decrypt_to_memory(
            data,
            key,
            expected_plaintext_length=encryption.plaintext_length,
            expected_plaintext_sha256=encryption.plaintext_sha256,
        )

    def _cached_ciphertext(self, path: Path, plan: UpdatePlan) -> bytes | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            self._check_ciphertext(data, plan)
        except errors.TargetHashError:
            logger.warning("discarding cached %s: does not match its signed hash", path.name)
            return None
        return data

    @staticmethod
    def _check_ciphertext(data: bytes, plan: UpdatePlan) -> None:
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != plan.length or digest != plan.sha256:
            raise errors.TargetHashError(
                f"target {plan.target_path!r}: expected {plan.length} bytes with sha256"
                f" {plan.sha256}, got {len(data)} bytes with sha256 {digest}"
            )
