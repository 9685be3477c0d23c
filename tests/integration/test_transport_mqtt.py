"""PahoTransport against a real mosquitto: round trips on MQTT 5 and 3.1.1, retained state,
Last Will, reconnect + resubscribe after a broker restart, 3.1.1 fallback, mutual TLS and ACLs."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.protocol.messages import StateMessage, decode, encode
from agent.protocol.topics import Topics
from agent.transport import Backoff, MessageProperties
from agent.transport.mqtt import PahoTransport, ProtocolChoice, TlsFiles
from tests.mosquitto import Mosquitto

pytestmark = pytest.mark.integration

TIMEOUT = 10.0
TOPICS = Topics()
Inbox = queue.Queue[tuple[str, bytes, MessageProperties]]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker") as mosquitto:
        yield mosquitto


def fast_backoff() -> Backoff:
    return Backoff(initial=0.05, maximum=0.5)


def transport(
    host: str, port: int, client_id: str, *, protocol: ProtocolChoice = "auto", **kw: object
) -> PahoTransport:
    return PahoTransport(
        host=host,
        port=port,
        client_id=client_id,
        protocol=protocol,
        backoff=fast_backoff(),
        **kw,  # type: ignore[arg-type]
    )


def inbox_for(t: PahoTransport, topic_filter: str) -> Inbox:
    inbox: Inbox = queue.Queue()
    t.subscribe(topic_filter, lambda tp, p, pr: inbox.put((tp, p, pr)), qos=1)
    return inbox


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_round_trip(broker: Mosquitto, protocol: ProtocolChoice) -> None:
    sub = transport(broker.host, broker.port, "sub", protocol=protocol)
    pub = transport(broker.host, broker.port, "pub", protocol=protocol)
    inbox = inbox_for(sub, "edge/v1/dev/+/telemetry")
    sub.connect()
    pub.connect()
    try:
        assert sub.wait_subscribed(TIMEOUT) and pub.wait_connected(TIMEOUT)
        assert sub.protocol_version == protocol
        payloads = [os.urandom(n) for n in (0, 1, 1000, 300_000)]
        for payload in payloads:
            pub.publish(TOPICS.telemetry("d1"), payload, qos=1)
        for payload in payloads:
            topic, got, props = inbox.get(timeout=TIMEOUT)
            assert (topic, got, props.qos, props.retain) == (
                "edge/v1/dev/d1/telemetry",
                payload,
                1,
                False,
            )
        assert pub.stats().messages_out == 4 and sub.stats().messages_in == 4
    finally:
        sub.disconnect()
        pub.disconnect()
    assert not sub.is_connected


def test_retained_state_reaches_a_late_subscriber(broker: Mosquitto) -> None:
    dev = transport(broker.host, broker.port, "d1")
    dev.connect()
    birth = encode(StateMessage(online=True, boot_id="b1", agent_version="0.1.0"))
    assert dev.wait_connected(TIMEOUT)
    dev.publish(TOPICS.state("d1"), birth, qos=1, retain=True)
    dev.disconnect()  # clean: no will, the retained birth stays
    ctl = transport(broker.host, broker.port, "ctl")
    inbox = inbox_for(ctl, TOPICS.fleet_filter("state"))
    ctl.connect()
    try:
        topic, payload, props = inbox.get(timeout=TIMEOUT)
        assert topic == TOPICS.state("d1") and props.retain
        assert decode(StateMessage, payload).online
    finally:
        ctl.disconnect()


DEVICE_SCRIPT = """
import sys
from agent.protocol.messages import StateMessage, encode
from agent.transport import Will
from agent.transport.mqtt import PahoTransport
host, port, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3]
will = Will(topic=topic, payload=encode(StateMessage(online=False, boot_id="b9")), qos=1)
t = PahoTransport(host=host, port=port, client_id="d9", will=will)
t.on_connected(lambda _s: t.publish(
    topic, encode(StateMessage(online=True, boot_id="b9", agent_version="0.1.0")), qos=1,
    retain=True))
t.connect()
assert t.wait_connected(10)
print("connected", flush=True)
sys.stdin.read()
"""


def test_last_will_fires_when_the_device_process_is_killed(broker: Mosquitto) -> None:
    ctl = transport(broker.host, broker.port, "ctl")
    inbox = inbox_for(ctl, TOPICS.state("d9"))
    ctl.connect()
    assert ctl.wait_subscribed(TIMEOUT)
    device = subprocess.Popen(
        [sys.executable, "-c", DEVICE_SCRIPT, broker.host, str(broker.port), TOPICS.state("d9")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert device.stdout is not None
        assert device.stdout.readline() == b"connected\n"
        _t, online, _p = inbox.get(timeout=TIMEOUT)
        assert decode(StateMessage, online).online
        device.send_signal(signal.SIGKILL)
        device.wait(timeout=TIMEOUT)
        _t, will, _p = inbox.get(timeout=TIMEOUT)
        offline = decode(StateMessage, will)
        assert not offline.online and offline.boot_id == "b9"
    finally:
        device.kill()
        device.wait()
        ctl.disconnect()


def test_reconnect_and_resubscribe_after_a_broker_restart(broker: Mosquitto) -> None:
    dev = transport(broker.host, broker.port, "d1")
    connects: queue.Queue[bool] = queue.Queue()
    drops: queue.Queue[str] = queue.Queue()
    dev.on_connected(connects.put)
    dev.on_disconnected(drops.put)
    inbox = inbox_for(dev, TOPICS.notify("d1"))
    dev.connect()
    ctl = transport(broker.host, broker.port, "ctl")
    ctl.connect()
    try:
        assert connects.get(timeout=TIMEOUT) is False
        broker.restart()  # no persistence: the broker forgot every subscription
        assert drops.get(timeout=TIMEOUT)
        assert connects.get(timeout=TIMEOUT) is False
        assert dev.wait_subscribed(TIMEOUT) and ctl.wait_connected(TIMEOUT)
        ctl.publish(TOPICS.notify("d1"), b'{"ts":1}', qos=1)
        topic, payload, _p = inbox.get(timeout=TIMEOUT)
        assert (topic, payload) == (TOPICS.notify("d1"), b'{"ts":1}')
        assert dev.stats().reconnects == 1
    finally:
        dev.disconnect()
        ctl.disconnect()


class V311OnlyGate:
    """A TCP front for mosquitto that behaves like an MQTT 3.1.1-only broker.

    A CONNECT with protocol level 5 gets the 3.1.1 answer "refused: unacceptable protocol
    version" (CONNACK 0x20 0x02 0x00 0x01); any other connection is relayed to the real broker.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.refused_v5 = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _addr = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_exact(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _serve(self, conn: socket.socket) -> None:
        try:
            head = self._read_exact(conn, 1)
            length, multiplier, raw_len = 0, 1, b""
            while True:
                byte = self._read_exact(conn, 1)
                raw_len += byte
                length += (byte[0] & 0x7F) * multiplier
                multiplier *= 128
                if not byte[0] & 0x80:
                    break
            body = self._read_exact(conn, length)
            name_len = int.from_bytes(body[:2], "big")
            level = body[2 + name_len]
            if level == 5:
                self.refused_v5 += 1
                conn.sendall(b"\x20\x02\x00\x01")
                conn.close()
                return
            upstream = socket.create_connection(self.upstream)
            upstream.sendall(head + raw_len + body)
        except (OSError, ConnectionError, IndexError):
            conn.close()
            return
        for src, dst in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def test_auto_falls_back_to_311_when_the_broker_refuses_mqtt5(broker: Mosquitto) -> None:
    gate = V311OnlyGate((broker.host, broker.port))
    dev = transport("127.0.0.1", gate.port, "d1")
    inbox = inbox_for(dev, "loop/#")
    dev.connect()
    try:
        assert dev.wait_subscribed(TIMEOUT)
        assert dev.protocol_version == "3.1.1" and gate.refused_v5 == 1
        dev.publish("loop/1", b"hello", qos=1)
        assert inbox.get(timeout=TIMEOUT)[1] == b"hello"
    finally:
        dev.disconnect()
        gate.close()


# ---- mutual TLS and ACLs -------------------------------------------------------------------------


def _write_pem(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_pki(directory: Path, clients: list[str]) -> None:
    """A throwaway CA, a server certificate for 127.0.0.1 and one client certificate per name."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test fleet CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write_pem(directory / "ca", ca_key, ca)

    def leaf(name: str, san: x509.GeneralName | None) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
        _write_pem(directory / name, key, builder.sign(ca_key, hashes.SHA256()))

    leaf("server", x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    for name in clients:
        leaf(name, None)


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[Mosquitto, Path]]:
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki, ["d1", "ctl"])
    acl = tmp_path / "acl"
    writable, readable = TOPICS.device_acl_patterns(placeholder="%u")
    acl.write_text(
        "user ctl\ntopic readwrite edge/v1/#\n\n"
        + "".join(f"pattern write {t}\n" for t in writable)
        + "".join(f"pattern read {t}\n" for t in readable)
    )
    config = [
        f"cafile {pki / 'ca.crt'}",
        f"certfile {pki / 'server.crt'}",
        f"keyfile {pki / 'server.key'}",
        "require_certificate true",
        "use_identity_as_username true",
        f"acl_file {acl}",
    ]
    with Mosquitto(tmp_path / "broker", extra_config=config, allow_anonymous=False) as mosquitto:
        yield mosquitto, pki


def test_mutual_tls_with_per_device_acl(tls_broker: tuple[Mosquitto, Path]) -> None:
    broker, pki = tls_broker

    def tls_for(name: str) -> TlsFiles:
        return TlsFiles(
            ca_file=pki / "ca.crt", cert_file=pki / f"{name}.crt", key_file=pki / f"{name}.key"
        )

    dev = transport(broker.host, broker.port, "d1", tls=tls_for("d1"))
    ctl = transport(broker.host, broker.port, "ctl", tls=tls_for("ctl"))
    dev_inbox = inbox_for(dev, "edge/v1/dev/+/notify")  # broader than the ACL lets through
    ctl_inbox = inbox_for(ctl, "$share/ctl/edge/v1/dev/+/telemetry")
    dev.connect()
    ctl.connect()
    try:
        assert dev.wait_subscribed(TIMEOUT) and ctl.wait_subscribed(TIMEOUT)
        # Order is kept per connection, so a message the ACL let through would arrive first.
        dev.publish(TOPICS.telemetry("d2"), b"spoofed", qos=1)  # dropped by the ACL
        dev.publish(TOPICS.telemetry("d1"), b"mine", qos=1)
        assert ctl_inbox.get(timeout=TIMEOUT)[:2] == (TOPICS.telemetry("d1"), b"mine")
        ctl.publish(TOPICS.notify("d2"), b"not for d1", qos=1)  # not delivered to d1
        ctl.publish(TOPICS.notify("d1"), b"nudge", qos=1)
        assert dev_inbox.get(timeout=TIMEOUT)[:2] == (TOPICS.notify("d1"), b"nudge")
        assert ctl_inbox.empty() and dev_inbox.empty()
    finally:
        dev.disconnect()
        ctl.disconnect()
