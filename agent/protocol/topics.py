"""Topic names of the wire protocol, device-id validation and MQTT topic-filter matching.

Sans-I/O. Every topic the product uses is built and parsed here, so a device id can never smuggle
MQTT syntax into a topic: ids match ``[a-z0-9][a-z0-9_-]{0,62}`` (no ``/``, ``+``, ``#``, ``$``)
and are not a reserved broker user (:data:`RESERVED_DEVICE_IDS`: the controller's ``fleetctl``).

Layout, with prefix ``p`` (default ``edge/v1``; the ``v1`` is the protocol's major version)::

    {p}/dev/{device}/state | telemetry | results | events | repo/req     device -> controller
    {p}/dev/{device}/repo/resp | notify | ack                            controller -> device

:func:`topic_matches` is the one implementation of MQTT filter matching (``+``, ``#``, ``$``
topics, ``$share/{group}/...``) used by the in-memory broker and by the transports' dispatch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

from agent.protocol.errors import TopicError

__all__ = [
    "CONTROLLER_GROUP",
    "DEFAULT_PREFIX",
    "DEVICE_PUBLISHES",
    "DEVICE_SUBSCRIBES",
    "MAX_TOPIC_BYTES",
    "RESERVED_DEVICE_IDS",
    "TOPIC_KINDS",
    "TOPIC_POLICIES",
    "DeviceTopic",
    "TopicKind",
    "TopicPolicy",
    "Topics",
    "split_shared",
    "topic_matches",
    "validate_device_id",
    "validate_filter",
    "validate_topic",
]

DEFAULT_PREFIX = "edge/v1"
CONTROLLER_GROUP = "ctl"
MAX_TOPIC_BYTES = 65535  # MQTT's UTF-8 string limit
# Broker user names that are not devices: ``fleetctl`` is the controller's user (certificate CN
# and ACL entry with readwrite on the whole prefix), so no device may be enrolled under it.
RESERVED_DEVICE_IDS = frozenset({"fleetctl"})

TopicKind = Literal[
    "state", "telemetry", "results", "events", "repo/req", "repo/resp", "notify", "ack"
]
TOPIC_KINDS: tuple[TopicKind, ...] = get_args(TopicKind)

_DEVICE_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_GROUP = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class TopicPolicy:
    """How one topic kind is used: who writes it, at which QoS, and whether it is retained."""

    direction: Literal["device->controller", "controller->device"]
    qos: Literal[0, 1]
    retain: bool
    content: str


TOPIC_POLICIES: dict[TopicKind, TopicPolicy] = {
    "state": TopicPolicy("device->controller", 1, True, "StateMessage (JSON); Last Will: offline"),
    "telemetry": TopicPolicy("device->controller", 1, False, "TelemetryMessage (JSON)"),
    "results": TopicPolicy("device->controller", 0, False, "ResultMessage (JSON), rate-limited"),
    "events": TopicPolicy("device->controller", 1, False, "EventMessage (JSON)"),
    "repo/req": TopicPolicy("device->controller", 1, False, "RepoRequest (JSON)"),
    "repo/resp": TopicPolicy("controller->device", 1, False, "binary RepoFrame"),
    "notify": TopicPolicy("controller->device", 1, False, "Notify (JSON)"),
    "ack": TopicPolicy("controller->device", 1, False, "Ack (JSON): telemetry/events stored"),
}
DEVICE_PUBLISHES: tuple[TopicKind, ...] = tuple(
    k for k, p in TOPIC_POLICIES.items() if p.direction == "device->controller"
)
DEVICE_SUBSCRIBES: tuple[TopicKind, ...] = tuple(
    k for k, p in TOPIC_POLICIES.items() if p.direction == "controller->device"
)


@dataclass(frozen=True)
class DeviceTopic:
    """A parsed device topic."""

    device_id: str
    kind: TopicKind


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is a valid id, else raise :class:`TopicError`."""
    if not isinstance(device_id, str) or _DEVICE_ID.fullmatch(device_id) is None:
        raise TopicError(
            f"invalid device id {device_id!r}: expected 1-63 characters of [a-z0-9_-], "
            "starting with a letter or digit"
        )
    if device_id in RESERVED_DEVICE_IDS:
        raise TopicError(
            f"invalid device id {device_id!r}: reserved for the controller's broker user,"
            " expected another id"
        )
    return device_id


def _check_utf8(text: str, what: str) -> None:
    if not text:
        raise TopicError(f"empty {what}: expected at least one character")
    if "\x00" in text:
        raise TopicError(f"{what} {text[:60]!r} contains NUL: not allowed in MQTT strings")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise TopicError(f"{what} {text[:60]!r} is not valid UTF-8: {exc.reason}") from None
    if size > MAX_TOPIC_BYTES:
        raise TopicError(f"{what} is {size} bytes: expected at most {MAX_TOPIC_BYTES}")


def validate_topic(topic: str) -> str:
    """Return ``topic`` if it is a valid topic *name* (something one can publish to)."""
    _check_utf8(topic, "topic")
    if "+" in topic or "#" in topic:
        raise TopicError(f"topic {topic[:60]!r} contains a wildcard: expected a topic name")
    return topic


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """Split ``$share/{group}/{filter}`` into ``(group, filter)``; ``(None, filter)`` otherwise."""
    if not topic_filter.startswith("$share/"):
        return None, topic_filter
    parts = topic_filter.split("/", 2)
    if len(parts) != 3 or _GROUP.fullmatch(parts[1]) is None or not parts[2]:
        raise TopicError(
            f"shared subscription {topic_filter[:60]!r}: expected $share/<group>/<filter> "
            "with a group of [A-Za-z0-9_-]"
        )
    return parts[1], parts[2]


def validate_filter(topic_filter: str) -> str:
    """Return ``topic_filter`` if it is a valid MQTT topic filter (shared ones included)."""
    _check_utf8(topic_filter, "topic filter")
    _group, inner = split_shared(topic_filter)
    levels = inner.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise TopicError(f"topic filter {topic_filter[:60]!r}: '#' must be a whole, last level")
        if "+" in level and level != "+":
            raise TopicError(f"topic filter {topic_filter[:60]!r}: '+' must be a whole level")
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether topic name ``topic`` matches ``topic_filter`` under MQTT rules.

    ``$share/{group}/`` is stripped from the filter first. A topic starting with ``$`` is not
    matched by a filter starting with a wildcard (MQTT 3.1.1 section 4.7.2).
    """
    _group, inner = split_shared(topic_filter)
    if topic.startswith("$") and inner[:1] in ("+", "#"):
        return False
    filter_levels = inner.split("/")
    topic_levels = topic.split("/")
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True  # also matches the parent level: "a/#" matches "a"
        if i >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[i]:
            return False
    return len(filter_levels) == len(topic_levels)


class Topics:
    """Builds and parses the topics of one deployment (one prefix)."""

    def __init__(self, *, prefix: str = DEFAULT_PREFIX) -> None:
        validate_topic(prefix)
        if prefix.startswith(("$", "/")) or prefix.endswith("/") or "//" in prefix:
            raise TopicError(
                f"topic prefix {prefix!r}: expected levels like 'edge/v1' without a leading '$', "
                "leading or trailing '/' or empty levels"
            )
        self.prefix = prefix
        self._base_levels = len(prefix.split("/")) + 2  # {p}/dev/{d}

    def device(self, kind: TopicKind, device_id: str) -> str:
        """The topic of ``kind`` for ``device_id``."""
        if kind not in TOPIC_POLICIES:
            raise TopicError(f"unknown topic kind {kind!r}: expected one of {TOPIC_KINDS}")
        return f"{self.prefix}/dev/{validate_device_id(device_id)}/{kind}"

    def state(self, device_id: str) -> str:
        """``{p}/dev/{d}/state``: retained birth/Last Will."""
        return self.device("state", device_id)

    def telemetry(self, device_id: str) -> str:
        """``{p}/dev/{d}/telemetry``."""
        return self.device("telemetry", device_id)

    def results(self, device_id: str) -> str:
        """``{p}/dev/{d}/results``."""
        return self.device("results", device_id)

    def events(self, device_id: str) -> str:
        """``{p}/dev/{d}/events``."""
        return self.device("events", device_id)

    def repo_request(self, device_id: str) -> str:
        """``{p}/dev/{d}/repo/req``."""
        return self.device("repo/req", device_id)

    def repo_response(self, device_id: str) -> str:
        """``{p}/dev/{d}/repo/resp``."""
        return self.device("repo/resp", device_id)

    def notify(self, device_id: str) -> str:
        """``{p}/dev/{d}/notify``."""
        return self.device("notify", device_id)

    def ack(self, device_id: str) -> str:
        """``{p}/dev/{d}/ack``: the controller stored these telemetry/event sequence numbers."""
        return self.device("ack", device_id)

    def parse(self, topic: str) -> DeviceTopic:
        """Parse one of our device topics, or raise :class:`TopicError`."""
        head = f"{self.prefix}/dev/"
        if not topic.startswith(head):
            raise TopicError(f"topic {topic[:80]!r}: expected it to start with {head!r}")
        device_id, sep, kind = topic[len(head) :].partition("/")
        if not sep or kind not in TOPIC_POLICIES:
            raise TopicError(
                f"topic {topic[:80]!r}: expected {head}<device>/<kind> with kind one of "
                f"{', '.join(TOPIC_KINDS)}"
            )
        validate_device_id(device_id)
        return DeviceTopic(device_id=device_id, kind=kind)  # type: ignore[arg-type]

    def fleet_filter(self, kind: TopicKind) -> str:
        """``{p}/dev/+/{kind}``: one kind from every device."""
        if kind not in TOPIC_POLICIES:
            raise TopicError(f"unknown topic kind {kind!r}: expected one of {TOPIC_KINDS}")
        return f"{self.prefix}/dev/+/{kind}"

    def controller_filters(self, *, group: str = CONTROLLER_GROUP) -> dict[TopicKind, str]:
        """Shared-subscription filters a controller replica subscribes to, per device->ctl kind.

        ``state`` is not shared: every replica needs the full retained picture of who is online.
        """
        if _GROUP.fullmatch(group) is None:
            raise TopicError(f"share group {group!r}: expected 1-64 characters of [A-Za-z0-9_-]")
        return {
            kind: (
                self.fleet_filter(kind)
                if kind == "state"
                else f"$share/{group}/{self.fleet_filter(kind)}"
            )
            for kind in DEVICE_PUBLISHES
        }

    def device_acl_patterns(
        self, *, placeholder: str = "%u"
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Like :meth:`device_acl` with a broker placeholder for the id (mosquitto: ``%u``)."""
        if not placeholder or any(c in placeholder for c in "/+#"):
            raise TopicError(f"ACL placeholder {placeholder!r}: expected no '/', '+' or '#'")
        return (
            tuple(f"{self.prefix}/dev/{placeholder}/{k}" for k in DEVICE_PUBLISHES),
            tuple(f"{self.prefix}/dev/{placeholder}/{k}" for k in DEVICE_SUBSCRIBES),
        )

    def device_acl(self, device_id: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(writable, readable)`` topics for one device: what broker ACLs must allow, no more."""
        return (
            tuple(self.device(k, device_id) for k in DEVICE_PUBLISHES),
            tuple(self.device(k, device_id) for k in DEVICE_SUBSCRIBES),
        )
