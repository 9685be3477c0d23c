"""The rollout planner: pure decisions about waves, outcomes and abort criteria (sans-I/O).

Nothing here touches files, the database, the network or a clock: callers pass the current time
and the facts they observed, and get back a decision. :mod:`tools.fleetctl.rollouts` persists the
rollout and applies the decisions.

Invariants:

- waves are the canary first, then waves that grow by the factor (``ceil(previous * factor)``);
  together they cover every device exactly once, in order;
- a wave starts only after every device of the previous wave reached a final status (succeeded,
  failed or timed out), was *settled* (see :class:`DeviceView`) and the interval elapsed;
- a rollout aborts when failures (timeouts included) exceed ``max_failures_pct`` of the executed
  devices once at least ``min_executed`` devices executed, or when the median p95 latency of the
  new model on updated devices regresses past ``max_latency_regression_pct`` against the median of
  the same devices' previous model;
- rollout states follow :data:`ROLLOUT_TRANSITIONS`, one table; anything else is refused.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from tools.fleetctl import FleetctlError

__all__ = [
    "ACTIVE_STATES",
    "DEVICE_FINAL",
    "ROLLOUT_TRANSITIONS",
    "CanarySpec",
    "DeviceView",
    "LatencyVerdict",
    "Rollout",
    "RolloutDevice",
    "RolloutPlanError",
    "RolloutPolicy",
    "WaveDecision",
    "check_transition",
    "device_timed_out",
    "failure_abort_reason",
    "latency_verdict",
    "next_wave",
    "parse_canary",
    "parse_duration",
    "parse_percent",
    "wave_sizes",
]


class RolloutPlanError(FleetctlError):
    """A rollout option or state change is not valid."""


# -- states ----------------------------------------------------------------------------------------

PENDING, RUNNING, PAUSED, SUCCEEDED, ABORTED = (
    "pending",
    "running",
    "paused",
    "succeeded",
    "aborted",
)
ROLLOUT_TRANSITIONS: Mapping[str, frozenset[str]] = {
    PENDING: frozenset({RUNNING, PAUSED, ABORTED}),  # paused before its first wave: holds it
    RUNNING: frozenset({PAUSED, SUCCEEDED, ABORTED}),
    PAUSED: frozenset({RUNNING, ABORTED}),
    SUCCEEDED: frozenset(),
    ABORTED: frozenset(),
}
ACTIVE_STATES = frozenset({PENDING, RUNNING, PAUSED})

# Per device: pending (not started) -> updating (assigned, notified) -> succeeded | failed |
# timed-out; ``cancelled`` when the rollout aborted before the device had an outcome.
DEVICE_PENDING, DEVICE_UPDATING = "pending", "updating"
DEVICE_SUCCEEDED, DEVICE_FAILED, DEVICE_TIMED_OUT = "succeeded", "failed", "timed-out"
DEVICE_CANCELLED = "cancelled"
DEVICE_FINAL = frozenset({DEVICE_SUCCEEDED, DEVICE_FAILED, DEVICE_TIMED_OUT})


def check_transition(current: str, new: str) -> None:
    """Raise :class:`RolloutPlanError` unless ``current -> new`` is in the transition table."""
    allowed = ROLLOUT_TRANSITIONS.get(current)
    if allowed is None or new not in allowed:
        expected = ", ".join(sorted(allowed)) if allowed else "none (final state)"
        raise RolloutPlanError(f"rollout is {current}, cannot become {new}; expected: {expected}")


# -- options ---------------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``30s``, ``5m``, ``1h30m``, ``250ms``, ``0`` -> seconds."""
    value = text.strip()
    if value == "0":
        return 0.0
    position, total = 0, 0.0
    while position < len(value):
        match = _DURATION_PART.match(value, position)
        if match is None:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if not value or position != len(value):
        raise RolloutPlanError(
            f"duration {text!r}: expected a number with a unit, e.g. 30s, 5m, 1h"
        )
    return total


def parse_percent(text: str, *, what: str) -> float:
    """``20%`` or ``20`` -> 20.0 (0 to 100)."""
    value = text.strip().removesuffix("%")
    try:
        percent = float(value)
    except ValueError:
        percent = math.nan
    if not 0.0 <= percent <= 100.0:  # also false for nan
        raise RolloutPlanError(f"{what} {text!r}: expected a percentage from 0% to 100%")
    return percent


@dataclass(frozen=True)
class CanarySpec:
    """The canary wave: a device count, or a percentage of the rollout's devices."""

    count: int | None = None
    percent: float | None = None

    def size(self, devices: int) -> int:
        """Canary devices out of ``devices`` (at least 1, at most all)."""
        if devices <= 0:
            return 0
        if self.percent is not None:
            wanted = math.ceil(devices * self.percent / 100.0 - 1e-9)
        else:
            wanted = self.count if self.count is not None else 1
        return max(1, min(devices, wanted))

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.count or 1)


def parse_canary(text: str) -> CanarySpec:
    """``3`` (devices) or ``10%`` (of the rollout's devices)."""
    value = text.strip()
    if value.endswith("%"):
        percent = parse_percent(value, what="canary")
        if percent <= 0:
            raise RolloutPlanError(f"canary {text!r}: expected more than 0%")
        return CanarySpec(percent=percent)
    if not value.isdigit() or int(value) < 1:
        raise RolloutPlanError(f"canary {text!r}: expected a device count >= 1 or a percentage")
    return CanarySpec(count=int(value))


@dataclass(frozen=True)
class RolloutPolicy:
    """How a rollout proceeds and when it aborts."""

    canary: CanarySpec = CanarySpec(count=1)
    wave_factor: float = 2.0
    wave_interval_s: float = 0.0
    max_failures_pct: float = 20.0
    min_executed: int = 1
    device_timeout_s: float = 300.0
    max_latency_regression_pct: float | None = None

    def __post_init__(self) -> None:
        if not 1.0 <= self.wave_factor <= 1000.0:
            raise RolloutPlanError(f"wave factor {self.wave_factor}: expected 1 to 1000")
        if self.wave_interval_s < 0 or self.device_timeout_s <= 0:
            raise RolloutPlanError(
                "wave interval and device timeout: expected interval >= 0 and timeout > 0"
            )
        if self.min_executed < 1:
            raise RolloutPlanError(f"min executed {self.min_executed}: expected at least 1")
        if not 0.0 <= self.max_failures_pct <= 100.0:
            raise RolloutPlanError(f"max failures {self.max_failures_pct}%: expected 0% to 100%")
        regression = self.max_latency_regression_pct
        if regression is not None and regression < 0:
            raise RolloutPlanError(f"latency regression {regression}%: expected >= 0%")

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible view (stored with the rollout)."""
        return {
            "canary": str(self.canary),
            "wave_factor": self.wave_factor,
            "wave_interval_s": self.wave_interval_s,
            "max_failures_pct": self.max_failures_pct,
            "min_executed": self.min_executed,
            "device_timeout_s": self.device_timeout_s,
            "max_latency_regression_pct": self.max_latency_regression_pct,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutPolicy:
        """Inverse of :meth:`to_dict`."""
        regression = data.get("max_latency_regression_pct")
        return cls(
            canary=parse_canary(str(data["canary"])),
            wave_factor=float(data["wave_factor"]),
            wave_interval_s=float(data["wave_interval_s"]),
            max_failures_pct=float(data["max_failures_pct"]),
            min_executed=int(data["min_executed"]),
            device_timeout_s=float(data["device_timeout_s"]),
            max_latency_regression_pct=None if regression is None else float(regression),
        )


# -- waves -----------------------------------------------------------------------------------------


def wave_sizes(devices: int, canary: CanarySpec, factor: float) -> list[int]:
    """Wave sizes covering ``devices``: the canary, then each wave ``ceil(previous * factor)``."""
    if factor < 1.0:
        raise RolloutPlanError(f"wave factor {factor}: expected at least 1")
    sizes: list[int] = []
    remaining = devices
    size = canary.size(devices)
    while remaining > 0:
        size = min(size, remaining)
        sizes.append(size)
        remaining -= size
        size = max(1, math.ceil(size * factor - 1e-9))
    return sizes


@dataclass(frozen=True)
class DeviceView:
    """What the planner needs to know about one device of a rollout.

    ``settled`` is False while a succeeded device must still prove its health (the latency check
    is on and it has not reported telemetry of the new model yet, and its timeout has not passed).
    """

    device_id: str
    wave: int
    status: str
    assigned_at: float | None = None
    finished_at: float | None = None
    settled: bool = True


def device_timed_out(device: DeviceView, now: float, timeout_s: float) -> bool:
    """True when an updating device has had no outcome for ``timeout_s`` since its assignment."""
    return (
        device.status == DEVICE_UPDATING
        and device.assigned_at is not None
        and now - device.assigned_at >= timeout_s
    )


class WaveDecision(NamedTuple):
    """What to do next with the waves: start one, wait, or finish the rollout."""

    start_wave: int | None
    finished: bool
    waiting_until: float | None = None


def next_wave(devices: Sequence[DeviceView], now: float, interval_s: float) -> WaveDecision:
    """Start the next wave once the previous one is complete and settled and the interval passed.

    Waves are numbered from 0 (the canary). Devices of the waves not started yet are ``pending``.
    """
    waves = sorted({d.wave for d in devices})
    started = [w for w in waves if any(d.status != DEVICE_PENDING for d in devices if d.wave == w)]
    if not started:
        return WaveDecision(start_wave=waves[0] if waves else None, finished=not waves)
    current = max(started)
    members = [d for d in devices if d.wave == current]
    if not all(d.status in DEVICE_FINAL and d.settled for d in members):
        return WaveDecision(start_wave=None, finished=False)
    later = [w for w in waves if w > current]
    if not later:
        return WaveDecision(start_wave=None, finished=True)
    completed_at = max((d.finished_at or 0.0) for d in members)
    ready_at = completed_at + interval_s
    if now < ready_at:
        return WaveDecision(start_wave=None, finished=False, waiting_until=ready_at)
    return WaveDecision(start_wave=later[0], finished=False)


# -- abort criteria --------------------------------------------------------------------------------


def failure_abort_reason(succeeded: int, failed: int, policy: RolloutPolicy) -> str | None:
    """Why the rollout must abort on failures (``failed`` includes timeouts), or None."""
    executed = succeeded + failed
    if executed < policy.min_executed or failed == 0:
        return None
    # failed / executed > max% without floating-point surprises at the boundary
    if failed * 100.0 <= policy.max_failures_pct * executed + 1e-9:
        return None
    return (
        f"{failed} of {executed} executed devices failed or timed out"
        f" ({100.0 * failed / executed:.1f}%); expected at most {policy.max_failures_pct:g}%"
    )


@dataclass(frozen=True)
class LatencyVerdict:
    """The latency comparison over the devices that reported both versions."""

    devices: int
    previous_p95_ms: float
    new_p95_ms: float
    regression_pct: float
    exceeded: bool

    def reason(self, limit_pct: float) -> str:
        """One line for the abort reason."""
        return (
            f"p95 latency regressed {self.regression_pct:.1f}% ({self.previous_p95_ms:.2f} ms ->"
            f" {self.new_p95_ms:.2f} ms, median of {self.devices} devices);"
            f" expected at most {limit_pct:g}%"
        )


def latency_verdict(
    samples: Mapping[str, tuple[Sequence[float], Sequence[float]]], limit_pct: float
) -> LatencyVerdict | None:
    """Compare the new model's p95 latency with the previous model's on the same devices.

    Args:
        samples: per device, (p95 values reported with the previous model, with the new model).
            Devices without at least one value of each are left out.
        limit_pct: the allowed regression in percent.

    Returns:
        None when no device has both, else the verdict: per device the median of its reports,
        then the median across devices for each version.
    """
    previous: list[float] = []
    new: list[float] = []
    for old_values, new_values in samples.values():
        if old_values and new_values:
            previous.append(statistics.median(old_values))
            new.append(statistics.median(new_values))
    if not previous:
        return None
    previous_p95 = statistics.median(previous)
    new_p95 = statistics.median(new)
    if previous_p95 > 0:
        regression = 100.0 * (new_p95 - previous_p95) / previous_p95
    else:
        regression = 0.0 if new_p95 <= 0 else math.inf
    return LatencyVerdict(
        devices=len(previous),
        previous_p95_ms=previous_p95,
        new_p95_ms=new_p95,
        regression_pct=regression,
        exceeded=regression > limit_pct + 1e-9,
    )


# -- records ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutDevice:
    """One device of a rollout."""

    device_id: str
    wave: int
    status: str
    previous_model: str | None
    events_mark: int | None
    assigned_at: float | None
    finished_at: float | None
    reason: str | None
    rolled_back_at: float | None
    rolled_back_to: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible view."""
        return {
            "device_id": self.device_id,
            "wave": self.wave,
            "status": self.status,
            "previous_model": self.previous_model,
            "assigned_at": self.assigned_at,
            "finished_at": self.finished_at,
            "reason": self.reason,
            "rolled_back": self.rolled_back_at is not None,
            "rolled_back_to": self.rolled_back_to,
        }


@dataclass(frozen=True)
class Rollout:
    """A rollout with its devices (ordered by wave, then id)."""

    id: int
    kind: str
    model: str
    version: str
    target_path: str
    selector: str
    policy: RolloutPolicy
    state: str
    request: str | None
    abort_reason: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    devices: tuple[RolloutDevice, ...]

    @property
    def ref(self) -> str:
        """``NAME@VERSION`` being rolled out."""
        return f"{self.model}@{self.version}"

    def counts(self) -> dict[str, int]:
        """Devices per status, plus ``rolled-back``."""
        counts = {s: 0 for s in ("pending", "updating", "succeeded", "failed", "timed-out")}
        for device in self.devices:
            counts[device.status] = counts.get(device.status, 0) + 1
        counts["rolled-back"] = sum(d.rolled_back_at is not None for d in self.devices)
        return counts

    def waves(self) -> list[dict[str, Any]]:
        """Per wave: its devices and how many reached each status."""
        out: list[dict[str, Any]] = []
        for wave in sorted({d.wave for d in self.devices}):
            members = [d for d in self.devices if d.wave == wave]
            statuses: dict[str, int] = {}
            for d in members:
                statuses[d.status] = statuses.get(d.status, 0) + 1
            out.append(
                {
                    "wave": wave,
                    "size": len(members),
                    "devices": [d.device_id for d in members],
                    "statuses": statuses,
                }
            )
        return out

    def to_dict(self, *, with_devices: bool = True) -> dict[str, Any]:
        """JSON-compatible view (``rollout show --json``)."""
        data: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "model": self.ref,
            "target": self.target_path,
            "selector": self.selector,
            "policy": self.policy.to_dict(),
            "state": self.state,
            "request": self.request,
            "abort_reason": self.abort_reason,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "counts": self.counts(),
        }
        if with_devices:
            data["waves"] = self.waves()
            data["devices"] = [d.to_dict() for d in self.devices]
        return data
