"""``fleetctl``: the operator's command line (keys, signed repositories, models, devices).

Every command works on a controller home: ``--home``, else ``$FLEETCTL_HOME``, else
``$XDG_DATA_HOME/fleetctl`` (``~/.local/share/fleetctl``). Errors the operator can fix print one
line on stderr and exit with status 2. Listing commands take ``--json``. Private keys and
content keys are never printed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from tools.fleetctl import FleetctlError

__all__ = ["main"]

_DESCRIPTION = """\
Operate a fleet of edge devices: hold the signing keys, pack models (optionally quantize them),
encrypt and sign them into the image repository, enrol devices and assign models to them
through per-device director metadata, roll models out in waves with automatic abort and
rollback, and watch the fleet. Devices verify everything with TUF/Uptane rules.

typical session:
  fleetctl init --root-threshold 2 --root-keys 3
  fleetctl model add digits_int8.tflite --name digits --version 1
  fleetctl device add pi-01 --tag lab --out ./pi-01-bundle
  fleetctl serve &                      (embedded broker; or --broker mqtts://HOST:8883)
  fleetctl deploy digits@1 --tag lab --canary 1 --wave-factor 2
  fleetctl watch                        (live fleet and rollout progress)
  fleetctl assign pi-01 digits@1        (one device, outside a rollout)
  fleetctl timestamp refresh            (serve does this itself; without it, before expiry)
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _home(args: argparse.Namespace) -> Any:
    from tools.fleetctl.home import FleetHome, default_home  # noqa: PLC0415 - keep --help light

    return FleetHome(Path(args.home) if args.home else default_home())


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _cmd_init(args: argparse.Namespace) -> int:
    home = _home(args)
    home.create(
        image_thresholds={
            "root": (args.root_threshold, args.root_keys),
            "targets": (args.targets_threshold, args.targets_keys),
        },
        director_thresholds={"root": (args.root_threshold, args.root_keys)},
    )
    print(f"initialized fleetctl home {home.root}")
    print(
        f"image root {args.root_threshold}-of-{args.root_keys}, targets"
        f" {args.targets_threshold}-of-{args.targets_keys}; keys in {home.keys_dir} (0600)."
        " Move offline root/targets keys off this machine when not signing."
    )
    return 0


def _progress_printer() -> Any:
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        end = "\n" if done >= total else ""
        print(f"\rencrypting {done / 1e6:.1f}/{total / 1e6:.1f} MB", end=end, file=sys.stderr)

    return show


def _cmd_model_add(args: argparse.Namespace) -> int:
    from tools.fleetctl.packing import pack_model  # noqa: PLC0415 - numpy/runtime imports

    result = pack_model(
        _home(args),
        Path(args.path),
        name=args.name,
        version=args.version,
        card_path=Path(args.card) if args.card else None,
        calibration=Path(args.quantize) if args.quantize else None,
        progress=_progress_printer(),
        warn=lambda message: print(message, file=sys.stderr),
        allow_failing_selftest=args.allow_failing_selftest,
    )
    record = result.record
    quantized = result.quantized
    if quantized is not None:
        print(f"quantized: {quantized.float_size} -> {quantized.int8_size} bytes (int8, QDQ)")
        if quantized.float_accuracy is not None and quantized.int8_accuracy is not None:
            print(
                f"accuracy on {quantized.calibration_samples} calibration samples: float"
                f" {quantized.float_accuracy:.4f} -> int8 {quantized.int8_accuracy:.4f}"
            )
    print(f"added {record.ref} ({record.format}) as {record.target_path}")
    print(f"  plaintext  sha256 {record.plaintext_sha256}  {record.plaintext_size} bytes")
    print(f"  ciphertext sha256 {record.ciphertext_sha256}  {record.ciphertext_size} bytes")
    print(f"  self-test  {result.selftest}")
    return 0


def _cmd_model_list(args: argparse.Namespace) -> int:
    with _home(args).registry() as registry:
        models = registry.list_models()
        running = {m.ref: registry.devices_running(m.name, m.version) for m in models}
    if args.json:
        _print_json([{**m.to_dict(), "devices": running[m.ref]} for m in models])
        return 0
    if not models:
        print("no models")
    for m in models:
        print(
            f"{m.ref:32} {m.format:6} {m.plaintext_size:>10} B  {m.plaintext_sha256[:16]}"
            f"  devices: {len(running[m.ref])}"
        )
    return 0


def _cmd_model_inspect(args: argparse.Namespace) -> int:
    from tools.fleetctl.devices import parse_model_ref  # noqa: PLC0415

    name, version = parse_model_ref(args.model)
    home = _home(args)
    with home.registry() as registry:
        record = registry.get_model(name, version)
        devices = registry.devices_running(name, version)
    target = home.image().get_target(record.target_path)
    data = {
        **record.to_dict(),
        "card": record.card,
        "devices": devices,
        "signed": target is not None,
        "encryption": None if target is None else target.custom.get("encryption"),
    }
    if args.json:
        _print_json(data)
        return 0
    print(f"{record.ref}  ({record.format}, target {record.target_path})")
    print(f"  plaintext  sha256 {record.plaintext_sha256}  {record.plaintext_size} bytes")
    print(f"  ciphertext sha256 {record.ciphertext_sha256}  {record.ciphertext_size} bytes")
    print(f"  in signed image targets: {'yes' if target is not None else 'NO'}")
    print(f"  devices: {', '.join(devices) if devices else '-'}")
    print("  card:")
    for line in json.dumps(record.card, indent=2, sort_keys=True).splitlines():
        print(f"    {line}")
    return 0


def _cmd_device_add(args: argparse.Namespace) -> int:
    from tools.fleetctl.devices import enrol_device  # noqa: PLC0415

    result = enrol_device(
        _home(args),
        args.id,
        tags=tuple(args.tag),
        out_dir=Path(args.out) if args.out else None,
        public_keys_file=Path(args.public_keys) if args.public_keys else None,
        mqtt_url=args.mqtt_url,
    )
    print(f"enrolled {result.device.id}; provisioning bundle in {result.bundle}")
    if result.has_private_keys:
        print("  the bundle holds the device's private keys: copy it to the device, then delete it")
    return 0


def _cmd_device_list(args: argparse.Namespace) -> int:
    with _home(args).registry() as registry:
        devices = registry.list_devices()
        current = {d.id: registry.current_assignment(d.id) for d in devices}
    if args.json:
        out = []
        for d in devices:
            assignment = current[d.id]
            out.append(
                {
                    **d.to_dict(),
                    "assigned": None
                    if assignment is None
                    else f"{assignment.model}@{assignment.version}",
                }
            )
        _print_json(out)
        return 0
    if not devices:
        print("no devices")
    for d in devices:
        assignment = current[d.id]
        model = "-" if assignment is None else f"{assignment.model}@{assignment.version}"
        state = "removed" if d.removed else "active"
        print(f"{d.id:24} {state:8} {model:32} tags: {','.join(d.tags) or '-'}")
    return 0


def _cmd_device_remove(args: argparse.Namespace) -> int:
    from tools.fleetctl.devices import remove_device  # noqa: PLC0415
    from tools.fleetctl.pki import FleetPki  # noqa: PLC0415

    home = _home(args)
    remove_device(home, args.id)
    print(f"removed {args.id}: no further grants; its director targets are now empty")
    pki = FleetPki(home.root)
    if pki.exists():
        print(
            f"  its client certificates are revoked in {pki.crl_path}: run `fleetctl broker"
            " config` again (or copy crl.pem to the broker) and restart mosquitto (SIGHUP"
            " refuses its new connections but keeps an open one)"
        )
    return 0


def _cmd_assign(args: argparse.Namespace) -> int:
    from tools.fleetctl.devices import assign_model, parse_model_ref  # noqa: PLC0415

    name, version = parse_model_ref(args.model)
    assignment = assign_model(_home(args), args.id, name, version)
    print(f"assigned {assignment.model}@{assignment.version} to {assignment.device_id}")
    return 0


def _cmd_keys_rotate(args: argparse.Namespace) -> int:
    home = _home(args)
    repo = home.image() if args.repo == "image" else home.director()
    root = repo.rotate_keys(args.role, key_count=args.keys, threshold=args.threshold)
    print(
        f"rotated {args.repo} {args.role} keys ({args.threshold}-of-{args.keys});"
        f" root is now version {root.version}"
    )
    return 0


def _cmd_timestamp_refresh(args: argparse.Namespace) -> int:
    from datetime import timedelta  # noqa: PLC0415

    home = _home(args)
    margin = timedelta(hours=args.margin_hours)
    renewed = home.image().refresh_expiring(margin)
    print(f"image: re-signed {', '.join(renewed)}")
    devices = home.director().refresh_expiring(margin)
    print(f"director: re-signed timestamps of {len(devices)} device(s)")
    return 0


# Command groups that live in their own modules; each has ``register(subparsers)`` that adds its
# parsers and sets ``func(args) -> int``. Keep heavy imports inside the functions.
COMMAND_MODULES = (
    "tools.fleetctl.cli_broker",  # broker config
    "tools.fleetctl.cli_serve",  # serve, devices, device show, telemetry, watch
    "tools.fleetctl.cli_rollout",  # deploy, rollout ..., rollback
)


def build_parser() -> argparse.ArgumentParser:
    """The full ``fleetctl`` argument parser."""
    parser = _Parser(
        prog="fleetctl",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--home",
        metavar="DIR",
        help="controller home (default: $FLEETCTL_HOME, else $XDG_DATA_HOME/fleetctl)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser(
        "init", help="create keys, the image and director repositories and the registry"
    )
    init.add_argument(
        "--root-threshold",
        type=int,
        default=1,
        metavar="K",
        help="root signatures required (image and director; default 1)",
    )
    init.add_argument(
        "--root-keys", type=int, default=1, metavar="N", help="root keys to create (default 1)"
    )
    init.add_argument(
        "--targets-threshold",
        type=int,
        default=1,
        metavar="K",
        help="image targets signatures required (default 1)",
    )
    init.add_argument(
        "--targets-keys",
        type=int,
        default=1,
        metavar="N",
        help="image targets keys to create (default 1)",
    )
    init.set_defaults(func=_cmd_init)

    model = commands.add_parser("model", help="add, list and inspect model versions")
    model_cmds = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    add = model_cmds.add_parser(
        "add",
        help="self-test, (quantize,) encrypt, sign and register a model",
        description="Pack a .tflite/.onnx model: read its card (--card, else MODEL.card.json,"
        " else derived), run the card's self-test, optionally quantize to int8, encrypt it with"
        " a fresh content key and add it to the signed image repository.",
    )
    add.add_argument("path", help="plaintext .tflite or .onnx model")
    add.add_argument("--name", required=True, help="model name")
    add.add_argument("--version", required=True, help="model version (NAME@VERSION is unique)")
    add.add_argument("--card", metavar="CARD.json", help="model card (default MODEL.card.json)")
    add.add_argument(
        "--quantize",
        metavar="CALIB.npz",
        help="quantize a float ONNX model to int8 with calibration inputs 'x'"
        " (and labels 'y' to report accuracy before and after)",
    )
    add.add_argument(
        "--allow-failing-selftest",
        action="store_true",
        help="pack even if the card's self-test fails (loud warning; devices refuse it):"
        " for staging a broken version in rollback drills",
    )
    add.set_defaults(func=_cmd_model_add)
    lst = model_cmds.add_parser("list", help="list model versions")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=_cmd_model_list)
    inspect = model_cmds.add_parser("inspect", help="card, hashes, sizes and devices of a model")
    inspect.add_argument("model", metavar="NAME@VERSION")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(func=_cmd_model_inspect)

    device = commands.add_parser("device", help="enrol, list and remove devices")
    device_cmds = device.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    dadd = device_cmds.add_parser(
        "add",
        help="enrol a device and write its provisioning bundle",
        description="Enrol a device: make its identity (or take --public-keys from"
        " `edge-agent keygen`), create its director namespace and write a provisioning bundle"
        " (a seed of the device's state directory).",
    )
    dadd.add_argument("id", help="device id: [a-z0-9][a-z0-9_-]{0,62}")
    dadd.add_argument("--tag", action="append", default=[], help="a tag (repeatable)")
    dadd.add_argument("--out", metavar="DIR", help="bundle directory (default ./ID-bundle)")
    dadd.add_argument(
        "--public-keys",
        metavar="FILE",
        help="public-keys.json (or device.json) of a device that made its own keys",
    )
    dadd.add_argument(
        "--mqtt-url",
        default=None,
        help="broker URL written into the bundle's agent.toml (default: the TLS broker of"
        " `fleetctl broker config` once a fleet CA exists, else mqtt://localhost:1883)",
    )
    dadd.set_defaults(func=_cmd_device_add)
    dlist = device_cmds.add_parser("list", help="list devices and what they run")
    dlist.add_argument("--json", action="store_true", help="machine-readable output")
    dlist.set_defaults(func=_cmd_device_list)
    drm = device_cmds.add_parser(
        "remove", help="revoke a device (no further grants; its certificates go into the CRL)"
    )
    drm.add_argument("id")
    drm.set_defaults(func=_cmd_device_remove)

    assign = commands.add_parser("assign", help="grant a model version to a device")
    assign.add_argument("id", help="device id")
    assign.add_argument("model", metavar="NAME@VERSION")
    assign.set_defaults(func=_cmd_assign)

    keys = commands.add_parser("keys", help="signing key operations")
    keys_cmds = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    rotate = keys_cmds.add_parser(
        "rotate",
        help="replace a role's keys; devices follow the new root chain",
        description="Generate new keys for ROLE, publish a new root signed by the current root"
        " threshold (and by the new keys for a root rotation), re-sign the role with the new"
        " keys, and delete the retired private keys.",
    )
    rotate.add_argument("role", choices=("root", "targets", "snapshot", "timestamp"))
    rotate.add_argument("--repo", choices=("image", "director"), default="image")
    rotate.add_argument("--keys", type=int, default=1, metavar="N", help="new keys (default 1)")
    rotate.add_argument(
        "--threshold", type=int, default=1, metavar="K", help="signatures required (default 1)"
    )
    rotate.set_defaults(func=_cmd_keys_rotate)

    timestamp = commands.add_parser("timestamp", help="timestamp maintenance")
    ts_cmds = timestamp.add_subparsers(dest="timestamp_command", required=True, metavar="ACTION")
    refresh = ts_cmds.add_parser(
        "refresh",
        help="re-sign timestamps (and snapshots/targets close to expiry)",
    )
    refresh.add_argument(
        "--margin-hours",
        type=float,
        default=48.0,
        help="also re-sign snapshot/targets expiring within this (default 48)",
    )
    refresh.set_defaults(func=_cmd_timestamp_refresh)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(commands)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fleetctl`` console script."""
    from agent.schema import SchemaError  # noqa: PLC0415
    from agent.supplychain.errors import SupplyChainError  # noqa: PLC0415

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="fleetctl: %(levelname)s %(message)s",
    )
    try:
        status: int = args.func(args)
    except (FleetctlError, SupplyChainError, SchemaError) as exc:
        print(f"fleetctl: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head`
        return 0
    return status


if __name__ == "__main__":
    sys.exit(main())
