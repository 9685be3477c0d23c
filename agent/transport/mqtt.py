"""``PahoTransport``: the :class:`~agent.transport.base.Transport` over a real MQTT broker.

The only module of the product that imports paho-mqtt (2.x, ``CallbackAPIVersion.VERSION2``).

Behaviour:
    * ``protocol="auto"`` connects with MQTT 5 and, if the broker refuses the protocol version
      (CONNACK "unsupported protocol version"), switches to 3.1.1 for the transport's lifetime.
      ``"5"`` and ``"3.1.1"`` force one.
    * Clean sessions: the broker keeps nothing for us while we are away, and the transport
      replays its subscription table after every (re)connect.
    * Reconnects run on paho's network thread; the delay between attempts is capped exponential
      with jitter (:class:`~agent.transport.base.Backoff`), fed to paho before each wait.
    * Bounded: at most ``max_inflight`` unacknowledged QoS>0 messages on the wire and
      ``max_queued`` accepted-but-unacknowledged in total; past that, ``publish`` raises
      :class:`~agent.transport.base.PublishQueueFullError`. Publishing while disconnected
      raises :class:`~agent.transport.base.NotConnectedError`.
    * With MQTT 5 the client announces ``max_message_bytes`` (plus header room) as its Maximum
      Packet Size, so the broker does not even send larger messages; with 3.1.1 they are dropped
      on arrival and counted.
    * TLS: a CA bundle to verify the broker (hostname checked), and a client certificate and key.

Threading: handlers and listeners run on paho's network thread (see agent.transport.base).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.transport.base import (
    Backoff,
    MessageProperties,
    NotConnectedError,
    PublishQueueFullError,
    QoS,
    Transport,
    TransportError,
    Will,
)

__all__ = ["PahoTransport", "ProtocolChoice", "TlsFiles"]

logger = logging.getLogger(__name__)

ProtocolChoice = Literal["auto", "5", "3.1.1"]
_UNSUPPORTED_PROTOCOL = 0x84  # MQTT 5 CONNACK reason; paho maps a 3.1.1 "refused: version" to it
_HEADER_ROOM = 64 * 1024  # topic, properties and fixed header on top of the payload


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for mutual TLS: the CA that signed the broker, our certificate and key."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    def context(self) -> ssl.SSLContext:
        """A client context: TLS >= 1.2, broker certificate and hostname verified."""
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cert_file is not None:
                key = None if self.key_file is None else str(self.key_file)
                ctx.load_cert_chain(str(self.cert_file), key)
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"TLS files {self}: cannot be loaded: {exc}") from exc
        return ctx


class PahoTransport(Transport):
    """MQTT 5 / 3.1.1 client with TLS, Last Will, jittered reconnects and bounded queues."""

    def __init__(
        self,
        *,
        host: str,
        port: int = 8883,
        client_id: str,
        protocol: ProtocolChoice = "auto",
        tls: TlsFiles | None = None,
        username: str | None = None,
        password: str | None = None,
        will: Will | None = None,
        keepalive: int = 30,
        backoff: Backoff | None = None,
        max_inflight: int = 20,
        max_queued: int = 1000,
        max_message_bytes: int = 1024 * 1024 + 1024,
        connect_timeout: float = 10.0,
    ) -> None:
        super().__init__(client_id=client_id, max_message_bytes=max_message_bytes)
        if protocol not in ("auto", "5", "3.1.1"):
            raise TransportError(f"protocol {protocol!r}: expected 'auto', '5' or '3.1.1'")
        if max_inflight < 1 or max_queued < max_inflight:
            raise TransportError(
                f"max_inflight={max_inflight}, max_queued={max_queued}: "
                "expected 1 <= max_inflight <= max_queued"
            )
        self.host = host
        self.port = port
        self._protocol_choice = protocol
        self._protocol = (
            MQTTProtocolVersion.MQTTv311 if protocol == "3.1.1" else MQTTProtocolVersion.MQTTv5
        )
        self._tls_context = tls.context() if tls is not None else None
        self._username = username
        self._password = password
        self._will = will
        self._keepalive = keepalive
        self._backoff = backoff or Backoff()
        self._max_inflight = max_inflight
        self._max_queued = max_queued
        self._connect_timeout = connect_timeout
        self._client: paho.Client | None = None
        self._stopping = False
        self._sub_cond = threading.Condition()
        self._pending_subacks: dict[int, str] = {}
        self._early_subacks: set[int] = set()

    # ---- public --------------------------------------------------------------------------------

    @property
    def protocol_version(self) -> str:
        """``"5"`` or ``"3.1.1"``: what the transport speaks (after any fallback)."""
        return "5" if self._protocol == MQTTProtocolVersion.MQTTv5 else "3.1.1"

    def connect(self) -> None:
        """Start the network thread; it connects and keeps reconnecting until disconnect()."""
        with self._lock:
            if self._client is not None:
                return
            self._stopping = False
            self._start_client()

    def disconnect(self) -> None:
        """Send DISCONNECT (no Last Will), stop the network thread and reconnecting."""
        with self._lock:
            self._stopping = True
            client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self._handle_disconnected("client disconnected")
        with self._sub_cond:
            self._pending_subacks.clear()
            self._sub_cond.notify_all()

    def publish(self, topic: str, payload: bytes, *, qos: QoS, retain: bool = False) -> None:
        """Send a message; see :meth:`Transport.publish` for errors."""
        self._check_publish(topic, payload)
        client = self._client
        if client is None or not self.is_connected:
            raise NotConnectedError(f"cannot publish to {topic!r}: not connected to the broker")
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise PublishQueueFullError(
                f"cannot publish to {topic!r}: {self._max_queued} messages already await "
                "acknowledgement"
            )
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
            raise NotConnectedError(f"cannot publish to {topic!r}: connection lost")
        # QoS>0 with NO_CONN: paho keeps it queued and sends it after the reconnect.
        self._count(messages_out=1, bytes_out=len(payload))

    def wait_subscribed(self, timeout: float) -> bool:
        """Wait until connected and every SUBSCRIBE sent has its SUBACK; False on timeout."""
        deadline = time.monotonic() + timeout
        if not self._replayed_event.wait(timeout):
            return False
        timeout = max(0.0, deadline - time.monotonic())
        with self._sub_cond:
            return self._sub_cond.wait_for(
                lambda: self.is_connected and not self._pending_subacks, timeout
            )

    # ---- client lifecycle ----------------------------------------------------------------------

    def _start_client(self) -> None:
        v5 = self._protocol == MQTTProtocolVersion.MQTTv5
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if v5 else True,
            protocol=self._protocol,
        )
        client.max_inflight_messages_set(self._max_inflight)
        client.max_queued_messages_set(self._max_queued)
        client.connect_timeout = self._connect_timeout
        if self._tls_context is not None:
            client.tls_set_context(self._tls_context)
        if self._username is not None:
            client.username_pw_set(self._username, self._password)
        if self._will is not None:
            client.will_set(
                self._will.topic, self._will.payload, qos=self._will.qos, retain=self._will.retain
            )
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 0
            properties.MaximumPacketSize = self.max_message_bytes + _HEADER_ROOM
        self._set_next_delay(client)
        client.connect_async(
            self.host,
            self.port,
            keepalive=self._keepalive,
            clean_start=True if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        self._client = client
        client.loop_start()
        logger.debug(
            "connecting to %s:%d with MQTT %s", self.host, self.port, self.protocol_version
        )

    def _fall_back_to_311(self, old: paho.Client) -> None:
        old.loop_stop()
        with self._lock:
            if self._stopping or self._client is not old:
                return
            logger.warning(
                "broker %s:%d refused MQTT 5; falling back to MQTT 3.1.1", self.host, self.port
            )
            self._protocol = MQTTProtocolVersion.MQTTv311
            self._start_client()

    def _set_next_delay(self, client: paho.Client) -> None:
        # paho waits min_delay before its next attempt; setting both bounds injects our jitter.
        delay = self._backoff.next_delay()
        client.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]

    # ---- paho callbacks (network thread) -------------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        _userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            if (
                self._protocol_choice == "auto"
                and self._protocol == MQTTProtocolVersion.MQTTv5
                and reason_code.value == _UNSUPPORTED_PROTOCOL
            ):
                client.disconnect()
                threading.Thread(
                    target=self._fall_back_to_311, args=(client,), name="mqtt-fallback", daemon=True
                ).start()
                return
            logger.warning(
                "broker %s:%d refused the connection: %s", self.host, self.port, reason_code
            )
            return
        logger.info("connected to %s:%d (MQTT %s)", self.host, self.port, self.protocol_version)
        _disable_nagle(client)
        self._backoff.reset()
        self._set_next_delay(client)
        self._handle_connected(bool(flags.session_present))

    def _on_connect_fail(self, client: paho.Client, _userdata: Any) -> None:
        logger.debug("cannot reach %s:%d; retrying", self.host, self.port)
        self._set_next_delay(client)

    def _on_disconnect(
        self,
        client: paho.Client,
        _userdata: Any,
        _flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        with self._sub_cond:
            self._pending_subacks.clear()
            self._early_subacks.clear()
        if self.is_connected and not self._stopping:
            logger.warning("disconnected from %s:%d: %s", self.host, self.port, reason_code)
        self._set_next_delay(client)
        self._handle_disconnected(str(reason_code))

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self._count(messages_in=1, dropped_malformed=1)
            logger.warning("dropped a message whose topic is not UTF-8")
            return
        payload = bytes(msg.payload)
        self._dispatch(topic, payload, MessageProperties(qos=msg.qos, retain=msg.retain))

    def _on_subscribe(
        self,
        _client: paho.Client,
        _userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        with self._sub_cond:
            topic_filter = self._pending_subacks.pop(mid, None)
            if topic_filter is None:
                self._early_subacks.add(mid)
            self._sub_cond.notify_all()
        refused = [rc for rc in reason_codes if rc.is_failure]
        if refused:
            self._count(subscriptions_refused=1)
            logger.error(
                "broker refused subscription %s: %s (check the broker ACL)",
                topic_filter,
                refused[0],
            )

    # ---- Transport hooks -----------------------------------------------------------------------

    def _send_subscribe(self, topic_filter: str, qos: int) -> None:
        client = self._client
        if client is None:
            return
        rc, mid = client.subscribe(topic_filter, qos=qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return  # lost the connection meanwhile; replayed on reconnect
        with self._sub_cond:
            if mid in self._early_subacks:
                self._early_subacks.discard(mid)
            else:
                self._pending_subacks[mid] = topic_filter

    def _send_unsubscribe(self, topic_filter: str) -> None:
        client = self._client
        if client is not None:
            client.unsubscribe(topic_filter)


def _disable_nagle(client: paho.Client) -> None:
    """Send small packets (requests, PUBACKs) at once instead of after a delayed ACK."""
    sock = client.socket()
    if not isinstance(sock, socket.socket):  # TLS sockets are socket.socket subclasses
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        logger.debug("TCP_NODELAY not set: %s", exc)
