"""Faults on the running fleet: a device killed mid-download, broker restarts and outages."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from tests.sim.conftest import converge
from tools.fleetsim import Fleet, write_heavy_digits_model

pytestmark = [pytest.mark.integration, pytest.mark.sim]


def _partial_bytes(fleet: Fleet, device_id: str) -> int:
    partial = fleet.device_dir(device_id) / "partial"
    return sum(p.stat().st_size for p in partial.glob("*.part")) if partial.is_dir() else 0


def test_device_killed_mid_download_resumes_and_commits(
    mosquitto_fleet: Fleet, tmp_path: Path
) -> None:
    fleet = mosquitto_fleet
    converge(fleet, "digits@1")
    big = write_heavy_digits_model(tmp_path / "digits_big.onnx", width=2048, layers=2)
    assert big.stat().st_size > 30 * 1024 * 1024
    fleet.fleetctl("model", "add", str(big), "--name", "digits", "--version", "big")
    victim = fleet.spec.device_ids()[-1]
    rollout_id = fleet.deploy("digits@big", "--devices", victim)

    fleet.wait_for(lambda: _partial_bytes(fleet, victim) > 2 * 1024 * 1024, "a partial download")
    fleet.kill_device(victim)
    kept = _partial_bytes(fleet, victim)
    assert kept > 2 * 1024 * 1024
    fleet.start_device(victim)

    rollout = fleet.wait_rollout(rollout_id, timeout=180)
    assert rollout["state"] == "succeeded", rollout
    fleet.wait_models({victim: "digits@big"})
    resumed = [
        int(n) for n in re.findall(r"resuming \S+ from byte (\d+)", fleet.device_log(victim))
    ]
    assert resumed and max(resumed) >= kept // 2  # resumed from what was kept, not from 0
    kinds = [kind for kind, version, _ in fleet.events(victim) if version == "big"]
    assert kinds[-3:] == ["verified", "activated", "committed"]


def test_broker_restart_mid_rollout_completes(mosquitto_fleet: Fleet) -> None:
    fleet = mosquitto_fleet
    assert fleet.broker is not None
    converge(fleet, "digits@1")
    rollout_id = fleet.deploy("digits@2", "--all", "--canary", "1", "--wave-factor", "2")

    def canary_done() -> bool:
        rows = fleet.query(
            "SELECT COUNT(*) FROM rollout_devices WHERE rollout_id = ? AND status = 'succeeded'",
            (rollout_id,),
        )
        return bool(rows and rows[0][0] >= 1)

    fleet.wait_for(canary_done, "the canary to succeed")
    fleet.broker.restart()
    rollout = fleet.wait_rollout(rollout_id, timeout=180)
    assert rollout["state"] == "succeeded", rollout
    rows = fleet.wait_models({d: "digits@2" for d in fleet.spec.device_ids()})
    assert all(row["online"] for row in rows.values())


def _queued_telemetry(fleet: Fleet, device_id: str) -> int:
    uri = f"file:{fleet.device_dir(device_id) / 'outbox.sqlite'}?mode=ro"
    db = sqlite3.connect(uri, uri=True, timeout=10)
    try:
        row = db.execute("SELECT COUNT(*) FROM messages WHERE topic LIKE '%/telemetry'").fetchone()
        return int(row[0])
    finally:
        db.close()


def test_telemetry_across_a_broker_outage_arrives_without_seq_gaps(
    mosquitto_fleet: Fleet,
) -> None:
    fleet = mosquitto_fleet
    assert fleet.broker is not None
    converge(fleet, "digits@1")  # telemetry reports intervals of a running model
    devices = fleet.spec.device_ids()
    before = dict(fleet.query("SELECT device_id, COUNT(*) FROM telemetry GROUP BY device_id"))
    fleet.broker.stop()
    try:
        fleet.wait_for(
            lambda: all(_queued_telemetry(fleet, d) >= 3 for d in devices),
            "three telemetry reports queued in every outbox",
        )
    finally:
        fleet.broker.start()

    def delivered() -> bool:
        counts = dict(fleet.query("SELECT device_id, COUNT(*) FROM telemetry GROUP BY device_id"))
        queued = sum(_queued_telemetry(fleet, d) for d in devices)
        return queued == 0 and all(counts.get(d, 0) >= before.get(d, 0) + 3 for d in devices)

    fleet.wait_for(delivered, "the outboxes to drain into the controller", timeout=120)
    steps = fleet.query(
        "SELECT device_id, boot_id, seq - LAG(seq) OVER"
        " (PARTITION BY device_id, boot_id ORDER BY seq) FROM telemetry"
    )
    gaps = [row for row in steps if row[2] is not None and row[2] != 1]
    assert gaps == []
