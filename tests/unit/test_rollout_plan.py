"""The rollout planner as pure functions: options, wave sizes, thresholds, latency, timeouts."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tools.fleetctl import rollout_plan as plan
from tools.fleetctl.rollout_plan import CanarySpec, DeviceView, RolloutPlanError, RolloutPolicy


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0.0), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1h30m", 5400.0), ("250ms", 0.25)],
)
def test_durations(text: str, seconds: float) -> None:
    assert plan.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5x", "m", "-1s", "1s2", "1.s"])
def test_bad_durations_say_what_was_expected(text: str) -> None:
    with pytest.raises(RolloutPlanError, match="expected a number with a unit"):
        plan.parse_duration(text)


def test_percent_and_canary_parsing() -> None:
    assert plan.parse_percent("20%", what="x") == 20.0
    assert plan.parse_percent("12.5", what="x") == 12.5
    for bad in ("101%", "-1%", "nan", "ten"):
        with pytest.raises(RolloutPlanError, match="expected a percentage"):
            plan.parse_percent(bad, what="max failures")
    assert plan.parse_canary("3") == CanarySpec(count=3)
    assert plan.parse_canary("10%") == CanarySpec(percent=10.0)
    for bad in ("0", "0%", "x", "-2"):
        with pytest.raises(RolloutPlanError, match="canary"):
            plan.parse_canary(bad)


def test_canary_sizes_by_count_and_percent() -> None:
    assert CanarySpec(count=1).size(10) == 1
    assert CanarySpec(count=30).size(10) == 10  # never more than the devices
    assert CanarySpec(percent=10.0).size(10) == 1
    assert CanarySpec(percent=10.0).size(11) == 2  # rounded up
    assert CanarySpec(percent=1.0).size(5) == 1  # at least one
    assert CanarySpec(percent=25.0).size(100) == 25
    assert CanarySpec(count=1).size(0) == 0


def test_wave_sizes_grow_by_the_factor() -> None:
    assert plan.wave_sizes(10, CanarySpec(count=1), 2.0) == [1, 2, 4, 3]
    assert plan.wave_sizes(7, CanarySpec(count=1), 2.0) == [1, 2, 4]
    assert plan.wave_sizes(10, CanarySpec(percent=20.0), 1.5) == [2, 3, 5]
    assert plan.wave_sizes(5, CanarySpec(count=2), 1.0) == [2, 2, 1]
    assert plan.wave_sizes(1, CanarySpec(count=3), 2.0) == [1]
    assert plan.wave_sizes(0, CanarySpec(count=1), 2.0) == []
    with pytest.raises(RolloutPlanError, match="expected at least 1"):
        plan.wave_sizes(5, CanarySpec(count=1), 0.5)


@given(
    devices=st.integers(min_value=1, max_value=500),
    canary=st.integers(min_value=1, max_value=50),
    factor=st.floats(min_value=1.0, max_value=10.0),
)
def test_waves_cover_every_device_once_and_never_shrink_before_the_last(
    devices: int, canary: int, factor: float
) -> None:
    sizes = plan.wave_sizes(devices, CanarySpec(count=canary), factor)
    assert sum(sizes) == devices
    assert all(s >= 1 for s in sizes)
    assert sizes[0] == min(canary, devices)
    assert all(a <= b for a, b in itertools.pairwise(sizes[:-1]))


def test_failure_threshold() -> None:
    policy = RolloutPolicy(max_failures_pct=20.0, min_executed=5)
    # below min executed: never abort, even at 100% failures
    assert plan.failure_abort_reason(0, 4, policy) is None
    # exactly 20% is not "exceeding"
    assert plan.failure_abort_reason(8, 2, policy) is None
    reason = plan.failure_abort_reason(7, 3, policy)
    assert reason is not None
    assert "3 of 10" in reason and "30.0%" in reason and "at most 20%" in reason
    # a single canary failure aborts with the defaults
    assert plan.failure_abort_reason(0, 1, RolloutPolicy()) is not None
    assert plan.failure_abort_reason(1, 0, RolloutPolicy()) is None
    # 100% tolerates everything
    assert plan.failure_abort_reason(0, 9, RolloutPolicy(max_failures_pct=100.0)) is None
    # 0% aborts on the first failure
    assert plan.failure_abort_reason(50, 1, RolloutPolicy(max_failures_pct=0.0)) is not None


def test_latency_regression_compares_medians_over_devices_with_both_versions() -> None:
    samples = {
        "a": ([10.0, 12.0, 11.0], [14.0]),  # median 11 -> 14
        "b": ([20.0], [26.0, 24.0, 25.0]),  # 20 -> 25
        "c": ([15.0], [18.0]),  # 15 -> 18
        "d": ([5.0], []),  # no new-version report: left out
    }
    verdict = plan.latency_verdict(samples, 10.0)
    assert verdict is not None
    assert verdict.devices == 3
    assert verdict.previous_p95_ms == 15.0
    assert verdict.new_p95_ms == 18.0
    assert verdict.regression_pct == pytest.approx(20.0)
    assert verdict.exceeded
    assert "20.0%" in verdict.reason(10.0) and "at most 10%" in verdict.reason(10.0)
    relaxed = plan.latency_verdict(samples, 25.0)
    assert relaxed is not None and not relaxed.exceeded
    faster = plan.latency_verdict({"a": ([10.0], [5.0])}, 0.0)
    assert faster is not None and faster.regression_pct == -50.0 and not faster.exceeded
    assert plan.latency_verdict({"a": ([10.0], []), "b": ([], [3.0])}, 10.0) is None
    zero = plan.latency_verdict({"a": ([0.0], [1.0])}, 50.0)
    assert zero is not None and math.isinf(zero.regression_pct) and zero.exceeded


def test_device_timeout_with_an_injected_clock() -> None:
    device = DeviceView("a", 0, plan.DEVICE_UPDATING, assigned_at=1000.0)
    assert not plan.device_timed_out(device, 1299.9, 300.0)
    assert plan.device_timed_out(device, 1300.0, 300.0)
    done = DeviceView("a", 0, plan.DEVICE_SUCCEEDED, assigned_at=1000.0, finished_at=1001.0)
    assert not plan.device_timed_out(done, 9999.0, 300.0)


def _views(statuses: list[list[str]], finished_at: float = 100.0) -> list[DeviceView]:
    return [
        DeviceView(f"d{w}-{i}", w, s, finished_at=finished_at if s in plan.DEVICE_FINAL else None)
        for w, wave in enumerate(statuses)
        for i, s in enumerate(wave)
    ]


def test_next_wave_starts_the_canary_then_waits_for_completion_and_interval() -> None:
    pending, updating = plan.DEVICE_PENDING, plan.DEVICE_UPDATING
    ok, failed, timed_out = plan.DEVICE_SUCCEEDED, plan.DEVICE_FAILED, plan.DEVICE_TIMED_OUT
    assert plan.next_wave(_views([[pending], [pending, pending]]), 0.0, 0.0).start_wave == 0
    assert plan.next_wave(_views([[updating], [pending, pending]]), 0.0, 0.0).start_wave is None
    waiting = plan.next_wave(_views([[ok], [pending, pending]]), 110.0, 30.0)
    assert waiting.start_wave is None and waiting.waiting_until == 130.0
    assert plan.next_wave(_views([[ok], [pending, pending]]), 130.0, 30.0).start_wave == 1
    mixed = _views([[ok], [failed, timed_out], [pending]])
    assert plan.next_wave(mixed, 100.0, 0.0).start_wave == 2
    half = _views([[ok], [ok, updating], [pending]])
    assert plan.next_wave(half, 1000.0, 0.0) == plan.WaveDecision(None, False)
    assert plan.next_wave(_views([[ok], [ok, failed]]), 100.0, 0.0).finished
    unsettled = [
        DeviceView("a", 0, ok, finished_at=1.0, settled=False),
        DeviceView("b", 1, pending),
    ]
    assert plan.next_wave(unsettled, 100.0, 0.0).start_wave is None


def test_transition_table() -> None:
    plan.check_transition("pending", "running")
    plan.check_transition("running", "paused")
    plan.check_transition("paused", "running")
    plan.check_transition("paused", "aborted")
    with pytest.raises(RolloutPlanError, match="rollout is succeeded, cannot become running"):
        plan.check_transition("succeeded", "running")
    plan.check_transition("pending", "paused")  # paused before its first wave
    with pytest.raises(RolloutPlanError, match="rollout is aborted, cannot become paused"):
        plan.check_transition("aborted", "paused")


def test_policy_validation_and_round_trip() -> None:
    policy = RolloutPolicy(
        canary=CanarySpec(percent=5.0),
        wave_factor=3.0,
        wave_interval_s=60.0,
        max_failures_pct=10.0,
        min_executed=4,
        device_timeout_s=120.0,
        max_latency_regression_pct=15.0,
    )
    assert RolloutPolicy.from_dict(policy.to_dict()) == policy
    assert RolloutPolicy.from_dict(RolloutPolicy().to_dict()) == RolloutPolicy()
    for bad in (
        {"wave_factor": 0.5},
        {"device_timeout_s": 0.0},
        {"wave_interval_s": -1.0},
        {"min_executed": 0},
        {"max_failures_pct": 120.0},
        {"max_latency_regression_pct": -5.0},
    ):
        with pytest.raises(RolloutPlanError, match="expected"):
            RolloutPolicy(**bad)  # type: ignore[arg-type]
