"""fleetctl commands of the running controller: serve, devices, device show, telemetry, watch.

Registered from tools.fleetctl.cli.COMMAND_MODULES. ``device show`` joins the existing
``device`` group. The views read the controller's SQLite (WAL), so they work while
``fleetctl serve`` runs, on the same machine or against a copy of the home.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tools.fleetctl import FleetctlError

__all__ = ["register"]

_ANSI_HOME_CLEAR = "\x1b[H\x1b[2J"


class ViewError(FleetctlError):
    """A view was asked for something that does not exist."""


def _home(args: argparse.Namespace) -> Any:
    from tools.fleetctl.home import FleetHome, default_home  # noqa: PLC0415

    home = FleetHome(Path(args.home) if args.home else default_home())
    home.require()
    return home


def _database(args: argparse.Namespace) -> Any:
    from tools.fleetctl.ingest import open_database  # noqa: PLC0415

    return open_database(_home(args).registry_path)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


class _JsonLines(logging.Formatter):
    """One JSON object per record (journald-friendly), when stderr is not a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def _configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(_JsonLines())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _cmd_serve(args: argparse.Namespace) -> int:
    from tools.fleetctl.serve import ControllerService, ServeOptions, parse_listen  # noqa: PLC0415

    _configure_logging(args.verbose)
    options = ServeOptions(
        broker_url=args.broker,
        listen=parse_listen(args.listen),
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        ca_file=Path(args.ca) if args.ca else None,
        client_cert=Path(args.client_cert) if args.client_cert else None,
        client_key=Path(args.client_key) if args.client_key else None,
        prefix=args.prefix,
        results=args.results,
        insecure_listen=args.insecure_listen,
    )
    service = ControllerService(_home(args), options)
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        logging.getLogger(__name__).info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    service.start()
    try:
        service.run(stop)
    finally:
        service.stop()
    return 0


def _cmd_devices(args: argparse.Namespace) -> int:
    from tools.fleetctl.views import fleet_rows, render_devices  # noqa: PLC0415

    db = _database(args)
    try:
        rows = fleet_rows(db, include_removed=args.all)
    finally:
        db.close()
    if args.json:
        _print_json([r.to_dict() for r in rows])
    else:
        print(render_devices(rows, time.time()))
    return 0


def _cmd_device_show(args: argparse.Namespace) -> int:
    from tools.fleetctl.views import device_detail, render_device_detail  # noqa: PLC0415

    db = _database(args)
    try:
        detail = device_detail(db, args.id, events=args.events)
    except LookupError as exc:
        raise ViewError(str(exc)) from None
    finally:
        db.close()
    if args.json:
        _print_json(detail)
    else:
        print(render_device_detail(detail, time.time()))
    return 0


def _cmd_telemetry(args: argparse.Namespace) -> int:
    from tools.fleetctl.views import render_telemetry, telemetry_rows  # noqa: PLC0415

    db = _database(args)
    since = None if args.since is None else time.time() - args.since
    last = 0
    try:
        if db.execute("SELECT 1 FROM devices WHERE id = ?", (args.id,)).fetchone() is None:
            raise ViewError(f"device {args.id!r} is not enrolled; expected an id from `devices`")
        while True:
            rows = telemetry_rows(db, args.id, since=since, after_rowid=last)
            for row in rows:
                last = max(last, int(row["rowid"]))
            if args.json:
                for row in rows:
                    print(json.dumps(row, sort_keys=True))
            else:
                for line in render_telemetry(rows):
                    print(line)
            sys.stdout.flush()
            if not args.follow:
                return 0
            time.sleep(args.interval)  # polling the database is what --follow does
    finally:
        db.close()


def _cmd_watch(args: argparse.Namespace) -> int:
    from tools.fleetctl.views import fleet_rows, render_watch, rollout_progress  # noqa: PLC0415

    db = _database(args)
    terminal = sys.stdout.isatty()
    try:
        while True:
            rows = fleet_rows(db)
            rollouts = rollout_progress(db)
            if args.json:
                _print_json(
                    {
                        "ts": time.time(),
                        "devices": [r.to_dict() for r in rows],
                        "rollouts": [vars(r) | {"fraction": r.fraction} for r in rollouts],
                    }
                )
                return 0
            frame = render_watch(rows, rollouts, time.time())
            print((_ANSI_HOME_CLEAR if terminal else "") + frame, flush=True)
            if args.once:
                return 0
            if not terminal:
                print("", flush=True)
            time.sleep(args.interval)
    finally:
        db.close()


def _device_group(commands: Any) -> Any:
    """The sub-command action of the existing ``device`` group (defined in tools.fleetctl.cli)."""
    device = commands.choices["device"]
    for action in device._actions:  # argparse keeps sub-parsers only there
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise FleetctlError("the `device` command group has no sub-commands; expected cli.py's")


def register(commands: Any) -> None:
    """Add this group's sub-commands to the ``fleetctl`` parser."""
    serve = commands.add_parser(
        "serve",
        help="run the controller: broker (embedded), repository server, ingest, rollouts, metrics",
        description="Run the controller service until SIGTERM/SIGINT. Without --broker it"
        " starts the embedded MQTT broker on --listen: devices log in with the password of"
        " their bundle, the controller with HOME/broker-password, under the fleet ACL.",
    )
    serve.add_argument("--broker", metavar="URL", help="mqtt://HOST[:PORT] or mqtts://...")
    serve.add_argument(
        "--listen",
        default="127.0.0.1:1883",
        metavar="HOST:PORT",
        help="embedded broker address (default 127.0.0.1:1883; loopback only unless"
        " --insecure-listen)",
    )
    serve.add_argument(
        "--insecure-listen",
        action="store_true",
        help="let the embedded broker listen on a non-loopback address: logins and traffic"
        " cross the network unencrypted (use mosquitto with TLS for a real network)",
    )
    serve.add_argument(
        "--metrics-port", type=int, default=9108, metavar="N", help="0 = off (default 9108)"
    )
    serve.add_argument("--metrics-host", default="127.0.0.1", help="default 127.0.0.1")
    serve.add_argument("--ca", metavar="PEM", help="CA of the broker (default HOME/pki/ca.crt)")
    serve.add_argument("--client-cert", metavar="PEM", help="default HOME/pki/fleetctl.crt")
    serve.add_argument("--client-key", metavar="PEM", help="default HOME/pki/fleetctl.key")
    serve.add_argument("--prefix", default="edge/v1", help="topic prefix (default edge/v1)")
    serve.add_argument("--results", action="store_true", help="also ingest inference results")
    serve.set_defaults(func=_cmd_serve)

    devices = commands.add_parser("devices", help="fleet table: online, model, fps, p95, seen")
    devices.add_argument("--all", action="store_true", help="include removed devices")
    devices.add_argument("--json", action="store_true", help="machine-readable output")
    devices.set_defaults(func=_cmd_devices)

    show = _device_group(commands).add_parser(
        "show", help="state, hardware, installed/assigned model, last events and telemetry"
    )
    show.add_argument("id")
    show.add_argument("--events", type=int, default=10, help="last N events (default 10)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=_cmd_device_show)

    telemetry = commands.add_parser("telemetry", help="a device's telemetry rows")
    telemetry.add_argument("id")
    telemetry.add_argument("--follow", "-f", action="store_true", help="keep printing new rows")
    telemetry.add_argument(
        "--since", type=float, metavar="SECONDS", help="only the last SECONDS (device time)"
    )
    telemetry.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    telemetry.add_argument("--json", action="store_true", help="one JSON object per line")
    telemetry.set_defaults(func=_cmd_telemetry)

    watch = commands.add_parser("watch", help="live fleet table and rollout progress")
    watch.add_argument("--once", action="store_true", help="print one frame and exit")
    watch.add_argument("--interval", type=float, default=1.0, help="refresh period (default 1 s)")
    watch.add_argument("--json", action="store_true", help="print one JSON snapshot and exit")
    watch.set_defaults(func=_cmd_watch)
