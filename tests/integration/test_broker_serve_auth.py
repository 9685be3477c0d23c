"""``fleetctl serve``'s embedded broker: device logins from the registry, reloads, loopback only."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.daemon.config import load_config
from agent.protocol.topics import Topics
from tests.unit.test_embedded_broker import RawClient
from tools.fleetctl import FleetctlError
from tools.fleetctl.broker_acl import CONTROLLER_PASSWORD_FILE, verify_password
from tools.fleetctl.devices import enrol_device, remove_device, reset_broker_password
from tools.fleetctl.home import FleetHome
from tools.fleetctl.serve import ControllerService, ServeError, ServeOptions

pytestmark = pytest.mark.integration

TOPICS = Topics()


def _password(bundle: Path) -> str:
    return (bundle / "identity" / "broker-password").read_text().strip()


@pytest.fixture
def home(tmp_path: Path) -> FleetHome:
    root = tmp_path / "home"
    subprocess.run(
        [sys.executable, "-m", "tools.fleetctl.cli", "--home", str(root), "init"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return FleetHome(root)


def test_bundle_holds_the_password_and_the_registry_only_its_hash(
    home: FleetHome, tmp_path: Path
) -> None:
    bundle = enrol_device(home, "pi-01", out_dir=tmp_path / "b1").bundle
    path = bundle / "identity" / "broker-password"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_config(bundle / "agent.toml").mqtt.password_file == "broker-password"
    with sqlite3.connect(home.registry_path) as db:
        (stored,) = db.execute("SELECT password_hash FROM broker_credentials").fetchone()
    password = _password(bundle)
    assert password not in stored and verify_password(stored, password.encode())
    with pytest.raises(FleetctlError, match="controller"):
        enrol_device(home, "fleetctl", out_dir=tmp_path / "b2")


def test_devices_log_in_with_their_bundle_password_only(home: FleetHome, tmp_path: Path) -> None:
    bundle = enrol_device(home, "pi-01", out_dir=tmp_path / "b1").bundle
    options = ServeOptions(listen=("127.0.0.1", 0), metrics_port=0, connect_timeout_s=10)
    service = ControllerService(home, options)
    service.start()
    try:
        port = service.broker.port
        assert (home.root / CONTROLLER_PASSWORD_FILE).stat().st_mode & 0o077 == 0
        assert RawClient(port).connect("pi-01") == 5  # anonymous
        assert RawClient(port).connect("pi-01", login=("pi-01", "guess")) == 4
        assert RawClient(port).connect("pi-02", login=("pi-01", _password(bundle))) == 2
        device = RawClient(port)
        assert device.connect("pi-01", login=("pi-01", _password(bundle))) == 0

        # enrolled while serving: accepted after the reload; removed: cut off and refused
        late = enrol_device(home, "pi-02", out_dir=tmp_path / "b2").bundle
        assert service.reload_broker_auth()
        assert RawClient(port).connect("pi-02", login=("pi-02", _password(late))) == 0
        remove_device(home, "pi-01")
        assert service.reload_broker_auth()
        assert device.closed_by_broker()
        assert RawClient(port).connect("pi-01", login=("pi-01", _password(bundle))) == 4
        assert not service.reload_broker_auth()  # nothing changed since

        # a new password replaces the old one
        new = reset_broker_password(home, "pi-02")
        assert service.reload_broker_auth()
        assert RawClient(port).connect("pi-02", login=("pi-02", _password(late))) == 4
        assert RawClient(port).connect("pi-02", login=("pi-02", new)) == 0
    finally:
        service.stop()


def test_the_controller_reads_device_uplinks_through_the_acl(
    home: FleetHome, tmp_path: Path
) -> None:
    a = enrol_device(home, "pi-01", out_dir=tmp_path / "b1").bundle
    enrol_device(home, "pi-02", out_dir=tmp_path / "b2")
    options = ServeOptions(listen=("127.0.0.1", 0), metrics_port=0, connect_timeout_s=10)
    service = ControllerService(home, options)
    service.start()
    try:
        device = RawClient(service.broker.port)
        assert device.connect("pi-01", login=("pi-01", _password(a))) == 0
        device.subscribe(TOPICS.notify("pi-02"))  # granted, but filtered at delivery
        device.subscribe(TOPICS.notify("pi-01"))
        assert service.notify("pi-02") and service.notify("pi-01")
        topic, _payload, _qos, _mid = device.receive()
        assert topic == TOPICS.notify("pi-01")
    finally:
        service.stop()


def test_a_non_loopback_listen_needs_insecure_listen(home: FleetHome) -> None:
    options = ServeOptions(listen=("0.0.0.0", 0), metrics_port=0)
    with pytest.raises(ServeError, match="insecure-listen"):
        ControllerService(home, options).start()
    insecure = ServeOptions(
        listen=("0.0.0.0", 0), metrics_port=0, insecure_listen=True, connect_timeout_s=10
    )
    service = ControllerService(home, insecure)
    service.start()
    try:
        assert service.transport is not None and service.transport.wait_connected(10)
    finally:
        service.stop()
