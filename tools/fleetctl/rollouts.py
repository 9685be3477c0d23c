"""Rollouts: the engine that runs them (tables and store: :mod:`tools.fleetctl.rollout_store`).

The CLI writes rows (:class:`RolloutStore`: deploy, rollback, pause/resume/abort requests); the
``fleetctl serve`` process calls :meth:`RolloutEngine.tick` at least every 0.5 s, which applies
the requests and moves every active rollout on, with the decisions of
:mod:`tools.fleetctl.rollout_plan`:

- a wave's devices get a fresh grant and director metadata (``assign_model``), then
  ``notify(device_id)``; the engine first remembers each device's previous assignment and the
  highest ``events.id``, so only later events count;
- outcomes come from the ingested events (``tools.fleetctl.ingest``) with ``verified = 1`` for the
  rollout's target path, stored after the mark and signed (``ts``) at or after the device's
  assignment time, so an outcome withheld from an earlier rollout of the same target cannot be
  released into this one (devices need a synchronised clock): ``committed`` or ``up-to-date``
  -> succeeded, ``failed`` or ``rolled-back`` -> failed (with the device's reason); none within
  the device timeout -> timed out;
- the latency check reads ingest's ``telemetry`` rows (``model`` = ``name@version``, ``p95_ms``);
- an abort re-assigns every device the rollout assigned to its previous model (a fresh grant and
  new director metadata) and notifies it; a device that had no previous model gets an empty
  director target list and its registry assignment ends, as for ``fleetctl device remove``.
  Only devices that had not failed count as rolled back: a failed device already runs its
  previous model, so its director metadata is restored without marking it (no double count).

A rollback (``fleetctl rollback``) is a rollout of kind ``rollback``: one wave with every device,
no abort criteria; it waits for the devices' outcomes like a deploy.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from tools.fleetctl import FleetctlError
from tools.fleetctl import rollout_plan as plan
from tools.fleetctl.devices import assign_model, parse_model_ref
from tools.fleetctl.home import FleetHome
from tools.fleetctl.rollout_plan import DeviceView, Rollout, RolloutDevice
from tools.fleetctl.rollout_store import ROLLOUT_SCHEMA, RolloutError, RolloutStore

__all__ = [
    "ROLLOUT_SCHEMA",
    "Rollout",
    "RolloutDevice",
    "RolloutEngine",
    "RolloutError",
    "RolloutStore",
]

logger = logging.getLogger(__name__)

_SUCCESS_KINDS = ("committed", "up-to-date")
_FAILURE_KINDS = ("failed", "rolled-back")
_NO_MODEL = "(none)"


class RolloutEngine:
    """Moves every active rollout on; ``fleetctl serve`` calls :meth:`tick` at least every 0.5 s.

    Args:
        home: the controller home.
        notify: sends ``Notify`` to a device whose director metadata changed.
        clock: seconds since the epoch (injected by tests).
    """

    def __init__(
        self,
        home: FleetHome,
        *,
        notify: Callable[[str], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.home = home
        self._notify = notify
        self._clock = clock
        self._store: RolloutStore | None = None

    @property
    def store(self) -> RolloutStore:
        """The engine's connection to the rollout tables (opened on first use)."""
        if self._store is None:
            self._store = RolloutStore(self.home, clock=self._clock)
        return self._store

    def close(self) -> None:
        """Close the database connection."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def tick(self) -> None:
        """Apply requests, record outcomes, abort or start waves; never raises for one rollout."""
        store = self.store
        for rollout_id in store.active_ids():
            try:
                self._advance(store.get(rollout_id))
            except (FleetctlError, sqlite3.Error, OSError) as exc:
                logger.error("rollout %d: %s", rollout_id, exc)

    # -- one rollout -----------------------------------------------------------------------------

    def _advance(self, rollout: Rollout) -> None:
        store, now = self.store, self._clock()
        if rollout.request is not None:
            rollout = self._apply_request(rollout, now)
            if rollout.state not in plan.ACTIVE_STATES:
                return
        if rollout.state == plan.PENDING:
            store.update_rollout(rollout.id, state=plan.RUNNING, started_at=now)
            logger.info("rollout %d of %s started", rollout.id, rollout.ref)
        self._record_outcomes(rollout, now)
        rollout = store.get(rollout.id)
        if rollout.kind == "deploy":
            reason = self._abort_reason(rollout)
            if reason is not None:
                self._abort(rollout, reason, now)
                return
        if rollout.state != plan.RUNNING:
            return
        views = self._views(rollout, now)
        decision = plan.next_wave(views, now, rollout.policy.wave_interval_s)
        if decision.start_wave is not None:
            self._start_wave(rollout, decision.start_wave, now)
        elif decision.finished:
            store.update_rollout(rollout.id, state=plan.SUCCEEDED, finished_at=now)
            logger.info("rollout %d of %s succeeded", rollout.id, rollout.ref)

    def _apply_request(self, rollout: Rollout, now: float) -> Rollout:
        action = rollout.request
        self.store.update_rollout(rollout.id, request=None)
        if action == "abort":
            self._abort(rollout, "aborted by the operator", now)
        else:
            new_state = plan.PAUSED if action == "pause" else plan.RUNNING
            try:
                if action == "resume" and rollout.state != plan.PAUSED:
                    raise plan.RolloutPlanError(f"rollout is {rollout.state}, not paused")
                plan.check_transition(rollout.state, new_state)
            except plan.RolloutPlanError as exc:
                logger.warning("rollout %d: %s request ignored: %s", rollout.id, action, exc)
            else:
                started = {} if rollout.started_at is not None else {"started_at": now}
                self.store.update_rollout(rollout.id, state=new_state, **started)
                logger.info("rollout %d %s", rollout.id, new_state)
        return self.store.get(rollout.id)

    def _record_outcomes(self, rollout: Rollout, now: float) -> None:
        has_events = self.store.has_table("events")
        timeout = rollout.policy.device_timeout_s
        for device in rollout.devices:
            if device.status != plan.DEVICE_UPDATING:
                continue
            outcome = self._outcome(device, rollout.target_path) if has_events else None
            if outcome is not None:
                status, reason = outcome
            elif plan.device_timed_out(self._view(device), now, timeout):
                status, reason = plan.DEVICE_TIMED_OUT, f"no outcome within {timeout:g} s"
            else:
                continue
            self.store.update_device(
                rollout.id, device.device_id, status=status, finished_at=now, reason=reason
            )
            log = logger.info if status == plan.DEVICE_SUCCEEDED else logger.warning
            log("rollout %d: %s %s (%s)", rollout.id, device.device_id, status, reason or "-")

    def _outcome(self, device: RolloutDevice, target: str) -> tuple[str, str | None] | None:
        """The first verified outcome event for ``target`` since the device was assigned."""
        row = self.store.db.execute(
            "SELECT kind, reason FROM events WHERE device_id = ? AND id > ? AND ts >= ?"
            " AND target = ? AND verified = 1 AND kind IN (?, ?, ?, ?) ORDER BY id LIMIT 1",
            (
                device.device_id,
                device.events_mark or 0,
                device.assigned_at or 0.0,
                target,
                *_SUCCESS_KINDS,
                *_FAILURE_KINDS,
            ),
        ).fetchone()
        if row is None:
            return None
        if row["kind"] in _SUCCESS_KINDS:
            return plan.DEVICE_SUCCEEDED, None
        return plan.DEVICE_FAILED, f"{row['kind']}: {row['reason'] or 'no reason given'}"

    def _latency_values(self, device_id: str, models: Sequence[str]) -> dict[str, list[float]]:
        values: dict[str, list[float]] = {m: [] for m in models}
        if not self.store.has_table("telemetry"):
            return values
        rows = self.store.db.execute(
            "SELECT model, p95_ms FROM telemetry WHERE device_id = ? AND model IN (?, ?)"
            " AND p95_ms IS NOT NULL ORDER BY ts DESC LIMIT 400",
            (device_id, *models),
        )
        for row in rows:
            values[row["model"]].append(float(row["p95_ms"]))
        return values

    def _abort_reason(self, rollout: Rollout) -> str | None:
        counts = rollout.counts()
        failed = counts[plan.DEVICE_FAILED] + counts[plan.DEVICE_TIMED_OUT]
        reason = plan.failure_abort_reason(counts[plan.DEVICE_SUCCEEDED], failed, rollout.policy)
        limit = rollout.policy.max_latency_regression_pct
        if reason is not None or limit is None:
            return reason
        samples: dict[str, tuple[list[float], list[float]]] = {}
        for device in rollout.devices:
            if device.status == plan.DEVICE_SUCCEEDED and device.previous_model is not None:
                values = self._latency_values(
                    device.device_id, (device.previous_model, rollout.ref)
                )
                samples[device.device_id] = (values[device.previous_model], values[rollout.ref])
        verdict = plan.latency_verdict(samples, limit)
        return verdict.reason(limit) if verdict is not None and verdict.exceeded else None

    def _view(self, device: RolloutDevice, settled: bool = True) -> DeviceView:
        return DeviceView(
            device_id=device.device_id,
            wave=device.wave,
            status=device.status,
            assigned_at=device.assigned_at,
            finished_at=device.finished_at,
            settled=settled,
        )

    def _views(self, rollout: Rollout, now: float) -> list[DeviceView]:
        """Devices as the planner sees them; with the latency check on, a succeeded device is
        settled once it reported telemetry of the new model (or its timeout passed)."""
        views = [self._view(d) for d in rollout.devices]
        if rollout.policy.max_latency_regression_pct is None:
            return views
        for index, device in enumerate(rollout.devices):
            if device.status != plan.DEVICE_SUCCEEDED or device.previous_model is None:
                continue
            waited = now - (device.finished_at or now)
            if waited >= rollout.policy.device_timeout_s:
                continue
            values = self._latency_values(device.device_id, (device.previous_model, rollout.ref))
            if not values[rollout.ref]:
                views[index] = replace(views[index], settled=False)
        return views

    def _events_mark(self) -> int:
        if not self.store.has_table("events"):
            return 0
        row = self.store.db.execute("SELECT COALESCE(MAX(id), 0) AS mark FROM events").fetchone()
        return int(row["mark"])

    def _start_wave(self, rollout: Rollout, wave: int, now: float) -> None:
        members = [d for d in rollout.devices if d.wave == wave]
        logger.info("rollout %d: wave %d (%d devices)", rollout.id, wave, len(members))
        mark = self._events_mark()
        for device in members:
            if device.status != plan.DEVICE_PENDING:
                continue
            previous = device.previous_model
            if device.events_mark is None:
                # Remembered before assigning, so a crash in between cannot lose it.
                with self.home.registry() as registry:
                    current = registry.current_assignment(device.device_id)
                previous = None if current is None else f"{current.model}@{current.version}"
                self.store.update_device(
                    rollout.id, device.device_id, previous_model=previous, events_mark=mark
                )
            try:
                assign_model(self.home, device.device_id, rollout.model, rollout.version)
            except FleetctlError as exc:
                self.store.update_device(
                    rollout.id,
                    device.device_id,
                    status=plan.DEVICE_FAILED,
                    finished_at=now,
                    reason=f"assignment failed: {exc}",
                )
                logger.warning("rollout %d: %s: %s", rollout.id, device.device_id, exc)
                continue
            self.store.update_device(
                rollout.id, device.device_id, status=plan.DEVICE_UPDATING, assigned_at=now
            )
            self._send_notify(device.device_id)

    def _send_notify(self, device_id: str) -> None:
        try:
            self._notify(device_id)
        except Exception as exc:  # a nudge only: the device also refreshes on its own schedule
            logger.warning("notify %s failed: %s", device_id, exc)

    # -- abort and rollback ----------------------------------------------------------------------

    def _abort(self, rollout: Rollout, reason: str, now: float) -> None:
        logger.error("rollout %d of %s aborted: %s", rollout.id, rollout.ref, reason)
        for device in rollout.devices:
            if device.status in (plan.DEVICE_PENDING, plan.DEVICE_UPDATING):
                self.store.update_device(
                    rollout.id, device.device_id, status=plan.DEVICE_CANCELLED, finished_at=now
                )
            restorable = device.assigned_at is not None and device.rolled_back_at is None
            if rollout.kind == "deploy" and restorable:
                self._restore(rollout, device, now)
        self.store.update_rollout(
            rollout.id, state=plan.ABORTED, abort_reason=reason, finished_at=now, request=None
        )

    def _restore(self, rollout: Rollout, device: RolloutDevice, now: float) -> None:
        """New director metadata naming the device's previous model (or none), then notify."""
        device_id = device.device_id
        with self.home.registry() as registry:
            current = registry.current_assignment(device_id)
        if current is None or (current.model, current.version) != (rollout.model, rollout.version):
            now_running = "nothing" if current is None else f"{current.model}@{current.version}"
            self.store.update_device(
                rollout.id, device_id, reason=f"reassigned to {now_running} meanwhile; left as is"
            )
            return
        try:
            if device.previous_model is not None:
                name, version = parse_model_ref(device.previous_model)
                assign_model(self.home, device_id, name, version)
            else:
                self.home.director().assign(device_id, {})
                with self.home.registry() as registry:
                    registry.unassign(device_id)
        except FleetctlError as exc:
            logger.error("rollout %d: rollback of %s failed: %s", rollout.id, device_id, exc)
            self.store.update_device(rollout.id, device_id, reason=f"rollback failed: {exc}")
            return
        restored = device.previous_model or _NO_MODEL
        if device.status == plan.DEVICE_FAILED:
            # It never ran the new model (or undid it itself): only its metadata goes back.
            logger.info(
                "rollout %d: %s (failed) assigned %s again", rollout.id, device_id, restored
            )
        else:
            self.store.update_device(
                rollout.id, device_id, rolled_back_at=now, rolled_back_to=restored
            )
            logger.warning("rollout %d: %s rolled back to %s", rollout.id, device_id, restored)
        self._send_notify(device_id)
