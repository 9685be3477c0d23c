"""fleetctl command group: rollout (registered from tools.fleetctl.cli.COMMAND_MODULES)."""

from __future__ import annotations

from typing import Any


def register(commands: Any) -> None:
    """Add this group's sub-commands to the ``fleetctl`` parser."""
    del commands
