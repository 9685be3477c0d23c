"""fleetctl: the operator side (keys, signed repositories, registry, devices, models).

Every error fleetctl raises on purpose derives from :class:`FleetctlError`; the CLI prints it as
one line and exits with status 2.
"""

from __future__ import annotations

__all__ = ["FleetctlError"]


class FleetctlError(Exception):
    """Root of fleetctl's errors; the message says what was wrong and what was expected."""
