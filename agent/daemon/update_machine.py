"""The model update lifecycle as a sans-I/O state machine: one transition table, events in.

The updater service (:mod:`agent.daemon.updater`) does the I/O - refreshing metadata, fetching,
decrypting, loading, swapping - and tells the machine what happened; the machine checks that the
step is legal now, moves to the next state and returns a :class:`Transition` naming the lifecycle
event to publish (``EventMessage.kind``, or None for internal steps). It never touches sockets,
files or clocks.

States, in the order an update goes through them::

    idle -> refreshing -> resolving -> fetching -> verifying -> unsealing -> decrypting
         -> loading -> self-testing -> activating -> watching -> committed | rolled-back

plus ``failed`` (any step before activation failed; the committed model keeps running).
``resolving`` ends back in ``idle`` when the device is up to date or the target is one it
rejected before; ``refreshing`` and ``fetching`` end back in ``idle`` on a transport failure
(``retry_later``: nothing is published, the target is not rejected, the next cycle retries).
``idle``, ``committed``, ``rolled-back`` and ``failed`` are rest states: only ``refresh`` leaves
them, starting the next cycle.

Invariants:
    * :data:`TRANSITIONS` is the whole behaviour: (state, input) -> (next state, event kind).
    * An input that is not legal in the current state raises :class:`UpdateStateError` and
      changes nothing.
    * ``fail`` is legal in every busy state before ``watching``; after activation only the watch
      verdict (``watch_passed`` / ``watch_failed``) ends the cycle, so an activated model is
      always either committed or rolled back.
    * ``retry_later`` is legal only where the repository is read (``refreshing``, ``fetching``)
      and publishes nothing: a lost connection is not a failure of the target.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

__all__ = [
    "REST_STATES",
    "TRANSITIONS",
    "Input",
    "State",
    "Transition",
    "UpdateContext",
    "UpdateMachine",
    "UpdateStateError",
]


class UpdateStateError(Exception):
    """An update step was reported in a state where it cannot happen."""


class State(enum.Enum):
    """Where the update cycle is."""

    IDLE = "idle"
    REFRESHING = "refreshing"
    RESOLVING = "resolving"
    FETCHING = "fetching"
    VERIFYING = "verifying"
    UNSEALING = "unsealing"
    DECRYPTING = "decrypting"
    LOADING = "loading"
    SELF_TESTING = "self-testing"
    ACTIVATING = "activating"
    WATCHING = "watching"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled-back"
    FAILED = "failed"


class Input(enum.Enum):
    """What the updater reports to the machine."""

    REFRESH = "refresh"  # start a cycle: metadata refresh begins
    REFRESHED = "refreshed"  # both repositories refreshed and verified
    UP_TO_DATE = "up-to-date"  # the director's target is the committed one
    SKIP = "skip"  # the director's target was rejected before: not retried
    NEW_TARGET = "new-target"  # a different target: download begins
    FETCHED = "fetched"  # ciphertext downloaded
    VERIFIED = "verified"  # ciphertext length and hashes match the signed ones
    UNSEALED = "unsealed"  # the key grant opened with the device key
    DECRYPTED = "decrypted"  # plaintext in memory matches the signed sha256
    LOADED = "loaded"  # the runtime loaded the model
    SELF_TEST_PASSED = "self-test-passed"
    ACTIVATED = "activated"  # the frame loop runs the new model
    WATCH_PASSED = "watch-passed"
    WATCH_FAILED = "watch-failed"
    FAIL = "fail"  # the current step failed (before activation)
    RETRY_LATER = "retry-later"  # the repository could not be read: end the cycle, retry soon


REST_STATES = frozenset({State.IDLE, State.COMMITTED, State.ROLLED_BACK, State.FAILED})
_BEFORE_ACTIVATION = (
    State.REFRESHING,
    State.RESOLVING,
    State.FETCHING,
    State.VERIFYING,
    State.UNSEALING,
    State.DECRYPTING,
    State.LOADING,
    State.SELF_TESTING,
    State.ACTIVATING,
)

#: (state, input) -> (next state, event kind to publish or None)
TRANSITIONS: dict[tuple[State, Input], tuple[State, str | None]] = {
    **{(rest, Input.REFRESH): (State.REFRESHING, "refreshing") for rest in REST_STATES},
    (State.REFRESHING, Input.REFRESHED): (State.RESOLVING, None),
    (State.RESOLVING, Input.UP_TO_DATE): (State.IDLE, "up-to-date"),
    (State.RESOLVING, Input.SKIP): (State.IDLE, None),
    (State.RESOLVING, Input.NEW_TARGET): (State.FETCHING, "fetching"),
    (State.FETCHING, Input.FETCHED): (State.VERIFYING, None),
    (State.VERIFYING, Input.VERIFIED): (State.UNSEALING, "verified"),
    (State.UNSEALING, Input.UNSEALED): (State.DECRYPTING, None),
    (State.DECRYPTING, Input.DECRYPTED): (State.LOADING, None),
    (State.LOADING, Input.LOADED): (State.SELF_TESTING, None),
    (State.SELF_TESTING, Input.SELF_TEST_PASSED): (State.ACTIVATING, None),
    (State.ACTIVATING, Input.ACTIVATED): (State.WATCHING, "activated"),
    (State.WATCHING, Input.WATCH_PASSED): (State.COMMITTED, "committed"),
    (State.WATCHING, Input.WATCH_FAILED): (State.ROLLED_BACK, "rolled-back"),
    **{(busy, Input.FAIL): (State.FAILED, "failed") for busy in _BEFORE_ACTIVATION},
    (State.REFRESHING, Input.RETRY_LATER): (State.IDLE, None),
    (State.FETCHING, Input.RETRY_LATER): (State.IDLE, None),
}


@dataclass(frozen=True)
class UpdateContext:
    """What the cycle knows about the target; copied into every published event."""

    target: str | None = None
    version: str | None = None
    previous_version: str | None = None
    sha256: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Transition:
    """One step: where from, where to, and the event to publish (None: nothing)."""

    old: State
    new: State
    input: Input
    kind: str | None
    context: UpdateContext


class UpdateMachine:
    """Holds the state of one device's update cycle; :meth:`handle` is the only way to move."""

    def __init__(self, *, previous_version: str | None = None) -> None:
        """``previous_version``: the committed model's version at start (None: none)."""
        self.state = State.IDLE
        self.committed_version = previous_version
        self.context = UpdateContext(previous_version=previous_version)

    @property
    def busy(self) -> bool:
        """True while a cycle is under way."""
        return self.state not in REST_STATES

    def handle(
        self,
        event: Input,
        *,
        target: str | None = None,
        version: str | None = None,
        sha256: str | None = None,
        reason: str | None = None,
    ) -> Transition:
        """Apply ``event``; returns the transition (with the event kind to publish).

        ``target``/``version``/``sha256`` name the target (given with ``UP_TO_DATE``, ``SKIP``
        or ``NEW_TARGET``); ``reason`` is the one-line cause of ``FAIL``/``WATCH_FAILED``
        (and, optionally, of ``RETRY_LATER``).

        Raises:
            UpdateStateError: ``event`` cannot happen in the current state.
        """
        step = TRANSITIONS.get((self.state, event))
        if step is None:
            legal = sorted(i.value for (s, i) in TRANSITIONS if s is self.state)
            raise UpdateStateError(
                f"update step {event.value!r} in state {self.state.value!r}: expected one of "
                f"{', '.join(legal)}"
            )
        if event in (Input.FAIL, Input.WATCH_FAILED) and not reason:
            raise UpdateStateError(f"update step {event.value!r}: expected a reason, got none")
        new, kind = step
        context = self.context
        if event is Input.REFRESH:
            context = UpdateContext(previous_version=self.committed_version)
        if target is not None or version is not None or sha256 is not None:
            context = replace(context, target=target, version=version, sha256=sha256)
        if reason is not None:
            context = replace(context, reason=" ".join(reason.split())[:1024])
        if new is State.COMMITTED:
            self.committed_version = context.version
        transition = Transition(self.state, new, event, kind, context)
        self.state = new
        self.context = context
        return transition
