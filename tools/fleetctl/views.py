"""Operator views: what ``fleetctl devices``, ``device show``, ``telemetry`` and ``watch`` show.

Two halves: *read models* (:func:`fleet_rows`, :func:`device_detail`, :func:`telemetry_rows`,
:func:`rollout_progress`) query ``registry.sqlite`` (registry tables plus the ingest tables of
tools.fleetctl.ingest) into plain dataclasses/dicts, and *renderers* (``render_*``) turn those
into text. Renderers are pure: same data and ``now`` in, same text out.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

__all__ = [
    "DeviceRow",
    "RolloutProgress",
    "device_detail",
    "fleet_rows",
    "render_device_detail",
    "render_devices",
    "render_table",
    "render_telemetry",
    "render_watch",
    "rollout_progress",
    "telemetry_rows",
]


@dataclass(frozen=True)
class DeviceRow:
    """One line of ``fleetctl devices``."""

    id: str
    online: bool
    model: str | None  # name@version the device reports running
    fps: float | None
    p95_ms: float | None
    last_seen: float | None  # Unix seconds
    tags: tuple[str, ...]
    removed: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible view."""
        data = asdict(self)
        data["tags"] = list(self.tags)
        return data


@dataclass(frozen=True)
class RolloutProgress:
    """A rollout as ``watch`` shows it: devices done out of devices targeted."""

    name: str
    state: str
    done: int
    total: int
    failed: int = 0

    @property
    def fraction(self) -> float:
        """Progress in [0, 1]."""
        return 0.0 if self.total <= 0 else min(1.0, self.done / self.total)


def _model_ref(active_model_json: str | None) -> str | None:
    if not active_model_json:
        return None
    active = json.loads(active_model_json)
    return f"{active.get('name')}@{active.get('version')}"


def fleet_rows(db: sqlite3.Connection, *, include_removed: bool = False) -> list[DeviceRow]:
    """Every enrolled device with its state and latest telemetry, sorted by id."""
    rows = db.execute(
        "SELECT d.id, d.tags_json, d.removed, s.online, s.active_model_json, s.last_seen,"
        " t.fps, t.p95_ms, t.model AS telemetry_model FROM devices d"
        " LEFT JOIN device_state s ON s.device_id = d.id"
        " LEFT JOIN telemetry t ON t.rowid = (SELECT rowid FROM telemetry"
        " WHERE device_id = d.id ORDER BY ts DESC, received_at DESC LIMIT 1)"
        " WHERE ? OR d.removed = 0 ORDER BY d.id",
        (int(include_removed),),
    ).fetchall()
    return [
        DeviceRow(
            id=r["id"],
            online=bool(r["online"]),
            model=_model_ref(r["active_model_json"]) or r["telemetry_model"],
            fps=r["fps"],
            p95_ms=r["p95_ms"],
            last_seen=r["last_seen"],
            tags=tuple(json.loads(r["tags_json"])),
            removed=bool(r["removed"]),
        )
        for r in rows
    ]


def _event_dict(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "ts": row["ts"],
        "kind": row["kind"],
        "target": row["target"],
        "version": row["version"],
        "previous_version": row["previous_version"],
        "reason": row["reason"],
        "verified": bool(row["verified"]),
        "verify_error": row["verify_error"],
        "boot_id": row["boot_id"],
        "seq": row["seq"],
    }


def telemetry_rows(
    db: sqlite3.Connection,
    device_id: str,
    *,
    since: float | None = None,
    after_rowid: int = 0,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Telemetry of one device, oldest first; each row has ``rowid`` for following."""
    rows = db.execute(
        "SELECT rowid, boot_id, seq, ts, received_at, model, fps, p95_ms, metrics_json"
        " FROM telemetry WHERE device_id = ? AND ts >= ? AND rowid > ?"
        " ORDER BY ts, seq LIMIT ?",
        (device_id, -1.0 if since is None else since, after_rowid, limit),
    ).fetchall()
    return [
        {
            "rowid": r["rowid"],
            "boot_id": r["boot_id"],
            "seq": r["seq"],
            "ts": r["ts"],
            "model": r["model"],
            "fps": r["fps"],
            "p95_ms": r["p95_ms"],
            "metrics": json.loads(r["metrics_json"]),
        }
        for r in rows
    ]


def device_detail(db: sqlite3.Connection, device_id: str, *, events: int = 10) -> dict[str, Any]:
    """Everything ``fleetctl device show`` prints; raises LookupError for an unknown id."""
    device = db.execute("SELECT * FROM devices WHERE id = ?", (device_id,)).fetchone()
    if device is None:
        raise LookupError(f"device {device_id!r} is not enrolled; expected an id from `devices`")
    state = db.execute("SELECT * FROM device_state WHERE device_id = ?", (device_id,)).fetchone()
    assigned = db.execute(
        "SELECT m.name, m.version, m.target_path, a.assigned_at FROM assignments a"
        " JOIN models m ON m.id = a.model_id WHERE a.device_id = ? AND a.current = 1"
        " ORDER BY a.id DESC LIMIT 1",
        (device_id,),
    ).fetchone()
    last_events = db.execute(
        "SELECT * FROM events WHERE device_id = ? ORDER BY ts DESC, id DESC LIMIT ?",
        (device_id, events),
    ).fetchall()
    latest = db.execute(
        "SELECT rowid FROM telemetry WHERE device_id = ? ORDER BY ts DESC LIMIT 1", (device_id,)
    ).fetchone()
    last_telemetry = (
        None
        if latest is None
        else telemetry_rows(db, device_id, after_rowid=latest[0] - 1, limit=1)[0]
    )
    return {
        "id": device["id"],
        "tags": json.loads(device["tags_json"]),
        "enrolled_at": device["enrolled_at"],
        "removed": bool(device["removed"]),
        "online": bool(state["online"]) if state is not None else False,
        "boot_id": None if state is None else state["boot_id"],
        "agent_version": None if state is None else state["agent_version"],
        "last_seen": None if state is None else state["last_seen"],
        "backends": [] if state is None else json.loads(state["backends_json"]),
        "hardware": None
        if state is None or not state["hardware_json"]
        else json.loads(state["hardware_json"]),
        "installed": None
        if state is None or not state["active_model_json"]
        else json.loads(state["active_model_json"]),
        "assigned": None
        if assigned is None
        else {
            "name": assigned["name"],
            "version": assigned["version"],
            "target": assigned["target_path"],
            "assigned_at": assigned["assigned_at"],
        },
        "events": [_event_dict(r) for r in last_events],
        "telemetry": last_telemetry,
    }


def rollout_progress(db: sqlite3.Connection) -> list[RolloutProgress]:
    """Pending, running and paused rollouts (tables of tools.fleetctl.rollouts), oldest first.

    ``done`` counts devices in a final status (succeeded, failed, timed out); ``failed`` the
    failed and timed-out ones. Empty when no rollout was ever created.
    """
    from tools.fleetctl import rollout_plan as plan  # noqa: PLC0415

    exists = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'rollout_devices'"
    ).fetchone()
    if exists is None:
        return []
    active = sorted(plan.ACTIVE_STATES)
    final = sorted(plan.DEVICE_FINAL)
    failed = [plan.DEVICE_FAILED, plan.DEVICE_TIMED_OUT]
    rows = db.execute(
        "SELECT r.id, r.kind, r.model, r.version, r.state, COUNT(d.device_id) AS total,"
        " SUM(d.status IN (?, ?, ?)) AS done, SUM(d.status IN (?, ?)) AS failed"
        " FROM rollouts r LEFT JOIN rollout_devices d ON d.rollout_id = r.id"
        " WHERE r.state IN (?, ?, ?) GROUP BY r.id ORDER BY r.id",
        (*final, *failed, *active),
    ).fetchall()
    return [
        RolloutProgress(
            name=f"{r['id']}:{r['kind']}:{r['model']}@{r['version']}",
            state=r["state"],
            done=int(r["done"] or 0),
            total=int(r["total"]),
            failed=int(r["failed"] or 0),
        )
        for r in rows
    ]


# ---- rendering ---------------------------------------------------------------------------------


def _ago(ts: float | None, now: float) -> str:
    if ts is None or ts <= 0:
        return "never"
    seconds = max(0.0, now - ts)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h ago"
    return f"{seconds / 86400:.1f}d ago"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, with a dashed rule under the header."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )
    return "\n".join(lines)


def render_devices(rows: Sequence[DeviceRow], now: float) -> str:
    """The ``fleetctl devices`` table."""
    if not rows:
        return "no devices"
    return render_table(
        ("DEVICE", "ONLINE", "MODEL", "FPS", "P95 MS", "LAST SEEN", "TAGS"),
        [
            (
                r.id,
                "removed" if r.removed else ("yes" if r.online else "no"),
                r.model or "-",
                _num(r.fps, ".1f"),
                _num(r.p95_ms, ".1f"),
                _ago(r.last_seen, now),
                ",".join(r.tags) or "-",
            )
            for r in rows
        ],
    )


def _iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def render_device_detail(detail: dict[str, Any], now: float) -> str:
    """The ``fleetctl device show`` text."""
    installed = detail["installed"]
    assigned = detail["assigned"]
    hardware = detail["hardware"] or {}
    lines = [
        f"device     {detail['id']}" + ("  (removed)" if detail["removed"] else ""),
        f"online     {'yes' if detail['online'] else 'no'}  (last seen "
        f"{_ago(detail['last_seen'], now)})",
        f"agent      {detail['agent_version'] or '-'}  boot {detail['boot_id'] or '-'}"
        f"  backends {','.join(detail['backends']) or '-'}",
        f"hardware   {hardware.get('model') or '-'}  {hardware.get('arch') or ''}"
        f"  {hardware.get('os') or ''}  cpus {hardware.get('cpu_count', '-')}".rstrip(),
        "installed  "
        + ("-" if installed is None else f"{installed['name']}@{installed['version']}"),
        "assigned   " + ("-" if assigned is None else f"{assigned['name']}@{assigned['version']}"),
        f"tags       {','.join(detail['tags']) or '-'}",
    ]
    telemetry = detail["telemetry"]
    if telemetry is not None:
        lines.append(
            f"telemetry  {_iso(telemetry['ts'])}  {telemetry['model'] or '-'}"
            f"  fps {_num(telemetry['fps'], '.1f')}  p95 {_num(telemetry['p95_ms'], '.1f')} ms"
            f"  seq {telemetry['seq']}"
        )
    else:
        lines.append("telemetry  -")
    lines.append("events:" if detail["events"] else "events     -")
    for event in detail["events"]:
        mark = "signed" if event["verified"] else "UNVERIFIED"
        what = event["version"] or "-"
        reason = f"  {event['reason']}" if event["reason"] else ""
        lines.append(f"  {_iso(event['ts'])}  {event['kind']:<16} {what:<10} {mark}{reason}")
    return "\n".join(lines)


def render_telemetry(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per telemetry row (for ``fleetctl telemetry``)."""
    out = []
    for row in rows:
        metrics = row["metrics"]
        out.append(
            f"{_iso(row['ts'])}  boot {row['boot_id']}  seq {row['seq']:>6}"
            f"  {row['model'] or '-'}  fps {_num(row['fps'], '.1f')}"
            f"  p95 {_num(row['p95_ms'], '.1f')} ms  drops {metrics.get('drops', 0)}"
            f"  errors {metrics.get('errors', 0)}"
        )
    return out


def progress_bar(fraction: float, width: int = 30) -> str:
    """``[#########.....]``."""
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def render_watch(rows: Sequence[DeviceRow], rollouts: Sequence[RolloutProgress], now: float) -> str:
    """One frame of ``fleetctl watch``: fleet summary, device table, rollouts with bars."""
    online = sum(1 for r in rows if r.online)
    lines = [
        f"fleet  {_iso(now)}  devices {len(rows)}  online {online}",
        "",
        render_devices(rows, now),
        "",
    ]
    if not rollouts:
        lines.append("no running rollout")
    for rollout in rollouts:
        failed = f"  failed {rollout.failed}" if rollout.failed else ""
        lines.append(
            f"rollout {rollout.name}  {rollout.state}  {progress_bar(rollout.fraction)}"
            f" {rollout.fraction * 100:3.0f}%  {rollout.done}/{rollout.total}{failed}"
        )
    return "\n".join(lines)
