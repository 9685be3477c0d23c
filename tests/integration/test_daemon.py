"""``edge-agent daemon`` as a subprocess against a real mosquitto and a real fleetctl home.

The repository is read over MQTT (:class:`~agent.daemon.repofetch.MqttRepositoryFetcher`)
from a real :class:`~tools.fleetctl.reposerver.RepositoryServer` serving the home, as in
production. The device installs v1 (tflite), reports state, telemetry, results and signed
events, hot-swaps to v2 (onnx) after a re-assignment and a Notify without losing a frame,
rejects a v3 whose self-test fails (keeping v2), sends READY/WATCHDOG on ``NOTIFY_SOCKET``,
stops on SIGTERM with a retained offline state, and restarts offline on the committed model from
its encrypted store. A second run: a corrupt partial download is discarded and fetched again,
SIGHUP applies a new ``[results]`` policy without touching the model, and a version that fails
the post-activation watch (``max_latency_ms``) is rolled back to the committed one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
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

from agent.modelcard import card_from_json, card_to_json
from agent.protocol.messages import (
    EventMessage,
    Notify,
    ResultMessage,
    StateMessage,
    TelemetryMessage,
    decode,
    encode,
)
from agent.protocol.topics import Topics
from agent.supplychain.identity import DevicePublicKeys
from agent.supplychain.reports import verify_report
from agent.transport.base import MessageProperties
from agent.transport.mqtt import PahoTransport
from tests.mosquitto import Mosquitto, free_port
from tools.fleetctl.devices import assign_model, enrol_device
from tools.fleetctl.home import FleetHome
from tools.fleetctl.packing import pack_model
from tools.fleetctl.reposerver import RepositoryServer
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
    """A datagram socket standing in for systemd's NOTIFY_SOCKET, read by a thread.

    Reading continuously matters: a unix datagram queue holds few messages, and a sender
    blocks when it is full.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                datagram = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.lines.extend(datagram.splitlines())
                self._cond.notify_all()

    def drain(self) -> None:
        """Forget every notification received so far."""
        with self._cond:
            self.lines.clear()

    def wait_for(self, prefix: str) -> str:
        def found() -> str | None:
            return next((line for line in self.lines if line.startswith(prefix)), None)

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, TIMEOUT):
                raise AssertionError(f"no {prefix!r} notification")
            line = found()
            assert line is not None
            return line

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker") as mosquitto:
        yield mosquitto


@pytest.fixture
def home(tmp_path: Path) -> FleetHome:
    home = FleetHome(tmp_path / "home")
    home.create(image_thresholds={"root": (1, 1), "targets": (1, 1)})
    return home


@pytest.fixture
def server(home: FleetHome, broker: Mosquitto) -> Iterator[RepositoryServer]:
    """The controller's repository server on the broker, as ``fleetctl serve`` runs it."""
    transport = PahoTransport(host="127.0.0.1", port=broker.port, client_id="fleet-ctl")
    server = RepositoryServer(home, transport, Topics())
    server.start()
    transport.connect()
    try:
        assert transport.wait_subscribed(10)
        yield server
    finally:
        server.stop()
        transport.disconnect()


def write_config(
    bundle: Path, *, port: int, video: Path, results: str = 'policy = "every"', update: str = ""
) -> Path:
    config = bundle / "agent.toml"
    config.write_text(
        f'[device]\nid = "{DEVICE}"\nstate_dir = "{bundle}"\n'
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\nreconnect_min_s = 0.2\nreconnect_max_s = 1\n'
        f'[source]\nspec = "{video}"\nloop = true\nrealtime = true\n'
        f"[results]\n{results}\nqos = 1\n"
        "[telemetry]\ninterval_s = 1\n"
        f"[update]\nwatch_s = 1.5\npoll_interval_s = 3600\n{update}\n"
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
    tmp_path: Path, broker: Mosquitto, home: FleetHome, server: RepositoryServer
) -> None:
    pack_model(home, MODELS_DIR / "digits_int8.tflite", name="digits", version="1.0.0")
    pack_model(home, MODELS_DIR / "digits_int8.onnx", name="digits", version="2.0.0")
    card = card_from_json((MODELS_DIR / "digits_int8.onnx.card.json").read_text())
    wrong = dataclasses.replace(card.selftest[0], expected=(), expected_argmax=6)
    bad_card = tmp_path / "bad.card.json"
    bad_card.write_text(card_to_json(dataclasses.replace(card, selftest=(wrong,))))
    pack_model(
        home,
        MODELS_DIR / "digits_int8.onnx",
        name="digits",
        version="3.0.0",
        card_path=bad_card,
        warn=lambda _message: None,
        allow_failing_selftest=True,
    )
    bundle = tmp_path / "bundle"
    enrol = enrol_device(home, DEVICE, out_dir=bundle)
    public = DevicePublicKeys.from_dict(
        json.loads((bundle / "device.json").read_text())["public_keys"]
    )
    assert enrol.has_private_keys
    assign_model(home, DEVICE, "digits", "1.0.0")
    images, _labels = load_digits()
    video = write_digits_video(tmp_path / "digits.avi", images[:60], fps=10)
    config = write_config(bundle, port=broker.port, video=video)
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
        signed = verify_report(failed.report, public.ed25519_key())
        assert (signed["reason"], signed["previous_version"]) == (failed.reason, "2.0.0")
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
    assert server.stats().ok > 0 and server.stats().forbidden == 0
    write_config(bundle, port=free_port(), video=video)
    notify.drain()
    daemon = start_daemon(config, notify, log)
    try:
        notify.wait_for("READY=1")
        status = notify.wait_for("STATUS=running digits@2.0.0")
        assert status.endswith(", offline")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        notify.close()


def test_daemon_refetches_a_corrupt_partial_reloads_on_sighup_and_rolls_back(
    tmp_path: Path, broker: Mosquitto, home: FleetHome, server: RepositoryServer
) -> None:
    v1 = pack_model(home, MODELS_DIR / "digits_int8.tflite", name="digits", version="1.0.0")
    v2 = pack_model(home, MODELS_DIR / "digits_int8.onnx", name="digits", version="2.0.0")
    bundle = tmp_path / "bundle"
    enrol_device(home, DEVICE, out_dir=bundle)
    assign_model(home, DEVICE, "digits", "1.0.0")
    # a torn partial download of v1 (as a crash mid-download leaves it), with wrong bytes
    image = home.image()
    ciphertext = image.target_file(image.get_target(v1.record.target_path))  # type: ignore[arg-type]
    repo_path = ciphertext.relative_to(home.repo_dir).as_posix()
    partial = bundle / "partial" / f"{hashlib.sha256(repo_path.encode()).hexdigest()}.part"
    partial.parent.mkdir(mode=0o700)
    partial.write_bytes(b"\xaa" * 4096)
    images, _labels = load_digits()
    video = write_digits_video(tmp_path / "digits.avi", images[:60], fps=10)
    config = write_config(bundle, port=broker.port, video=video)
    notify = NotifySocket(tmp_path / "notify.sock")
    observer = Observer(broker.port)
    log = tmp_path / "daemon.log"
    daemon = start_daemon(config, notify, log)
    try:
        # -- the resumed download fails its hash check; the partial is dropped, v1 fetched again
        observer.wait_for(
            "events", lambda e: e.kind == "committed" and e.version == "1.0.0", "v1 committed"
        )
        assert "failed" not in [e.kind for e in observer.of("events")]
        assert "discarding partial downloads" in log.read_text()
        assert not partial.exists()

        # -- SIGHUP: results at most every 2 s from now on, the model keeps running
        observer.wait_for("results", lambda r: r.model_version == "1.0.0", "v1 results")
        activations = [e for e in observer.of("events") if e.kind == "activated"]
        write_config(
            bundle, port=broker.port, video=video, results='policy = "interval"\ninterval_s = 2'
        )
        daemon.send_signal(signal.SIGHUP)
        notify.wait_for("STATUS=settings reloaded")
        reloaded_at = time.time()
        observer.wait_for(
            "results",
            lambda r: len([x for x in observer.of("results") if x.ts > reloaded_at]) >= 3,
            "three results after the reload",
        )
        after = [r for r in observer.of("results") if r.ts > reloaded_at]
        gaps = [b.ts - a.ts for a, b in itertools.pairwise(after)]
        assert min(gaps) >= 1.9, f"results {gaps} s apart; expected the 2 s interval policy"
        assert {r.model_version for r in after} == {"1.0.0"}
        assert [e for e in observer.of("events") if e.kind == "activated"] == activations
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()

    # -- restart with a p95 ceiling no model meets: v2 is activated, watched and rolled back
    write_config(bundle, port=broker.port, video=video, update="max_latency_ms = 0.1")
    daemon = start_daemon(config, notify, log)
    try:
        observer.wait_for(
            "events",
            lambda e: e.kind == "up-to-date" and e.version == "1.0.0",
            "v1 up to date after the restart",
        )
        assign_model(home, DEVICE, "digits", "2.0.0")
        observer.transport.publish(
            f"edge/v1/dev/{DEVICE}/notify", encode(Notify(ts=time.time())), qos=1
        )
        rolled = observer.wait_for("events", lambda e: e.kind == "rolled-back", "v2 rolled back")
        assert rolled.version == "2.0.0" and rolled.previous_version == "1.0.0"
        assert rolled.reason is not None and rolled.reason.startswith("p95 latency")
        kinds = [e.kind for e in observer.of("events") if e.boot_id == rolled.boot_id]
        assert kinds[kinds.index("fetching") :] == [
            "fetching",
            "verified",
            "activated",
            "rolled-back",
        ]
        last = max(r.seq for r in observer.of("results") if r.boot_id == rolled.boot_id)
        observer.wait_for(
            "results",
            lambda r: r.boot_id == rolled.boot_id and r.seq > last and r.model_version == "1.0.0",
            "v1 running again",
        )
        installed = json.loads((bundle / "installed.json").read_text())
        assert installed["current"]["version"] == "1.0.0"
        failed = json.loads((bundle / "failed-targets.json").read_text())
        assert [entry["version"] for entry in failed.values()] == ["2.0.0"]
        assert v2.record.target_path in failed[next(iter(failed))]["target"]
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        observer.close()
        notify.close()
