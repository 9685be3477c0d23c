"""The ACL written by ``fleetctl broker config``, enforced by a real mosquitto: each device
certificate writes only its own uplink topics and reads only its own downlink topics.

"Receives nothing" is proven by ordering, not by waiting: the forbidden message is sent first,
then a marker the receiver may see, on the same connection; the marker arriving first (and
alone) shows the forbidden one was dropped."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.protocol.topics import DEVICE_PUBLISHES, Topics
from agent.transport import MessageProperties
from agent.transport.mqtt import PahoTransport, TlsFiles
from tests.mosquitto import Mosquitto, free_port
from tools.fleetctl.cli import main as fleetctl

pytestmark = pytest.mark.integration

TIMEOUT = 10.0
TOPICS = Topics()
Inbox = queue.Queue[tuple[str, bytes, MessageProperties]]


class Fleet:
    """A real mosquitto with the generated config, and transports for the controller and devices."""

    def __init__(self, tmp_path: Path) -> None:
        self.home, self.out = tmp_path / "home", tmp_path / "broker"
        self.tmp_path = tmp_path
        self.port = free_port()
        self.clients: list[PahoTransport] = []
        assert fleetctl(["--home", str(self.home), "init"]) == 0
        argv = ["--home", str(self.home), "broker", "config", "--out", str(self.out)]
        assert fleetctl([*argv, "--port", str(self.port)]) == 0

    def controller(self, client_id: str = "fleetctl") -> PahoTransport:
        tls = TlsFiles(self.out / "ca.crt", self.out / "fleetctl.crt", self.out / "fleetctl.key")
        return self._client(client_id, tls)

    def device(self, device_id: str) -> PahoTransport:
        bundle = self.tmp_path / f"{device_id}-bundle"
        assert (
            fleetctl(["--home", str(self.home), "device", "add", device_id, "--out", str(bundle)])
            == 0
        )
        identity = bundle / "identity"
        tls = TlsFiles(identity / "ca.crt", identity / "client.crt", identity / "client.key")
        return self._client(device_id, tls)

    def _client(self, client_id: str, tls: TlsFiles) -> PahoTransport:
        client = PahoTransport(host="127.0.0.1", port=self.port, client_id=client_id, tls=tls)
        self.clients.append(client)
        return client

    def connect_all(self) -> None:
        for client in self.clients:
            client.connect()
        for client in self.clients:
            assert client.wait_subscribed(TIMEOUT), client.client_id


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path)
    with Mosquitto(tmp_path / "run", config_file=fleet.out / "mosquitto.conf", port=fleet.port):
        try:
            yield fleet
        finally:
            for client in fleet.clients:
                client.disconnect()


def inbox_for(t: PahoTransport, topic_filter: str) -> Inbox:
    inbox: Inbox = queue.Queue()
    t.subscribe(topic_filter, lambda tp, p, pr: inbox.put((tp, p, pr)), qos=1)
    return inbox


def test_a_device_publishes_its_own_uplink_topics(fleet: Fleet) -> None:
    ctl, a = fleet.controller(), fleet.device("dev-a")
    inbox = inbox_for(ctl, f"{TOPICS.prefix}/#")
    fleet.connect_all()
    for kind in DEVICE_PUBLISHES:
        a.publish(TOPICS.device(kind, "dev-a"), kind.encode(), qos=1)
        assert inbox.get(timeout=TIMEOUT)[:2] == (TOPICS.device(kind, "dev-a"), kind.encode())


def test_a_device_cannot_publish_on_another_devices_topics(fleet: Fleet) -> None:
    ctl, a, _b = fleet.controller(), fleet.device("dev-a"), fleet.device("dev-b")
    b_topics = inbox_for(ctl, f"{TOPICS.prefix}/dev/dev-b/#")
    marker = inbox_for(ctl, TOPICS.events("dev-a"))
    fleet.connect_all()
    for kind in (*DEVICE_PUBLISHES, "notify", "repo/resp"):
        a.publish(TOPICS.device(kind, "dev-b"), b"spoofed", qos=1)  # type: ignore[arg-type]
    a.publish(TOPICS.events("dev-a"), b"marker", qos=1)
    assert marker.get(timeout=TIMEOUT)[:2] == (TOPICS.events("dev-a"), b"marker")
    assert b_topics.empty()


def test_a_device_cannot_read_another_devices_downlink(fleet: Fleet) -> None:
    ctl, a, b = fleet.controller(), fleet.device("dev-a"), fleet.device("dev-b")
    a_inbox = inbox_for(a, f"{TOPICS.prefix}/dev/+/notify")  # broader than the ACL allows
    a_resp = inbox_for(a, TOPICS.repo_response("dev-b"))
    a_telemetry = inbox_for(a, TOPICS.telemetry("dev-b"))  # uplink of another device
    b_notify = inbox_for(b, TOPICS.notify("dev-b"))
    b_resp = inbox_for(b, TOPICS.repo_response("dev-b"))
    fleet.connect_all()
    ctl.publish(TOPICS.notify("dev-b"), b"for b", qos=1)
    ctl.publish(TOPICS.repo_response("dev-b"), b"\x00frame for b", qos=1)
    ctl.publish(TOPICS.telemetry("dev-b"), b"b telemetry", qos=1)
    b.publish(TOPICS.telemetry("dev-b"), b"b telemetry", qos=1)
    ctl.publish(TOPICS.notify("dev-a"), b"marker", qos=1)
    assert b_notify.get(timeout=TIMEOUT)[:2] == (TOPICS.notify("dev-b"), b"for b")
    assert b_resp.get(timeout=TIMEOUT)[:2] == (TOPICS.repo_response("dev-b"), b"\x00frame for b")
    assert a_inbox.get(timeout=TIMEOUT)[:2] == (TOPICS.notify("dev-a"), b"marker")
    assert a_inbox.empty() and a_resp.empty()
    # Another connection's denied publish: b's allowed telemetry after it, seen by the
    # controller, shows the broker handled the denied one before the next marker is sent.
    b_seen = inbox_for(ctl, TOPICS.telemetry("dev-b"))
    assert ctl.wait_subscribed(TIMEOUT)
    b.publish(TOPICS.notify("dev-a"), b"denied: b cannot write a's notify", qos=1)
    b.publish(TOPICS.telemetry("dev-b"), b"after", qos=1)
    assert b_seen.get(timeout=TIMEOUT)[:2] == (TOPICS.telemetry("dev-b"), b"after")
    ctl.publish(TOPICS.notify("dev-a"), b"marker 2", qos=1)
    assert a_inbox.get(timeout=TIMEOUT)[:2] == (TOPICS.notify("dev-a"), b"marker 2")
    assert a_telemetry.empty() and a_inbox.empty()


def test_retained_device_state_reaches_a_late_controller(fleet: Fleet) -> None:
    ctl, a = fleet.controller(), fleet.device("dev-a")
    inbox = inbox_for(ctl, TOPICS.fleet_filter("state"))
    fleet.connect_all()
    a.publish(TOPICS.state("dev-a"), b"online", qos=1, retain=True)
    assert inbox.get(timeout=TIMEOUT)[:2] == (TOPICS.state("dev-a"), b"online")
    ctl.disconnect()  # one connection per certificate: the client id is its CN
    late = fleet.controller("fleetctl-late")
    late_inbox = inbox_for(late, TOPICS.fleet_filter("state"))
    late.connect()
    topic, payload, properties = late_inbox.get(timeout=TIMEOUT)
    assert (topic, payload, properties.retain) == (TOPICS.state("dev-a"), b"online", True)
