"""``fleetctl broker config`` against a real mosquitto: the generated config starts, the
controller certificate reads and writes the whole prefix (shared subscriptions included), and
clients without a fleet certificate are refused. Device bundles get client certificates."""

from __future__ import annotations

import json
import queue
import socket
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent.daemon.config import config_from_toml
from agent.protocol.topics import Topics
from agent.transport import MessageProperties
from agent.transport.base import Will
from agent.transport.mqtt import PahoTransport, TlsFiles
from tests.mosquitto import Mosquitto, free_port
from tools.fleetctl.broker_acl import verify_password
from tools.fleetctl.cli import main as fleetctl
from tools.fleetctl.registry import Registry

pytestmark = pytest.mark.integration

TIMEOUT = 10.0
TOPICS = Topics()
Inbox = queue.Queue[tuple[str, bytes, MessageProperties]]
# MQTT 3.1.1 CONNECT, client id "x", keepalive 30
CONNECT_311 = bytes.fromhex("100d00044d5154540402001e000178")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[dict[str, Any]]:
    home, out = tmp_path / "home", tmp_path / "broker"
    assert fleetctl(["--home", str(home), "init"]) == 0
    port = free_port()
    argv = ["--home", str(home), "broker", "config", "--out", str(out), "--port", str(port)]
    assert fleetctl([*argv, "--json"]) == 0
    with Mosquitto(tmp_path / "run", config_file=out / "mosquitto.conf", port=port) as broker:
        yield {"home": home, "out": out, "broker": broker, "port": port}


def controller(fleet: dict[str, Any], client_id: str = "fleetctl") -> PahoTransport:
    out = fleet["out"]
    tls = TlsFiles(out / "ca.crt", out / "fleetctl.crt", out / "fleetctl.key")
    return PahoTransport(host="127.0.0.1", port=fleet["port"], client_id=client_id, tls=tls)


def inbox_for(t: PahoTransport, topic_filter: str) -> Inbox:
    inbox: Inbox = queue.Queue()
    t.subscribe(topic_filter, lambda tp, p, pr: inbox.put((tp, p, pr)), qos=1)
    return inbox


def test_files_and_permissions(fleet: dict[str, Any]) -> None:
    out, home = fleet["out"], fleet["home"]
    for key in (home / "pki" / "ca.key", out / "server.key", out / "fleetctl.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    conf = (out / "mosquitto.conf").read_text()
    for line in (
        f"listener {fleet['port']}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "allow_anonymous false",
        "persistence false",
        f"acl_file {out / 'acl'}",
    ):
        assert f"\n{line}\n" in conf
    acl = (out / "acl").read_text().splitlines()
    writable, readable = TOPICS.device_acl_patterns(placeholder="%u")
    assert [f"pattern write {t}" for t in writable] + [f"pattern read {t}" for t in readable] == [
        line for line in acl if line.startswith("pattern ")
    ]
    server = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_running_config_again_keeps_the_ca(fleet: dict[str, Any], capsys: Any) -> None:
    ca_before = (fleet["home"] / "pki" / "ca.crt").read_bytes()
    capsys.readouterr()
    argv = ["--home", str(fleet["home"]), "broker", "config", "--out", str(fleet["out"])]
    assert fleetctl([*argv, "--host", "broker.example", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ca_created"] is False and summary["hosts"] == ["broker.example"]
    assert (fleet["home"] / "pki" / "ca.crt").read_bytes() == ca_before
    assert fleetctl([*argv, "--host", "bad host!"]) == 2


def test_controller_reads_and_writes_the_whole_prefix(fleet: dict[str, Any]) -> None:
    # One connection per certificate (the client id is the CN); `fleetctl serve`'s shared
    # subscriptions on mosquitto are exercised by the simulated fleets (tests/sim).
    ctl = controller(fleet)
    everything = inbox_for(ctl, f"{TOPICS.prefix}/#")
    ctl.connect()
    try:
        assert ctl.wait_subscribed(TIMEOUT)
        for kind in ("state", "telemetry", "notify", "repo/resp"):
            ctl.publish(TOPICS.device(kind, "pi-07"), kind.encode(), qos=1)
            assert everything.get(timeout=TIMEOUT)[:2] == (
                TOPICS.device(kind, "pi-07"),
                kind.encode(),
            )
    finally:
        ctl.disconnect()


def test_a_device_cannot_kick_another_off_with_its_client_id(
    fleet: dict[str, Any], tmp_path: Path
) -> None:
    home = str(fleet["home"])
    clients = {}
    for device_id in ("pi-01", "pi-02"):
        bundle = tmp_path / device_id
        assert fleetctl(["--home", home, "device", "add", device_id, "--out", str(bundle)]) == 0
        identity = bundle / "identity"
        clients[device_id] = TlsFiles(
            identity / "ca.crt", identity / "client.crt", identity / "client.key"
        )
    will = Will(TOPICS.state("pi-02"), b"offline", qos=1)
    victim = PahoTransport(
        host="127.0.0.1", port=fleet["port"], client_id="pi-02", tls=clients["pi-02"], will=will
    )
    # pi-01's certificate, pi-02's client id: the broker uses the CN (pi-01) as client id.
    impostor = PahoTransport(
        host="127.0.0.1", port=fleet["port"], client_id="pi-02", tls=clients["pi-01"]
    )
    ctl = controller(fleet)
    inbox = inbox_for(ctl, f"{TOPICS.prefix}/#")
    ctl.connect()
    victim.connect()
    try:
        assert ctl.wait_subscribed(TIMEOUT) and victim.wait_connected(TIMEOUT)
        impostor.connect()
        assert impostor.wait_connected(TIMEOUT)
        impostor.publish(TOPICS.telemetry("pi-01"), b"impostor here", qos=1)
        victim.publish(TOPICS.telemetry("pi-02"), b"still here", qos=1)
        expected = {
            (TOPICS.telemetry("pi-02"), b"still here"),
            (TOPICS.telemetry("pi-01"), b"impostor here"),  # in its own name only
        }
        seen: list[tuple[str, bytes]] = []
        while not expected <= set(seen):
            seen.append(inbox.get(timeout=TIMEOUT)[:2])
        assert (TOPICS.state("pi-02"), b"offline") not in seen  # pi-02 was never kicked off
    finally:
        impostor.disconnect()
        victim.disconnect()
        ctl.disconnect()


def tls_connect(port: int, ctx: ssl.SSLContext) -> bytes:
    """Handshake, send CONNECT and return what the broker answers (b'' or an error: refused)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(CONNECT_311)
                return tls.recv(4)
        except (ssl.SSLError, ConnectionError):
            return b""


def test_clients_without_a_fleet_certificate_are_refused(
    fleet: dict[str, Any], tmp_path: Path
) -> None:
    out = fleet["out"]
    ctx = ssl.create_default_context(cafile=str(out / "ca.crt"))
    assert tls_connect(fleet["port"], ctx) == b""  # no client certificate
    other_home = tmp_path / "other"
    assert fleetctl(["--home", str(other_home), "init"]) == 0
    assert (
        fleetctl(["--home", str(other_home), "broker", "config", "--out", str(tmp_path / "o")]) == 0
    )
    ctx.load_cert_chain(tmp_path / "o" / "fleetctl.crt", tmp_path / "o" / "fleetctl.key")
    assert tls_connect(fleet["port"], ctx) == b""  # a certificate from another CA
    good = ssl.create_default_context(cafile=str(out / "ca.crt"))
    good.load_cert_chain(out / "fleetctl.crt", out / "fleetctl.key")
    assert tls_connect(fleet["port"], good) == b"\x20\x02\x00\x00"  # CONNACK accepted


def test_device_bundle_gets_a_client_certificate(fleet: dict[str, Any], tmp_path: Path) -> None:
    bundle = tmp_path / "pi-01-bundle"
    home = str(fleet["home"])
    assert fleetctl(["--home", home, "device", "add", "pi-01", "--out", str(bundle)]) == 0
    identity = bundle / "identity"
    assert stat.S_IMODE((identity / "client.key").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((identity / "client.crt").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=pi-01"
    ca = x509.load_pem_x509_certificate((identity / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    config = config_from_toml((bundle / "agent.toml").read_text())
    assert config.mqtt.url == "mqtts://localhost:8883" or config.mqtt.url.startswith("mqtts://")
    assert (config.mqtt.ca, config.mqtt.cert, config.mqtt.key) == (
        "ca.crt",
        "client.crt",
        "client.key",
    )
    # The device connects with exactly these files.
    tls = TlsFiles(identity / "ca.crt", identity / "client.crt", identity / "client.key")
    device = PahoTransport(host="127.0.0.1", port=fleet["port"], client_id="pi-01", tls=tls)
    ctl = controller(fleet)
    inbox = inbox_for(ctl, TOPICS.fleet_filter("telemetry"))
    ctl.connect()
    device.connect()
    try:
        assert ctl.wait_subscribed(TIMEOUT) and device.wait_connected(TIMEOUT)
        device.publish(TOPICS.telemetry("pi-01"), b"hello", qos=1)
        assert inbox.get(timeout=TIMEOUT)[:2] == (TOPICS.telemetry("pi-01"), b"hello")
    finally:
        device.disconnect()
        ctl.disconnect()


def test_no_ca_no_certificates(tmp_path: Path) -> None:
    home, bundle = tmp_path / "home", tmp_path / "b"
    assert fleetctl(["--home", str(home), "init"]) == 0
    assert fleetctl(["--home", str(home), "device", "add", "pi-02", "--out", str(bundle)]) == 0
    assert not (bundle / "identity" / "client.crt").exists()
    assert config_from_toml((bundle / "agent.toml").read_text()).mqtt.url == "mqtt://localhost:1883"


def test_issue_a_certificate_for_a_device_enrolled_before_the_ca(tmp_path: Path) -> None:
    home, out = str(tmp_path / "home"), tmp_path / "cert"
    assert fleetctl(["--home", home, "init"]) == 0
    assert fleetctl(["--home", home, "device", "add", "pi-03", "--out", str(tmp_path / "b")]) == 0
    assert fleetctl(["--home", home, "broker", "issue", "pi-03", "--out", str(out)]) == 2  # no CA
    assert fleetctl(["--home", home, "broker", "config", "--out", str(tmp_path / "broker")]) == 0
    assert fleetctl(["--home", home, "broker", "issue", "pi-99", "--out", str(out)]) == 2
    assert fleetctl(["--home", home, "broker", "issue", "pi-03", "--out", str(out)]) == 0
    cert = x509.load_pem_x509_certificate((out / "client.crt").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((out / "ca.crt").read_bytes()))
    assert cert.subject.rfc4514_string() == "CN=pi-03"
    assert stat.S_IMODE((out / "client.key").stat().st_mode) == 0o600


def device_context(bundle: Path, ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(bundle / "identity" / "client.crt", bundle / "identity" / "client.key")
    return ctx


def test_removed_device_is_refused_after_the_crl_reaches_mosquitto(
    fleet: dict[str, Any], tmp_path: Path, capsys: Any
) -> None:
    home, out, port = str(fleet["home"]), fleet["out"], fleet["port"]
    broker: Mosquitto = fleet["broker"]
    bundles = {d: tmp_path / f"{d}-bundle" for d in ("pi-a", "pi-b")}
    for device_id, bundle in bundles.items():
        assert fleetctl(["--home", home, "device", "add", device_id, "--out", str(bundle)]) == 0
    assert f"crlfile {out / 'crl.pem'}\n" in (out / "mosquitto.conf").read_text()
    accepted = b"\x20\x02\x00\x00"
    contexts = {d: device_context(b, out / "ca.crt") for d, b in bundles.items()}
    assert tls_connect(port, contexts["pi-a"]) == accepted
    assert tls_connect(port, contexts["pi-b"]) == accepted

    capsys.readouterr()
    assert fleetctl(["--home", home, "device", "remove", "pi-a"]) == 0
    assert "restart mosquitto" in capsys.readouterr().out
    assert (
        fleetctl(["--home", home, "broker", "config", "--out", str(out), "--port", str(port)]) == 0
    )
    crl = x509.load_pem_x509_crl((out / "crl.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    serial_a = x509.load_pem_x509_certificate(
        (bundles["pi-a"] / "identity" / "client.crt").read_bytes()
    ).serial_number
    assert [entry.serial_number for entry in crl] == [serial_a]

    broker.restart()
    assert tls_connect(port, contexts["pi-a"]) == b""  # revoked: the handshake fails
    assert tls_connect(port, contexts["pi-b"]) == accepted
    assert tls_connect(port, contexts["pi-b"]) == accepted


def test_every_certificate_of_a_removed_device_is_revoked(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    assert fleetctl(["--home", home, "init"]) == 0
    assert fleetctl(["--home", home, "broker", "config", "--out", str(tmp_path / "broker")]) == 0
    crl_path = tmp_path / "home" / "pki" / "crl.pem"
    empty = x509.load_pem_x509_crl(crl_path.read_bytes())
    assert list(empty) == []
    assert fleetctl(["--home", home, "device", "add", "pi-c", "--out", str(tmp_path / "b")]) == 0
    reissued = tmp_path / "again"
    assert fleetctl(["--home", home, "broker", "issue", "pi-c", "--out", str(reissued)]) == 0
    serials = {
        x509.load_pem_x509_certificate(path.read_bytes()).serial_number
        for path in (tmp_path / "b" / "identity" / "client.crt", reissued / "client.crt")
    }
    assert fleetctl(["--home", home, "device", "remove", "pi-c"]) == 0
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    assert {entry.serial_number for entry in crl} == serials
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    previous = empty.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == previous + 1
    assert crl.next_update_utc is not None and crl.next_update_utc > crl.last_update_utc
    assert fleetctl(["--home", home, "broker", "issue", "pi-c", "--out", str(reissued)]) == 2


def bundle_url(home: str, device_id: str, out: Path, *extra: str) -> str:
    assert fleetctl(["--home", home, "device", "add", device_id, "--out", str(out), *extra]) == 0
    return config_from_toml((out / "agent.toml").read_text()).mqtt.url


def test_mqtt_url_defaults_follow_the_fleet_ca_and_an_explicit_url_wins(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    assert fleetctl(["--home", home, "init"]) == 0
    assert bundle_url(home, "pi-10", tmp_path / "b10") == "mqtt://localhost:1883"
    explicit = ["--mqtt-url", "mqtt://10.0.0.5:1884"]
    assert bundle_url(home, "pi-11", tmp_path / "b11", *explicit) == "mqtt://10.0.0.5:1884"
    broker_argv = ["broker", "config", "--out", str(tmp_path / "broker"), "--port", "9883"]
    assert fleetctl(["--home", home, *broker_argv, "--host", "broker.example"]) == 0
    assert bundle_url(home, "pi-12", tmp_path / "b12") == "mqtts://broker.example:9883"
    # The URL that used to be the default is kept as given, not replaced by the TLS broker.
    given = ["--mqtt-url", "mqtt://localhost:1883"]
    assert bundle_url(home, "pi-13", tmp_path / "b13", *given) == "mqtt://localhost:1883"


def test_broker_password_gives_an_enrolled_device_a_new_login(tmp_path: Path) -> None:
    home, out = str(tmp_path / "home"), tmp_path / "pw"
    assert fleetctl(["--home", home, "init"]) == 0
    assert fleetctl(["--home", home, "device", "add", "pi-04", "--out", str(tmp_path / "b")]) == 0
    assert fleetctl(["--home", home, "broker", "password", "pi-99", "--out", str(out)]) == 2
    assert fleetctl(["--home", home, "broker", "password", "pi-04", "--out", str(out)]) == 0
    password = (out / "broker-password").read_text().strip()
    assert stat.S_IMODE((out / "broker-password").stat().st_mode) == 0o600
    assert password != (tmp_path / "b" / "identity" / "broker-password").read_text().strip()
    with Registry.open(Path(home) / "registry.sqlite") as registry:
        assert verify_password(registry.broker_credentials()["pi-04"], password.encode())
