"""The updater service: drives :mod:`agent.daemon.update_machine` with real I/O.

A cycle runs on start, on a ``Notify`` from the controller and every ``[update]
poll_interval_s``: refresh and resolve through
:class:`~agent.supplychain.verify.DeviceUpdateClient` (fetcher from a factory: MQTT in
production, a local directory for air-gapped devices and tests), download and decrypt in memory,
``load_model``, strict self-test, build a :class:`~agent.pipeline.predictor.Predictor`,
swap it into the running loop (the previous model stays loaded), watch it for ``watch_s``
(inference error rate, p95 latency against ``max_latency_ms``), then commit
(``DeviceState.record_install``) or swap back and report ``rolled-back``.

Invariants:
    * ``installed.json`` changes only on commit: a crash at any point before boots the
      previously committed model.
    * A target that failed verification, its grant, decryption, loading, its self-test,
      activation or the watch is remembered by ciphertext sha256 in ``failed-targets.json`` and
      not retried until the director names a different target.
    * A transport failure (repository unreachable, download stalled or cut) ends the cycle with
      no event and nothing remembered; the partial download is kept and resumed by the next
      cycle, after ``retry_after_s`` (doubling up to ``poll_interval_s``).
    * No cycle ends with the machine busy: a watch that raises fails and rolls back; a rollback
      that cannot restore the previous model stops inference rather than run the rejected one.
    * The decryption buffer is zeroed after loading, but the runtime keeps its own immutable
      copy of the plaintext for as long as the model is loaded (onnxruntime takes only ``bytes``;
      a TFLite interpreter reads its model buffer while it lives).
    * Every machine transition with an event kind becomes one signed ``EventMessage`` queued in
      the outbox (``seq`` +1 per event per boot).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuf.ngclient.fetcher import FetcherInterface

from agent.atomicio import atomic_write
from agent.daemon.config import UpdateConfig
from agent.daemon.inference import InferenceService, RunningModel
from agent.daemon.outbox import Outbox, OutboxError
from agent.daemon.update_machine import Input, Transition, UpdateMachine
from agent.daemon.worker import ServiceThread
from agent.protocol.messages import EventMessage, encode
from agent.protocol.topics import Topics
from agent.supplychain.identity import DeviceIdentity
from agent.supplychain.reports import sign_report
from agent.supplychain.store import DeviceState

__all__ = ["EventPublisher", "FailedTargets", "UpdaterService", "WatchVerdict"]

logger = logging.getLogger(__name__)

FetcherFactory = Callable[[], FetcherInterface]
#: frames (results + errors) needed before the error rate can fail a watch early
MIN_WATCH_FRAMES = 20
#: seconds before the first retry after a transport failure (doubling, up to the poll interval)
RETRY_AFTER_S = 5.0
_WATCH_STEP_S = 0.25


class FailedTargets:
    """``failed-targets.json``: targets (by ciphertext sha256) this device rejected."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, dict[str, Any]]:
        """sha256 -> {target, version, reason, ts}; empty when absent or unreadable."""
        try:
            data = json.loads(self.path.read_bytes()[: 1024 * 1024])
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("%s unreadable (%s); starting with no failed targets", self.path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def contains(self, sha256: str) -> bool:
        """Whether the target with this ciphertext sha256 failed before."""
        return sha256 in self.read()

    def remember(self, sha256: str, *, target: str, version: str | None, reason: str) -> None:
        """Record a failed target (kept until the director names another one)."""
        data = self.read()
        data[sha256] = {"target": target, "version": version, "reason": reason, "ts": time.time()}
        atomic_write(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode=0o600)

    def forget_all(self) -> None:
        """The director moved on: earlier failures may be retried if named again."""
        if self.read():
            atomic_write(self.path, "{}\n", mode=0o600)


class EventPublisher:
    """Turns machine transitions into signed ``EventMessage``s queued in the outbox."""

    def __init__(
        self,
        *,
        outbox: Outbox,
        topics: Topics,
        device_id: str,
        boot_id: str,
        identity: DeviceIdentity,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._outbox = outbox
        self._topic = topics.events(device_id)
        self._device_id = device_id
        self._boot_id = boot_id
        self._identity = identity
        self._clock = clock
        self._lock = threading.Lock()
        self.seq = 0

    def publish(self, transition: Transition) -> EventMessage | None:
        """Queue the event of ``transition`` (None when the step publishes nothing)."""
        if transition.kind is None:
            return None
        context = transition.context
        reason = context.reason if transition.kind in ("failed", "rolled-back") else None
        with self._lock:
            seq, ts = self.seq, round(self._clock(), 6)
            report: dict[str, Any] = {
                "device_id": self._device_id,
                "kind": transition.kind,
                "target": context.target,
                "version": context.version,
                "sha256": context.sha256,
                "boot_id": self._boot_id,
                "seq": seq,
                "ts": ts,
            }
            # signed too, so a broker cannot change why a target failed or what it replaced
            if reason is not None:
                report["reason"] = reason
            if context.previous_version is not None:
                report["previous_version"] = context.previous_version
            message = EventMessage(
                boot_id=self._boot_id,
                seq=seq,
                ts=ts,
                kind=transition.kind,
                target=context.target,
                version=context.version,
                previous_version=context.previous_version,
                reason=reason,
                report=sign_report(report, self._identity.ed25519),
            )
            try:
                self._outbox.put(self._topic, encode(message), qos=1)
            except OutboxError as exc:
                logger.warning("event %s not queued: %s", transition.kind, exc)
                return None
            self.seq += 1
        logger.info(
            "update event %s%s%s",
            transition.kind,
            f" {context.target}" if context.target else "",
            f": {context.reason}" if message.reason else "",
        )
        return message


@dataclass(frozen=True)
class WatchVerdict:
    """The outcome of a post-activation watch."""

    passed: bool
    reason: str = ""
    results: int = 0
    errors: int = 0
    p95_ms: float = 0.0


class _StepFailed(Exception):
    """Internal: a step before activation failed; the message is the event's reason."""


class _TransportFailed(Exception):
    """Internal: the repository could not be read; the message says why (not an event)."""


def is_transport_failure(exc: BaseException) -> bool:
    """Whether ``exc`` means the repository could not be read (missing, unreachable, stalled,
    cut or overlong download, not connected), rather than that what was read is bad."""
    from tuf.api.exceptions import DownloadError  # noqa: PLC0415 - tuf

    from agent.supplychain.errors import FetchError  # noqa: PLC0415
    from agent.transport.base import TransportError  # noqa: PLC0415

    return isinstance(exc, FetchError | DownloadError | TransportError)


class UpdaterService(ServiceThread):
    """Runs update cycles in a thread: on start, on :meth:`notify` and every poll interval."""

    thread_name = "edge-updater"
    stop_timeout_s = 10.0  # a step in progress (a download, a self-test) finishes first

    def __init__(
        self,
        *,
        config: UpdateConfig,
        state: DeviceState,
        identity: DeviceIdentity,
        device_id: str,
        fetcher_factory: FetcherFactory,
        inference: InferenceService,
        events: EventPublisher,
        runtime_options: Any = None,
        can_fetch: Callable[[], bool] = lambda: True,
        retry_after_s: float = RETRY_AFTER_S,
    ) -> None:
        super().__init__()
        self.config = config
        self.state = state
        self.identity = identity
        self.device_id = device_id
        self.fetcher_factory = fetcher_factory
        self.inference = inference
        self.events = events
        self.runtime_options = runtime_options
        self.can_fetch = can_fetch
        self.retry_after_s = retry_after_s
        #: transport failures in a row; the next cycle comes after a backoff while above 0
        self.transport_failures = 0
        self.failed_targets = FailedTargets(state.root / "failed-targets.json")
        committed = state.read_installed().current
        self.machine = UpdateMachine(
            previous_version=committed.version if committed is not None else None
        )
        self.cycles = 0
        self.cycle_done = threading.Condition()

    def notify(self) -> None:
        """Run a cycle as soon as possible (a controller ``Notify``, a reconnect)."""
        self._wake.set()

    def start(self) -> None:
        """Start the updater thread; the first cycle runs at once."""
        self._wake.set()
        super().start()

    def next_wait_s(self) -> float:
        """Seconds until the next cycle unless notified: a backoff after transport failures."""
        poll = self.config.poll_interval_s
        if not self.transport_failures:
            return poll
        return float(min(poll, self.retry_after_s * 2 ** min(self.transport_failures - 1, 16)))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.next_wait_s())
            self._wake.clear()
            if self._stop.is_set():
                return
            if not self.can_fetch():
                logger.debug("update check postponed: the repository is not reachable now")
                continue
            try:
                self.run_cycle()
            except Exception as exc:
                logger.exception("update cycle failed unexpectedly")
                self._end_cycle_after(exc)
            with self.cycle_done:
                self.cycles += 1
                self.cycle_done.notify_all()

    def _end_cycle_after(self, exc: Exception) -> None:
        """Leave no cycle half done after an unexpected error: the next one must be able to run."""
        from agent.daemon.update_machine import State  # noqa: PLC0415

        if not self.machine.busy or self.machine.state is State.WATCHING:
            return  # the watch always ends in a verdict (see _activate_and_watch)
        try:
            self._step(Input.FAIL, reason=f"update step failed: {type(exc).__name__}: {exc}")
        except Exception:
            logger.exception("could not end the update cycle after an error")

    def _step(self, event: Input, **context: Any) -> None:
        self.events.publish(self.machine.handle(event, **context))

    def run_cycle(self) -> None:
        """One refresh -> ... -> commit | rollback | failed | up-to-date cycle."""
        from agent.supplychain.errors import NoUpdateError  # noqa: PLC0415
        from agent.supplychain.verify import DeviceUpdateClient  # noqa: PLC0415 - tuf

        self._step(Input.REFRESH)
        try:
            client = DeviceUpdateClient(
                self.state, self.fetcher_factory(), device_id=self.device_id, identity=self.identity
            )
            plan = client.refresh()
        except NoUpdateError as exc:
            self.transport_failures = 0
            self._step(Input.REFRESHED)
            self._step(Input.SKIP)
            logger.info("no model assigned: %s", exc)
            return
        except Exception as exc:
            reason = f"refresh failed: {type(exc).__name__}: {exc}"
            if is_transport_failure(exc):
                self._retry_later(reason)
                return
            self.transport_failures = 0
            self._step(Input.FAIL, reason=reason)
            return
        self.transport_failures = 0
        self._step(Input.REFRESHED)
        card = plan.card
        named = {"target": plan.target_path, "version": card.version, "sha256": plan.sha256}
        if plan.up_to_date:
            self._step(Input.UP_TO_DATE, **named)
            return
        if self.failed_targets.contains(plan.sha256):
            self._step(Input.SKIP, **named)
            logger.debug("target %s failed before; not retried", plan.target_path)
            return
        self.failed_targets.forget_all()
        self._step(Input.NEW_TARGET, **named)
        try:
            running, verified = self._prepare(client, plan)
        except _TransportFailed as exc:
            self._retry_later(str(exc))
            return
        except _StepFailed as exc:
            reason = str(exc)
            self._step(Input.FAIL, reason=reason)
            self.failed_targets.remember(
                plan.sha256, target=plan.target_path, version=card.version, reason=reason
            )
            return
        self._activate_and_watch(running, verified)

    def _retry_later(self, reason: str) -> None:
        """End the cycle after a transport failure: nothing remembered, a retry soon."""
        self.transport_failures += 1
        self._step(Input.RETRY_LATER, reason=reason)
        logger.warning("%s; trying again in %.1f s", reason, self.next_wait_s())

    def _prepare(self, client: Any, plan: Any) -> tuple[RunningModel, Any]:
        """Fetch, verify, unseal, decrypt, load, self-test and build the predictor."""
        from agent.pipeline.predictor import Predictor  # noqa: PLC0415
        from agent.pipeline.selftest import SelfTestError, run_self_test  # noqa: PLC0415
        from agent.runtime import load_model  # noqa: PLC0415

        card = plan.card
        try:
            verified = self._fetch_verified(client, plan)
        except Exception as exc:
            reason = f"download/verification failed: {type(exc).__name__}: {exc}"
            if is_transport_failure(exc):
                raise _TransportFailed(reason) from exc
            raise _StepFailed(reason) from exc
        for event in (Input.FETCHED, Input.VERIFIED, Input.UNSEALED, Input.DECRYPTED):
            self._step(event)
        try:
            # load_model makes the one immutable copy the runtime keeps (see the module notes)
            model = load_model(verified.plaintext, format=card.format, options=self.runtime_options)
        except Exception as exc:
            raise _StepFailed(f"model did not load: {type(exc).__name__}: {exc}") from exc
        finally:
            verified.plaintext[:] = bytes(len(verified.plaintext))
        self._step(Input.LOADED)
        try:
            run_self_test(model, card, strict=True)
            predictor = Predictor(model, card)
        except SelfTestError as exc:
            model.close()
            raise _StepFailed(f"self-test failed: {exc}") from exc
        except Exception as exc:
            model.close()
            raise _StepFailed(f"model does not fit its card: {exc}") from exc
        self._step(Input.SELF_TEST_PASSED)
        running = RunningModel(predictor, card.name, card.version, plan.target_path, plan.sha256)
        return running, verified

    @staticmethod
    def _fetch_verified(client: Any, plan: Any) -> Any:
        """``fetch_and_decrypt``; after a hash mismatch, drop partial downloads and retry once.

        A resumed download whose stored prefix was torn or corrupted fails ngclient's hash
        check; starting over from byte 0 is then the cure (a second mismatch is a bad target).
        """
        from agent.supplychain.errors import TargetHashError  # noqa: PLC0415

        try:
            return client.fetch_and_decrypt(plan)
        except TargetHashError as exc:
            discard = getattr(client.fetcher, "discard_partials", None)
            if discard is None:
                raise
            logger.warning("%s; discarding partial downloads and fetching once more", exc)
            discard()
            return client.fetch_and_decrypt(plan)

    def _activate_and_watch(self, running: RunningModel, verified: Any) -> None:
        before = self.inference.running
        try:
            previous = self.inference.activate(running)
        except Exception as exc:
            reason = f"activation failed: {type(exc).__name__}: {exc}"
            problem = self._fall_back(before, running)
            self._step(Input.FAIL, reason=reason + problem)
            self.failed_targets.remember(
                running.sha256, target=running.target, version=running.version, reason=reason
            )
            return
        self._step(Input.ACTIVATED)
        try:
            verdict = self.watch()
        except Exception as exc:
            logger.exception("watching %s failed", running.label)
            verdict = WatchVerdict(False, f"watch failed: {type(exc).__name__}: {exc}")
        if verdict is None:
            logger.info("stopping during the watch of %s: not committed", running.label)
            return
        if verdict.passed:
            try:
                self.state.record_install(verified.installed_target())
            except Exception as exc:
                verdict = WatchVerdict(False, f"recording the install failed: {exc}")
        if verdict.passed:
            self._step(Input.WATCH_PASSED)
            if previous is not None:
                previous.close()
            return
        problem = self._fall_back(previous, running)
        self._step(Input.WATCH_FAILED, reason=verdict.reason + problem)
        self.failed_targets.remember(
            running.sha256, target=running.target, version=running.version, reason=verdict.reason
        )

    def _fall_back(self, previous: RunningModel | None, rejected: RunningModel) -> str:
        """Run ``previous`` again (nothing when None) instead of ``rejected``, close ``rejected``.

        Returns "" or "; restoring ... failed: why" (inference is then stopped) for the reason.
        """
        problem = ""
        try:
            if previous is not None:
                if self.inference.running is not previous:
                    self.inference.activate(previous)
            else:
                self.inference.deactivate()
        except Exception as exc:
            label = previous.label if previous is not None else "no model"
            problem = f"; restoring {label} failed: {type(exc).__name__}: {exc}"
            logger.error("restoring %s after %s failed: %s", label, rejected.label, exc)
            if previous is None or self.inference.running is not previous:
                try:
                    self.inference.deactivate()
                except Exception:
                    logger.exception("stopping inference after a failed restore failed")
        rejected.close()
        return problem

    def watch(self) -> WatchVerdict | None:
        """Watch the running model for ``watch_s``; None when stopped meanwhile."""
        config = self.config
        start = self.inference.health()
        self.inference.watch_latency.reset()
        deadline = time.monotonic() + config.watch_s
        results = errors = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining > 0 and self._stop.wait(min(remaining, _WATCH_STEP_S)):
                return None
            now = self.inference.health()
            results, errors = now.results - start.results, now.errors - start.errors
            total = results + errors
            rate = errors / total if total else 0.0
            if rate > config.max_error_rate and (total >= MIN_WATCH_FRAMES or remaining <= 0):
                return WatchVerdict(
                    False,
                    f"error rate {rate:.1%} over {total} frames: expected at most "
                    f"{config.max_error_rate:.1%}",
                    results,
                    errors,
                )
            if remaining <= 0:
                break
        p95 = self.inference.watch_latency.percentile(95) / 1e6
        if config.max_latency_ms is not None and results and p95 > config.max_latency_ms:
            return WatchVerdict(
                False,
                f"p95 latency {p95:.1f} ms over {results} frames: expected at most "
                f"{config.max_latency_ms:g} ms",
                results,
                errors,
                p95,
            )
        return WatchVerdict(True, "", results, errors, p95)
