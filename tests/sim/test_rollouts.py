"""Rollouts on ten real agents behind mosquitto: waves in order, pause/resume, automatic aborts."""

from __future__ import annotations

import itertools

import pytest

from tests.sim.conftest import converge, wave_commit_times
from tools.fleetsim import Fleet

pytestmark = [pytest.mark.integration, pytest.mark.sim]


def test_canary_then_waves_commit_in_wave_order(mosquitto_fleet: Fleet) -> None:
    fleet = mosquitto_fleet
    converge(fleet, "digits@2")
    rollout_id = fleet.deploy("digits@1", "--all", "--canary", "1", "--wave-factor", "2")
    rollout = fleet.wait_rollout(rollout_id)

    assert rollout["state"] == "succeeded", rollout
    assert [w["size"] for w in rollout["waves"]] == [1, 2, 4, 3]
    assert all(d["status"] == "succeeded" for d in rollout["devices"])
    commits = wave_commit_times(fleet, rollout, "1")
    for earlier, later in itertools.pairwise(commits):
        assert max(earlier) <= min(later), commits
    fleet.wait_models({d: "digits@1" for d in fleet.spec.device_ids()})


def test_pause_holds_the_next_wave_until_resume(mosquitto_fleet: Fleet) -> None:
    fleet = mosquitto_fleet
    converge(fleet, "digits@1")
    rollout_id = fleet.deploy("digits@2", "--all", "--canary", "1", "--wave-interval", "1s")
    fleet.fleetctl("rollout", "pause", str(rollout_id))
    paused = fleet.wait_rollout(rollout_id, {"paused"})
    started = {d["device_id"] for d in paused["devices"] if d["status"] != "pending"}

    # While paused, every device reports telemetry three more times: nothing new starts.
    marks = dict(fleet.query("SELECT device_id, COUNT(*) FROM telemetry GROUP BY device_id"))

    def three_more_reports() -> bool:
        counts = dict(fleet.query("SELECT device_id, COUNT(*) FROM telemetry GROUP BY device_id"))
        return all(counts.get(d, 0) >= marks.get(d, 0) + 3 for d in fleet.spec.device_ids())

    fleet.wait_for(three_more_reports, "three telemetry reports per device")
    still = fleet.rollout(rollout_id)
    assert still["state"] == "paused"
    assert {d["device_id"] for d in still["devices"] if d["status"] != "pending"} == started
    assert len(started) < len(fleet.spec.device_ids())

    fleet.fleetctl("rollout", "resume", str(rollout_id))
    done = fleet.wait_rollout(rollout_id)
    assert done["state"] == "succeeded", done
    fleet.wait_models({d: "digits@2" for d in fleet.spec.device_ids()})


def test_broken_model_fails_its_self_test_and_the_rollout_aborts(mosquitto_fleet: Fleet) -> None:
    fleet = mosquitto_fleet
    converge(fleet, "digits@2")
    rollout_id = fleet.deploy("digits@3", "--all", "--canary", "2", "--min-executed", "2")
    rollout = fleet.wait_rollout(rollout_id)

    assert rollout["state"] == "aborted", rollout
    assert "failed" in rollout["abort_reason"]
    canary = [d for d in rollout["devices"] if d["wave"] == 0]
    assert canary and all(d["status"] == "failed" for d in canary)
    assert all("self-test failed" in (d["reason"] or "") for d in canary)
    others = [d for d in rollout["devices"] if d["wave"] > 0]
    assert all(d["status"] in ("pending", "cancelled") for d in others)
    for device in canary:
        failed = [e for e in fleet.events(device["device_id"]) if e[0] == "failed"]
        assert failed[-1][1] == "3" and "self-test failed: vector" in (failed[-1][2] or "")
    # Nobody runs the broken model; everybody keeps (or is given back) digits@2.
    rows = fleet.wait_models({d: "digits@2" for d in fleet.spec.device_ids()})
    assert all(row["online"] for row in rows.values())
    never_fetched = {d["device_id"] for d in others}
    for device_id in never_fetched:
        assert ("fetching", "3", None) not in fleet.events(device_id)


def test_latency_regression_aborts_and_rolls_the_canary_back(mosquitto_fleet: Fleet) -> None:
    fleet = mosquitto_fleet
    converge(fleet, "digits@2")
    rollout_id = fleet.deploy(
        "digits@4", "--all", "--canary", "1", "--max-latency-regression", "50%"
    )
    rollout = fleet.wait_rollout(rollout_id)

    assert rollout["state"] == "aborted", rollout
    assert "p95 latency regressed" in rollout["abort_reason"]
    canary = rollout["devices"][0]["device_id"]
    assert any(e[:2] == ("committed", "4") for e in fleet.events(canary))  # it did run v4
    fleet.wait_models({d: "digits@2" for d in fleet.spec.device_ids()})
    final = fleet.rollout(rollout_id)
    assert [d["device_id"] for d in final["devices"] if d["rolled_back"]] == [canary]
