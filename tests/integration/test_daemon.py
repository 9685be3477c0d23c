"""``edge-agent daemon`` as a subprocess against a real mosquitto and a real fleetctl home.

The device installs v1 (tflite), reports state, telemetry, results and signed events, hot-swaps
to v2 (onnx) after a re-assignment and a Notify without losing a frame, rejects a v3 whose
self-test fails (keeping v2), sends READY/WATCHDOG on ``NOTIFY_SOCKET``, stops on SIGTERM with
a retained offline state, and restarts offline on the committed model from its encrypted store.
The repository is read through ``[update] repository_dir`` (a ``LocalDirectoryFetcher``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.modelcard import card_from_json
from agent.protocol.messages import (
    EventMessage,
    Notify,
    ResultMessage,
    StateMessage,
    TelemetryMessage,
    decode,
    encode,
)
from agent.supplychain.envelope import DEFAULT_SEGMENT_SIZE, encrypt_file, new_content_key
from agent.supplychain.identity import DevicePublicKeys
from agent.supplychain.reports import verify_report
from agent.supplychain.targets import EncryptionInfo, ImageTargetCustom, target_path
from agent.transport.base import MessageProperties
from agent.transport.mqtt import PahoTransport
from tests.mosquitto import Mosquitto, free_port
from tools.fleetctl.devices import assign_model, enrol_device
from tools.fleetctl.home import FleetHome
from tools.fleetctl.packing import image_custom_metadata, pack_model
from tools.videos import MODELS_DIR, load_digits, write_digits_video

pytestmark = pytest.mark.inference

DEVICE = "cam-01"
EDGE_AGENT = Path(sys.executable).parent / "edge-agent"
TIMEOUT = 60.0


class Observer:
    """Everything the broker delivers on the device's topics, decoded, with waits."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, Any, bool]] = []
        self._cond = threading.Condition()
        self.transport = PahoTransport(host="127.0.0.1", port=port, client_id="observer")
        self.transport.subscribe(f"edge/v1/dev/{DEVICE}/#", self._on_message, qos=1)
        self.transport.connect()
        assert self.transport.wait_subscribed(10)

    def _on_message(self, topic: str, payload: bytes, props: MessageProperties) -> None:
        kind = topic.rsplit("/", 1)[-1]
        types: dict[str, Any] = {
            "state": StateMessage,
            "telemetry": TelemetryMessage,
            "results": ResultMessage,
            "events": EventMessage,
        }
        if kind not in types:
            return
        with self._cond:
            self.messages.append((kind, decode(types[kind], payload), props.retain))
            self._cond.notify_all()

    def of(self, kind: str) -> list[Any]:
        with self._cond:
            return [m for k, m, _r in self.messages if k == kind]

    def wait_for(self, kind: str, predicate: Callable[[Any], bool], what: str) -> Any:
        deadline = time.monotonic() + TIMEOUT
        with self._cond:
            while True:
                for k, message, _retain in self.messages:
                    if k == kind and predicate(message):
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out waiting for {what}")
                self._cond.wait(remaining)

    def close(self) -> None:
        self.transport.disconnect()


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(TIMEOUT)
        self.lines: list[str] = []

    def drain(self) -> None:
        """Forget every notification received so far."""
        self.sock.setblocking(False)
        try:
            while self.sock.recv(4096):
                pass
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(TIMEOUT)
        self.lines.clear()

    def wait_for(self, prefix: str) -> str:
        for line in self.lines:
            if line.startswith(prefix):
                return line
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            datagram = self.sock.recv(4096).decode()
            self.lines.extend(datagram.splitlines())
            for line in datagram.splitlines():
                if line.startswith(prefix):
                    return line
        raise AssertionError(f"no {prefix!r} notification")


def pack_without_selftest(home: FleetHome, model: Path, card: Any, version: str) -> None:
    """Pack a model whose card fails its own self-test (pack_model refuses such cards)."""
    data = model.read_bytes()
    card = dataclasses.replace(
        card, version=version, sha256=hashlib.sha256(data).hexdigest(), size=len(data)
    )
    path = target_path(card.name, version, card.format)
    key = new_content_key()
    ciphertext = home.root / "bad.enc"
    info = encrypt_file(io.BytesIO(data), ciphertext, key, segment_size=DEFAULT_SEGMENT_SIZE)
    custom = ImageTargetCustom(
        card=card,
        encryption=EncryptionInfo(
            scheme="stream-chacha20poly1305-v1",
            segment_size=info.segment_size,
            plaintext_sha256=info.plaintext_sha256,
            plaintext_length=info.plaintext_length,
        ),
    )
    home.image().add_target(path, ciphertext, image_custom_metadata(custom))
    with home.registry() as registry:
        registry.add_model(
            name=card.name,
            version=version,
            format=card.format,
            target_path=path,
            plaintext_sha256=info.plaintext_sha256,
            plaintext_size=info.plaintext_length,
            ciphertext_sha256=info.ciphertext_sha256,
            ciphertext_size=info.ciphertext_length,
            card=card.to_dict(),
            content_key=key,
        )


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker") as mosquitto:
        yield mosquitto


def write_config(bundle: Path, *, port: int, video: Path, repo: Path) -> Path:
    config = bundle / "agent.toml"
    config.write_text(
        f'[device]\nid = "{DEVICE}"\nstate_dir = "{bundle}"\n'
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\nreconnect_min_s = 0.2\nreconnect_max_s = 1\n'
        f'[source]\nspec = "{video}"\nloop = true\nrealtime = true\n'
        '[results]\npolicy = "every"\nqos = 1\n'
        "[telemetry]\ninterval_s = 1\n"
        f'[update]\nwatch_s = 1.5\npoll_interval_s = 3600\nrepository_dir = "{repo}"\n'
    )
    return config


def start_daemon(config: Path, notify: NotifySocket, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"}
    env.pop("WATCHDOG_PID", None)
    with log.open("ab") as stream:
        return subprocess.Popen(
            [str(EDGE_AGENT), "daemon", "--config", str(config), "--log-level", "DEBUG"],
            stdout=subprocess.DEVNULL,
            stderr=stream,
            env=env,
        )


def test_daemon_installs_swaps_rejects_and_restarts_offline(
    tmp_path: Path, broker: Mosquitto
) -> None:
    home = FleetHome(tmp_path / "home")
    home.create(image_thresholds={"root": (1, 1), "targets": (1, 1)})
    pack_model(home, MODELS_DIR / "digits_int8.tflite", name="digits", version="1.0.0")
    pack_model(home, MODELS_DIR / "digits_int8.onnx", name="digits", version="2.0.0")
    card = card_from_json((MODELS_DIR / "digits_int8.onnx.card.json").read_text())
    wrong = dataclasses.replace(card.selftest[0], expected=(), expected_argmax=6)
    bad_card = dataclasses.replace(card, name="digits", selftest=(wrong,))
    pack_without_selftest(home, MODELS_DIR / "digits_int8.onnx", bad_card, "3.0.0")
    bundle = tmp_path / "bundle"
    enrol = enrol_device(home, DEVICE, out_dir=bundle)
    public = DevicePublicKeys.from_dict(
        json.loads((bundle / "device.json").read_text())["public_keys"]
    )
    assert enrol.has_private_keys
    assign_model(home, DEVICE, "digits", "1.0.0")
    images, _labels = load_digits()
    video = write_digits_video(tmp_path / "digits.avi", images[:60], fps=10)
    config = write_config(bundle, port=broker.port, video=video, repo=home.repo_dir)
    notify = NotifySocket(tmp_path / "notify.sock")
    observer = Observer(broker.port)
    log = tmp_path / "daemon.log"
    daemon = start_daemon(config, notify, log)
    try:
        # -- v1 installed and reported
        notify.wait_for("READY=1")
        committed = observer.wait_for(
            "events", lambda e: e.kind == "committed" and e.version == "1.0.0", "v1 committed"
        )
        report = verify_report(committed.report, public.ed25519_key())
        assert report["device_id"] == DEVICE and report["kind"] == "committed"
        kinds = [e.kind for e in observer.of("events")]
        assert kinds[:5] == ["refreshing", "fetching", "verified", "activated", "committed"]
        assert [e.seq for e in observer.of("events")] == list(range(len(kinds)))
        observer.wait_for(
            "state",
            lambda s: s.online and s.active_model is not None and s.active_model.version == "1.0.0",
            "online state with v1",
        )
        observer.wait_for(
            "telemetry",
            lambda t: t.metrics.model == "digits@1.0.0" and t.metrics.frames > 0,
            "v1 telemetry",
        )
        notify.wait_for("WATCHDOG=1")

        # -- hot swap to v2 after a re-assignment and a Notify
        assign_model(home, DEVICE, "digits", "2.0.0")
        observer.transport.publish(
            f"edge/v1/dev/{DEVICE}/notify", encode(Notify(ts=time.time())), qos=1
        )
        observer.wait_for(
            "events", lambda e: e.kind == "committed" and e.version == "2.0.0", "v2 committed"
        )
        first_v2 = observer.wait_for("results", lambda r: r.model_version == "2.0.0", "v2 result")
        results = observer.of("results")
        frames = [r.result["frame"] for r in results]
        switch = frames.index(first_v2.result["frame"])
        assert results[switch - 1].model_version == "1.0.0"
        window = frames[max(0, switch - 10) : switch + 10]
        missing = set(range(window[0], window[-1] + 1)) - set(window)
        if missing:  # real-time mode drops stale frames under load; they must be counted
            last = observer.of("telemetry")[-1].seq
            observer.wait_for("telemetry", lambda t: t.seq > last, "telemetry after the swap")
            drops = sum(t.metrics.drops for t in observer.of("telemetry"))
            assert len(missing) <= drops, f"frames {sorted(missing)} lost, {drops} drops counted"
        assert [r.seq for r in results] == list(range(len(results)))
        telemetry = observer.of("telemetry")
        assert [t.seq for t in telemetry] == list(range(len(telemetry)))
        assert {t.metrics.model for t in telemetry} <= {"digits@1.0.0", "digits@2.0.0"}

        # -- v3 fails its self-test: reported, remembered, v2 keeps running
        assign_model(home, DEVICE, "digits", "3.0.0")
        observer.transport.publish(
            f"edge/v1/dev/{DEVICE}/notify", encode(Notify(ts=time.time())), qos=1
        )
        failed = observer.wait_for("events", lambda e: e.kind == "failed", "v3 failed")
        assert failed.version == "3.0.0" and failed.previous_version == "2.0.0"
        assert failed.reason is not None and failed.reason.startswith("self-test failed: vector")
        count = len(observer.of("results"))
        observer.wait_for(
            "results",
            lambda r: r.model_version == "2.0.0" and r.seq > count + 10,
            "v2 still running",
        )
        assert "3.0.0" not in (bundle / "installed.json").read_text()
        assert json.loads((bundle / "failed-targets.json").read_text())

        # -- SIGTERM: exit 0, retained offline state
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        observer.wait_for("state", lambda s: not s.online, "offline state")
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        observer.close()

    # -- restart with no broker: the committed v2 runs from the encrypted store
    write_config(bundle, port=free_port(), video=video, repo=tmp_path / "no-repo")
    notify.drain()
    daemon = start_daemon(config, notify, log)
    try:
        notify.wait_for("READY=1")
        status = notify.wait_for("STATUS=running digits@2.0.0")
        assert status.endswith(", offline")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
