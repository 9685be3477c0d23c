"""``edge-agent keygen``: create a device identity and the public-key document for enrolment.

Writes ``DIR/identity/x25519.key`` and ``DIR/identity/ed25519.key`` (0600, directory 0700) and
``DIR/public-keys.json``; hand the latter to ``fleetctl device add ID --public-keys FILE``.
``DIR`` is normally the device state directory. An existing identity is never overwritten.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.cli import CliError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``keygen`` sub-command."""
    parser = subparsers.add_parser(
        "keygen",
        help="create this device's keys and public-keys.json for enrolment",
        description=__doc__,
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="directory (normally the state dir)"
    )
    parser.add_argument("--json", action="store_true", help="print the public keys as JSON")
    parser.set_defaults(func=run)


def run(args: Any) -> int:
    """Generate and save the identity; print where it went."""
    from agent.atomicio import atomic_write, ensure_private_dir  # noqa: PLC0415 - keeps `edge-agent --help` light
    from agent.supplychain.identity import PUBLIC_KEYS_FILE, DeviceIdentity  # noqa: PLC0415

    out = Path(args.out)
    identity_dir = out / "identity"
    if identity_dir.exists() and any(identity_dir.iterdir()):
        raise CliError(f"{identity_dir}: holds keys already; expected a new directory")
    identity = DeviceIdentity.generate()
    try:
        ensure_private_dir(out)
        identity.save(identity_dir)
        public = identity.public_keys().to_dict()
        atomic_write(
            out / PUBLIC_KEYS_FILE, json.dumps(public, indent=2, sort_keys=True) + "\n", mode=0o644
        )
    except OSError as exc:
        raise CliError(f"{out}: cannot write the identity ({exc.strerror})") from exc
    if args.json:
        print(json.dumps({"identity": str(identity_dir), "public_keys": public}, sort_keys=True))
    else:
        print(f"private keys   {identity_dir}/ (0600)")
        print(f"public keys    {out / PUBLIC_KEYS_FILE}")
        print(f"x25519         {public['x25519']}")
        print(f"ed25519        {public['ed25519']}")
        print(f"next: fleetctl device add ID --public-keys {out / PUBLIC_KEYS_FILE}")
    return 0
