"""``fleetctl serve``: the long-running controller, wired from its parts.

What runs (each on its own thread, all stopped by :meth:`ControllerService.stop`):

* the embedded MQTT broker (tools.fleetctl.broker) when no broker URL is given, with logins
  and the fleet ACL: each active device logs in with its id and the password of its bundle
  (the registry's ``broker_credentials`` hashes), the controller as ``fleetctl`` with
  ``HOME/broker-password``; the table is re-read every :attr:`ServeOptions.auth_reload_s`, so
  enrolled devices get in and removed ones are disconnected and refused. It listens on
  loopback only unless ``insecure_listen`` is set (its passwords and traffic are not
  encrypted: a fleet across a network uses mosquitto with TLS, ``fleetctl broker config``);
* one :class:`~agent.transport.mqtt.PahoTransport` (client id ``fleetctl-<host>-<pid>``);
* the repository server (tools.fleetctl.reposerver) answering devices' fetch requests;
* ingest (tools.fleetctl.ingest): the transport's handlers only enqueue, one worker thread
  validates and writes to SQLite, so the network thread never waits on the database; the same
  thread acknowledges stored telemetry and events to their devices (tools.fleetctl.acks), once
  per ingest batch and at most every 200 ms while messages keep coming;
* the rollout engine (tools.fleetctl.rollouts), ticked every :attr:`ServeOptions.tick_s`;
* timestamp refresh: director timestamps are short-lived, so when one gets within
  :attr:`ServeOptions.timestamp_margin` of expiry it is re-signed and the device gets a
  ``Notify``; the image repository's timestamp likewise (no notify: devices read it anyway);
* ``/metrics`` for Prometheus (tools.fleetctl.metrics), unless the port is 0.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from agent.protocol.messages import Notify, encode
from agent.protocol.topics import DEFAULT_PREFIX, Topics
from agent.transport.base import Transport, TransportError
from tools.fleetctl import FleetctlError
from tools.fleetctl.acks import AckBatcher
from tools.fleetctl.home import FleetHome
from tools.fleetctl.ingest import EnrolledDevices, Ingest, IngestStore
from tools.fleetctl.pki import CONTROLLER_USER

if TYPE_CHECKING:
    from tools.fleetctl.reposerver import RepositoryServer
    from tools.fleetctl.rollouts import RolloutEngine

__all__ = [
    "ControllerService",
    "ServeError",
    "ServeOptions",
    "is_loopback",
    "parse_broker_url",
    "parse_listen",
]

logger = logging.getLogger(__name__)

_INGEST_QUEUE = 10_000


class ServeError(FleetctlError):
    """The controller service cannot start as configured."""


@dataclass(frozen=True)
class BrokerAddress:
    """Where the controller's MQTT client connects."""

    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]``."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or parts.path not in ("", "/"):
        raise ServeError(f"broker URL {url!r}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ServeError(f"broker URL {url!r}: expected a port number 1-65535") from None
    return BrokerAddress(parts.hostname, port, tls)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (port 0 picks a free port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ServeError(f"listen address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:1883")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class ServeOptions:
    """How ``fleetctl serve`` runs."""

    broker_url: str | None = None
    listen: tuple[str, int] = ("127.0.0.1", 1883)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9108
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    prefix: str = DEFAULT_PREFIX
    results: bool = False
    tick_s: float = 0.5
    timestamp_check_s: float = 60.0
    timestamp_margin: timedelta = timedelta(hours=12)
    other_roles_margin: timedelta = timedelta(hours=48)
    connect_timeout_s: float = 30.0
    insecure_listen: bool = False
    auth_reload_s: float = 2.0


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ControllerService:
    """One running controller; :meth:`start`, then :meth:`run` until stopped, then :meth:`stop`."""

    def __init__(self, home: FleetHome, options: ServeOptions) -> None:
        home.require()
        self.home = home
        self.options = options
        self.topics = Topics(prefix=options.prefix)
        self.client_id = f"fleetctl-{socket.gethostname().split('.')[0][:40]}-{os.getpid()}"
        self.broker: Any = None
        self.transport: Transport | None = None
        self.metrics: Any = None
        self.repository_server: RepositoryServer | None = None
        self.rollout_engine: RolloutEngine | None = None
        self.store = IngestStore.open(home.registry_path)
        self.acks = AckBatcher(lambda: self.transport, self.topics)
        self.ingest = Ingest(
            self.store,
            EnrolledDevices.from_registry(home.registry_path),
            self.topics,
            on_stored=self.acks.add,
        )
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue(_INGEST_QUEUE)
        self._ingest_thread = threading.Thread(target=self._ingest_loop, name="ingest", daemon=True)
        self.inbox_overflows = 0
        self._next_timestamp_check = 0.0
        self._last_assignment_id = self._max_assignment_id()
        self._notified_since_check: set[str] = set()
        self._broker_auth_hashes: dict[str, str] | None = None
        self._controller_hash = ""
        self._next_auth_reload = 0.0

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start every part; raises :class:`ServeError` if the broker is unreachable."""
        from agent.transport.mqtt import PahoTransport, TlsFiles  # noqa: PLC0415 - paho

        options = self.options
        # Namespaces written before director metadata named its device are refused by devices:
        # re-sign them now rather than at their next timestamp refresh.
        rebound = self.home.director().bind_namespaces()
        if rebound:
            logger.info("re-signed director metadata bound to %d device(s)", len(rebound))
        username = password = None
        if options.broker_url is None:
            from tools.fleetctl.broker import EmbeddedBroker  # noqa: PLC0415
            from tools.fleetctl.broker_acl import (  # noqa: PLC0415
                controller_password,
                hash_password,
            )

            if not is_loopback(options.listen[0]) and not options.insecure_listen:
                raise ServeError(
                    f"--listen {options.listen[0]}: the embedded broker has no TLS, expected a"
                    " loopback address (or --insecure-listen, or mosquitto via --broker)"
                )
            username, password = CONTROLLER_USER, controller_password(self.home.root)
            self._controller_hash = hash_password(password)
            self.broker = EmbeddedBroker(*options.listen, auth=self.broker_auth())
            self.broker.start()
            # A wildcard listen address is not something to connect to: use loopback then.
            host = options.listen[0]
            with contextlib.suppress(ValueError):
                if not host or ipaddress.ip_address(host).is_unspecified:
                    host = "127.0.0.1"
            address = BrokerAddress(host, int(self.broker.port), tls=False)
        else:
            address = parse_broker_url(options.broker_url)
        tls = None
        if address.tls:
            pki = self.home.root / "pki"
            tls = TlsFiles(
                ca_file=options.ca_file or pki / "ca.crt",
                cert_file=options.client_cert or pki / "fleetctl.crt",
                key_file=options.client_key or pki / "fleetctl.key",
            )
        transport = PahoTransport(
            host=address.host,
            port=address.port,
            client_id=self.client_id,
            tls=tls,
            username=username,
            password=password,
        )
        self.transport = transport
        self._ingest_thread.start()
        for kind, topic_filter in self.topics.controller_filters().items():
            if kind == "repo/req" or (kind == "results" and not options.results):
                continue
            transport.subscribe(topic_filter, self._enqueue, qos=1)
        from tools.fleetctl.reposerver import RepositoryServer  # noqa: PLC0415
        from tools.fleetctl.rollouts import RolloutEngine  # noqa: PLC0415

        self.repository_server = RepositoryServer(self.home, transport, self.topics)
        self.repository_server.start()
        self.rollout_engine = RolloutEngine(self.home, notify=self.notify_director_changed)
        transport.connect()
        if not transport.wait_connected(options.connect_timeout_s):
            self.stop()
            raise ServeError(
                f"broker {address.host}:{address.port} did not accept a connection within"
                f" {options.connect_timeout_s:.0f} s; expected a reachable MQTT broker"
            )
        transport.wait_subscribed(options.connect_timeout_s)
        if options.metrics_port:
            from tools.fleetctl.metrics import MetricsServer, fleet_registry  # noqa: PLC0415

            registry = fleet_registry(self.home.registry_path, lambda: self.ingest.counters)
            self.metrics = MetricsServer(
                registry, host=options.metrics_host, port=options.metrics_port
            )
            try:
                self.metrics.start()
            except OSError as exc:
                self.stop()
                raise ServeError(
                    f"metrics port {options.metrics_host}:{options.metrics_port}: cannot listen"
                    f" ({exc.strerror}); expected a free port or --metrics-port 0"
                ) from exc
        logger.info(
            "controller %s serving %s on %s:%d",
            self.client_id,
            self.topics.prefix,
            address.host,
            address.port,
        )

    def run(self, stop: threading.Event) -> None:
        """Tick the rollout engine and the timestamp refresh until ``stop`` is set."""
        while not stop.is_set():
            self.tick()
            stop.wait(self.options.tick_s)

    def broker_auth(self) -> Any:
        """The embedded broker's :class:`BrokerAuth`: active devices' hashes, the controller's."""
        from tools.fleetctl.broker_acl import BrokerAuth, fleet_acl_rules  # noqa: PLC0415

        with self.home.registry() as registry:
            hashes = registry.broker_credentials()
        hashes[CONTROLLER_USER] = self._controller_hash  # never a device's, whatever its id
        self._broker_auth_hashes = hashes
        return BrokerAuth(
            hashes,
            fleet_acl_rules(self.topics, controller_user=CONTROLLER_USER),
            free_client_ids=frozenset({CONTROLLER_USER}),
        )

    def reload_broker_auth(self) -> bool:
        """Re-read the device credentials; True if the embedded broker got a new table."""
        if self.broker is None:
            return False
        previous = self._broker_auth_hashes
        auth = self.broker_auth()
        if auth.password_hashes == previous:
            return False
        self.broker.set_auth(auth)
        logger.info("embedded broker: %d device login(s)", len(auth.password_hashes) - 1)
        return True

    def tick(self) -> None:
        """One round of periodic work (never raises: a failing round is logged)."""
        if self.rollout_engine is not None:
            try:
                self.rollout_engine.tick()
            except Exception:
                logger.exception("rollout engine tick failed")
        try:
            self.notify_new_assignments()
        except sqlite3.Error:
            logger.exception("assignment check failed")
        now = time.monotonic()
        if self.broker is not None and now >= self._next_auth_reload:
            self._next_auth_reload = now + self.options.auth_reload_s
            try:
                self.reload_broker_auth()
            except (FleetctlError, sqlite3.Error) as exc:
                logger.error("embedded broker logins not reloaded: %s", exc)
        if now >= self._next_timestamp_check:
            self._next_timestamp_check = now + self.options.timestamp_check_s
            try:
                self.refresh_timestamps()
            except (FleetctlError, OSError, ValueError):
                logger.exception("timestamp refresh failed")

    def stop(self) -> None:
        """Stop every part (idempotent)."""
        for part in (self.metrics, self.repository_server):
            stop = getattr(part, "stop", None)
            if stop is not None:
                stop()
        self.metrics = self.repository_server = None
        if self.rollout_engine is not None:
            self.rollout_engine.close()
            self.rollout_engine = None
        if self.transport is not None:
            self.transport.disconnect()
            self.transport = None
        if self._ingest_thread.is_alive():
            self._inbox.put(None)
            self._ingest_thread.join(timeout=10)
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        self.store.close()
        logger.info("controller stopped")

    # ---- ingest --------------------------------------------------------------------------------

    def _enqueue(self, topic: str, payload: bytes, _properties: Any) -> None:
        try:
            self._inbox.put_nowait((topic, payload))
        except queue.Full:
            self.inbox_overflows += 1
            logger.warning("ingest queue full (%d): dropped a message on %s", _INGEST_QUEUE, topic)

    def _ingest_loop(self) -> None:
        while True:
            try:
                item = self._inbox.get(timeout=self.acks.interval_s)
            except queue.Empty:
                self._flush_acks()  # idle: only acknowledgements may be left
                continue
            if item is None:
                return
            try:
                self.ingest.handle(*item)
            except Exception:
                logger.exception("ingest of a message on %s failed", item[0])
            if self.acks.due() or self._inbox.empty():
                self._flush_acks()

    def _flush_acks(self) -> None:
        if not self.acks.pending:
            return
        try:
            self.acks.flush()
        except Exception:
            logger.exception("acknowledging stored messages failed")

    # ---- timestamps ----------------------------------------------------------------------------

    def refresh_timestamps(self) -> list[str]:
        """Re-sign timestamps close to expiry; notify the devices concerned. Returns their ids."""
        deadline = self.home.clock() + self.options.timestamp_margin
        image = self.home.image()
        if image.timestamp().expires <= deadline:
            renewed = image.refresh_expiring(self.options.other_roles_margin)
            logger.info("image repository: re-signed %s", ", ".join(renewed))
        director = self.home.director()
        refreshed = []
        for device_id in director.devices():
            namespace = director.namespace(device_id)
            if namespace.timestamp().expires <= deadline:
                namespace.refresh_expiring(self.options.other_roles_margin)
                refreshed.append(device_id)
                self.notify(device_id, reason="timestamp-refreshed")
        if refreshed:
            logger.info("re-signed director timestamps of %d device(s)", len(refreshed))
        return refreshed

    def _max_assignment_id(self) -> int:
        with contextlib.closing(sqlite3.connect(self.home.registry_path, timeout=5.0)) as db:
            row = db.execute("SELECT COALESCE(MAX(id), 0) FROM assignments").fetchone()
        return int(row[0])

    def notify_new_assignments(self) -> list[str]:
        """Nudge devices assigned since the last check (``fleetctl assign`` from another process).

        The director metadata is already signed and served; the nudge only saves the device its
        next poll interval. Returns the devices notified.
        """
        with contextlib.closing(sqlite3.connect(self.home.registry_path, timeout=5.0)) as db:
            rows = db.execute(
                "SELECT id, device_id FROM assignments WHERE id > ? ORDER BY id",
                (self._last_assignment_id,),
            ).fetchall()
        if rows:
            self._last_assignment_id = int(rows[-1][0])
        # The rollout engine nudges the devices it re-assigns: one nudge per change is enough.
        already, self._notified_since_check = self._notified_since_check, set()
        devices = [
            d for d in dict.fromkeys(str(device_id) for _, device_id in rows) if d not in already
        ]
        for device_id in devices:
            self.notify(device_id)
        return devices

    def notify_director_changed(self, device_id: str) -> None:
        """Nudge a device whose director metadata changed (the rollout engine's callback)."""
        self._notified_since_check.add(device_id)
        self.notify(device_id)

    def notify(self, device_id: str, *, reason: str = "director-changed") -> bool:
        """Nudge a device to refresh now; False if it could not be sent (it refreshes anyway)."""
        if self.transport is None:
            return False
        payload = encode(Notify(ts=time.time(), reason=reason))
        try:
            self.transport.publish(self.topics.notify(device_id), payload, qos=1)
        except TransportError as exc:
            logger.warning("notify %s not sent: %s", device_id, exc)
            return False
        return True
