"""Fleets for the simulation tests: real ``fleetctl serve`` and ``edge-agent daemon`` processes.

``mosquitto_fleet`` (session scope: built once, shared by the tests that tolerate each other)
is ten agents behind a real mosquitto running the config ``fleetctl broker config`` wrote
(mutual TLS, the generated ACL). ``embedded_fleet`` is three agents on the embedded broker of
``fleetctl serve``. Tests start from a known model with :func:`converge`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mosquitto import mosquitto_binary
from tools.fleetsim import Fleet, FleetSpec

MOSQUITTO_DEVICES = 10


def _running_fleet(spec: FleetSpec, workdir: Path) -> Iterator[Fleet]:
    fleet = Fleet(spec, workdir)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.close()


@pytest.fixture(scope="session")
def mosquitto_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Ten agents, a real mosquitto (mutual TLS + ACL from fleetctl), fleetctl serve."""
    mosquitto_binary()  # a clear error when mosquitto is not installed
    spec = FleetSpec(devices=MOSQUITTO_DEVICES, broker="mosquitto", fps=5.0, watch_s=1.5)
    yield from _running_fleet(spec, tmp_path_factory.mktemp("mosquitto-fleet"))


@pytest.fixture(scope="session")
def embedded_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Three agents on the embedded broker of fleetctl serve."""
    spec = FleetSpec(devices=3, broker="embedded", fps=5.0, watch_s=1.5)
    yield from _running_fleet(spec, tmp_path_factory.mktemp("embedded-fleet"))


def converge(fleet: Fleet, model: str, timeout: float = 120.0) -> None:
    """Bring every device to ``model`` (one rollout with everybody in the canary) if needed."""
    expected = {device_id: model for device_id in fleet.spec.device_ids()}
    current = fleet.devices()
    if all(current.get(d, {}).get("model") == m for d, m in expected.items()):
        return
    rollout = fleet.deploy(model, "--all", "--canary", "100%")
    assert fleet.wait_rollout(rollout, timeout=timeout)["state"] == "succeeded"
    fleet.wait_models(expected, timeout=timeout)


def wave_commit_times(fleet: Fleet, rollout: dict[str, object], version: str) -> list[list[float]]:
    """Per wave of ``rollout``, the times its devices reported ``committed`` for ``version``."""
    times: list[list[float]] = []
    for wave in rollout["waves"]:  # type: ignore[attr-defined]
        rows = []
        for device_id in wave["devices"]:
            found = fleet.query(
                "SELECT MAX(ts) FROM events WHERE device_id = ? AND kind = 'committed'"
                " AND version = ?",
                (device_id, version),
            )
            rows.append(float(found[0][0]))
        times.append(rows)
    return times
