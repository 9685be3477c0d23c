"""`fleetctl serve` nudges a device when another process (`fleetctl assign`) re-assigns it."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from agent.protocol.messages import Notify, decode
from agent.protocol.topics import Topics
from agent.transport.memory import MemoryBroker, MemoryTransport
from tools.fleetctl.devices import assign_model, enrol_device
from tools.fleetctl.home import FleetHome
from tools.fleetctl.serve import ControllerService, ServeOptions


def _add_model(home: FleetHome, version: str) -> None:
    path = f"models/digits/{version}/model.tflite.enc"
    info = home.image().add_target(path, os.urandom(256), {"model": {"name": "digits"}})
    with home.registry() as registry:
        registry.add_model(
            name="digits",
            version=version,
            format="tflite",
            target_path=path,
            plaintext_sha256="00" * 32,
            plaintext_size=200,
            ciphertext_sha256=info.hashes["sha256"],
            ciphertext_size=info.length,
            card={},
            content_key=os.urandom(32),
        )


def test_new_assignments_are_notified_once_and_old_ones_never(tmp_path: Path) -> None:
    home = FleetHome(tmp_path / "home")
    home.create(image_thresholds={})
    for version in ("1", "2"):
        _add_model(home, version)
    for device_id in ("pi-01", "pi-02", "pi-03"):
        enrol_device(home, device_id, tags=(), out_dir=tmp_path / device_id)
    assign_model(home, "pi-01", "digits", "1")  # before the controller starts: not news

    service = ControllerService(home, ServeOptions(broker_url="mqtt://127.0.0.1:1"))
    broker = MemoryBroker()
    service.transport = MemoryTransport(broker=broker, client_id="ctl")
    service.transport.connect()
    listener = MemoryTransport(broker=broker, client_id="watcher")
    listener.connect()
    received: list[str] = []
    done = threading.Event()

    def on_notify(topic: str, payload: bytes, _props: object) -> None:
        decode(Notify, payload)
        received.append(Topics().parse(topic).device_id)
        if len(received) == 2:
            done.set()

    listener.subscribe("edge/v1/dev/+/notify", on_notify, qos=1)
    try:
        assert service.notify_new_assignments() == []
        assign_model(home, "pi-02", "digits", "2")
        assign_model(home, "pi-03", "digits", "1")
        assign_model(home, "pi-02", "digits", "1")
        assert service.notify_new_assignments() == ["pi-02", "pi-03"]
        assert done.wait(5.0)
        assert sorted(received) == ["pi-02", "pi-03"]
        assert service.notify_new_assignments() == []
        # A device the rollout engine already nudged is not nudged twice for the same change.
        assign_model(home, "pi-01", "digits", "2")
        service.notify_director_changed("pi-01")
        assert service.notify_new_assignments() == []
    finally:
        service.store.close()
