"""The controller home (``$FLEETCTL_HOME``): where keys, repositories and the registry live.

Layout (the directory itself is 0700; it holds private keys and content keys)::

    keys/                      role keys, 0600 PEM (see tools.fleetctl.keys)
    repo/image/                the image repository (metadata/ and targets/)
    repo/director/{device}/    one director namespace per device
    director-root/metadata/    the canonical director root chain
    registry.sqlite            models (with their content keys), devices, assignments; 0600

``repo/`` is public and can be served to devices as it is; nothing else in the home is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from agent.atomicio import ensure_private_dir
from tools.fleetctl import FleetctlError
from tools.fleetctl.keys import KeyStore
from tools.fleetctl.registry import Registry
from tools.fleetctl.repository import DirectorRepository, ImageRepository

__all__ = ["FleetHome", "HomeError", "default_home"]

logger = logging.getLogger(__name__)


class HomeError(FleetctlError):
    """The controller home is missing, incomplete or exists already."""


def default_home(environ: Mapping[str, str] | None = None) -> Path:
    """``$FLEETCTL_HOME``, else ``$XDG_DATA_HOME/fleetctl``, else ``~/.local/share/fleetctl``."""
    env = os.environ if environ is None else environ
    explicit = env.get("FLEETCTL_HOME")
    if explicit:
        return Path(explicit)
    xdg = env.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "fleetctl"


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class FleetHome:
    """Paths of one controller home, and constructors for what lives there."""

    root: Path
    clock: Callable[[], datetime] = _utcnow

    @property
    def keys_dir(self) -> Path:
        """Private role keys."""
        return self.root / "keys"

    @property
    def repo_dir(self) -> Path:
        """The public repositories (served to devices as ``repo://``)."""
        return self.root / "repo"

    @property
    def image_dir(self) -> Path:
        """The image repository."""
        return self.repo_dir / "image"

    @property
    def director_dir(self) -> Path:
        """The per-device director namespaces."""
        return self.repo_dir / "director"

    @property
    def director_root_dir(self) -> Path:
        """The canonical director root chain."""
        return self.root / "director-root"

    @property
    def registry_path(self) -> Path:
        """The SQLite registry."""
        return self.root / "registry.sqlite"

    def keystore(self) -> KeyStore:
        """The role key store."""
        return KeyStore(self.keys_dir)

    def is_initialized(self) -> bool:
        """True when ``fleetctl init`` completed here."""
        return self.registry_path.is_file() and (self.image_dir / "metadata").is_dir()

    def create(
        self,
        *,
        image_thresholds: Mapping[str, tuple[int, int]],
        director_thresholds: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        """Create keys, both repositories and the registry; refuses an existing home."""
        if self.root.exists() and any(self.root.iterdir()):
            raise HomeError(f"{self.root}: exists and is not empty; expected a new home")
        ensure_private_dir(self.root)
        ensure_private_dir(self.keys_dir)
        keys = self.keystore()
        ImageRepository.create(self.image_dir, keys, thresholds=image_thresholds, clock=self.clock)
        DirectorRepository.create(
            self.director_dir,
            self.director_root_dir,
            keys,
            thresholds=director_thresholds,
            clock=self.clock,
        )
        Registry.open(self.registry_path, create=True).close()
        logger.info("created controller home %s", self.root)

    def require(self) -> None:
        """Raise :class:`HomeError` unless the home was initialized."""
        if not self.is_initialized():
            raise HomeError(f"{self.root}: not a fleetctl home; expected `fleetctl init` first")

    def image(self) -> ImageRepository:
        """The image repository."""
        self.require()
        return ImageRepository(self.image_dir, self.keystore(), clock=self.clock)

    def director(self) -> DirectorRepository:
        """The director repository."""
        self.require()
        return DirectorRepository(
            self.director_dir, self.director_root_dir, self.keystore(), clock=self.clock
        )

    def registry(self) -> Registry:
        """Open the registry (the caller closes it)."""
        self.require()
        return Registry.open(self.registry_path)
