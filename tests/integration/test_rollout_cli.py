"""``fleetctl deploy``, ``rollout ...`` and ``rollback`` in subprocesses on a real home.

The CLI only writes rows; an in-process :class:`RolloutEngine` (what ``fleetctl serve`` runs)
acts on them between commands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.fleetctl.home import FleetHome
from tools.fleetctl.rollouts import RolloutEngine

pytestmark = pytest.mark.integration

TFLITE = Path(__file__).resolve().parents[2] / "tools" / "models" / "digits_int8.tflite"


def fleetctl(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.fleetctl.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "FLEETCTL_HOME": str(home)},
        timeout=120,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert " error: " in lines[0] and needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rollout-cli")
    path = root / "home"
    ok(fleetctl(path, "init"))
    for version in ("1", "2"):
        ok(fleetctl(path, "model", "add", str(TFLITE), "--name", "digits", "--version", version))
    for index in range(4):
        device = f"pi-{index:02d}"
        tag = "lab" if index < 3 else "field"
        ok(fleetctl(path, "device", "add", device, "--tag", tag, "--out", str(root / device)))
        ok(fleetctl(path, "assign", device, "digits@1"))
    return path


def test_deploy_list_show_abort_and_rollback(home: Path) -> None:
    out = ok(fleetctl(home, "deploy", "digits@2", "--tag", "lab", "--canary", "34%"))
    rollout_id = int(out.strip())
    listed = json.loads(ok(fleetctl(home, "rollout", "list", "--json")))
    assert [r["id"] for r in listed] == [rollout_id]
    assert listed[0]["state"] == "pending" and listed[0]["model"] == "digits@2"
    shown = json.loads(ok(fleetctl(home, "rollout", "show", str(rollout_id), "--json")))
    assert [w["size"] for w in shown["waves"]] == [2, 1]  # 34% of 3 -> 2, then the rest
    assert shown["policy"]["max_failures_pct"] == 20.0
    assert shown["policy"]["device_timeout_s"] == 300.0
    assert shown["counts"]["pending"] == 3

    notified: list[str] = []
    engine = RolloutEngine(FleetHome(home), notify=notified.append)
    try:
        engine.tick()
        assert notified == ["pi-00", "pi-01"]
        ok(fleetctl(home, "rollout", "pause", str(rollout_id)))
        engine.tick()
        assert json.loads(ok(fleetctl(home, "rollout", "list", "--json")))[0]["state"] == "paused"
        out = ok(fleetctl(home, "rollout", "abort", str(rollout_id)))
        assert "abort requested" in out
        engine.tick()
    finally:
        engine.close()
    shown = json.loads(ok(fleetctl(home, "rollout", "show", str(rollout_id), "--json")))
    assert shown["state"] == "aborted"
    assert shown["abort_reason"] == "aborted by the operator"
    assert shown["counts"]["rolled-back"] == 2
    text = ok(fleetctl(home, "rollout", "show", str(rollout_id)))
    assert "abort reason: aborted by the operator" in text
    assert "rolled back to digits@1" in text
    devices = json.loads(ok(fleetctl(home, "device", "list", "--json")))
    assert {d["id"]: d["assigned"] for d in devices}["pi-00"] == "digits@1"

    back = int(ok(fleetctl(home, "rollback", "--devices", "pi-03", "digits@2")).strip())
    assert back == rollout_id + 1
    listed = json.loads(ok(fleetctl(home, "rollout", "list", "--json")))
    assert listed[0]["kind"] == "rollback" and listed[0]["selector"] == "devices pi-03"


def test_errors_are_one_line_with_exit_2(home: Path) -> None:
    one_line_error(fleetctl(home, "deploy", "digits@9", "--all"), "digits@9 not found")
    one_line_error(fleetctl(home, "deploy", "digits", "--all"), "expected NAME@VERSION")
    one_line_error(
        fleetctl(home, "deploy", "digits@2", "--all", "--device-timeout", "5 minutes"),
        "expected a number with a unit",
    )
    one_line_error(
        fleetctl(home, "deploy", "digits@2", "--all", "--max-failures", "150%"),
        "expected a percentage",
    )
    one_line_error(fleetctl(home, "deploy", "digits@2", "--devices", "pi-77"), "'pi-77' not found")
    one_line_error(fleetctl(home, "deploy", "digits@2"), "one of the arguments")
    one_line_error(fleetctl(home, "rollout", "show", "999"), "rollout 999 not found")
    one_line_error(fleetctl(home, "rollout", "abort", "x"), "expected a number")
    rollout_id = ok(fleetctl(home, "deploy", "digits@2", "--devices", "pi-02", "--json"))
    created = json.loads(rollout_id)
    assert created["state"] == "pending" and created["devices"][0]["device_id"] == "pi-02"
    one_line_error(
        fleetctl(home, "deploy", "digits@2", "--devices", "pi-01,pi-02"), "in active rollout"
    )
    one_line_error(
        fleetctl(home, "rollout", "resume", str(created["id"])), "is pending; expected a paused one"
    )
    ok(fleetctl(home, "rollout", "abort", str(created["id"])))
