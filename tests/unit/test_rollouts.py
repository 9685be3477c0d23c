"""The rollout engine against a real controller home, with ingest rows inserted directly.

The ``events`` and ``telemetry`` tables are the interface between ingest and the engine: the tests
write the rows ``fleetctl serve`` would ingest and check the director metadata the engine signs.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.fleetctl.devices import assign_model, enrol_device, remove_device
from tools.fleetctl.home import FleetHome
from tools.fleetctl.ingest import open_database
from tools.fleetctl.rollout_plan import CanarySpec, RolloutPolicy
from tools.fleetctl.rollouts import RolloutEngine, RolloutError, RolloutStore


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Fleet:
    """A controller home with models digits@1/@2, devices, an engine and the ingest tables."""

    def __init__(self, root: Path, devices: int, *, previous: bool = True) -> None:
        self.home = FleetHome(root / "home")
        self.home.create(image_thresholds={})
        self.targets = {v: self._add_model("digits", v) for v in ("1", "2")}
        self.devices = [f"pi-{i:02d}" for i in range(devices)]
        for device_id in self.devices:
            enrol_device(self.home, device_id, tags=("lab",), out_dir=root / device_id)
            if previous:
                assign_model(self.home, device_id, "digits", "1")
        self.clock = Clock()
        self.notified: list[str] = []
        self.engine = RolloutEngine(self.home, notify=self.notified.append, clock=self.clock)
        self.store = RolloutStore(self.home, clock=self.clock)
        self.db: sqlite3.Connection = open_database(self.home.registry_path)
        self._seq = 0

    def _add_model(self, name: str, version: str) -> str:
        path = f"models/{name}/{version}/model.tflite.enc"
        ciphertext = os.urandom(512)
        info = self.home.image().add_target(path, ciphertext, {"model": {"name": name}})
        with self.home.registry() as registry:
            registry.add_model(
                name=name,
                version=version,
                format="tflite",
                target_path=path,
                plaintext_sha256="00" * 32,
                plaintext_size=400,
                ciphertext_sha256=info.hashes["sha256"],
                ciphertext_size=info.length,
                card={},
                content_key=os.urandom(32),
            )
        return path

    def close(self) -> None:
        self.engine.close()
        self.store.close()
        self.db.close()

    def deploy(self, devices: list[str] | None = None, **policy: object) -> int:
        chosen = devices if devices is not None else self.devices
        return self.store.create_deploy(
            "digits@2",
            chosen,
            selector="test",
            policy=RolloutPolicy(**policy),  # type: ignore[arg-type]
        )

    def event(self, device_id: str, kind: str, version: str = "2", **extra: object) -> None:
        self._seq += 1
        self.db.execute(
            "INSERT INTO events (device_id, boot_id, seq, ts, received_at, kind, target, version,"
            " reason, verified) VALUES (?, 'boot', ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                device_id,
                self._seq,
                extra.get("ts", self.clock.now),
                self.clock.now,
                kind,
                self.targets[version],
                version,
                extra.get("reason"),
                extra.get("verified", 1),
            ),
        )

    def telemetry(self, device_id: str, model: str, p95_ms: float) -> None:
        self._seq += 1
        self.db.execute(
            "INSERT INTO telemetry (device_id, boot_id, seq, ts, received_at, model, fps, p95_ms,"
            " metrics_json) VALUES (?, 'boot', ?, ?, ?, ?, 10.0, ?, '{}')",
            (device_id, self._seq, self.clock.now, self.clock.now, model, p95_ms),
        )

    def director_targets(self, device_id: str) -> list[str]:
        return sorted(self.home.director().namespace(device_id).targets().targets)

    def statuses(self, rollout_id: int) -> dict[str, str]:
        return {d.device_id: d.status for d in self.store.get(rollout_id).devices}

    def commit(self, *devices: str) -> None:
        for device_id in devices:
            self.event(device_id, "committed")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path, 5)
    yield fleet
    fleet.close()


def test_canary_then_waves_growing_by_the_factor(fleet: Fleet) -> None:
    rollout_id = fleet.deploy(canary=CanarySpec(count=1), wave_factor=2.0)
    v1, v2 = fleet.targets["1"], fleet.targets["2"]
    assert [w["size"] for w in fleet.store.get(rollout_id).waves()] == [1, 2, 2]

    fleet.engine.tick()
    assert fleet.store.get(rollout_id).state == "running"
    assert fleet.notified == ["pi-00"]
    assert fleet.director_targets("pi-00") == [v2]
    assert fleet.director_targets("pi-01") == [v1]
    fleet.engine.tick()  # no outcome yet: nothing else starts
    assert fleet.notified == ["pi-00"]

    fleet.event("pi-00", "fetching")
    fleet.engine.tick()
    assert fleet.statuses(rollout_id)["pi-00"] == "updating"
    fleet.commit("pi-00")
    fleet.engine.tick()
    assert fleet.statuses(rollout_id)["pi-00"] == "succeeded"
    fleet.engine.tick()
    assert fleet.notified == ["pi-00", "pi-01", "pi-02"]
    assert fleet.director_targets("pi-02") == [v2]
    assert fleet.director_targets("pi-03") == [v1]

    fleet.commit("pi-01")
    fleet.engine.tick()
    assert fleet.notified == ["pi-00", "pi-01", "pi-02"]  # wave 1 not complete
    fleet.event("pi-02", "up-to-date")  # already running the target counts as success
    fleet.engine.tick()
    fleet.engine.tick()
    assert fleet.notified[3:] == ["pi-03", "pi-04"]
    fleet.commit("pi-03", "pi-04")
    fleet.engine.tick()
    fleet.engine.tick()
    rollout = fleet.store.get(rollout_id)
    assert rollout.state == "succeeded"
    assert rollout.counts()["succeeded"] == 5
    assert {d.previous_model for d in rollout.devices} == {"digits@1"}
    with fleet.home.registry() as registry:
        assert registry.devices_running("digits", "2") == fleet.devices


def test_wave_interval_is_waited_for(fleet: Fleet) -> None:
    rollout_id = fleet.deploy(wave_interval_s=60.0)
    fleet.engine.tick()
    fleet.commit("pi-00")
    fleet.engine.tick()
    fleet.clock.now += 59.0
    fleet.engine.tick()
    assert fleet.statuses(rollout_id)["pi-01"] == "pending"
    fleet.clock.now += 1.0
    fleet.engine.tick()
    assert fleet.statuses(rollout_id)["pi-01"] == "updating"


def test_abort_on_failures_rolls_updated_devices_back(fleet: Fleet) -> None:
    rollout_id = fleet.deploy(max_failures_pct=20.0, min_executed=3)
    v1, v2 = fleet.targets["1"], fleet.targets["2"]
    fleet.engine.tick()
    fleet.commit("pi-00")
    fleet.engine.tick()
    fleet.engine.tick()  # wave 1: pi-01, pi-02
    fleet.event("pi-01", "failed", reason="self-test failed: vector 'digit-3'")
    fleet.engine.tick()  # 1 of 2 executed, below min-executed 3: keep going
    assert fleet.store.get(rollout_id).state == "running"
    fleet.notified.clear()
    fleet.event("pi-02", "rolled-back", reason="watch: error rate 40%")
    fleet.engine.tick()  # 2 of 3 failed: 66.7% > 20%

    rollout = fleet.store.get(rollout_id)
    assert rollout.state == "aborted"
    assert rollout.abort_reason is not None and "2 of 3" in rollout.abort_reason
    statuses = fleet.statuses(rollout_id)
    assert statuses == {
        "pi-00": "succeeded",
        "pi-01": "failed",
        "pi-02": "failed",
        "pi-03": "cancelled",
        "pi-04": "cancelled",
    }
    devices = {d.device_id: d for d in rollout.devices}
    assert devices["pi-01"].reason == "failed: self-test failed: vector 'digit-3'"
    for device_id in ("pi-00", "pi-01", "pi-02"):
        assert fleet.director_targets(device_id) == [v1]
    # Only the device that ran digits@2 is rolled back; the failed ones already run digits@1.
    assert devices["pi-00"].rolled_back_to == "digits@1" and devices["pi-00"].rolled_back_at
    for device_id in ("pi-01", "pi-02", "pi-03"):
        assert not devices[device_id].rolled_back_at and not devices[device_id].rolled_back_to
    assert sorted(fleet.notified) == ["pi-00", "pi-01", "pi-02"]
    counts = rollout.counts()
    assert (counts["failed"], counts["cancelled"], counts["rolled-back"]) == (2, 2, 1)
    with fleet.home.registry() as registry:
        assert registry.devices_running("digits", "2") == []
        assert registry.devices_running("digits", "1") == fleet.devices
    assert v2 not in fleet.director_targets("pi-03")
    fleet.engine.tick()  # an aborted rollout is left alone
    assert sorted(fleet.notified) == ["pi-00", "pi-01", "pi-02"]


def test_devices_without_a_previous_model_get_an_empty_target_list(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, 2, previous=False)
    try:
        rollout_id = fleet.deploy()
        fleet.engine.tick()
        assert fleet.director_targets("pi-00") == [fleet.targets["2"]]
        fleet.event("pi-00", "failed", reason="self-test failed")
        fleet.engine.tick()
        rollout = fleet.store.get(rollout_id)
        assert rollout.state == "aborted"
        assert rollout.devices[0].rolled_back_to is None  # failed: not counted as rolled back
        assert rollout.counts()["rolled-back"] == 0
        assert fleet.director_targets("pi-00") == []
        with fleet.home.registry() as registry:
            assert registry.current_assignment("pi-00") is None
    finally:
        fleet.close()


def test_unverified_and_earlier_events_are_not_evidence(fleet: Fleet) -> None:
    fleet.event("pi-00", "committed")  # before the rollout: not about this assignment
    rollout_id = fleet.deploy(devices=["pi-00"])
    fleet.engine.tick()
    fleet.engine.tick()
    assert fleet.statuses(rollout_id)["pi-00"] == "updating"
    fleet.event("pi-00", "failed", verified=0, reason="forged")
    fleet.event("pi-00", "committed", version="1")  # a different target
    fleet.engine.tick()
    assert fleet.statuses(rollout_id)["pi-00"] == "updating"
    fleet.commit("pi-00")
    fleet.engine.tick()
    assert fleet.store.get(rollout_id).state == "succeeded"


def test_an_outcome_signed_before_the_assignment_is_not_evidence(fleet: Fleet) -> None:
    rollout_id = fleet.deploy(devices=["pi-00"])
    fleet.engine.tick()
    assigned_at = fleet.store.get(rollout_id).devices[0].assigned_at
    assert assigned_at is not None
    fleet.clock.now += 30.0
    # A `committed` signed before this assignment (withheld by a broker, released now).
    fleet.event("pi-00", "committed", ts=assigned_at - 0.5)
    fleet.engine.tick()
    assert fleet.statuses(rollout_id)["pi-00"] == "updating"
    fleet.event("pi-00", "failed", ts=assigned_at, reason="self-test failed")  # at: it counts
    fleet.engine.tick()
    assert fleet.statuses(rollout_id)["pi-00"] == "failed"


def test_abort_on_latency_regression(fleet: Fleet) -> None:
    for device_id, p95 in zip(fleet.devices, (10.0, 12.0, 11.0, 10.0, 10.0), strict=True):
        fleet.telemetry(device_id, "digits@1", p95)
    rollout_id = fleet.deploy(
        canary=CanarySpec(count=3), max_latency_regression_pct=20.0, wave_factor=1.0
    )
    fleet.engine.tick()
    fleet.commit("pi-00", "pi-01", "pi-02")
    fleet.engine.tick()
    fleet.engine.tick()
    # committed, but no telemetry of the new model yet: the next wave waits for it
    assert fleet.statuses(rollout_id)["pi-03"] == "pending"
    fleet.telemetry("pi-00", "digits@2", 11.0)  # +10% on one device: median 11 -> 11
    fleet.engine.tick()
    assert fleet.store.get(rollout_id).state == "running"
    fleet.telemetry("pi-01", "digits@2", 18.0)
    fleet.telemetry("pi-02", "digits@2", 16.0)  # medians 11 -> 16: +45%
    fleet.engine.tick()
    rollout = fleet.store.get(rollout_id)
    assert rollout.state == "aborted"
    assert rollout.abort_reason is not None
    assert "p95 latency regressed 45.5%" in rollout.abort_reason
    for device_id in ("pi-00", "pi-01", "pi-02"):
        assert fleet.director_targets(device_id) == [fleet.targets["1"]]
    assert fleet.statuses(rollout_id)["pi-03"] == "cancelled"


def test_latency_within_limit_lets_waves_go_on(fleet: Fleet) -> None:
    fleet.telemetry("pi-00", "digits@1", 10.0)
    rollout_id = fleet.deploy(max_latency_regression_pct=20.0)
    fleet.engine.tick()
    fleet.commit("pi-00")
    fleet.engine.tick()
    fleet.telemetry("pi-00", "digits@2", 11.5)
    fleet.engine.tick()
    assert fleet.store.get(rollout_id).state == "running"
    assert fleet.statuses(rollout_id)["pi-01"] == "updating"


def test_pausing_a_pending_rollout_holds_its_first_wave(fleet: Fleet) -> None:
    rollout_id = fleet.deploy()
    fleet.store.request(rollout_id, "pause")  # before the engine has seen it
    fleet.engine.tick()
    fleet.engine.tick()
    paused = fleet.store.get(rollout_id)
    assert paused.state == "paused"
    assert set(fleet.statuses(rollout_id).values()) == {"pending"}
    assert fleet.notified == []
    fleet.store.request(rollout_id, "resume")
    fleet.engine.tick()
    resumed = fleet.store.get(rollout_id)
    assert resumed.state == "running"
    assert resumed.started_at is not None
    assert fleet.statuses(rollout_id)["pi-00"] == "updating"


def test_pause_and_resume(fleet: Fleet) -> None:
    rollout_id = fleet.deploy()
    fleet.engine.tick()
    assert fleet.store.request(rollout_id, "pause").request == "pause"
    fleet.engine.tick()
    assert fleet.store.get(rollout_id).state == "paused"
    fleet.commit("pi-00")
    fleet.engine.tick()
    fleet.engine.tick()
    statuses = fleet.statuses(rollout_id)
    assert statuses["pi-00"] == "succeeded"  # outcomes are still recorded while paused
    assert statuses["pi-01"] == "pending"  # but no wave starts
    fleet.store.request(rollout_id, "resume")
    fleet.engine.tick()
    assert fleet.store.get(rollout_id).state == "running"
    assert fleet.statuses(rollout_id)["pi-01"] == "updating"


def test_device_timeout_counts_as_failure_and_aborts(fleet: Fleet) -> None:
    rollout_id = fleet.deploy(device_timeout_s=300.0)
    fleet.engine.tick()
    fleet.clock.now += 299.0
    fleet.engine.tick()
    assert fleet.store.get(rollout_id).state == "running"
    fleet.clock.now += 1.0
    fleet.engine.tick()
    rollout = fleet.store.get(rollout_id)
    assert rollout.state == "aborted"
    assert rollout.devices[0].status == "timed-out"
    assert rollout.devices[0].reason == "no outcome within 300 s"
    assert fleet.director_targets("pi-00") == [fleet.targets["1"]]


def test_operator_abort_and_rollback_command(fleet: Fleet) -> None:
    rollout_id = fleet.deploy()
    fleet.engine.tick()
    fleet.store.request(rollout_id, "abort")
    fleet.engine.tick()
    rollout = fleet.store.get(rollout_id)
    assert rollout.state == "aborted" and rollout.abort_reason == "aborted by the operator"
    assert fleet.director_targets("pi-00") == [fleet.targets["1"]]
    with pytest.raises(RolloutError, match="is aborted; expected a paused one"):
        fleet.store.request(rollout_id, "resume")

    back = fleet.store.create_rollback("digits@2", ["pi-03", "pi-04"], selector="test")
    fleet.notified.clear()
    fleet.engine.tick()
    assert sorted(fleet.notified) == ["pi-03", "pi-04"]  # one wave, all at once
    assert fleet.director_targets("pi-04") == [fleet.targets["2"]]
    fleet.event("pi-03", "failed", reason="bad")
    fleet.commit("pi-04")
    fleet.engine.tick()
    fleet.engine.tick()
    rollback = fleet.store.get(back)
    assert rollback.kind == "rollback" and rollback.state == "succeeded"
    assert rollback.counts()["failed"] == 1 and rollback.counts()["rolled-back"] == 0


def test_deploy_validation(fleet: Fleet) -> None:
    fleet.deploy(devices=["pi-00", "pi-01"])
    with pytest.raises(RolloutError, match="'pi-01' is in active rollout 1"):
        fleet.deploy(devices=["pi-01", "pi-02"])
    with pytest.raises(RolloutError, match="expected exactly one"):
        fleet.store.select_devices()
    with pytest.raises(RolloutError, match="'pi-99' not found"):
        fleet.store.select_devices(devices=["pi-99"])
    remove_device(fleet.home, "pi-04")
    with pytest.raises(RolloutError, match="'pi-04' is removed"):
        fleet.store.select_devices(devices=["pi-04"])
    assert fleet.store.select_devices(tag="lab")[0] == fleet.devices[:4]
    with pytest.raises(RolloutError, match="tag nope: no active device"):
        fleet.store.select_devices(tag="nope")
    with pytest.raises(Exception, match=r"digits@9 not found"):
        fleet.store.create_deploy("digits@9", ["pi-03"], selector="x", policy=RolloutPolicy())


def test_a_device_removed_before_its_wave_fails_without_stopping_the_engine(
    fleet: Fleet,
) -> None:
    rollout_id = fleet.deploy(devices=["pi-00", "pi-01"], max_failures_pct=100.0)
    remove_device(fleet.home, "pi-00")
    fleet.engine.tick()
    rollout = fleet.store.get(rollout_id)
    assert rollout.devices[0].status == "failed"
    assert (rollout.devices[0].reason or "").startswith("assignment failed: device 'pi-00' is")
    fleet.engine.tick()
    assert fleet.statuses(rollout_id)["pi-01"] == "updating"
