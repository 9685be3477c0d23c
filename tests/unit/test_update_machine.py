"""The update state machine: every legal path, the events it asks to publish, illegal calls."""

from __future__ import annotations

import pytest

from agent.daemon.update_machine import (
    REST_STATES,
    TRANSITIONS,
    Input,
    State,
    UpdateMachine,
    UpdateStateError,
)
from agent.protocol.messages import EVENT_KINDS

TARGET = {"target": "models/digits/2.0.0/model.onnx.enc", "version": "2.0.0", "sha256": "ab" * 32}
TO_ACTIVATED = [
    (Input.REFRESH, {}),
    (Input.REFRESHED, {}),
    (Input.NEW_TARGET, TARGET),
    (Input.FETCHED, {}),
    (Input.VERIFIED, {}),
    (Input.UNSEALED, {}),
    (Input.DECRYPTED, {}),
    (Input.LOADED, {}),
    (Input.SELF_TEST_PASSED, {}),
    (Input.ACTIVATED, {}),
]


def run(machine: UpdateMachine, steps: list[tuple[Input, dict[str, str]]]) -> list[str | None]:
    return [machine.handle(event, **context).kind for event, context in steps]


def test_commit_path_publishes_the_contract_events_in_order() -> None:
    machine = UpdateMachine(previous_version="1.0.0")
    kinds = run(machine, [*TO_ACTIVATED, (Input.WATCH_PASSED, {})])
    assert [k for k in kinds if k] == [
        "refreshing",
        "fetching",
        "verified",
        "activated",
        "committed",
    ]
    assert machine.state is State.COMMITTED
    assert machine.context.version == "2.0.0"
    assert machine.context.previous_version == "1.0.0"
    assert machine.committed_version == "2.0.0"
    # the next cycle names 2.0.0 as the previous version
    assert machine.handle(Input.REFRESH).context.previous_version == "2.0.0"


def test_rollback_path_keeps_the_committed_version() -> None:
    machine = UpdateMachine(previous_version="1.0.0")
    run(machine, TO_ACTIVATED)
    last = machine.handle(Input.WATCH_FAILED, reason="error rate 50%\nover 40 frames")
    assert (last.old, last.new, last.kind) == (State.WATCHING, State.ROLLED_BACK, "rolled-back")
    assert last.context.reason == "error rate 50% over 40 frames"  # one line
    assert machine.committed_version == "1.0.0"
    assert not machine.busy


@pytest.mark.parametrize("fail_after", range(1, len(TO_ACTIVATED)))
def test_failure_at_every_step_before_activation(fail_after: int) -> None:
    machine = UpdateMachine()
    run(machine, TO_ACTIVATED[:fail_after])
    failed_in = machine.state
    last = machine.handle(Input.FAIL, reason="self-test failed: vector 'digit-3' ...")
    assert (last.old, last.new, last.kind) == (failed_in, State.FAILED, "failed")
    assert last.context.reason == "self-test failed: vector 'digit-3' ..."
    assert machine.handle(Input.REFRESH).new is State.REFRESHING  # a new cycle may start


@pytest.mark.parametrize(
    ("decision", "kind"), [(Input.UP_TO_DATE, "up-to-date"), (Input.SKIP, None)]
)
def test_resolving_can_end_the_cycle(decision: Input, kind: str | None) -> None:
    machine = UpdateMachine(previous_version="1.0.0")
    run(machine, TO_ACTIVATED[:2])
    last = machine.handle(decision, **TARGET)
    assert (last.new, last.kind) == (State.IDLE, kind)
    assert last.context.target == TARGET["target"]


def test_every_published_kind_is_a_protocol_event_kind() -> None:
    kinds = {kind for _state, kind in TRANSITIONS.values() if kind is not None}
    assert kinds <= EVENT_KINDS
    assert {
        "refreshing",
        "up-to-date",
        "fetching",
        "verified",
        "activated",
        "committed",
        "failed",
        "rolled-back",
    } == kinds


def test_every_state_is_reachable_and_every_rest_state_can_start_a_cycle() -> None:
    reached = {State.IDLE} | {new for new, _kind in TRANSITIONS.values()}
    assert reached == set(State)
    for rest in REST_STATES:
        assert TRANSITIONS[(rest, Input.REFRESH)][0] is State.REFRESHING


@pytest.mark.parametrize(
    ("steps", "illegal"),
    [
        ([], Input.FETCHED),
        ([], Input.FAIL),
        (TO_ACTIVATED[:1], Input.REFRESH),  # no second cycle while one is running
        (TO_ACTIVATED[:3], Input.ACTIVATED),  # cannot skip verification
        (TO_ACTIVATED, Input.FAIL),  # after activation only the watch verdict ends it
        (TO_ACTIVATED, Input.REFRESH),
    ],
)
def test_out_of_order_steps_raise_and_change_nothing(
    steps: list[tuple[Input, dict[str, str]]], illegal: Input
) -> None:
    machine = UpdateMachine()
    run(machine, steps)
    before = (machine.state, machine.context)
    with pytest.raises(UpdateStateError, match=f"update step '{illegal.value}' in state"):
        machine.handle(illegal, reason="x")
    assert (machine.state, machine.context) == before


def test_failure_needs_a_reason() -> None:
    machine = UpdateMachine()
    machine.handle(Input.REFRESH)
    with pytest.raises(UpdateStateError, match="expected a reason"):
        machine.handle(Input.FAIL)
    assert machine.state is State.REFRESHING


@pytest.mark.parametrize("reading", [TO_ACTIVATED[:1], TO_ACTIVATED[:3]])
def test_transport_failure_ends_the_cycle_quietly(
    reading: list[tuple[Input, dict[str, str]]],
) -> None:
    machine = UpdateMachine(previous_version="1.0.0")
    run(machine, reading)
    last = machine.handle(Input.RETRY_LATER, reason="download/verification failed: stalled")
    assert (last.new, last.kind) == (State.IDLE, None)
    assert not machine.busy
    assert machine.handle(Input.REFRESH).new is State.REFRESHING  # the retry may start


@pytest.mark.parametrize("steps", [[], TO_ACTIVATED[:2], TO_ACTIVATED[:5], TO_ACTIVATED])
def test_transport_failure_is_refused_where_nothing_is_read(
    steps: list[tuple[Input, dict[str, str]]],
) -> None:
    machine = UpdateMachine()
    run(machine, steps)
    with pytest.raises(UpdateStateError, match="update step 'retry-later' in state"):
        machine.handle(Input.RETRY_LATER, reason="stalled")
