"""Topic building, parsing, validation, and MQTT filter matching."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.protocol.errors import TopicError
from agent.protocol.topics import (
    DEVICE_PUBLISHES,
    DEVICE_SUBSCRIBES,
    RESERVED_DEVICE_IDS,
    TOPIC_KINDS,
    Topics,
    split_shared,
    topic_matches,
    validate_device_id,
    validate_filter,
    validate_topic,
)

T = Topics()


def test_builders_produce_the_documented_layout() -> None:
    assert T.state("cam-01") == "edge/v1/dev/cam-01/state"
    assert T.telemetry("cam-01") == "edge/v1/dev/cam-01/telemetry"
    assert T.results("cam-01") == "edge/v1/dev/cam-01/results"
    assert T.events("cam-01") == "edge/v1/dev/cam-01/events"
    assert T.repo_request("cam-01") == "edge/v1/dev/cam-01/repo/req"
    assert T.repo_response("cam-01") == "edge/v1/dev/cam-01/repo/resp"
    assert T.notify("cam-01") == "edge/v1/dev/cam-01/notify"
    assert Topics(prefix="acme/edge/v1").state("a") == "acme/edge/v1/dev/a/state"


@pytest.mark.parametrize("kind", TOPIC_KINDS)
def test_parse_inverts_build(kind: str) -> None:
    parsed = T.parse(T.device(kind, "pi_7-b"))  # type: ignore[arg-type]
    assert (parsed.device_id, parsed.kind) == ("pi_7-b", kind)


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/dev/a/state",
        "edge/v1/dev/a/unknown",
        "edge/v1/dev/a",
        "edge/v1/dev/A/state",
        "edge/v1/dev/a/repo",
        "edge/v1/dev/a/state/extra",
        "edge/v1/dev//state",
    ],
)
def test_parse_rejects_foreign_topics(topic: str) -> None:
    with pytest.raises(TopicError, match="expected"):
        T.parse(topic)


@pytest.mark.parametrize(
    "device_id",
    ["", "A", "-a", "_a", "a/b", "a+", "a#", "$a", "a b", "a.b", "é", "a" * 64, "a\x00"],
)
def test_bad_device_ids_are_rejected_everywhere(device_id: str) -> None:
    with pytest.raises(TopicError, match="invalid device id"):
        validate_device_id(device_id)
    with pytest.raises(TopicError):
        T.state(device_id)


@pytest.mark.parametrize("device_id", sorted(RESERVED_DEVICE_IDS))
def test_reserved_broker_users_are_not_device_ids(device_id: str) -> None:
    # The controller's broker user has readwrite on the whole prefix: no device may take its name.
    with pytest.raises(TopicError, match="reserved"):
        validate_device_id(device_id)
    with pytest.raises(TopicError):
        T.state(device_id)
    with pytest.raises(TopicError):
        T.parse(f"edge/v1/dev/{device_id}/state")


@pytest.mark.parametrize("device_id", ["a", "0", "cam-01", "pi_4b", "a" * 63])
def test_good_device_ids_are_accepted(device_id: str) -> None:
    assert validate_device_id(device_id) == device_id


@pytest.mark.parametrize("prefix", ["", "/edge", "edge/", "$SYS/x", "a//b", "a/+/b", "a/#"])
def test_bad_prefixes_are_rejected(prefix: str) -> None:
    with pytest.raises(TopicError):
        Topics(prefix=prefix)


def test_controller_filters_share_everything_but_retained_state() -> None:
    filters = T.controller_filters()
    assert filters["telemetry"] == "$share/ctl/edge/v1/dev/+/telemetry"
    assert filters["events"] == "$share/ctl/edge/v1/dev/+/events"
    assert filters["repo/req"] == "$share/ctl/edge/v1/dev/+/repo/req"
    assert filters["state"] == "edge/v1/dev/+/state"
    assert set(filters) == set(DEVICE_PUBLISHES)
    for f in filters.values():
        validate_filter(f)
    with pytest.raises(TopicError):
        T.controller_filters(group="a/b")


def test_device_acl_lists_only_its_own_topics() -> None:
    writable, readable = T.device_acl("d1")
    assert set(writable) == {T.device(k, "d1") for k in DEVICE_PUBLISHES}
    assert set(readable) == {T.notify("d1"), T.repo_response("d1"), T.ack("d1")}
    assert set(DEVICE_SUBSCRIBES) == {"notify", "repo/resp", "ack"}
    write_patterns, read_patterns = T.device_acl_patterns()
    assert write_patterns == tuple(t.replace("/d1/", "/%u/") for t in writable)
    assert read_patterns == tuple(t.replace("/d1/", "/%u/") for t in readable)
    with pytest.raises(TopicError, match="placeholder"):
        T.device_acl_patterns(placeholder="+")


MATCH_TABLE = [
    ("a/b/c", "a/b/c", True),
    ("a/b/c", "a/b", False),
    ("a/+/c", "a/x/c", True),
    ("a/+/c", "a/x/y/c", False),
    ("a/+", "a/", True),  # empty level matches +
    ("+", "a", True),
    ("+", "a/b", False),
    ("+/+", "/a", True),
    ("a/#", "a", True),  # '#' includes the parent level
    ("a/#", "a/b/c", True),
    ("a/#", "ab", False),
    ("#", "a/b", True),
    ("#", "$SYS/broker", False),
    ("+/broker", "$SYS/broker", False),
    ("$SYS/#", "$SYS/broker", True),
    ("edge/v1/dev/+/telemetry", "edge/v1/dev/d1/telemetry", True),
    ("edge/v1/dev/+/telemetry", "edge/v1/dev/d1/events", False),
    ("$share/ctl/edge/v1/dev/+/telemetry", "edge/v1/dev/d1/telemetry", True),
    ("$share/ctl/#", "edge/v1/dev/d1/state", True),
    ("a/b", "A/b", False),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCH_TABLE)
def test_filter_matching_table(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize("bad", ["a/#/b", "a#", "a/b+", "+a/b", "", "$share/ctl", "$share//a"])
def test_bad_filters_are_rejected(bad: str) -> None:
    with pytest.raises(TopicError):
        validate_filter(bad)


@pytest.mark.parametrize("bad", ["a/+", "a/#", "", "a\x00b", "\ud800"])
def test_bad_topic_names_are_rejected(bad: str) -> None:
    with pytest.raises(TopicError):
        validate_topic(bad)


def test_split_shared() -> None:
    assert split_shared("$share/g1/a/+") == ("g1", "a/+")
    assert split_shared("a/+") == (None, "a/+")


level = st.text(alphabet="abc", min_size=0, max_size=2)
topics = st.lists(level, min_size=1, max_size=5).map("/".join)


@given(topics)
def test_a_topic_matches_itself_and_hash(topic: str) -> None:
    assert topic_matches(topic, topic)
    assert topic_matches("#", topic)


@given(topics, st.data())
def test_replacing_levels_by_plus_still_matches(topic: str, data: st.DataObject) -> None:
    levels = topic.split("/")
    mask = data.draw(st.lists(st.booleans(), min_size=len(levels), max_size=len(levels)))
    pattern = "/".join("+" if m else lv for lv, m in zip(levels, mask, strict=True))
    assert topic_matches(pattern, topic)
    assert not topic_matches(pattern + "/x", topic)
    cut = data.draw(st.integers(min_value=0, max_value=len(levels) - 1))
    assert topic_matches("/".join([*levels[:cut], "#"]), topic)
