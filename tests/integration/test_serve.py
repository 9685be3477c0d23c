"""``fleetctl serve`` as a real subprocess on a real mosquitto, fed by a scripted device."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
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
    encode,
)
from agent.protocol.topics import Topics
from agent.supplychain.identity import DeviceIdentity
from agent.supplychain.reports import sign_report
from agent.transport.base import Will
from agent.transport.mqtt import PahoTransport
from tests.mosquitto import Mosquitto, free_port

pytestmark = pytest.mark.integration

TOPICS = Topics()
BOOT = "5f0c2a9e"


def fleetctl(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.fleetctl.cli", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


class Controller:
    """``fleetctl serve`` in a subprocess; ``ready`` is set on its "serving" log line."""

    def __init__(self, home: Path, broker: Mosquitto, metrics_port: int) -> None:
        self.ready = threading.Event()
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tools.fleetctl.cli",
                "--home",
                str(home),
                "serve",
                "--broker",
                f"mqtt://{broker.host}:{broker.port}",
                "--metrics-port",
                str(metrics_port),
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if '"controller ' in line and " serving " in line:
                self.ready.set()
        self.ready.set()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Path, Mosquitto, Controller, int]]:
    home = tmp_path / "home"
    ok(fleetctl(home, "init"))
    ok(fleetctl(home, "device", "add", "pi-01", "--tag", "lab", "--out", str(tmp_path / "b1")))
    ok(fleetctl(home, "device", "add", "pi-02", "--out", str(tmp_path / "b2")))
    metrics_port = free_port()
    with Mosquitto(tmp_path / "broker") as broker:
        controller = Controller(home, broker, metrics_port)
        try:
            assert controller.ready.wait(60), "".join(controller.lines)
            assert controller.process.poll() is None, "".join(controller.lines)
            yield home, broker, controller, metrics_port
        finally:
            if controller.process.poll() is None:
                controller.process.send_signal(signal.SIGTERM)
            controller.process.wait(timeout=30)


def telemetry(seq: int) -> bytes:
    stats = LatencyStats(count=300, p50=8.0, p95=11.5, p99=14.0, max=20.0)
    metrics = TelemetryMetrics(
        interval_s=10.0, fps=30.0, frames=300, model="digits@1", latency_ms={"total": stats}
    )
    return encode(TelemetryMessage(boot_id=BOOT, seq=seq, ts=time.time(), metrics=metrics))


def committed_event(identity: DeviceIdentity, seq: int) -> bytes:
    event = EventMessage(
        boot_id=BOOT, seq=seq, ts=time.time(), kind="committed", target="image/t.enc", version="1"
    )
    report = {
        "device_id": "pi-01",
        "kind": event.kind,
        "target": event.target,
        "version": event.version,
        "sha256": "ab" * 32,
        "boot_id": BOOT,
        "seq": seq,
        "ts": event.ts,
    }
    signed = EventMessage(**{**vars(event), "report": sign_report(report, identity.ed25519)})
    return encode(signed)


def wait_for(home: Path, query: str, expected: object, timeout: float = 30.0) -> None:
    """Wait until ``query`` on the controller's database returns ``expected``."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    value: object = None
    while time.monotonic() < deadline:
        db = sqlite3.connect(home / "registry.sqlite", timeout=5)
        try:
            value = db.execute(query).fetchone()[0]
        except sqlite3.OperationalError:  # tables not created yet
            value = None
        finally:
            db.close()
        if value == expected:
            return
        pause.wait(0.05)
    raise AssertionError(f"{query}: expected {expected!r}, still {value!r}")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
    return text


def test_serve_ingests_a_device_and_exports_metrics(
    fleet: tuple[Path, Mosquitto, Controller, int], tmp_path: Path
) -> None:
    home, broker, controller, metrics_port = fleet
    identity = DeviceIdentity.load(tmp_path / "b1" / "identity")
    offline = encode(StateMessage(online=False, boot_id=BOOT))
    device = PahoTransport(
        host=broker.host,
        port=broker.port,
        client_id="pi-01",
        will=Will(TOPICS.state("pi-01"), offline),
    )
    device.connect()
    assert device.wait_connected(10)
    try:
        birth = StateMessage(
            online=True,
            boot_id=BOOT,
            agent_version="0.1.0",
            ts=time.time(),
            backends=("tflite",),
            hardware=Hardware(model="Raspberry Pi 4 Model B", arch="aarch64", cpu_count=4),
            active_model=ActiveModel(name="digits", version="1", backend="tflite"),
        )
        device.publish(TOPICS.state("pi-01"), encode(birth), qos=1, retain=True)
        for seq in (0, 1, 2, 2):  # the repeat is an outbox replay
            device.publish(TOPICS.telemetry("pi-01"), telemetry(seq), qos=1)
        device.publish(TOPICS.events("pi-01"), committed_event(identity, 0), qos=1)
        wait_for(home, "SELECT COUNT(*) FROM events WHERE verified = 1", 1)
        wait_for(home, "SELECT COUNT(*) FROM telemetry WHERE device_id = 'pi-01'", 3)

        # A broker restart (it publishes the device's will: offline); both sides reconnect,
        # the device's birth comes back, telemetry after it arrives without seq gaps.
        broker.restart()
        assert device.wait_connected(30)
        wait_for(home, "SELECT online FROM device_state WHERE device_id = 'pi-01'", 0)
        device.publish(TOPICS.state("pi-01"), encode(birth), qos=1, retain=True)
        wait_for(home, "SELECT online FROM device_state WHERE device_id = 'pi-01'", 1)
        for seq in (3, 4):
            device.publish(TOPICS.telemetry("pi-01"), telemetry(seq), qos=1)
        wait_for(home, "SELECT COUNT(*) FROM telemetry WHERE device_id = 'pi-01'", 5)
        gaps = (
            "SELECT COUNT(*) FROM (SELECT seq - LAG(seq) OVER (ORDER BY seq) AS step"
            " FROM telemetry WHERE device_id = 'pi-01' AND boot_id = '5f0c2a9e') WHERE step > 1"
        )
        wait_for(home, gaps, 0)

        devices = json.loads(ok(fleetctl(home, "devices", "--json")))
        by_id = {d["id"]: d for d in devices}
        assert by_id["pi-01"]["online"] is True
        assert by_id["pi-01"]["model"] == "digits@1"
        assert by_id["pi-01"]["p95_ms"] == 11.5
        assert by_id["pi-01"]["tags"] == ["lab"]
        assert by_id["pi-02"]["online"] is False and by_id["pi-02"]["model"] is None

        detail = json.loads(ok(fleetctl(home, "device", "show", "pi-01", "--json")))
        assert detail["hardware"]["model"] == "Raspberry Pi 4 Model B"
        assert [e["kind"] for e in detail["events"]] == ["committed"]
        assert detail["events"][0]["verified"] is True
        assert detail["telemetry"]["seq"] == 4

        rows = ok(fleetctl(home, "telemetry", "pi-01", "--json")).splitlines()
        assert [json.loads(r)["seq"] for r in rows] == [0, 1, 2, 3, 4]
        frame = ok(fleetctl(home, "watch", "--once"))
        assert "pi-01" in frame and "digits@1" in frame and "online 1" in frame

        metrics = scrape(metrics_port)
        assert "fleet_devices_online 1.0" in metrics
        assert 'fleet_devices{model="digits",version="1"} 1.0' in metrics
        assert 'fleet_devices{model="none",version="none"} 1.0' in metrics
        assert 'fleet_inference_latency_p95_ms{model="digits",version="1"} 11.5' in metrics
        assert "fleet_ingest_duplicates_total" in metrics
        assert 'fleet_ingest_messages_total{kind="events"} 1.0' in metrics
    finally:
        device.disconnect()

    controller.process.send_signal(signal.SIGTERM)
    assert controller.process.wait(timeout=30) == 0, "".join(controller.lines)
    records = [json.loads(line) for line in controller.lines if line.startswith("{")]
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert any(r["msg"] == "controller stopped" for r in records)


def test_device_show_of_unknown_device_is_one_line_error(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ok(fleetctl(home, "init"))
    result = fleetctl(home, "device", "show", "nope")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not enrolled" in result.stderr
