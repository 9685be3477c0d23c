"""fleetctl commands ``deploy``, ``rollout list|show|pause|resume|abort`` and ``rollback``.

They only write and read rows of the rollout tables (:mod:`tools.fleetctl.rollouts`); the
``fleetctl serve`` process runs the rollouts. Registered from ``tools.fleetctl.cli``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["register"]

_DEPLOY_DESCRIPTION = """\
Roll NAME@VERSION out to devices: a canary first, then waves growing by the factor, each after
the previous one completed and the interval passed. Aborts (and rolls the updated devices back to
their previous model) when failures or timeouts exceed --max-failures of the executed devices
after --min-executed, or when the p95 latency on updated devices regresses past
--max-latency-regression. Prints the rollout id; `fleetctl serve` runs it."""


def _store(args: argparse.Namespace) -> Any:
    from tools.fleetctl.home import FleetHome, default_home  # noqa: PLC0415 - keep --help light
    from tools.fleetctl.rollouts import RolloutStore  # noqa: PLC0415

    return RolloutStore(FleetHome(Path(args.home) if args.home else default_home()))


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _device_list(text: str | None) -> list[str]:
    if text is None:
        return []
    return [d.strip() for d in text.split(",") if d.strip()]


def _rollout_id(text: str) -> int:
    from tools.fleetctl.rollouts import RolloutError  # noqa: PLC0415

    if not text.isdigit():
        raise RolloutError(f"rollout id {text!r}: expected a number from rollout list")
    return int(text)


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _cmd_deploy(args: argparse.Namespace) -> int:
    from tools.fleetctl import rollout_plan as plan  # noqa: PLC0415

    regression = args.max_latency_regression
    policy = plan.RolloutPolicy(
        canary=plan.parse_canary(args.canary),
        wave_factor=args.wave_factor,
        wave_interval_s=plan.parse_duration(args.wave_interval),
        max_failures_pct=plan.parse_percent(args.max_failures, what="max failures"),
        min_executed=args.min_executed,
        device_timeout_s=plan.parse_duration(args.device_timeout),
        max_latency_regression_pct=None
        if regression is None
        else plan.parse_percent(regression, what="max latency regression"),
    )
    with _store(args) as store:
        devices, selector = store.select_devices(
            devices=_device_list(args.devices), tag=args.tag, all_devices=args.all
        )
        rollout_id = store.create_deploy(args.model, devices, selector=selector, policy=policy)
        rollout = store.get(rollout_id)
    if args.json:
        _print_json(rollout.to_dict())
        return 0
    sizes = ",".join(str(w["size"]) for w in rollout.waves())
    print(rollout_id)
    print(
        f"rollout {rollout_id}: {rollout.ref} to {len(devices)} device(s) ({selector}),"
        f" waves {sizes}; `fleetctl serve` runs it",
        file=sys.stderr,
    )
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    with _store(args) as store:
        devices, selector = store.select_devices(devices=_device_list(args.devices), tag=args.tag)
        rollout_id = store.create_rollback(args.model, devices, selector=selector)
        rollout = store.get(rollout_id)
    if args.json:
        _print_json(rollout.to_dict())
        return 0
    print(rollout_id)
    print(
        f"rollback {rollout_id}: {rollout.ref} to {len(devices)} device(s) ({selector});"
        " `fleetctl serve` re-assigns and notifies them",
        file=sys.stderr,
    )
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        rollouts = store.list_rollouts()
    if args.json:
        _print_json([r.to_dict(with_devices=False) for r in rollouts])
        return 0
    if not rollouts:
        print("no rollouts")
    for r in rollouts:
        c = r.counts()
        done = f"{c['succeeded']} ok, {c['failed'] + c['timed-out']} failed"
        print(
            f"{r.id:>4}  {r.kind:8} {r.ref:28} {r.state:9} {len(r.devices):>4} devices"
            f"  {done:20} {_when(r.created_at)}"
        )
    return 0


def _show_text(rollout: Any) -> None:
    policy = rollout.policy
    latency = policy.max_latency_regression_pct
    print(
        f"rollout {rollout.id}: {rollout.kind} {rollout.ref}  {rollout.state}  ({rollout.selector})"
    )
    if rollout.request:
        print(f"  requested: {rollout.request} (applied by `fleetctl serve`)")
    print(
        f"  policy: canary {policy.canary}, factor {policy.wave_factor:g}, interval"
        f" {policy.wave_interval_s:g} s, max failures {policy.max_failures_pct:g}% after"
        f" {policy.min_executed}, device timeout {policy.device_timeout_s:g} s, latency"
        f" regression {'off' if latency is None else f'{latency:g}%'}"
    )
    print(
        f"  created {_when(rollout.created_at)}, started {_when(rollout.started_at)},"
        f" finished {_when(rollout.finished_at)}"
    )
    print("  counts: " + ", ".join(f"{k} {v}" for k, v in rollout.counts().items()))
    if rollout.abort_reason:
        print(f"  abort reason: {rollout.abort_reason}")
    for wave in rollout.waves():
        label = "canary" if wave["wave"] == 0 else f"wave {wave['wave']}"
        print(f"  {label} ({wave['size']} devices):")
        for device in rollout.devices:
            if device.wave != wave["wave"]:
                continue
            extra = f"  from {device.previous_model}" if device.previous_model else ""
            if device.rolled_back_to:
                extra += f", rolled back to {device.rolled_back_to}"
            if device.reason:
                extra += f"  ({device.reason})"
            print(f"    {device.device_id:24} {device.status:10}{extra}".rstrip())


def _cmd_show(args: argparse.Namespace) -> int:
    with _store(args) as store:
        rollout = store.get(_rollout_id(args.id))
    if args.json:
        _print_json(rollout.to_dict())
    else:
        _show_text(rollout)
    return 0


def _cmd_request(args: argparse.Namespace) -> int:
    with _store(args) as store:
        rollout = store.request(_rollout_id(args.id), args.rollout_command)
    if args.json:
        _print_json(rollout.to_dict(with_devices=False))
    else:
        print(
            f"rollout {rollout.id}: {args.rollout_command} requested; `fleetctl serve` applies it"
        )
    return 0


def _add_selection(parser: argparse.ArgumentParser, *, allow_all: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--devices", metavar="A,B", help="comma-separated device ids")
    group.add_argument("--tag", metavar="T", help="every active device with this tag")
    if allow_all:
        group.add_argument("--all", action="store_true", help="every active device")


def register(commands: Any) -> None:
    """Add ``deploy``, ``rollout`` and ``rollback`` to the ``fleetctl`` parser."""
    deploy = commands.add_parser(
        "deploy",
        help="roll a model out in waves with automatic abort and rollback",
        description=_DEPLOY_DESCRIPTION,
    )
    deploy.add_argument("model", metavar="NAME@VERSION")
    _add_selection(deploy, allow_all=True)
    deploy.add_argument("--canary", default="1", metavar="N|P%", help="canary size (default 1)")
    deploy.add_argument(
        "--wave-factor", type=float, default=2.0, metavar="F", help="wave growth (default 2)"
    )
    deploy.add_argument(
        "--wave-interval", default="0s", metavar="DURATION", help="pause between waves (0s)"
    )
    deploy.add_argument(
        "--max-failures", default="20%", metavar="P%", help="abort above this (default 20%%)"
    )
    deploy.add_argument(
        "--min-executed",
        type=int,
        default=1,
        metavar="N",
        help="devices with an outcome before the failure rule applies (default 1)",
    )
    deploy.add_argument(
        "--device-timeout",
        default="5m",
        metavar="DURATION",
        help="no outcome within this counts as a failure (default 5m)",
    )
    deploy.add_argument(
        "--max-latency-regression",
        metavar="P%",
        help="abort when the median p95 latency regresses more than this (default off)",
    )
    deploy.add_argument("--json", action="store_true", help="print the rollout as JSON")
    deploy.set_defaults(func=_cmd_deploy)

    rollout = commands.add_parser("rollout", help="list, show, pause, resume or abort rollouts")
    actions = rollout.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    lst = actions.add_parser("list", help="every rollout, newest first")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=_cmd_list)
    show = actions.add_parser("show", help="waves, per-device status, counts, abort reason")
    show.add_argument("id", metavar="ID")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=_cmd_show)
    helps = {
        "pause": "start no further waves",
        "resume": "continue a paused rollout",
        "abort": "stop and roll the updated devices back to their previous model",
    }
    for action, text in helps.items():
        sub = actions.add_parser(action, help=text)
        sub.add_argument("id", metavar="ID")
        sub.add_argument("--json", action="store_true", help="machine-readable output")
        sub.set_defaults(func=_cmd_request)

    rollback = commands.add_parser(
        "rollback",
        help="re-assign a model version to devices now (through fleetctl serve)",
        description="Re-assign NAME@VERSION to the devices at once: `fleetctl serve` writes"
        " their director metadata, notifies them and records their outcomes as a rollout of"
        " kind rollback.",
    )
    rollback.add_argument("model", metavar="NAME@VERSION")
    _add_selection(rollback, allow_all=False)
    rollback.add_argument("--json", action="store_true", help="print the rollback as JSON")
    rollback.set_defaults(func=_cmd_rollback)
