"""The embedded MQTT 3.1.1 broker against real clients: ``PahoTransport`` and raw sockets
speaking MQTT bytes (for wills, takeovers, malformed packets and unacknowledged deliveries).

Loopback sockets only; "nothing else arrived" is shown by ordering (a marker sent afterwards on
the same path arrives first), never by sleeping."""

from __future__ import annotations

import os
import queue
import socket
import struct
from collections.abc import Iterator

import pytest

from agent.protocol.topics import Topics
from agent.transport import MessageProperties
from agent.transport.mqtt import PahoTransport
from tools.fleetctl.broker import BrokerAuth, BrokerError, EmbeddedBroker, fleet_acl_rules
from tools.fleetctl.broker_acl import hash_password, verify_password

TIMEOUT = 10.0
TOPICS = Topics()
Inbox = queue.Queue[tuple[str, bytes, MessageProperties]]


# ---- a raw MQTT 3.1.1 client ------------------------------------------------------------------


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _length(len(body)) + body


def _str(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


class RawClient:
    """Just enough MQTT to drive the broker byte by byte."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.mid = 0

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError("broker closed the connection")
            data += chunk
        return data

    def read(self) -> tuple[int, int, bytes]:
        first = self._exactly(1)[0]
        length, shift = 0, 0
        while True:
            digit = self._exactly(1)[0]
            length |= (digit & 0x7F) << shift
            shift += 7
            if not digit & 0x80:
                break
        return first >> 4, first & 0x0F, self._exactly(length)

    def closed_by_broker(self) -> bool:
        """True once the broker closed the socket (reads until EOF)."""
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return True

    def connect(
        self,
        client_id: str,
        *,
        keepalive: int = 60,
        will: tuple[str, bytes] | None = None,
        login: tuple[str, str] | None = None,
        level: int = 4,
    ) -> int:
        flags = 0x02
        payload = _str(client_id)
        if will is not None:
            flags |= 0x04 | 0x08  # will, QoS 1
            payload += _str(will[0]) + _str(will[1])
        if login is not None:
            flags |= 0xC0
            payload += _str(login[0]) + _str(login[1])
        body = _str("MQTT") + bytes((level, flags)) + struct.pack("!H", keepalive) + payload
        self.send(_packet(0x10, body))
        kind, _flags, ack = self.read()
        assert kind == 2
        return ack[1]

    def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        self.mid += 1
        self.send(_packet(0x82, struct.pack("!H", self.mid) + _str(topic_filter) + bytes((qos,))))
        kind, _flags, ack = self.read()
        assert kind == 9
        return ack[2]

    def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> None:
        """Publish and, for QoS 1, wait for the PUBACK (the broker routed it by then)."""
        self.mid += 1
        mid = struct.pack("!H", self.mid) if qos else b""
        self.send(_packet(0x30 | qos << 1, _str(topic) + mid + payload))
        if qos:
            kind, _flags, ack = self.read()
            assert (kind, ack) == (4, mid)

    def receive(self) -> tuple[str, bytes, int, int]:
        """Next PUBLISH: (topic, payload, qos, packet id)."""
        kind, flags, body = self.read()
        assert kind == 3, kind
        n = struct.unpack("!H", body[:2])[0]
        topic, rest = body[2 : 2 + n].decode(), body[2 + n :]
        qos = (flags >> 1) & 3
        mid = struct.unpack("!H", rest[:2])[0] if qos else 0
        return topic, rest[2:] if qos else rest, qos, mid

    def puback(self, mid: int) -> None:
        self.send(_packet(0x40, struct.pack("!H", mid)))


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(port=0) as b:
        yield b


def client(broker: EmbeddedBroker, client_id: str, **kw: object) -> PahoTransport:
    return PahoTransport(host="127.0.0.1", port=broker.port, client_id=client_id, **kw)  # type: ignore[arg-type]


def inbox_for(t: PahoTransport, topic_filter: str) -> Inbox:
    inbox: Inbox = queue.Queue()
    t.subscribe(topic_filter, lambda tp, p, pr: inbox.put((tp, p, pr)), qos=1)
    return inbox


@pytest.fixture
def pair(broker: EmbeddedBroker) -> Iterator[tuple[PahoTransport, PahoTransport]]:
    sub, pub = client(broker, "sub"), client(broker, "pub")
    yield sub, pub
    sub.disconnect()
    pub.disconnect()


# ---- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("qos", [0, 1])
def test_round_trip_with_paho_transport(
    pair: tuple[PahoTransport, PahoTransport], qos: int
) -> None:
    sub, pub = pair
    inbox = inbox_for(sub, "a/+/c")
    sub.connect()
    pub.connect()
    assert sub.wait_subscribed(TIMEOUT) and pub.wait_connected(TIMEOUT)
    assert sub.protocol_version == "3.1.1"  # MQTT 5 was refused, the transport fell back
    pub.publish("a/b/c", b"hello", qos=qos)  # type: ignore[arg-type]
    topic, payload, properties = inbox.get(timeout=TIMEOUT)
    assert (topic, payload, properties.qos, properties.retain) == ("a/b/c", b"hello", qos, False)


def test_binary_payload_of_one_mib_is_intact(pair: tuple[PahoTransport, PahoTransport]) -> None:
    sub, pub = pair
    inbox = inbox_for(sub, "blob")
    sub.connect()
    pub.connect()
    assert sub.wait_subscribed(TIMEOUT) and pub.wait_connected(TIMEOUT)
    blob = os.urandom(1024 * 1024)
    pub.publish("blob", blob, qos=1)
    assert inbox.get(timeout=TIMEOUT)[1] == blob


def test_retained_messages_reach_late_subscribers_and_empty_clears(broker: EmbeddedBroker) -> None:
    pub = RawClient(broker.port)
    assert pub.connect("pub") == 0
    pub.publish("r/one", b"1", qos=1)
    pub.send(_packet(0x33, _str("r/two") + b"\x00\x09" + b"2"))  # QoS 1, retained
    assert pub.read()[0] == 4
    pub.send(_packet(0x33, _str("r/three") + b"\x00\x0a" + b"3"))
    assert pub.read()[0] == 4
    pub.send(_packet(0x33, _str("r/three") + b"\x00\x0b"))  # empty retained payload clears
    assert pub.read()[0] == 4
    late = RawClient(broker.port)
    assert late.connect("late") == 0
    assert late.subscribe("r/#") == 1
    topic, payload, qos, _mid = late.receive()
    assert (topic, payload, qos) == ("r/two", b"2", 1)
    pub.publish("r/one", b"live", qos=1)
    assert late.receive()[:2] == ("r/one", b"live")  # r/three was not retained any more
    assert broker.stats().retained == 1


def test_last_will_on_a_socket_closed_without_disconnect(broker: EmbeddedBroker) -> None:
    watcher = RawClient(broker.port)
    assert watcher.connect("watcher") == 0
    watcher.subscribe("dev/+/state")
    device = RawClient(broker.port)
    assert device.connect("d1", will=("dev/d1/state", b"offline")) == 0
    device.close()  # no DISCONNECT
    assert watcher.receive()[:2] == ("dev/d1/state", b"offline")


def test_no_will_after_a_clean_disconnect(broker: EmbeddedBroker) -> None:
    watcher = RawClient(broker.port)
    assert watcher.connect("watcher") == 0
    watcher.subscribe("dev/#")
    device = RawClient(broker.port)
    assert device.connect("d1", will=("dev/d1/state", b"offline")) == 0
    device.send(_packet(0xE0, b""))
    assert device.closed_by_broker()  # the broker handled the DISCONNECT (a will would be queued)
    watcher.publish("dev/marker", b"m", qos=1)
    assert watcher.receive()[:2] == ("dev/marker", b"m")


def test_client_id_takeover_closes_the_old_connection_and_fires_its_will(
    broker: EmbeddedBroker,
) -> None:
    watcher = RawClient(broker.port)
    assert watcher.connect("watcher") == 0
    watcher.subscribe("dev/+/state")
    old = RawClient(broker.port)
    assert old.connect("d1", will=("dev/d1/state", b"offline")) == 0
    new = RawClient(broker.port)
    assert new.connect("d1") == 0
    assert old.closed_by_broker()
    assert watcher.receive()[:2] == ("dev/d1/state", b"offline")
    new.publish("dev/d1/state", b"online")
    assert watcher.receive()[:2] == ("dev/d1/state", b"online")


def test_shared_subscriptions_split_the_load(broker: EmbeddedBroker) -> None:
    members = [RawClient(broker.port) for _ in range(2)]
    for i, member in enumerate(members):
        assert member.connect(f"ctl-{i}") == 0
        assert member.subscribe("$share/ctl/dev/+/telemetry") == 1
    plain = RawClient(broker.port)
    assert plain.connect("plain") == 0
    plain.subscribe("dev/+/telemetry")
    pub = RawClient(broker.port)
    assert pub.connect("pub") == 0
    for n in range(10):
        pub.publish(f"dev/d{n}/telemetry", str(n).encode())
    got = [[member.receive()[1] for _ in range(5)] for member in members]
    assert sorted(got[0] + got[1]) == sorted(str(n).encode() for n in range(10))
    assert [plain.receive()[1] for _ in range(10)] == [str(n).encode() for n in range(10)]
    pub.publish("dev/marker/telemetry", b"m")  # the 11th goes to the first member again
    assert members[0].receive()[1] == b"m"


def test_bounded_queue_drops_and_counts() -> None:
    with EmbeddedBroker(port=0, max_inflight=2, max_queued=3) as broker:
        slow = RawClient(broker.port)
        assert slow.connect("slow") == 0
        slow.subscribe("t")
        pub = RawClient(broker.port)
        assert pub.connect("pub") == 0
        for n in range(10):
            pub.publish("t", bytes((n,)))  # PUBACK: routed (queued or dropped) by now
        assert broker.stats().dropped_queue_full == 5
        first = [slow.receive() for _ in range(2)]  # the in-flight window
        assert [m[1] for m in first] == [b"\x00", b"\x01"]
        for message in first:
            slow.puback(message[3])
        rest = []
        for _ in range(3):  # the queue, then nothing: 5 were dropped
            rest.append(slow.receive())
            slow.puback(rest[-1][3])
        assert [m[1] for m in rest] == [b"\x02", b"\x03", b"\x04"]
        pub.publish("t", b"after")
        assert slow.receive()[1] == b"after"


@pytest.mark.parametrize(
    "garbage",
    [
        _packet(0x36, _str("t") + b"\x00\x01x"),  # QoS 2 publish
        _packet(0x00, b""),  # reserved packet type
        _packet(0x30, _str("a/#") + b"x"),  # wildcard in a topic name
        _packet(0x82, b"\x00\x01\x00\x09short"),  # string runs past the packet
        b"\x30\xff\xff\xff\x7f",  # remaining length of 256 MiB: over the packet limit
    ],
)
def test_malformed_packet_closes_that_connection_only(
    broker: EmbeddedBroker, garbage: bytes
) -> None:
    good = RawClient(broker.port)
    assert good.connect("good") == 0
    good.subscribe("t")
    bad = RawClient(broker.port)
    assert bad.connect("bad") == 0
    bad.send(garbage)
    assert bad.closed_by_broker()
    good.publish("t", b"still here")
    assert good.receive()[:2] == ("t", b"still here")
    assert broker.stats().closed_malformed == 1


def test_first_packet_must_be_connect_and_mqtt5_is_refused(broker: EmbeddedBroker) -> None:
    raw = RawClient(broker.port)
    raw.send(_packet(0xC0, b""))  # PINGREQ before CONNECT
    assert raw.closed_by_broker()
    v5 = RawClient(broker.port)
    assert v5.connect("v5", level=5) == 1  # unacceptable protocol version


def test_keepalive_is_enforced(broker: EmbeddedBroker) -> None:
    watcher = RawClient(broker.port)
    assert watcher.connect("watcher") == 0
    watcher.subscribe("dev/+/state")
    quiet = RawClient(broker.port)
    assert quiet.connect("quiet", keepalive=1, will=("dev/quiet/state", b"gone")) == 0
    assert quiet.closed_by_broker()  # after 1.5 s without a packet
    assert watcher.receive()[:2] == ("dev/quiet/state", b"gone")


def test_ping_and_unsubscribe(broker: EmbeddedBroker) -> None:
    raw = RawClient(broker.port)
    assert raw.connect("c") == 0
    raw.send(_packet(0xC0, b""))
    assert raw.read()[0] == 13
    assert raw.subscribe("x", qos=2) == 1  # QoS 2 is granted as 1
    raw.subscribe("y")
    raw.send(_packet(0xA2, b"\x00\x63" + _str("x")))
    assert raw.read() == (11, 0, b"\x00\x63")
    raw.publish("x", b"unsubscribed")
    raw.publish("y", b"marker")
    assert raw.receive()[:2] == ("y", b"marker")


def _fleet_auth(**passwords: str) -> BrokerAuth:
    return BrokerAuth.from_passwords(
        {"fleetctl": "ctl-pw", "dev-a": "a-pw", "dev-b": "b-pw", **passwords},
        rules=fleet_acl_rules(TOPICS, controller_user="fleetctl"),
        free_client_ids=frozenset({"fleetctl"}),
    )


def test_auth_and_acl() -> None:
    auth = _fleet_auth()
    with EmbeddedBroker(port=0, auth=auth) as broker:
        assert RawClient(broker.port).connect("x") == 5  # anonymous
        assert RawClient(broker.port).connect("x", login=("dev-a", "wrong")) == 4
        ctl, ctl_pub, a, b = (RawClient(broker.port) for _ in range(4))
        assert ctl.connect("ctl", login=("fleetctl", "ctl-pw")) == 0
        assert ctl_pub.connect("ctl-pub", login=("fleetctl", "ctl-pw")) == 0
        assert a.connect("dev-a", login=("dev-a", "a-pw")) == 0
        assert b.connect("dev-b", login=("dev-b", "b-pw")) == 0
        ctl.subscribe(f"{TOPICS.prefix}/#")
        a.subscribe(TOPICS.fleet_filter("notify"))  # broader than its ACL
        b.subscribe(TOPICS.notify("dev-b"))
        a.publish(TOPICS.telemetry("dev-b"), b"spoofed")  # acknowledged, dropped
        a.publish(TOPICS.telemetry("dev-a"), b"mine")
        assert ctl.receive()[:2] == (TOPICS.telemetry("dev-a"), b"mine")
        ctl_pub.publish(TOPICS.notify("dev-b"), b"for b")
        ctl_pub.publish(TOPICS.notify("dev-a"), b"for a")
        assert ctl.receive()[:2] == (TOPICS.notify("dev-b"), b"for b")  # ctl reads everything
        assert ctl.receive()[:2] == (TOPICS.notify("dev-a"), b"for a")
        assert b.receive()[:2] == (TOPICS.notify("dev-b"), b"for b")
        assert a.receive()[:2] == (TOPICS.notify("dev-a"), b"for a")  # not b's first
        assert broker.stats().dropped_acl >= 2


def test_password_hashes_are_salted_scrypt_and_verify() -> None:
    first, second = hash_password("pw"), hash_password("pw")
    assert first.startswith("scrypt$") and first != second  # salted
    assert verify_password(first, b"pw") and verify_password(second, b"pw")
    assert not verify_password(first, b"pW")
    assert not verify_password("plain-text", b"plain-text")
    auth = BrokerAuth({"u": first})
    assert auth.login_ok("u", b"pw") and auth.login_ok("u", b"pw")  # second one: cached
    assert not auth.login_ok("u", b"other")
    assert not auth.login_ok("u", None) and not auth.login_ok(None, b"pw")


def test_with_auth_a_device_client_id_must_be_its_username() -> None:
    with EmbeddedBroker(port=0, auth=_fleet_auth()) as broker:
        assert RawClient(broker.port).connect("dev-b", login=("dev-a", "a-pw")) == 2
        assert RawClient(broker.port).connect("other", login=("dev-a", "a-pw")) == 2
        assert RawClient(broker.port).connect("dev-a", login=("dev-a", "a-pw")) == 0
        # the controller runs several clients under its own name
        assert RawClient(broker.port).connect("fleetctl-x-1", login=("fleetctl", "ctl-pw")) == 0


def test_with_auth_no_user_takes_over_another_users_client_id() -> None:
    with EmbeddedBroker(port=0, auth=_fleet_auth()) as broker:
        watcher = RawClient(broker.port)
        assert watcher.connect("fleetctl-w", login=("fleetctl", "ctl-pw")) == 0
        watcher.subscribe(TOPICS.fleet_filter("state"))
        device = RawClient(broker.port)
        will = (TOPICS.state("dev-a"), b"offline")
        assert device.connect("dev-a", login=("dev-a", "a-pw"), will=will) == 0
        # the controller's user may pick any client id, but not one another user holds
        assert RawClient(broker.port).connect("dev-a", login=("fleetctl", "ctl-pw")) == 2
        device.publish(TOPICS.state("dev-a"), b"still connected")
        assert watcher.receive()[:2] == (TOPICS.state("dev-a"), b"still connected")
        # the same user reconnecting takes its own session over (its will fires)
        again = RawClient(broker.port)
        assert again.connect("dev-a", login=("dev-a", "a-pw")) == 0
        assert device.closed_by_broker()
        assert watcher.receive()[:2] == will


def test_set_auth_closes_and_refuses_removed_users() -> None:
    auth = _fleet_auth()
    with EmbeddedBroker(port=0, auth=auth) as broker:
        watcher = RawClient(broker.port)
        assert watcher.connect("fleetctl-w", login=("fleetctl", "ctl-pw")) == 0
        watcher.subscribe(TOPICS.fleet_filter("state"))
        a, b = RawClient(broker.port), RawClient(broker.port)
        assert a.connect("dev-a", login=("dev-a", "a-pw"), will=(TOPICS.state("dev-a"), b"x")) == 0
        assert b.connect("dev-b", login=("dev-b", "b-pw")) == 0
        # dev-a removed, dev-b's password changed, dev-c enrolled
        hashes = {
            "fleetctl": auth.password_hashes["fleetctl"],  # unchanged: its connection stays
            "dev-b": hash_password("new-b"),
            "dev-c": hash_password("c-pw"),
        }
        broker.set_auth(BrokerAuth(hashes, auth.rules, auth.free_client_ids))
        assert a.closed_by_broker() and b.closed_by_broker()
        assert RawClient(broker.port).connect("dev-a", login=("dev-a", "a-pw")) == 4
        assert RawClient(broker.port).connect("dev-b", login=("dev-b", "b-pw")) == 4
        assert RawClient(broker.port).connect("dev-b", login=("dev-b", "new-b")) == 0
        assert RawClient(broker.port).connect("dev-c", login=("dev-c", "c-pw")) == 0
        # the watcher (unchanged) stays; no will of the removed device was published
        watcher.publish(TOPICS.state("dev-c"), b"marker")
        assert watcher.receive()[:2] == (TOPICS.state("dev-c"), b"marker")


def test_start_twice_and_bad_port() -> None:
    with EmbeddedBroker(port=0) as broker:
        with pytest.raises(BrokerError, match="already running"):
            broker.start()
        taken = broker.port
        with pytest.raises(BrokerError, match="cannot listen"):
            EmbeddedBroker(port=taken).start()
    raw_port = broker.port
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", raw_port), timeout=TIMEOUT)


def test_stop_closes_client_connections() -> None:
    broker = EmbeddedBroker(port=0)
    broker.start()
    raw = RawClient(broker.port)
    assert raw.connect("c") == 0
    broker.stop()
    assert raw.closed_by_broker()
