"""Per-device isolation on the running fleet, with a device's own certificate and the real ACL.

Device A (dev-01's credentials, its agent stopped meanwhile: mosquitto allows one connection
per certificate) tries to speak for B (dev-02), to read B's repository answers,
and to fetch B's director metadata (its grant) through its own, allowed request topic.
"""

from __future__ import annotations

import queue
import secrets
import time
from collections.abc import Iterator

import pytest

from agent.protocol.framing import FrameStatus, RepoFrame, decode_frame
from agent.protocol.messages import RepoRequest, TelemetryMessage, TelemetryMetrics, encode
from agent.protocol.topics import Topics
from agent.transport.base import MessageHandler, MessageProperties
from agent.transport.mqtt import PahoTransport, TlsFiles
from tools.fleetsim import Fleet

pytestmark = [pytest.mark.integration, pytest.mark.sim]

TOPICS = Topics()
TIMEOUT = 30.0


def _client(fleet: Fleet, device_id: str) -> PahoTransport:
    identity = fleet.device_dir(device_id) / "identity"
    tls = TlsFiles(
        ca_file=identity / "ca.crt",
        cert_file=identity / "client.crt",
        key_file=identity / "client.key",
    )
    # mosquitto makes the certificate's CN the client id: one connection per device.
    client = PahoTransport(host="127.0.0.1", port=fleet.port, client_id=device_id, tls=tls)
    client.connect()
    assert client.wait_connected(TIMEOUT)
    return client


@pytest.fixture
def clients(mosquitto_fleet: Fleet) -> Iterator[tuple[PahoTransport, PahoTransport]]:
    """Connections with dev-01's and dev-02's certificates, while their agents are stopped."""
    probed = ("dev-01", "dev-02")
    for device_id in probed:
        mosquitto_fleet.stop_device(device_id)
    a = _client(mosquitto_fleet, "dev-01")
    b = _client(mosquitto_fleet, "dev-02")
    try:
        yield a, b
    finally:
        a.disconnect()
        b.disconnect()
        for device_id in probed:
            mosquitto_fleet.start_device(device_id)


def _request(client: PahoTransport, device_id: str, path: str) -> bytes:
    request = RepoRequest(request_id=secrets.token_hex(16), path=path, offset=0, length=65536)
    client.publish(TOPICS.repo_request(device_id), encode(request), qos=1)
    return request.request_id_bytes


def _answer(inbox: queue.Queue[bytes], request_id: bytes) -> RepoFrame:
    deadline = time.monotonic() + TIMEOUT
    while True:
        frame = decode_frame(inbox.get(timeout=max(0.01, deadline - time.monotonic())))
        if frame.request_id == request_id:
            return frame


def test_a_device_cannot_act_as_another_or_read_its_grant(
    mosquitto_fleet: Fleet, clients: tuple[PahoTransport, PahoTransport]
) -> None:
    fleet = mosquitto_fleet
    a, b = clients
    own: queue.Queue[bytes] = queue.Queue()
    stolen: queue.Queue[bytes] = queue.Queue()
    b_inbox: queue.Queue[bytes] = queue.Queue()

    def into(box: queue.Queue[bytes]) -> MessageHandler:
        def handler(_topic: str, payload: bytes, _props: MessageProperties) -> None:
            box.put(payload)

        return handler

    a.subscribe(TOPICS.repo_response("dev-01"), into(own), qos=1)
    a.subscribe(TOPICS.repo_response("dev-02"), into(stolen), qos=1)
    b.subscribe(TOPICS.repo_response("dev-02"), into(b_inbox), qos=1)
    a.wait_subscribed(TIMEOUT)
    assert b.wait_subscribed(TIMEOUT)

    # A forges telemetry and a repository request in B's name: the broker drops both.
    forged = TelemetryMessage(
        boot_id="forged0000", seq=0, ts=time.time(), metrics=TelemetryMetrics(interval_s=1.0)
    )
    a.publish(TOPICS.telemetry("dev-02"), encode(forged), qos=1)
    _request(a, "dev-02", "director/dev-02/metadata/timestamp.json")

    # A asks for B's director metadata on its own topic: the controller refuses.
    refused = _answer(own, _request(a, "dev-01", "director/dev-02/metadata/1.root.json"))
    assert refused.status is not FrameStatus.OK
    # B's own request is answered to B; A, subscribed to B's answers, receives nothing.
    assert (
        _answer(b_inbox, _request(b, "dev-02", "director/dev-02/metadata/1.root.json")).status
        is FrameStatus.OK
    )
    # A's own director metadata is served (the refusal above is about whose it is).
    assert (
        _answer(own, _request(a, "dev-01", "director/dev-01/metadata/1.root.json")).status
        is FrameStatus.OK
    )

    assert stolen.empty()
    assert fleet.query("SELECT COUNT(*) FROM telemetry WHERE boot_id = 'forged0000'") == [(0,)]
    legit = b_inbox.qsize()
    assert legit == 0  # B got exactly its one answer (consumed above), not A's forged request's
