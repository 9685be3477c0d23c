"""The updater service: drives :mod:`agent.daemon.update_machine` with real I/O.

A cycle runs on start, on a ``Notify`` from the controller and every ``[update]
poll_interval_s``: refresh and resolve through
:class:`~agent.supplychain.verify.DeviceUpdateClient` (fetcher from a factory: MQTT in
production, a local directory for air-gapped devices and tests), download and decrypt in memory,
``load_model(bytes)``, strict self-test, build a :class:`~agent.pipeline.predictor.Predictor`,
swap it into the running loop (the previous model stays loaded), watch it for ``watch_s``
(inference error rate, p95 latency against ``max_latency_ms``), then commit
(``DeviceState.record_install``) or swap back and report ``rolled-back``.

Invariants:
    * ``installed.json`` changes only on commit: a crash at any point before boots the
      previously committed model.
    * A target that failed or was rolled back is remembered by ciphertext sha256 in
      ``failed-targets.json`` and not retried until the director names a different target.
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
        with self._lock:
            seq, ts = self.seq, round(self._clock(), 6)
            report = {
                "device_id": self._device_id,
                "kind": transition.kind,
                "target": context.target,
                "version": context.version,
                "sha256": context.sha256,
                "boot_id": self._boot_id,
                "seq": seq,
                "ts": ts,
            }
            message = EventMessage(
                boot_id=self._boot_id,
                seq=seq,
                ts=ts,
                kind=transition.kind,
                target=context.target,
                version=context.version,
                previous_version=context.previous_version,
                reason=context.reason if transition.kind in ("failed", "rolled-back") else None,
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


class UpdaterService:
    """Runs update cycles in a thread: on start, on :meth:`notify` and every poll interval."""

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
    ) -> None:
        self.config = config
        self.state = state
        self.identity = identity
        self.device_id = device_id
        self.fetcher_factory = fetcher_factory
        self.inference = inference
        self.events = events
        self.runtime_options = runtime_options
        self.can_fetch = can_fetch
        self.failed_targets = FailedTargets(state.root / "failed-targets.json")
        committed = state.read_installed().current
        self.machine = UpdateMachine(
            previous_version=committed.version if committed is not None else None
        )
        self._trigger = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cycles = 0
        self.cycle_done = threading.Condition()

    def notify(self) -> None:
        """Run a cycle as soon as possible (a controller ``Notify``, a reconnect)."""
        self._trigger.set()

    def start(self) -> None:
        """Start the updater thread; the first cycle runs at once."""
        self._trigger.set()
        self._thread = threading.Thread(target=self._run, name="edge-updater", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current step (a watch in progress ends without a commit)."""
        self._stop.set()
        self._trigger.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._trigger.wait(self.config.poll_interval_s)
            self._trigger.clear()
            if self._stop.is_set():
                return
            if not self.can_fetch():
                logger.debug("update check postponed: the repository is not reachable now")
                continue
            try:
                self.run_cycle()
            except Exception:
                logger.exception("update cycle failed unexpectedly")
            with self.cycle_done:
                self.cycles += 1
                self.cycle_done.notify_all()

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
            self._step(Input.REFRESHED)
            self._step(Input.SKIP)
            logger.info("no model assigned: %s", exc)
            return
        except Exception as exc:
            self._step(Input.FAIL, reason=f"refresh failed: {type(exc).__name__}: {exc}")
            return
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
        except _StepFailed as exc:
            reason = str(exc)
            self._step(Input.FAIL, reason=reason)
            self.failed_targets.remember(
                plan.sha256, target=plan.target_path, version=card.version, reason=reason
            )
            return
        self._activate_and_watch(running, verified)

    def _prepare(self, client: Any, plan: Any) -> tuple[RunningModel, Any]:
        """Fetch, verify, unseal, decrypt, load, self-test and build the predictor."""
        from agent.pipeline.predictor import Predictor  # noqa: PLC0415
        from agent.pipeline.selftest import SelfTestError, run_self_test  # noqa: PLC0415
        from agent.runtime import load_model  # noqa: PLC0415

        card = plan.card
        try:
            verified = self._fetch_verified(client, plan)
        except Exception as exc:
            raise _StepFailed(f"download/verification failed: {type(exc).__name__}: {exc}") from exc
        for event in (Input.FETCHED, Input.VERIFIED, Input.UNSEALED, Input.DECRYPTED):
            self._step(event)
        try:
            model = load_model(
                bytes(verified.plaintext), format=card.format, options=self.runtime_options
            )
        except Exception as exc:
            raise _StepFailed(f"model did not load: {type(exc).__name__}: {exc}") from exc
        finally:
            verified.plaintext[:] = b"\0" * len(verified.plaintext)
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
        try:
            previous = self.inference.activate(running)
        except Exception as exc:
            running.close()
            reason = f"activation failed: {type(exc).__name__}: {exc}"
            self._step(Input.FAIL, reason=reason)
            self.failed_targets.remember(
                running.sha256, target=running.target, version=running.version, reason=reason
            )
            return
        self._step(Input.ACTIVATED)
        verdict = self.watch()
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
        if previous is not None:
            self.inference.activate(previous)
        else:
            self.inference.deactivate()
        running.close()
        self._step(Input.WATCH_FAILED, reason=verdict.reason)
        self.failed_targets.remember(
            running.sha256, target=running.target, version=running.version, reason=verdict.reason
        )

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
