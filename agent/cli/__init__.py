"""``edge-agent``: the device command line.

Each sub-command lives in its own module with a ``register(subparsers)`` function that adds its
parser and sets ``func``. Errors the user can fix exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from agent import __version__

__all__ = ["CliError", "main"]

# Sub-command modules, in --help order.
COMMANDS = ("run", "update", "keygen", "daemon")


class CliError(Exception):
    """A usage, config or model problem; reported as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The full ``edge-agent`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Run verified, encrypted ML models on camera and sensor input.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"agent.cli.{name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edge-agent`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except CliError as exc:
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
