"""``edge-agent daemon``: the long-running device service (what systemd starts).

Loads ``--config`` (a bad file is one line on stderr and exit status 2), configures logging
(JSON lines unless on a terminal), then runs :class:`agent.daemon.supervisor.Supervisor` until
SIGTERM (exit 0). SIGHUP reloads the ``[source]``, ``[results]`` and ``[telemetry]`` settings.
"""

from __future__ import annotations

import argparse
from typing import Any

from agent.cli import CliError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``daemon`` sub-command."""
    parser = subparsers.add_parser(
        "daemon",
        help="run the device service: model updates, inference, telemetry",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        default="/etc/edge-agent/agent.toml",
        metavar="PATH",
        help="agent config file (default /etc/edge-agent/agent.toml)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level (default INFO)",
    )
    parser.set_defaults(func=run)


def run(args: Any) -> int:
    """Run the daemon until stopped."""
    from agent.daemon.config import ConfigError, load_config  # noqa: PLC0415
    from agent.daemon.logs import configure_logging  # noqa: PLC0415
    from agent.daemon.supervisor import Supervisor, SupervisorError  # noqa: PLC0415

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    configure_logging(level=args.log_level)
    try:
        return Supervisor(config, config_path=args.config).run()
    except SupervisorError as exc:
        raise CliError(str(exc)) from None
