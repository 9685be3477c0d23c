"""The daemon's supervisor: lifecycle of ``edge-agent daemon`` from config to clean stop.

Start order: state dir -> device identity -> outbox -> transport (started, not awaited: the
device works offline) -> inference on the committed model from the encrypted store -> results,
telemetry, updater and outbox flusher -> ``READY=1``. The main loop then beats the watchdog
while the services are healthy, refreshes ``STATUS=`` ("running digits@1.0.0, 29.8 fps,
connected") and handles signals: SIGTERM/SIGINT stop cleanly (retained offline state, loop
stopped, outbox closed); SIGHUP reloads ``[source]``, ``[results]`` and ``[telemetry]``
(:func:`~agent.daemon.config.reload_settings`) without dropping the model.

Delivery guarantees: telemetry and events are ``put`` in the SQLite outbox first; the flusher
(:mod:`agent.daemon.delivery`) publishes them in order at QoS 1 while connected and keeps each
until the controller acknowledges it end to end (``Ack`` on ``{p}/dev/{d}/ack``), re-sending what
is not acknowledged in time and everything in flight after a reconnect. Broker outages, broker
restarts and process restarts lose nothing the outbox's bounds kept. Duplicates are possible and
the controller drops them by ``boot_id``/``seq``. Results bypass the outbox (stale results are
worthless) and go out at ``[results] qos`` only while connected.
"""

from __future__ import annotations

import logging
import signal
import ssl
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from agent import __version__
from agent.atomicio import ensure_private_dir
from agent.daemon.config import AgentConfig, load_config, reload_settings
from agent.daemon.delivery import OutboxFlusher, ack_key_function
from agent.daemon.inference import InferenceService, RunningModel
from agent.daemon.outbox import Outbox
from agent.daemon.results import ResultPublisher
from agent.daemon.sdnotify import SystemdNotifier, WatchdogKeepAlive, watchdog_interval
from agent.daemon.telemetry import TelemetryService
from agent.daemon.updater import EventPublisher, FetcherFactory, UpdaterService
from agent.pipeline.loop import FrameResult
from agent.protocol.messages import ActiveModel, Notify, StateMessage, decode, encode
from agent.protocol.topics import Topics
from agent.supplychain.store import DeviceState
from agent.transport.base import (
    Backoff,
    MessageProperties,
    Transport,
    TransportError,
    Will,
)

__all__ = ["OutboxFlusher", "Supervisor", "SupervisorError"]

logger = logging.getLogger(__name__)

_TICK_S = 1.0
#: repository segment per request: 8 in flight x 512 KiB stays within the brokers' per-client
#: queues (mosquitto: 20 in flight, 1000 queued) and halves the per-segment overhead of 256 KiB
REPOSITORY_SEGMENT_BYTES = 512 * 1024


class SupervisorError(Exception):
    """The daemon cannot start: state, identity, outbox or transport setup failed."""


class Supervisor:
    """Builds and runs the daemon's services; :meth:`run` returns the exit status."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        config_path: str | None = None,
        environ: Mapping[str, str] | None = None,
        fetcher_factory: FetcherFactory | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.environ = environ
        self.boot_id = uuid.uuid4().hex
        self.topics = Topics(prefix=config.mqtt.prefix)
        self.device_id = config.device.id
        self._fetcher_factory = fetcher_factory
        self._transport = transport
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._state_lock = threading.Lock()
        self._published_model: str | None = "unset"

    # ---- construction --------------------------------------------------------------------------

    def _build_transport(self) -> Transport:
        from agent.transport.mqtt import PahoTransport, TlsFiles  # noqa: PLC0415 - paho

        mqtt = self.config.mqtt
        tls = None
        if mqtt.tls:
            default_ca = (
                ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
            )
            tls = TlsFiles(
                ca_file=self.config.credential_path(mqtt.ca, self.environ)
                if mqtt.ca
                else Path(default_ca),
                cert_file=self.config.credential_path(mqtt.cert, self.environ)
                if mqtt.cert
                else None,
                key_file=self.config.credential_path(mqtt.key, self.environ) if mqtt.key else None,
            )
        password = None
        if mqtt.password_file is not None:
            path = self.config.credential_path(mqtt.password_file, self.environ)
            try:
                password = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise SupervisorError(
                    f"mqtt.password_file {path}: cannot read it ({exc}); expected a readable"
                    " text file"
                ) from exc
        will = Will(
            self.topics.state(self.device_id),
            encode(StateMessage(online=False, ts=time.time())),
            qos=1,
            retain=True,
        )
        return PahoTransport(
            host=mqtt.host,
            port=mqtt.port,
            client_id=self.device_id,
            protocol=mqtt.protocol,
            tls=tls,
            username=self.device_id,
            password=password,
            will=will,
            keepalive=mqtt.keepalive_s,
            backoff=Backoff(initial=mqtt.reconnect_min_s, maximum=mqtt.reconnect_max_s),
        )

    def _default_fetcher_factory(self, transport: Transport) -> FetcherFactory:
        repository_dir = self.config.update.repository_dir
        if repository_dir is not None:
            from agent.supplychain.fetcher import LocalDirectoryFetcher  # noqa: PLC0415

            return lambda: LocalDirectoryFetcher(Path(repository_dir))
        from agent.daemon.repofetch import (  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
            MqttRepositoryFetcher,
        )

        partial = Path(self.config.device.state_dir) / "partial"
        fetcher = MqttRepositoryFetcher(
            transport,
            self.topics,
            self.device_id,
            segment_bytes=REPOSITORY_SEGMENT_BYTES,
            partial_dir=partial,
        )
        return lambda: fetcher  # type: ignore[no-any-return]

    def _state_message(self, inference: InferenceService) -> StateMessage:
        from agent.runtime import available_runtimes  # noqa: PLC0415

        running = inference.running
        backends = tuple(
            f"{fmt}:{status}"[:64]
            for fmt, status in available_runtimes().items()
            if not status.startswith("unavailable")
        )
        active = None
        if running is not None:
            active = ActiveModel(
                name=running.name,
                version=running.version,
                backend=running.backend,
                target=running.target,
            )
        return StateMessage(
            online=True,
            boot_id=self.boot_id,
            agent_version=__version__,
            ts=time.time(),
            backends=backends,
            active_model=active,
        )

    def _load_committed(self, state: DeviceState, identity: Any) -> RunningModel | None:
        from agent.pipeline.predictor import Predictor  # noqa: PLC0415
        from agent.runtime import load_model  # noqa: PLC0415

        if state.read_installed().current is None:
            logger.info("no committed model yet; waiting for the director")
            return None
        for slot in ("current", "previous"):
            try:
                plaintext, entry = state.decrypt_installed(identity, self.device_id, slot)  # type: ignore[arg-type]
                try:
                    # The runtime keeps its own copy while the model is loaded; the decryption
                    # buffer is zeroed so no second plaintext copy lingers (see updater.py).
                    model = load_model(plaintext, format=entry.card.format)
                finally:
                    plaintext[:] = bytes(len(plaintext))
                predictor = Predictor(model, entry.card)
            except Exception as exc:
                logger.error("cannot run the %s installed model: %s", slot, exc)
                continue
            return RunningModel(
                predictor, entry.card.name, entry.version, entry.target_path, entry.sha256
            )
        return None

    # ---- run -----------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop the daemon (what SIGTERM does)."""
        self._stop.set()

    def request_reload(self) -> None:
        """Reload settings (what SIGHUP does)."""
        self._reload.set()

    def _install_signals(self) -> None:
        def on_stop(_signum: int, _frame: FrameType | None) -> None:
            self._stop.set()

        def on_reload(_signum: int, _frame: FrameType | None) -> None:
            self._reload.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_reload)

    def run(self, *, install_signals: bool = True) -> int:
        """Run until stopped; returns 0 after a clean stop.

        Raises:
            SupervisorError: startup failed (one line: what, and what was expected).
        """
        from agent.supplychain.identity import DeviceIdentity  # noqa: PLC0415

        config = self.config
        notifier = SystemdNotifier(environ=self.environ)
        try:
            ensure_private_dir(config.device.state_dir)
            state = DeviceState(config.device.state_dir)
            identity = DeviceIdentity.load(config.credentials_dir(self.environ))
            outbox = Outbox(
                Path(config.device.state_dir) / "outbox.sqlite",
                max_bytes=config.outbox.max_bytes,
                max_messages=config.outbox.max_messages,
                ack_key=ack_key_function(self.topics),
            )
        except Exception as exc:
            raise SupervisorError(f"daemon setup: {exc}") from exc
        try:
            transport = self._transport or self._build_transport()
        except TransportError as exc:
            outbox.close()
            raise SupervisorError(f"mqtt: {exc}") from exc
        if install_signals:
            self._install_signals()

        results = ResultPublisher(
            transport,
            self.topics,
            self.device_id,
            config.results,
            boot_id=self.boot_id,
            clock=time.time,
        )

        def on_result(result: FrameResult, running: RunningModel) -> None:
            results.offer(
                result.payload,
                frame=result.frame,
                ts=result.ts,
                latency_ms=result.latency_ms,
                model=running.name,
                model_version=running.version,
            )

        telemetry: TelemetryService | None = None
        inference = InferenceService(
            config.source,
            on_result=on_result,
            on_model_change=lambda sample: telemetry.cut(sample) if telemetry else None,
        )
        telemetry = TelemetryService(
            outbox=outbox,
            topics=self.topics,
            device_id=self.device_id,
            boot_id=self.boot_id,
            interval_s=config.telemetry.interval_s,
            drain=inference.drain_interval,
            reconnects=lambda: transport.stats().reconnects,
            wall_clock=time.time,
        )
        flusher = OutboxFlusher(outbox, transport, self.topics, self.device_id)
        events = EventPublisher(
            outbox=outbox,
            topics=self.topics,
            device_id=self.device_id,
            boot_id=self.boot_id,
            identity=identity,
        )
        from agent.runtime import RuntimeOptions  # noqa: PLC0415

        fetcher_factory = self._fetcher_factory or self._default_fetcher_factory(transport)
        offline_repo = config.update.repository_dir is not None or self._fetcher_factory is not None
        updater = UpdaterService(
            config=config.update,
            state=state,
            identity=identity,
            device_id=self.device_id,
            fetcher_factory=fetcher_factory,
            inference=inference,
            events=events,
            runtime_options=RuntimeOptions(
                threads=config.runtime.threads,
                onnx_providers=config.runtime.onnx_providers,
                tflite_runtime=config.runtime.tflite_runtime,
            ),
            can_fetch=(lambda: True) if offline_repo else (lambda: transport.is_connected),
        )

        def on_connected(_session_present: bool) -> None:
            self._publish_state(transport, inference)
            flusher.reconnected()
            updater.notify()

        def on_notify(_topic: str, payload: bytes, _props: MessageProperties) -> None:
            decode(Notify, payload)  # malformed nudges are dropped and counted
            logger.info("controller asked for an update check")
            updater.notify()

        transport.on_connected(on_connected)
        transport.subscribe(self.topics.notify(self.device_id), on_notify, qos=1)
        flusher.subscribe()
        transport.connect()

        committed = self._load_committed(state, identity)
        if committed is not None:
            try:
                inference.activate(committed)
            except Exception as exc:
                logger.error("cannot start inference on %s: %s", committed.label, exc)
        for service in (telemetry, flusher, updater):
            service.start()
        notifier.ready(self._status(inference, transport))
        logger.info(
            "edge-agent %s running as %s (boot %s)", __version__, self.device_id, self.boot_id
        )

        timeout = watchdog_interval(self.environ)
        keepalive = WatchdogKeepAlive(notifier, timeout_s=timeout) if timeout else None
        if keepalive is not None:
            keepalive.start()
        try:
            while not self._stop.wait(_TICK_S):
                if self._reload.is_set():
                    self._reload.clear()
                    self._reload_settings(notifier, inference, results, telemetry)
                running = inference.running
                label = running.label if running is not None else None
                if label != self._published_model and transport.is_connected:
                    self._publish_state(transport, inference)
                notifier.status(self._status(inference, transport))
                if keepalive is not None:
                    keepalive.beat()
        finally:
            notifier.stopping("stopping")
            if keepalive is not None:
                keepalive.stop()
            updater.stop()
            telemetry.stop()
            inference.stop()
            flusher.flush_once()
            flusher.stop()
            try:
                transport.publish(
                    self.topics.state(self.device_id),
                    encode(StateMessage(online=False, boot_id=self.boot_id, ts=time.time())),
                    qos=1,
                    retain=True,
                )
            except TransportError as exc:
                logger.warning("offline state not published: %s", exc)
            transport.disconnect()
            outbox.close()
            logger.info("edge-agent stopped")
        return 0

    def _publish_state(self, transport: Transport, inference: InferenceService) -> None:
        with self._state_lock:
            message = self._state_message(inference)
            try:
                transport.publish(
                    self.topics.state(self.device_id), encode(message), qos=1, retain=True
                )
            except TransportError as exc:
                logger.debug("state not published: %s", exc)
                return
            model = message.active_model
            self._published_model = f"{model.name}@{model.version}" if model else None

    def _status(self, inference: InferenceService, transport: Transport) -> str:
        link = "connected" if transport.is_connected else "offline"
        return f"{inference.describe()}, {link}"

    def _reload_settings(
        self,
        notifier: SystemdNotifier,
        inference: InferenceService,
        results: ResultPublisher,
        telemetry: TelemetryService,
    ) -> None:
        if self.config_path is None:
            return
        notifier.reloading("reloading settings")
        try:
            plan = reload_settings(self.config, load_config(self.config_path))
        except Exception as exc:
            logger.error("reload refused, keeping the running settings: %s", exc)
            notifier.ready(f"reload refused: {exc}")
            return
        self.config = plan.config
        if "source" in plan.applied:
            try:
                inference.reload_source(plan.config.source)
            except Exception as exc:
                logger.error("source %s did not open: %s", plan.config.source.spec, exc)
        if "results" in plan.applied:
            results.reconfigure(plan.config.results)
        if "telemetry" in plan.applied:
            telemetry.set_interval(plan.config.telemetry.interval_s)
        if plan.needs_restart:
            logger.warning(
                "reload: %s changed and need a restart", ", ".join(sorted(plan.needs_restart))
            )
        logger.info("reloaded %s", ", ".join(sorted(plan.applied)) or "nothing (no change)")
        notifier.ready("settings reloaded")
