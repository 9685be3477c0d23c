"""Operator views rendered from a populated controller database."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.protocol.messages import (
    ActiveModel,
    EventMessage,
    Hardware,
    LatencyStats,
    StateMessage,
    TelemetryMessage,
    TelemetryMetrics,
)
from tools.fleetctl.ingest import IngestStore
from tools.fleetctl.registry import Registry
from tools.fleetctl.views import (
    RolloutProgress,
    device_detail,
    fleet_rows,
    progress_bar,
    render_device_detail,
    render_devices,
    render_telemetry,
    render_watch,
    rollout_progress,
    telemetry_rows,
)

KEY = "A" * 43 + "="
NOW = 1_700_000_100.0


@pytest.fixture
def store(tmp_path: Path) -> IngestStore:
    path = tmp_path / "registry.sqlite"
    with Registry.open(path, create=True) as registry:
        registry.add_device("pi-01", tags=("lab", "cam"), x25519_public=KEY, ed25519_public=KEY)
        registry.add_device("pi-02", tags=(), x25519_public=KEY, ed25519_public=KEY)
        registry.add_device("old", tags=(), x25519_public=KEY, ed25519_public=KEY)
        registry.remove_device("old")
    s = IngestStore.open(path)
    state = StateMessage(
        online=True,
        boot_id="b1",
        agent_version="0.1.0",
        ts=NOW - 50,
        hardware=Hardware(model="Jetson Orin Nano", arch="aarch64", cpu_count=6),
        active_model=ActiveModel(name="digits", version="2"),
    )
    s.record_state("pi-01", state, NOW - 50)
    for seq, p95 in ((0, 10.0), (1, 12.25)):
        metrics = TelemetryMetrics(
            fps=24.0 + seq,
            model="digits@2",
            latency_ms={"total": LatencyStats(count=10, p95=p95)},
        )
        message = TelemetryMessage(boot_id="b1", seq=seq, ts=NOW - 40 + seq, metrics=metrics)
        s.record_telemetry("pi-01", message, NOW - 40 + seq)
    event = EventMessage(
        boot_id="b1", seq=0, ts=NOW - 30, kind="rolled-back", version="2", reason="p95 too high"
    )
    s.record_event("pi-01", event, NOW - 30, verified=False, verify_error="unsigned")
    return s


def test_fleet_table(store: IngestStore) -> None:
    rows = fleet_rows(store.connection)
    assert [r.id for r in rows] == ["pi-01", "pi-02"]
    first = rows[0]
    assert (first.online, first.model, first.fps, first.p95_ms) == (True, "digits@2", 25.0, 12.25)
    text = render_devices(rows, NOW)
    lines = text.splitlines()
    assert lines[0].split() == [
        "DEVICE",
        "ONLINE",
        "MODEL",
        "FPS",
        "P95",
        "MS",
        "LAST",
        "SEEN",
        "TAGS",
    ]
    assert lines[2].split() == ["pi-01", "yes", "digits@2", "25.0", "12.2", "30s", "ago", "lab,cam"]
    assert lines[3].split() == ["pi-02", "no", "-", "-", "-", "never", "-"]
    all_rows = fleet_rows(store.connection, include_removed=True)
    assert [r.id for r in all_rows] == ["old", "pi-01", "pi-02"]


def test_device_detail(store: IngestStore) -> None:
    detail = device_detail(store.connection, "pi-01")
    assert detail["installed"]["version"] == "2"
    assert detail["assigned"] is None
    assert detail["telemetry"]["seq"] == 1
    assert detail["events"][0]["kind"] == "rolled-back"
    text = render_device_detail(detail, NOW)
    assert "Jetson Orin Nano" in text
    assert "installed  digits@2" in text
    assert "rolled-back" in text and "UNVERIFIED" in text and "p95 too high" in text
    with pytest.raises(LookupError, match="not enrolled"):
        device_detail(store.connection, "ghost")


def test_telemetry_rows_follow_from_a_rowid(store: IngestStore) -> None:
    rows = telemetry_rows(store.connection, "pi-01")
    assert [r["seq"] for r in rows] == [0, 1]
    assert telemetry_rows(store.connection, "pi-01", after_rowid=rows[0]["rowid"])[0]["seq"] == 1
    assert telemetry_rows(store.connection, "pi-01", since=NOW - 39.5)[0]["seq"] == 1
    lines = render_telemetry(rows)
    assert "seq      1" in lines[1] and "p95 12.2 ms" in lines[1]


def test_watch_frame_with_a_rollout(store: IngestStore) -> None:
    assert rollout_progress(store.connection) == []
    rollout = RolloutProgress(name="3:deploy:digits@2", state="running", done=3, total=4, failed=1)
    frame = render_watch(fleet_rows(store.connection), [rollout], NOW)
    assert "devices 2  online 1" in frame
    assert f"{progress_bar(0.75)}  75%  3/4  failed 1" in frame
    assert progress_bar(0.5, width=4) == "[##..]"
    assert "no running rollout" in render_watch([], [], NOW)
