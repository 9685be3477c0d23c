"""The rollout tables ``rollouts`` and ``rollout_devices``, and :class:`RolloutStore` over them.

The tables live in the controller home's ``registry.sqlite`` (created if missing, on every
connection). The CLI writes rows through the store (deploy, rollback, pause/resume/abort
requests) and :class:`tools.fleetctl.rollouts.RolloutEngine`, in ``fleetctl serve``, reads them
and records its progress with :meth:`RolloutStore.update_rollout` and
:meth:`RolloutStore.update_device`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tools.fleetctl import FleetctlError
from tools.fleetctl import rollout_plan as plan
from tools.fleetctl.devices import parse_model_ref
from tools.fleetctl.home import FleetHome
from tools.fleetctl.rollout_plan import CanarySpec, Rollout, RolloutDevice, RolloutPolicy

__all__ = ["ROLLOUT_SCHEMA", "RolloutError", "RolloutStore"]

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
