"""Model delivery over a real mosquitto: a real fleetctl home served by RepositoryServer, the
device's real DeviceUpdateClient on MqttRepositoryFetcher (ngclient verification, grant, decrypt,
load, self-test); another device's director namespace stays out of reach; a stalled controller is
a quick SlowRetrievalError.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.daemon.repofetch import MqttRepositoryFetcher
from agent.pipeline.selftest import run_self_test
from agent.protocol.topics import Topics
from agent.runtime import load_model
from agent.supplychain import errors
from agent.supplychain.store import DeviceState
from agent.supplychain.verify import DeviceUpdateClient
from agent.transport import Backoff
from agent.transport.mqtt import PahoTransport
from tests.mosquitto import Mosquitto
from tools.fleetctl.devices import assign_model, enrol_device
from tools.fleetctl.home import FleetHome
from tools.fleetctl.packing import pack_model
from tools.fleetctl.reposerver import RepositoryServer

pytestmark = [pytest.mark.integration, pytest.mark.inference]

MODEL = Path(__file__).resolve().parents[2] / "tools" / "models" / "digits_int8.tflite"
TIMEOUT = 10.0
TOPICS = Topics()


@dataclass
class Fleet:
    broker: Mosquitto
    home: FleetHome
    bundles: dict[str, Path]
    tmp: Path
    transports: list[PahoTransport]

    def transport(self, client_id: str) -> PahoTransport:
        transport = PahoTransport(
            host=self.broker.host,
            port=self.broker.port,
            client_id=client_id,
            backoff=Backoff(initial=0.05, maximum=0.5),
        )
        self.transports.append(transport)
        return transport

    def device(
        self, device_id: str, *, timeout_s: float = 10.0
    ) -> tuple[MqttRepositoryFetcher, PahoTransport]:
        transport = self.transport(device_id)
        fetcher = MqttRepositoryFetcher(
            transport,
            TOPICS,
            device_id,
            segment_bytes=4096,  # several segments even for a small model
            timeout_s=timeout_s,
            partial_dir=self.tmp / f"{device_id}-partial",
        )
        transport.connect()
        assert transport.wait_subscribed(TIMEOUT)
        return fetcher, transport


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> tuple[FleetHome, dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("fleet")
    home = FleetHome(tmp / "home")
    home.create(image_thresholds={})
    pack_model(home, MODEL, name="digits", version="1.0.0")
    bundles = {}
    for device_id in ("pi-01", "pi-02"):
        bundles[device_id] = tmp / f"{device_id}-bundle"
        enrol_device(home, device_id, out_dir=bundles[device_id])
        assign_model(home, device_id, "digits", "1.0.0")
    return home, bundles


@pytest.fixture
def fleet(tmp_path: Path, home: tuple[FleetHome, dict[str, Path]]) -> Iterator[Fleet]:
    with Mosquitto(tmp_path / "broker") as broker:
        fleet = Fleet(broker, home[0], home[1], tmp_path, [])
        try:
            yield fleet
        finally:
            for transport in fleet.transports:
                transport.disconnect()


def serve(fleet: Fleet) -> RepositoryServer:
    transport = fleet.transport("ctl")
    server = RepositoryServer(fleet.home, transport, TOPICS)  # $share/ctl/... on mosquitto
    server.start()
    transport.connect()
    assert transport.wait_subscribed(TIMEOUT)
    return server


def test_device_installs_its_model_over_mqtt(fleet: Fleet) -> None:
    server = serve(fleet)
    fetcher, _transport = fleet.device("pi-01")
    state = DeviceState(fleet.bundles["pi-01"])
    client = DeviceUpdateClient(state, fetcher, device_id="pi-01")
    plan = client.refresh()
    assert not plan.up_to_date and plan.card.name == "digits"
    verified = client.fetch_and_decrypt(plan)
    model = load_model(bytes(verified.plaintext))
    assert run_self_test(model, plan.card).passed
    state.record_install(verified.installed_target())
    assert verified.ciphertext_file.read_bytes() == state.ciphertext_path(plan.sha256).read_bytes()
    assert hashlib.sha256(verified.plaintext).hexdigest() == plan.image.encryption.plaintext_sha256

    stats = fetcher.stats()
    assert stats.retries == 0 and stats.unknown_responses == 0
    assert stats.requests > plan.length // 4096  # the target went in several segments
    served = server.stats()
    assert served.requests == stats.requests and served.bytes_served == stats.bytes_received
    assert served.not_found == 2 and served.forbidden == 0  # the "no newer root" probes
    assert fetcher.partial_dir is not None and not any(fetcher.partial_dir.iterdir())

    again = DeviceUpdateClient(state, fetcher, device_id="pi-01").refresh()
    assert again.up_to_date


def test_device_cannot_read_another_devices_director(fleet: Fleet) -> None:
    server = serve(fleet)
    fetcher, _transport = fleet.device("pi-01")  # publishes as pi-01 ...
    other = DeviceState(fleet.bundles["pi-02"])
    client = DeviceUpdateClient(other, fetcher, device_id="pi-02")  # ... asks for pi-02's
    with pytest.raises(errors.FetchError, match="not found"):
        client.refresh()
    assert server.stats().forbidden >= 1
    assert server.stats().bytes_served == 0


def test_stalled_controller_is_a_quick_slow_retrieval(fleet: Fleet) -> None:
    ctl = fleet.transport("ctl")  # subscribed, never answers
    ctl.subscribe(TOPICS.controller_filters()["repo/req"], lambda *_a: None, qos=1)
    ctl.connect()
    assert ctl.wait_subscribed(TIMEOUT)
    fetcher, _transport = fleet.device("pi-01", timeout_s=0.5)
    client = DeviceUpdateClient(DeviceState(fleet.bundles["pi-01"]), fetcher, device_id="pi-01")
    with pytest.raises(errors.SlowRetrievalError):
        client.refresh()
    assert fetcher.stats().requests >= 1
