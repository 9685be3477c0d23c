"""Rollouts: the tables ``rollouts`` and ``rollout_devices``, and the engine that runs them.

The CLI writes rows (:class:`RolloutStore`: deploy, rollback, pause/resume/abort requests); the
``fleetctl serve`` process calls :meth:`RolloutEngine.tick` at least every 0.5 s, which applies
the requests and moves every active rollout on, with the decisions of
:mod:`tools.fleetctl.rollout_plan`:

- a wave's devices get a fresh grant and director metadata (``assign_model``), then
  ``notify(device_id)``; the engine first remembers each device's previous assignment and the
  highest ``events.id``, so only later events count;
- outcomes come from the ingested events (``tools.fleetctl.ingest``) with ``verified = 1`` for the
  rollout's target path: ``committed`` or ``up-to-date`` -> succeeded, ``failed`` or
  ``rolled-back`` -> failed (with the device's reason); none within the device timeout -> timed out;
- the latency check reads ingest's ``telemetry`` rows (``model`` = ``name@version``, ``p95_ms``);
- an abort re-assigns every device the rollout assigned to its previous model (a fresh grant and
  new director metadata) and notifies it; a device that had no previous model gets an empty
  director target list and its registry assignment ends, as for ``fleetctl device remove``.

A rollback (``fleetctl rollback``) is a rollout of kind ``rollback``: one wave with every device,
no abort criteria; it waits for the devices' outcomes like a deploy.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

from tools.fleetctl import FleetctlError
from tools.fleetctl import rollout_plan as plan
from tools.fleetctl.devices import assign_model, parse_model_ref
from tools.fleetctl.home import FleetHome
from tools.fleetctl.rollout_plan import (
    CanarySpec,
    DeviceView,
    Rollout,
    RolloutDevice,
    RolloutPolicy,
)

__all__ = [
    "ROLLOUT_SCHEMA",
    "Rollout",
    "RolloutDevice",
    "RolloutEngine",
    "RolloutError",
    "RolloutStore",
]

logger = logging.getLogger(__name__)

ROLLOUT_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('deploy', 'rollback')),
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    target_path TEXT NOT NULL,
    selector TEXT NOT NULL,
    policy_json TEXT NOT NULL,
    state TEXT NOT NULL,
    request TEXT CHECK (request IN ('pause', 'resume', 'abort')),
    abort_reason TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS rollouts_state ON rollouts(state);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id INTEGER NOT NULL REFERENCES rollouts(id),
    device_id TEXT NOT NULL,
    wave INTEGER NOT NULL,
    status TEXT NOT NULL,
    previous_model TEXT,
    events_mark INTEGER,
    assigned_at REAL,
    finished_at REAL,
    reason TEXT,
    rolled_back_at REAL,
    rolled_back_to TEXT,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX IF NOT EXISTS rollout_devices_device ON rollout_devices(device_id);
"""

_SUCCESS_KINDS = ("committed", "up-to-date")
_FAILURE_KINDS = ("failed", "rolled-back")
_NO_MODEL = "(none)"


class RolloutError(FleetctlError):
    """A rollout cannot be created, found or changed as asked."""


def _connect(home: FleetHome) -> sqlite3.Connection:
    home.require()
    connection = sqlite3.connect(
        str(home.registry_path), isolation_level=None, check_same_thread=False
    )
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA busy_timeout = 5000")
    connection.executescript(ROLLOUT_SCHEMA)
    return connection


class RolloutStore:
    """Reads and writes the rollout tables in the home's ``registry.sqlite``."""

    def __init__(self, home: FleetHome, *, clock: Callable[[], float] = time.time) -> None:
        self.home = home
        self.db = _connect(home)
        self._clock = clock

    def close(self) -> None:
        """Close the connection."""
        self.db.close()

    def __enter__(self) -> RolloutStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------------

    def get(self, rollout_id: int) -> Rollout:
        """The rollout with its devices; raises :class:`RolloutError` if unknown."""
        row = self.db.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
        if row is None:
            raise RolloutError(f"rollout {rollout_id} not found; expected an id from rollout list")
        devices = self.db.execute(
            "SELECT * FROM rollout_devices WHERE rollout_id = ? ORDER BY wave, device_id",
            (rollout_id,),
        ).fetchall()
        return Rollout(
            id=row["id"],
            kind=row["kind"],
            model=row["model"],
            version=row["version"],
            target_path=row["target_path"],
            selector=row["selector"],
            policy=RolloutPolicy.from_dict(json.loads(row["policy_json"])),
            state=row["state"],
            request=row["request"],
            abort_reason=row["abort_reason"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            devices=tuple(
                RolloutDevice(
                    device_id=d["device_id"],
                    wave=d["wave"],
                    status=d["status"],
                    previous_model=d["previous_model"],
                    events_mark=d["events_mark"],
                    assigned_at=d["assigned_at"],
                    finished_at=d["finished_at"],
                    reason=d["reason"],
                    rolled_back_at=d["rolled_back_at"],
                    rolled_back_to=d["rolled_back_to"],
                )
                for d in devices
            ),
        )

    def list_rollouts(self) -> list[Rollout]:
        """Every rollout, newest first."""
        ids = [r["id"] for r in self.db.execute("SELECT id FROM rollouts ORDER BY id DESC")]
        return [self.get(i) for i in ids]

    def active_ids(self) -> list[int]:
        """Ids of pending, running and paused rollouts, oldest first."""
        marks = ",".join("?" * len(plan.ACTIVE_STATES))
        rows = self.db.execute(
            f"SELECT id FROM rollouts WHERE state IN ({marks}) ORDER BY id",  # noqa: S608
            sorted(plan.ACTIVE_STATES),
        )
        return [r["id"] for r in rows]

    def _busy_devices(self, device_ids: Iterable[str]) -> dict[str, int]:
        marks = ",".join("?" * len(plan.ACTIVE_STATES))
        busy: dict[str, int] = {}
        for device_id in device_ids:
            row = self.db.execute(
                "SELECT r.id FROM rollout_devices d JOIN rollouts r ON r.id = d.rollout_id"  # noqa: S608
                f" WHERE d.device_id = ? AND r.state IN ({marks})",
                (device_id, *sorted(plan.ACTIVE_STATES)),
            ).fetchone()
            if row is not None:
                busy[device_id] = row["id"]
        return busy

    # -- writing (CLI side) ----------------------------------------------------------------------

    def select_devices(
        self, *, devices: Sequence[str] = (), tag: str | None = None, all_devices: bool = False
    ) -> tuple[list[str], str]:
        """Resolve ``--devices``/``--tag``/``--all`` to enrolled, active device ids + a label."""
        if sum((bool(devices), tag is not None, all_devices)) != 1:
            raise RolloutError("devices: expected exactly one of --devices, --tag or --all")
        with self.home.registry() as registry:
            active = [d for d in registry.list_devices() if not d.removed]
            if devices:
                for device_id in devices:
                    record = registry.find_device(device_id)
                    if record is None:
                        raise RolloutError(
                            f"device {device_id!r} not found; expected an enrolled device"
                        )
                    if record.removed:
                        raise RolloutError(
                            f"device {device_id!r} is removed; expected an active device"
                        )
                if len(set(devices)) != len(devices):
                    raise RolloutError("devices: a device is listed twice; expected each once")
                return sorted(devices), "devices " + ",".join(devices)
        if tag is not None:
            chosen = [d.id for d in active if tag in d.tags]
            label = f"tag {tag}"
        else:
            chosen = [d.id for d in active]
            label = "all"
        if not chosen:
            raise RolloutError(f"{label}: no active device matches; expected at least one")
        return chosen, label

    def _insert(
        self,
        *,
        kind: str,
        ref: str,
        devices: Sequence[str],
        selector: str,
        policy: RolloutPolicy,
    ) -> int:
        name, version = parse_model_ref(ref)
        with self.home.registry() as registry:
            model = registry.get_model(name, version)
        sizes = plan.wave_sizes(len(devices), policy.canary, policy.wave_factor)
        waves = [w for w, size in enumerate(sizes) for _ in range(size)]
        self.db.execute("BEGIN IMMEDIATE")
        try:
            busy = self._busy_devices(devices)
            if busy:
                device_id, other = next(iter(sorted(busy.items())))
                raise RolloutError(
                    f"device {device_id!r} is in active rollout {other}; expected devices"
                    " without an active rollout (abort or wait for it)"
                )
            cursor = self.db.execute(
                "INSERT INTO rollouts (kind, model, version, target_path, selector, policy_json,"
                " state, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    kind,
                    name,
                    version,
                    model.target_path,
                    selector,
                    json.dumps(policy.to_dict(), sort_keys=True),
                    plan.PENDING,
                    self._clock(),
                ),
            )
            rollout_id = int(cursor.lastrowid or 0)
            self.db.executemany(
                "INSERT INTO rollout_devices (rollout_id, device_id, wave, status)"
                " VALUES (?, ?, ?, ?)",
                [
                    (rollout_id, d, w, plan.DEVICE_PENDING)
                    for d, w in zip(devices, waves, strict=True)
                ],
            )
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        logger.info("%s %d of %s to %d devices written", kind, rollout_id, ref, len(devices))
        return rollout_id

    def create_deploy(
        self, ref: str, devices: Sequence[str], *, selector: str, policy: RolloutPolicy
    ) -> int:
        """Write a pending deploy of NAME@VERSION to ``devices``; returns its id."""
        return self._insert(
            kind="deploy", ref=ref, devices=devices, selector=selector, policy=policy
        )

    def create_rollback(self, ref: str, devices: Sequence[str], *, selector: str) -> int:
        """Write a pending rollback: every device re-assigned NAME@VERSION at once."""
        policy = RolloutPolicy(canary=CanarySpec(percent=100.0), max_failures_pct=100.0)
        return self._insert(
            kind="rollback", ref=ref, devices=devices, selector=selector, policy=policy
        )

    def request(self, rollout_id: int, action: str) -> Rollout:
        """Ask the serving engine to ``pause``, ``resume`` or ``abort`` a rollout."""
        target_state = {"pause": plan.PAUSED, "resume": plan.RUNNING, "abort": plan.ABORTED}
        if action not in target_state:
            raise RolloutError(f"action {action!r}: expected pause, resume or abort")
        rollout = self.get(rollout_id)
        if action == "resume" and rollout.state != plan.PAUSED:
            raise RolloutError(f"rollout {rollout_id} is {rollout.state}; expected a paused one")
        try:
            plan.check_transition(rollout.state, target_state[action])
        except plan.RolloutPlanError as exc:
            raise RolloutError(f"rollout {rollout_id}: {exc}") from exc
        self.db.execute("UPDATE rollouts SET request = ? WHERE id = ?", (action, rollout_id))
        return self.get(rollout_id)

    # -- writing (engine side) -------------------------------------------------------------------

    def update_rollout(self, rollout_id: int, **fields: Any) -> None:
        """Set columns of a rollout row."""
        columns = ", ".join(f"{name} = ?" for name in fields)
        self.db.execute(
            f"UPDATE rollouts SET {columns} WHERE id = ?",  # noqa: S608 - fixed column names
            (*fields.values(), rollout_id),
        )

    def update_device(self, rollout_id: int, device_id: str, **fields: Any) -> None:
        """Set columns of a rollout device row."""
        columns = ", ".join(f"{name} = ?" for name in fields)
        self.db.execute(
            f"UPDATE rollout_devices SET {columns} WHERE rollout_id = ? AND device_id = ?",  # noqa: S608
            (*fields.values(), rollout_id, device_id),
        )

    def has_table(self, name: str) -> bool:
        """True when ``name`` exists (ingest tables appear once ``fleetctl serve`` ran)."""
        row = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return row is not None


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
                self.store.update_rollout(rollout.id, state=new_state)
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
            "SELECT kind, reason FROM events WHERE device_id = ? AND id > ? AND target = ?"
            " AND verified = 1 AND kind IN (?, ?, ?, ?) ORDER BY id LIMIT 1",
            (device.device_id, device.events_mark or 0, target, *_SUCCESS_KINDS, *_FAILURE_KINDS),
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
        self.store.update_device(rollout.id, device_id, rolled_back_at=now, rolled_back_to=restored)
        logger.warning("rollout %d: %s rolled back to %s", rollout.id, device_id, restored)
        self._send_notify(device_id)
