"""``fleetctl broker config``: a mosquitto 2.x setup for the fleet (mutual TLS + per-device ACL).

Creates the fleet CA in the home once (:class:`tools.fleetctl.pki.FleetPki`), then writes to
``--out DIR``: ``mosquitto.conf`` (one TLS listener, client certificates required, the
certificate CN is the username), ``acl`` (the controller reads/writes the prefix; each device only
its own topics, from :func:`agent.protocol.topics.Topics.device_acl_patterns`), ``ca.crt``,
``server.crt``/``server.key``, the controller's ``fleetctl.crt``/``fleetctl.key`` (keys 0600) and
``crl.pem``, the fleet CRL (client certificates of removed devices, regenerated from the registry
on every run; mosquitto's ``crlfile``). After ``fleetctl device remove``, run ``broker config``
again (or copy ``HOME/pki/crl.pem``) and reload mosquitto: SIGHUP re-reads ``crlfile`` (2.0 loads
it with the server certificate), so new handshakes with a revoked certificate fail, but a device
connected at that moment keeps its session until it reconnects; a restart cuts it at once.
The controller certificate is also kept in ``HOME/pki`` for ``fleetctl serve --broker mqtts://``.
``fleetctl broker issue DEVICE --out DIR`` issues a client certificate for a device enrolled
before the CA existed; ``fleetctl broker password DEVICE --out DIR`` gives a device a new
password for the embedded broker of ``fleetctl serve`` (devices enrolled before it had logins).
Registered from ``tools.fleetctl.cli.COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BrokerConfigResult", "acl_file_text", "mosquitto_conf_text", "register"]

_MAX_QUEUED, _MAX_INFLIGHT, _MAX_PACKET = 1000, 20, 2 * 1024 * 1024


@dataclass(frozen=True)
class BrokerConfigResult:
    """What ``broker config`` wrote."""

    out_dir: Path
    ca_created: bool
    hosts: tuple[str, ...]
    port: int
    files: dict[str, Path]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (paths as strings)."""
        return {
            "out": str(self.out_dir),
            "ca_created": self.ca_created,
            "hosts": list(self.hosts),
            "port": self.port,
            "files": {k: str(v) for k, v in self.files.items()},
        }


def acl_file_text(prefix: str, controller_user: str) -> str:
    """The mosquitto ACL file for the fleet (same rules as the embedded broker's)."""
    from agent.protocol.topics import CONTROLLER_GROUP, Topics  # noqa: PLC0415
    from tools.fleetctl.broker import fleet_acl_rules  # noqa: PLC0415

    lines = [
        "# mosquitto ACL for the edge fleet, written by `fleetctl broker config`.",
        "# Usernames are certificate CNs (use_identity_as_username): device ids and fleetctl.",
        "# mosquitto 2.0 grants any SUBSCRIBE and checks 'read' per message at delivery, against",
        "# the topic itself: a $share/<group>/<filter> subscription receives what 'topic read'",
        "# allows on the underlying topics. The $share line only matters to brokers that check",
        "# the subscription filter itself.",
    ]
    rules = fleet_acl_rules(Topics(prefix=prefix), controller_user=controller_user)
    for rule in rules:
        if rule.user is not None:
            lines += ["", f"user {rule.user}", f"topic {rule.access} {rule.topic}"]
    lines.append(f"topic read $share/{CONTROLLER_GROUP}/{prefix}/#")
    lines += [
        "",
        "# Every other user (a device): write its own uplink topics, read its own downlink.",
    ]
    lines += [f"pattern {r.access} {r.topic}" for r in rules if r.user is None]
    return "\n".join(lines) + "\n"


def mosquitto_conf_text(directory: Path, port: int) -> str:
    """``mosquitto.conf`` with a TLS listener on ``port`` and files under ``directory``."""
    d = directory
    return f"""\
# mosquitto 2.x configuration for the edge fleet, written by `fleetctl broker config`.
#
# per_listener_settings false    authentication and ACL below apply to every listener
# allow_anonymous false          a client must present a certificate (no anonymous access)
# persistence false              clean sessions only; retained device state is re-published by
#                                devices on reconnect, so nothing needs to survive a restart
# max_queued_messages {_MAX_QUEUED}       per client, past the in-flight window; beyond it QoS 1
#                                messages are dropped (devices fetch with a bounded window)
# max_inflight_messages {_MAX_INFLIGHT}      unacknowledged QoS 1 messages per client
# max_packet_size {_MAX_PACKET}     1 MiB payloads (repository segments, results) plus headers
# set_tcp_nodelay true           small packets (requests, PUBACKs) go out at once, no Nagle delay
# acl_file                       who may read/write which topic (see that file)
# listener {port}                  MQTT over TLS on every interface (add an address to restrict)
# cafile                         the fleet CA: client certificates must be signed by it
# crlfile                        revoked client certificates (removed devices). After a
#                                removal: SIGHUP refuses new connections of the device, a
#                                restart also drops its open one. Regenerate it (fleetctl
#                                broker config) within a year: an expired CRL makes mosquitto
#                                refuse every client
# certfile / keyfile             the broker's certificate (SAN: the --host names) and key
# require_certificate true       mutual TLS: no client certificate, no connection
# use_identity_as_username true  the certificate CN (device id, or "fleetctl") is the username
#                                the ACL's %u patterns see; no passwords exist
# use_username_as_clientid true  the client id is the username: a device cannot kick another
#                                off by connecting with its id (one connection per identity)
# tls_version tlsv1.2            the oldest TLS accepted (1.3 is negotiated when available)
#
# Paths are absolute: if you move these files (e.g. to /etc/mosquitto/fleet), edit them, and
# make server.key readable by the mosquitto user (chown mosquitto, mode 0600).

per_listener_settings false
allow_anonymous false
persistence false
max_queued_messages {_MAX_QUEUED}
max_inflight_messages {_MAX_INFLIGHT}
max_packet_size {_MAX_PACKET}
set_tcp_nodelay true
acl_file {d / "acl"}

listener {port}
cafile {d / "ca.crt"}
crlfile {d / "crl.pem"}
certfile {d / "server.crt"}
keyfile {d / "server.key"}
require_certificate true
use_identity_as_username true
use_username_as_clientid true
tls_version tlsv1.2
"""


def write_broker_config(
    home_root: Path,
    out_dir: Path,
    *,
    hosts: Sequence[str],
    port: int,
    prefix: str,
) -> BrokerConfigResult:
    """Create the CA if needed and write the mosquitto config, ACL and certificates."""
    from agent.atomicio import atomic_write, ensure_private_dir  # noqa: PLC0415
    from agent.protocol.errors import TopicError  # noqa: PLC0415
    from agent.protocol.topics import Topics  # noqa: PLC0415
    from tools.fleetctl.devices import write_revocation_list  # noqa: PLC0415
    from tools.fleetctl.home import FleetHome  # noqa: PLC0415
    from tools.fleetctl.pki import CONTROLLER_USER, FleetPki, PkiError  # noqa: PLC0415

    if not 1 <= port <= 65535:
        raise PkiError(f"broker port {port}: expected 1-65535")
    try:
        Topics(prefix=prefix)
    except TopicError as exc:
        raise PkiError(str(exc)) from None
    pki = FleetPki(home_root)
    server = None
    created = pki.ensure_ca()
    server = pki.issue_server(hosts)  # validates the names before anything lands in out_dir
    pki.ensure_controller_cert()
    pki.save_broker_info(hosts, port)
    home = FleetHome(home_root)
    if home.registry_path.is_file():
        write_revocation_list(home)
    else:  # no registry, no device certificates: an empty CRL
        pki.write_crl([])
    out = ensure_private_dir(out_dir.resolve())
    files = {
        "config": out / "mosquitto.conf",
        "acl": out / "acl",
        "ca": out / "ca.crt",
        "server_cert": out / "server.crt",
        "server_key": out / "server.key",
        "controller_cert": out / f"{CONTROLLER_USER}.crt",
        "controller_key": out / f"{CONTROLLER_USER}.key",
        "crl": out / "crl.pem",
    }
    atomic_write(files["ca"], pki.ca_cert_pem(), mode=0o644)
    server.write(files["server_cert"], files["server_key"])
    atomic_write(files["controller_cert"], pki.controller_cert_path.read_bytes(), mode=0o644)
    atomic_write(files["controller_key"], pki.controller_key_path.read_bytes(), mode=0o600)
    atomic_write(files["crl"], pki.crl_path.read_bytes(), mode=0o644)
    atomic_write(files["acl"], acl_file_text(prefix, CONTROLLER_USER), mode=0o644)
    atomic_write(files["config"], mosquitto_conf_text(out, port), mode=0o644)
    return BrokerConfigResult(out, created, tuple(hosts), port, files)


def _cmd_broker_config(args: argparse.Namespace) -> int:
    from tools.fleetctl.home import FleetHome, default_home  # noqa: PLC0415
    from tools.fleetctl.pki import DEFAULT_BROKER_HOSTS  # noqa: PLC0415

    home = FleetHome(Path(args.home) if args.home else default_home())
    home.require()
    result = write_broker_config(
        home.root,
        Path(args.out),
        hosts=tuple(args.host) or DEFAULT_BROKER_HOSTS,
        port=args.port,
        prefix=args.prefix,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        return 0
    state = "created" if result.ca_created else "existing"
    print(f"fleet CA ({state}) in {home.root / 'pki'}; mosquitto config in {result.out_dir}")
    print(f"  run: mosquitto -c {result.files['config']}   (TLS on port {result.port})")
    print(f"  server certificate for: {', '.join(result.hosts)}")
    print("  `fleetctl device add` now issues client certificates into device bundles")
    print(
        "  after `fleetctl device remove`: run this again (or copy crl.pem), then restart"
        " mosquitto (SIGHUP refuses new connections only)"
    )
    return 0


def _cmd_broker_issue(args: argparse.Namespace) -> int:
    from agent.atomicio import atomic_write, ensure_private_dir  # noqa: PLC0415
    from tools.fleetctl.devices import issue_device_certificate  # noqa: PLC0415
    from tools.fleetctl.home import FleetHome, default_home  # noqa: PLC0415
    from tools.fleetctl.pki import FleetPki  # noqa: PLC0415

    home = FleetHome(Path(args.home) if args.home else default_home())
    pki = FleetPki(home.root)
    issued = issue_device_certificate(home, args.id)
    out = ensure_private_dir(Path(args.out))
    issued.write(out / "client.crt", out / "client.key")
    atomic_write(out / "ca.crt", pki.ca_cert_pem(), mode=0o644)
    print(f"client certificate for {args.id} in {out} (client.crt, client.key 0600, ca.crt)")
    print(f'  device agent.toml: [mqtt] url = "{pki.broker_url()}", ca/cert/key = those files')
    return 0


def _cmd_broker_password(args: argparse.Namespace) -> int:
    from agent.atomicio import atomic_write, ensure_private_dir  # noqa: PLC0415
    from tools.fleetctl.devices import BROKER_PASSWORD_FILE, reset_broker_password  # noqa: PLC0415
    from tools.fleetctl.home import FleetHome, default_home  # noqa: PLC0415

    home = FleetHome(Path(args.home) if args.home else default_home())
    home.require()
    password = reset_broker_password(home, args.id)
    out = ensure_private_dir(Path(args.out))
    atomic_write(out / BROKER_PASSWORD_FILE, password + "\n", mode=0o600)
    print(f"new embedded-broker password for {args.id} in {out / BROKER_PASSWORD_FILE} (0600)")
    print(
        f'  device agent.toml: [mqtt] password_file = "{BROKER_PASSWORD_FILE}" (in its'
        " credentials directory); a running fleetctl serve refuses the old one within seconds"
    )
    return 0


def register(commands: Any) -> None:
    """Add ``fleetctl broker config`` to the ``fleetctl`` parser."""
    broker = commands.add_parser("broker", help="MQTT broker setup (mosquitto config, fleet CA)")
    sub = broker.add_subparsers(dest="broker_command", required=True, metavar="COMMAND")
    config = sub.add_parser(
        "config",
        help="write a mosquitto config with mutual TLS and the fleet ACL (creates the fleet CA)",
    )
    config.add_argument("--out", required=True, help="directory for the config, ACL and certs")
    config.add_argument(
        "--host",
        action="append",
        default=[],
        help="DNS name or IP of the broker for its certificate (repeatable; "
        "default localhost and 127.0.0.1; the first one goes into device bundles)",
    )
    config.add_argument("--port", type=int, default=8883, help="TLS listener port (8883)")
    config.add_argument("--prefix", default="edge/v1", help="topic prefix (edge/v1)")
    config.add_argument("--json", action="store_true", help="print a JSON summary")
    config.set_defaults(func=_cmd_broker_config)
    issue = sub.add_parser(
        "issue", help="issue a client certificate for an already enrolled device"
    )
    issue.add_argument("id", help="device id (the certificate CN)")
    issue.add_argument("--out", required=True, help="directory for client.crt/.key and ca.crt")
    issue.set_defaults(func=_cmd_broker_issue)
    password = sub.add_parser(
        "password", help="a new embedded-broker password for an enrolled device"
    )
    password.add_argument("id", help="device id (its broker username)")
    password.add_argument("--out", required=True, help="directory for broker-password (0600)")
    password.set_defaults(func=_cmd_broker_password)
