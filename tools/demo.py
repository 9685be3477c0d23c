"""``make demo``: a fleet of three agents on one machine, updated safely in under two minutes.

A controller (``fleetctl serve`` with its embedded MQTT broker) and three ``edge-agent daemon``
processes, each watching its own generated video of held-out digits. The demo installs the int8
TFLite digits model (v1), shows telemetry and live results, rolls out the int8 ONNX model (v2)
behind a canary, then rolls out a deliberately broken v3 whose self-test fails on the device:
the rollout aborts by itself and every device keeps running v2. Everything lives in a temporary
directory (or ``--workdir``); every process is stopped on exit, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, NoReturn

from tools.fleetsim import Fleet, FleetSpec

DEVICES = 3


class _ResultTap:
    """Subscribes to every device's results on the embedded broker; keeps the latest few."""

    def __init__(self, port: int, login: tuple[str, str]) -> None:
        from agent.protocol.topics import Topics  # noqa: PLC0415
        from agent.transport.mqtt import PahoTransport  # noqa: PLC0415

        self.latest: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._lock = threading.Lock()
        username, password = login  # the controller's: the broker's ACL lets it read results
        self._transport = PahoTransport(
            host="127.0.0.1",
            port=port,
            client_id="fleetctl-demo-results",
            username=username,
            password=password,
        )
        self._transport.subscribe(Topics().fleet_filter("results"), self._on_result, qos=0)
        self._transport.connect()

    def _on_result(self, topic: str, payload: bytes, _props: object) -> None:
        device_id = topic.split("/")[-2]
        message = json.loads(payload)
        with self._lock:
            self.latest[device_id] = [*self.latest[device_id][-4:], message]

    def lines(self) -> list[str]:
        """One line per device: its last results (label score, model version)."""
        with self._lock:
            snapshot = {d: list(r) for d, r in sorted(self.latest.items())}
        out = []
        for device_id, results in snapshot.items():
            shown = []
            for message in results:
                top = (message.get("result", {}).get("top") or [{}])[0]
                shown.append(
                    f"{top.get('label', '?')} ({float(top.get('score', 0.0)):.2f},"
                    f" v{message.get('model_version', '?')})"
                )
            out.append(f"    {device_id}: {'  '.join(shown)}")
        return out

    def close(self) -> None:
        self._transport.disconnect()


def _say(started: float, text: str) -> None:
    print(f"[{time.monotonic() - started:5.1f}s] {text}", flush=True)


def _rollout(fleet: Fleet, started: float, model: str, *args: str) -> dict[str, Any]:
    rollout_id = fleet.deploy(model, *args)
    _say(started, f"rollout {rollout_id}: {model} {' '.join(args)}")
    seen: set[tuple[str, str]] = set()

    def progress() -> dict[str, Any] | None:
        rollout = fleet.rollout(rollout_id)
        for device in rollout["devices"]:
            key = (device["device_id"], device["status"])
            if key not in seen and device["status"] != "pending":
                seen.add(key)
                reason = str(device["reason"] or "").removeprefix(f"{key[1]}: ")
                _say(
                    started,
                    f"  wave {device['wave']} {key[0]} {key[1]}{': ' * bool(reason)}{reason}",
                )
        return rollout if rollout["state"] in ("succeeded", "aborted") else None

    rollout = fleet.wait_for(progress, f"rollout {rollout_id}", timeout=120)
    reason = f" ({rollout['abort_reason']})" if rollout["abort_reason"] else ""
    _say(started, f"rollout {rollout_id} {rollout['state']}{reason}")
    return rollout


def _show_fleet(fleet: Fleet, tap: _ResultTap) -> None:
    print(fleet.fleetctl("devices").rstrip())
    print("  latest results (label, score, model version):")
    print("\n".join(tap.lines()) or "    (none yet)")


def run(workdir: Path) -> int:
    """The whole demo in ``workdir``."""
    started = time.monotonic()
    spec = FleetSpec(devices=DEVICES, fps=10.0, watch_s=3.0, telemetry_interval_s=2.0)
    rollouts: list[dict[str, Any]] = []
    with Fleet(spec, workdir) as fleet:
        _say(started, f"building a controller home and {DEVICES} devices in {workdir}")
        fleet.create(progress=lambda text: _say(started, text))
        for model, what in fleet.models.items():
            print(f"    {model}: {what}")
        fleet.start()
        tap = _ResultTap(fleet.port, fleet.controller_login())
        try:
            _say(started, "controller (embedded broker) and 3 agents running; no model yet")
            rollouts.append(_rollout(fleet, started, "digits@1", "--all", "--canary", "100%"))
            fleet.wait_models({d: "digits@1" for d in spec.device_ids()})
            fleet.wait_for(lambda: all(r["p95_ms"] for r in fleet.devices().values()), "telemetry")
            fleet.wait_for(lambda: len(tap.latest) == DEVICES, "results from every device")
            _show_fleet(fleet, tap)

            rollouts.append(_rollout(fleet, started, "digits@2", "--all", "--canary", "1"))
            fleet.wait_models({d: "digits@2" for d in spec.device_ids()})
            _show_fleet(fleet, tap)

            _say(started, "now a broken v3: its self-test cannot pass on the device")
            rollouts.append(_rollout(fleet, started, "digits@3", "--all", "--canary", "1"))
            fleet.wait_models({d: "digits@2" for d in spec.device_ids()})
            _say(started, "every device still runs digits@2")
            _show_fleet(fleet, tap)
            _summary(fleet, rollouts, time.monotonic() - started)
        finally:
            tap.close()
    return 0


def _summary(fleet: Fleet, rollouts: list[dict[str, Any]], elapsed: float) -> None:
    print("\n== summary")
    for device_id, row in sorted(fleet.devices().items()):
        print(
            f"  {device_id}: {row['model']}, {row['fps'] or 0:.1f} fps,"
            f" p95 {row['p95_ms'] or 0:.2f} ms, {'online' if row['online'] else 'offline'}"
        )
    for rollout in rollouts:
        counts = ", ".join(f"{n} {s}" for s, n in rollout["counts"].items() if n)
        print(f"  rollout {rollout['id']} {rollout['model']}: {rollout['state']} ({counts})")
    print(f"  {len(fleet.spec.device_ids())} devices, {len(rollouts)} rollouts, {elapsed:.0f} s")


def _stop_on_sigterm(_signum: int, _frame: object) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the demo; Ctrl-C or SIGTERM stops every process it started."""
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__)
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        if args.workdir is not None:
            return run(args.workdir)
        with tempfile.TemporaryDirectory(prefix="edge-demo-") as tmp:
            return run(Path(tmp))
    except KeyboardInterrupt:
        print("\ninterrupted: every demo process stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
