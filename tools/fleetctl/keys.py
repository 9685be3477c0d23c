"""The controller's signing keys: Ed25519 role keys stored as 0600 PEM files, one per key.

A key file is named ``{repo}-{role}-{keyid[:16]}.pem`` (``repo`` is ``image`` or ``director``)
inside the home's ``keys/`` directory (0700). The public half is derived from the private key,
so the key id in TUF metadata always names the file that can sign for it: the signers of a role
are found by reading the role's key ids from root metadata, never by trusting file names alone.

Root and targets keys are meant to live offline: a key whose file is absent is simply not
available, and signing that needs it fails with a clear error once the threshold cannot be met.
Private key bytes are never logged, printed or put in exception messages.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey  # type: ignore[attr-defined]

from agent.atomicio import atomic_write, ensure_private_dir
from tools.fleetctl import FleetctlError

__all__ = ["KEY_NAME_PATTERN", "KeyStore", "KeyStoreError", "key_file_name"]

logger = logging.getLogger(__name__)

KEY_NAME_PATTERN = re.compile(r"^(image|director)-(root|targets|snapshot|timestamp)-[0-9a-f]{16}$")
_PRIVATE_MODE = 0o600
_MAX_KEY_FILE_BYTES = 16 * 1024


class KeyStoreError(FleetctlError):
    """A key file is missing, unreadable, of the wrong type or too widely readable."""


def key_file_name(repo: str, role: str, keyid: str) -> str:
    """The file name (without ``.pem``) holding the private key ``keyid`` of ``repo``/``role``."""
    name = f"{repo}-{role}-{keyid[:16]}"
    if not KEY_NAME_PATTERN.match(name):
        raise KeyStoreError(
            f"key name {name!r}: expected {{image|director}}-{{role}}-{{16 hex digits}}"
        )
    return name


class KeyStore:
    """Ed25519 private keys in one directory, as PKCS#8 PEM files with mode 0600."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def path_of(self, repo: str, role: str, keyid: str) -> Path:
        """Where the private key ``keyid`` of ``repo``/``role`` lives (it may be absent)."""
        return self.directory / f"{key_file_name(repo, role, keyid)}.pem"

    def generate(self, repo: str, role: str) -> CryptoSigner:
        """Create a new Ed25519 key for ``repo``/``role``, store it 0600 and return its signer.

        Raises:
            KeyStoreError: a key file with that name exists already (never overwritten).
        """
        ensure_private_dir(self.directory)
        signer = CryptoSigner.generate_ed25519()
        path = self.path_of(repo, role, signer.public_key.keyid)
        if path.exists():
            raise KeyStoreError(f"{path}: key file exists already; expected a new key name")
        atomic_write(path, signer.private_bytes, mode=_PRIVATE_MODE)
        logger.info("generated %s %s key %s", repo, role, signer.public_key.keyid)
        return signer

    def has(self, repo: str, role: str, keyid: str) -> bool:
        """True when the private key for ``keyid`` is present here."""
        return self.path_of(repo, role, keyid).is_file()

    def load(self, repo: str, role: str, keyid: str) -> CryptoSigner:
        """Load the signer for ``keyid``; checks mode 0600 and that the key id matches.

        Raises:
            KeyStoreError: missing file, group/world-accessible file, not Ed25519, wrong key.
        """
        path = self.path_of(repo, role, keyid)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError as exc:
            raise KeyStoreError(f"{path}: private key not found; expected it for {role}") from exc
        except OSError as exc:
            raise KeyStoreError(f"{path}: cannot open private key ({exc.strerror})") from exc
        try:
            info = os.fstat(fd)
            if stat.S_IMODE(info.st_mode) & 0o077:
                raise KeyStoreError(
                    f"{path}: mode {stat.S_IMODE(info.st_mode):04o} lets others read the key;"
                    " expected 0600"
                )
            data = os.read(fd, _MAX_KEY_FILE_BYTES + 1)
        finally:
            os.close(fd)
        if len(data) > _MAX_KEY_FILE_BYTES:
            raise KeyStoreError(f"{path}: expected a PEM key under {_MAX_KEY_FILE_BYTES} bytes")
        try:
            private_key = load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            # The cryptography message never contains key material.
            raise KeyStoreError(f"{path}: expected an unencrypted PKCS#8 PEM key") from exc
        if not isinstance(private_key, Ed25519PrivateKey):
            raise KeyStoreError(f"{path}: expected an Ed25519 key")
        public_key = SSlibKey.from_crypto(private_key.public_key())
        if public_key.keyid != keyid:
            raise KeyStoreError(f"{path}: holds key {public_key.keyid}, expected {keyid}")
        return CryptoSigner(private_key, public_key)

    def remove(self, repo: str, role: str, keyid: str) -> None:
        """Delete a retired key (after rotation); absent keys are ignored."""
        path = self.path_of(repo, role, keyid)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        logger.info("removed retired %s %s key %s", repo, role, keyid)

    def list_keys(self) -> list[tuple[str, str, str]]:
        """``(repo, role, keyid prefix)`` of every key file present, sorted."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.glob("*.pem")):
            if KEY_NAME_PATTERN.match(path.stem):
                repo, role, prefix = path.stem.split("-")
                found.append((repo, role, prefix))
        return found
