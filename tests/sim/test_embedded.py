"""The happy path on the embedded broker of ``fleetctl serve``: first install, then a canary rollout."""

from __future__ import annotations

import pytest

from tests.sim.conftest import wave_commit_times
from tools.fleetsim import Fleet

pytestmark = [pytest.mark.integration, pytest.mark.sim]


def test_first_install_then_canary_rollout_on_the_embedded_broker(embedded_fleet: Fleet) -> None:
    fleet = embedded_fleet
    devices = fleet.spec.device_ids()
    assert all(row["model"] is None for row in fleet.devices().values())

    first = fleet.wait_rollout(fleet.deploy("digits@1", "--all", "--canary", "100%"))
    assert first["state"] == "succeeded", first
    rows = fleet.wait_models({d: "digits@1" for d in devices})
    # Telemetry now names the model that produced it, with a p95 latency.
    fleet.wait_for(
        lambda: all(r["p95_ms"] for r in fleet.devices().values()), "telemetry with latency"
    )
    assert all(row["online"] for row in rows.values())

    second = fleet.wait_rollout(fleet.deploy("digits@2", "--all", "--canary", "1"))
    assert second["state"] == "succeeded", second
    assert [w["size"] for w in second["waves"]] == [1, 2]
    canary, rest = wave_commit_times(fleet, second, "2")
    assert max(canary) <= min(rest)
    fleet.wait_models({d: "digits@2" for d in devices})
    for device_id in devices:
        kinds = [kind for kind, version, _ in fleet.events(device_id) if version == "2"]
        # Later refresh cycles may add "refreshing"/"up-to-date": the install itself is what counts.
        lifecycle = [k for k in kinds if k not in ("refreshing", "up-to-date")]
        assert lifecycle[-4:] == ["fetching", "verified", "activated", "committed"]
