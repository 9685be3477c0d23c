"""The in-memory broker and transport: MQTT semantics the product relies on, and the backoff."""

from __future__ import annotations

import random

import pytest

from agent.protocol.errors import MessageError, TopicError
from agent.transport import (
    Backoff,
    MemoryBroker,
    MemoryTransport,
    MessageHandler,
    MessageProperties,
    NotConnectedError,
    TransportError,
    Will,
)

Received = list[tuple[str, bytes, MessageProperties]]


def collector() -> tuple[Received, MessageHandler]:
    received: Received = []

    def handler(topic: str, payload: bytes, props: MessageProperties) -> None:
        received.append((topic, payload, props))

    return received, handler


def connected(broker: MemoryBroker, client_id: str, will: Will | None = None) -> MemoryTransport:
    transport = MemoryTransport(broker=broker, client_id=client_id, will=will)
    transport.connect()
    assert transport.is_connected
    return transport


def test_publish_reaches_matching_filters_only() -> None:
    broker = MemoryBroker()
    sub = connected(broker, "sub")
    pub = connected(broker, "pub")
    got, handler = collector()
    sub.subscribe("edge/v1/dev/+/telemetry", handler, qos=1)
    pub.publish("edge/v1/dev/d1/telemetry", b"t1", qos=1)
    pub.publish("edge/v1/dev/d1/events", b"e1", qos=1)
    pub.publish("edge/v1/dev/d2/telemetry", b"t2", qos=0)
    assert [(t, p, pr.qos) for t, p, pr in got] == [
        ("edge/v1/dev/d1/telemetry", b"t1", 1),
        ("edge/v1/dev/d2/telemetry", b"t2", 0),
    ]
    assert sub.stats().messages_in == 2 and pub.stats().messages_out == 3


def test_retained_messages_reach_late_subscribers_and_can_be_cleared() -> None:
    broker = MemoryBroker()
    dev = connected(broker, "dev")
    dev.publish("s/dev1", b"online", qos=1, retain=True)
    ctl = connected(broker, "ctl")
    got, handler = collector()
    ctl.subscribe("s/+", handler, qos=1)
    assert got == [("s/dev1", b"online", MessageProperties(qos=1, retain=True))]
    dev.publish("s/dev1", b"", qos=1, retain=True)  # clears; live delivery is not "retained"
    assert got[-1] == ("s/dev1", b"", MessageProperties(qos=1, retain=False))
    assert broker.retained("s/dev1") is None
    late, late_handler = collector()
    connected(broker, "late").subscribe("s/+", late_handler, qos=1)
    assert late == []


def test_shared_subscription_delivers_each_message_to_one_member() -> None:
    broker = MemoryBroker()
    members = [connected(broker, f"ctl{i}") for i in range(3)]
    boxes = []
    for member in members:
        got, handler = collector()
        member.subscribe("$share/ctl/t/+", handler, qos=1)
        boxes.append(got)
    watcher_box, watcher = collector()
    connected(broker, "watcher").subscribe("t/#", watcher, qos=0)
    pub = connected(broker, "pub")
    for i in range(30):
        pub.publish(f"t/{i}", b"x", qos=1)
    assert sum(len(b) for b in boxes) == 30
    assert all(len(b) == 10 for b in boxes)  # round robin
    assert len(watcher_box) == 30  # non-shared subscribers still see everything
    assert all(pr.qos == 0 for _t, _p, pr in watcher_box)  # min(pub qos, sub qos)


def test_shared_subscriptions_get_no_retained_messages() -> None:
    broker = MemoryBroker()
    connected(broker, "dev").publish("s/d", b"x", qos=1, retain=True)
    got, handler = collector()
    connected(broker, "ctl").subscribe("$share/g/s/+", handler, qos=1)
    assert got == []


def test_last_will_fires_on_abrupt_disconnect_only() -> None:
    broker = MemoryBroker()
    will = Will(topic="s/dev", payload=b"offline", qos=1, retain=True)
    ctl = connected(broker, "ctl")
    got, handler = collector()
    ctl.subscribe("s/#", handler, qos=1)
    connected(broker, "dev", will).disconnect()
    assert got == []
    connected(broker, "dev2", Will("s/dev2", b"offline"))
    broker.drop("dev2", reconnect=False)
    assert got == [("s/dev2", b"offline", MessageProperties(qos=1, retain=False))]
    assert broker.retained("s/dev2") == b"offline"
    assert "dev2" not in broker.connected_clients()


def test_dropped_client_reconnects_resubscribes_and_sends_its_birth_again() -> None:
    broker = MemoryBroker()
    dev = MemoryTransport(broker=broker, client_id="dev", will=Will("s/dev", b"offline"))
    dev.on_connected(lambda _session: dev.publish("s/dev", b"online", qos=1, retain=True))
    events: list[str] = []
    dev.on_disconnected(events.append)
    dev.connect()
    got, handler = collector()
    dev.subscribe("n/dev", handler, qos=1)
    broker.drop("dev")
    assert events == ["connection lost"]
    assert dev.is_connected and broker.retained("s/dev") == b"online"  # will, then new birth
    connected(broker, "ctl").publish("n/dev", b"nudge", qos=1)
    assert [p for _t, p, _pr in got] == [b"nudge"]
    assert dev.stats().reconnects == 1


def test_outage_refuses_connections_then_everyone_reconnects() -> None:
    broker = MemoryBroker()
    a = connected(broker, "a", Will("s/a", b"offline"))
    got, handler = collector()
    a.subscribe("x", handler, qos=1)
    broker.go_down()
    assert not a.is_connected and broker.retained("s/a") is None  # a dead broker sends no wills
    with pytest.raises(NotConnectedError, match="not connected"):
        a.publish("x", b"1", qos=1)
    late = MemoryTransport(broker=broker, client_id="late")
    late.connect()
    assert not late.is_connected
    broker.come_up()
    assert a.is_connected and late.is_connected
    late.publish("x", b"2", qos=1)
    assert [p for _t, p, _pr in got] == [b"2"]
    assert a.stats().reconnects == 1 and late.stats().reconnects == 0


def test_client_id_takeover_disconnects_the_old_session_with_its_will() -> None:
    broker = MemoryBroker()
    old = connected(broker, "dev", Will("s/dev", b"offline-old"))
    new = connected(broker, "dev")
    assert not old.is_connected and new.is_connected
    assert broker.retained("s/dev") == b"offline-old"
    broker.come_up()
    assert not old.is_connected  # a taken-over client does not fight back


def test_unsubscribe_stops_delivery() -> None:
    broker = MemoryBroker()
    sub = connected(broker, "sub")
    got, handler = collector()
    sub.subscribe("a", handler, qos=1)
    sub.unsubscribe("a")
    sub.unsubscribe("never-subscribed")
    connected(broker, "pub").publish("a", b"x", qos=1)
    assert got == []


def test_handler_errors_are_counted_not_propagated() -> None:
    broker = MemoryBroker()
    sub = connected(broker, "sub")

    def malformed(_t: str, _p: bytes, _pr: MessageProperties) -> None:
        raise MessageError("Notify: expected JSON")

    def broken(_t: str, _p: bytes, _pr: MessageProperties) -> None:
        raise RuntimeError("bug")

    sub.subscribe("m", malformed, qos=1)
    sub.subscribe("b", broken, qos=1)
    pub = connected(broker, "pub")
    pub.publish("m", b"{", qos=1)
    pub.publish("b", b"x", qos=1)
    stats = sub.stats()
    assert (stats.dropped_malformed, stats.handler_errors) == (1, 1)


def test_oversize_and_invalid_publishes_are_rejected() -> None:
    broker = MemoryBroker()
    small = MemoryTransport(broker=broker, client_id="s", max_message_bytes=10)
    small.connect()
    with pytest.raises(TransportError, match="expected at most 10"):
        small.publish("a", b"x" * 11, qos=0)
    with pytest.raises(TopicError, match="wildcard"):
        small.publish("a/+", b"x", qos=0)
    with pytest.raises(TopicError):
        small.subscribe("a/#/b", lambda *_: None, qos=0)
    got, handler = collector()
    small.subscribe("big", handler, qos=0)
    connected(broker, "pub").publish("big", b"y" * 11, qos=0)
    assert got == [] and small.stats().dropped_oversize == 1


# ---- reconnect backoff (used by PahoTransport) ----------------------------------------------


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    backoff = Backoff(initial=1.0, maximum=8.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [1, 2, 4, 8, 8, 8, 8, 8]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)  # jittered, not lock-step
    backoff.reset()
    assert 0.5 <= backoff.next_delay() <= 1.0


def test_backoff_spreads_a_fleet() -> None:
    firsts = {round(Backoff(initial=10, maximum=60).next_delay(), 3) for _ in range(50)}
    assert len(firsts) > 40
    with pytest.raises(TransportError, match="expected 0 < initial <= maximum"):
        Backoff(initial=0, maximum=1)
