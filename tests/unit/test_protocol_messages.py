"""JSON wire messages: round trips, strict known fields, tolerated unknown fields, size bounds."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent.protocol.errors import MessageError
from agent.protocol.messages import (
    MAX_MESSAGE_BYTES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    ActiveModel,
    EventMessage,
    Hardware,
    LatencyStats,
    Message,
    Notify,
    RepoRequest,
    ResultMessage,
    StateMessage,
    TelemetryMessage,
    TelemetryMetrics,
    ThrottleFlags,
    decode,
    encode,
)
from agent.schema import SchemaError, field_meta, load

RID = "0123456789abcdef0123456789abcdef"

EXAMPLES: list[Message] = [
    StateMessage(
        online=True,
        boot_id="b1",
        agent_version="0.1.0",
        ts=1700000000.5,
        backends=("tflite", "onnx"),
        hardware=Hardware(model="Raspberry Pi 4 Model B", arch="aarch64", cpu_count=4),
        active_model=ActiveModel(name="faces", version="3", backend="tflite"),
    ),
    StateMessage(online=False, boot_id="b1"),
    TelemetryMessage(
        boot_id="b1",
        seq=42,
        ts=1700000000.0,
        metrics=TelemetryMetrics(
            interval_s=10.0,
            latency_ms={"inference": LatencyStats(count=300, p50=8.1, p95=12.0, p99=15.5, max=30)},
            fps=29.9,
            drops=3,
            cpu_percent=55.0,
            rss_bytes=120_000_000,
            temperature_c=61.2,
            throttled=ThrottleFlags(under_voltage_occurred=True),
            outbox_backlog=2,
            reconnects=1,
            extra={"queue": 1.0},
        ),
    ),
    EventMessage(
        boot_id="b1",
        seq=7,
        ts=1700000001.0,
        kind="failed",
        target="image/targets/faces-3.enc",
        version="3",
        reason="self-test: expected class 3, got 5",
        report={"report": {"installed": "faces@2"}, "signature": "AAAA", "alg": "ed25519"},
    ),
    ResultMessage(
        boot_id="b1",
        seq=1,
        ts=1.5,
        kind="detection",
        result={"detections": [{"box": [1.0, 2.0, 3.0, 4.0], "score": 0.9, "label": "face"}]},
        model="faces",
        model_version="3",
        latency_ms=14.0,
    ),
    RepoRequest(request_id=RID, path="director/metadata/timestamp.json", offset=0, length=65536),
    Notify(ts=5.0),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Message) -> None:
    data = encode(message)
    assert len(data) <= MAX_MESSAGE_BYTES
    assert decode(type(message), data) == message
    assert json.loads(data)["v"] == PROTOCOL_VERSION


def test_every_json_topic_has_a_message_type() -> None:
    assert set(MESSAGE_TYPES) == {
        "state",
        "telemetry",
        "results",
        "events",
        "repo/req",
        "notify",
        "ack",
    }


def test_unknown_fields_are_tolerated_at_every_level() -> None:
    data = json.loads(encode(EXAMPLES[2]))
    data["future_top"] = {"anything": [1, 2]}
    data["v"] = 3
    data["metrics"]["future_metric"] = 1.0
    data["metrics"]["latency_ms"]["inference"]["p999"] = 40.0
    decoded = decode(TelemetryMessage, json.dumps(data).encode())
    assert decoded.v == 3
    assert decoded.metrics == EXAMPLES[2].metrics  # type: ignore[union-attr]


def test_unknown_event_kinds_decode_but_do_not_encode() -> None:
    newer = b'{"v":2,"boot_id":"b","seq":1,"ts":1,"kind":"warming-up"}'
    event = decode(EventMessage, newer)
    assert event.kind == "warming-up"
    with pytest.raises(MessageError, match="event kind 'warming-up': expected one of"):
        encode(event)
    with pytest.raises(MessageError, match="kind 'Bad Kind'"):
        decode(EventMessage, b'{"boot_id":"b","seq":1,"ts":1,"kind":"Bad Kind"}')


@pytest.mark.parametrize(
    ("cls", "payload", "reason"),
    [
        (StateMessage, b'{"online":"yes"}', "StateMessage.online: expected a boolean"),
        (StateMessage, b'{"online":true}', "needs boot_id and agent_version"),
        (StateMessage, b"{}", "StateMessage.online: required key is missing"),
        (
            TelemetryMessage,
            b'{"boot_id":"b","seq":-1,"ts":1,"metrics":{}}',
            "seq: expected a value >= 0",
        ),
        (
            TelemetryMessage,
            b'{"boot_id":"b","seq":1.5,"ts":1,"metrics":{}}',
            "seq: expected an integer",
        ),
        (
            TelemetryMessage,
            b'{"boot_id":"b","seq":1,"ts":1,"metrics":{"fps":true}}',
            "metrics.fps: expected a number",
        ),
        (
            TelemetryMessage,
            b'{"boot_id":"","seq":1,"ts":1,"metrics":{}}',
            "boot_id: expected at least 1",
        ),
        (
            ResultMessage,
            b'{"boot_id":"b","seq":1,"ts":1,"kind":"segmentation","result":{}}',
            "kind: expected one of",
        ),
        (
            RepoRequest,
            b'{"request_id":"XYZ","path":"a"}',
            "request_id 'XYZ': expected 32 lowercase hex",
        ),
        (
            RepoRequest,
            b'{"request_id":"' + RID.encode() + b'","path":"../etc/passwd"}',
            "without '.' or '..'",
        ),
        (
            RepoRequest,
            b'{"request_id":"' + RID.encode() + b'","path":"/abs"}',
            "expected a relative path",
        ),
        (
            RepoRequest,
            b'{"request_id":"' + RID.encode() + b'","path":"a","length":0}',
            "length: expected a value >= 1",
        ),
        (
            RepoRequest,
            b'{"request_id":"' + RID.encode() + b'","path":"a","length":99999999}',
            "length: expected a value <=",
        ),
        (Notify, b'{"ts":1,"v":0}', "Notify.v: expected a value >= 1"),
        (Notify, b"[]", "expected a JSON object, got list"),
        (Notify, b'{"ts":1', "expected JSON"),
        (Notify, b'{"ts":NaN}', "JSON constant NaN"),
        (Notify, b'{"ts":1,"ts":2}', "duplicate key 'ts'"),
        (Notify, b'{"ts":1,"reason":"\xff"}', "expected UTF-8"),
    ],
)
def test_bad_messages_raise_one_line_errors(cls: Any, payload: bytes, reason: str) -> None:
    with pytest.raises(MessageError) as info:
        decode(cls, payload)
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


def test_oversize_is_rejected_both_ways() -> None:
    big = {"boot_id": "b", "seq": 1, "ts": 1, "metrics": {}, "pad": "x" * MAX_MESSAGE_BYTES}
    with pytest.raises(MessageError, match=r"bytes: expected at most 65536"):
        decode(TelemetryMessage, json.dumps(big).encode())
    huge_result = ResultMessage(
        boot_id="b", seq=1, ts=1, kind="raw", result={"outputs": [0.5] * 20000}
    )
    with pytest.raises(MessageError, match=r"ResultMessage is .* bytes: expected at most 65536"):
        encode(huge_result)


def test_deep_nesting_is_rejected_not_crashing() -> None:
    with pytest.raises(MessageError, match="nested too deeply, expected a shallower"):
        decode(Notify, b"[" * 30000 + b"]" * 30000)
    deep = b'{"ts":1,"x":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}"
    with pytest.raises(MessageError, match="nested too deeply"):
        decode(Notify, deep)
    nested = b'{"ts":1,"x":' + b'{"a":' * 100 + b"1" + b"}" * 100 + b"}"
    assert decode(Notify, nested).ts == 1.0  # an unknown, nested field is ignored


@pytest.mark.parametrize(
    "payload",
    [
        b'{"ts":1,"x":' + b"1" * 5000 + b"}",
        b'{"ts":1,"x":[-' + b"9" * 4400 + b"]}",
        b'{"ts":' + b"1" * 4301 + b"}",
    ],
    ids=["unknown-field", "negative-in-list", "known-field"],
)
def test_numbers_too_long_to_convert_are_one_line_errors(payload: bytes) -> None:
    # json raises a plain ValueError for integers over sys.get_int_max_str_digits() digits.
    with pytest.raises(MessageError, match="Notify: expected JSON") as caught:
        decode(Notify, payload)
    assert "\n" not in str(caught.value)


def test_request_id_bytes() -> None:
    assert RepoRequest(request_id=RID, path="a").request_id_bytes == bytes.fromhex(RID)


def test_throttle_flags_from_firmware_bitmask() -> None:
    flags = ThrottleFlags.from_bitmask(0x50005)
    assert flags.under_voltage and flags.throttled and not flags.freq_capped
    assert flags.under_voltage_occurred and flags.throttled_occurred
    assert not flags.soft_temp_limit_occurred
    assert ThrottleFlags.from_bitmask(0) == ThrottleFlags()


# ---- agent.schema.load(ignore_unknown=...) ---------------------------------------------------


@dataclass(frozen=True)
class _Inner:
    n: int = field(metadata=field_meta("a number", min=0))


@dataclass(frozen=True)
class _Outer:
    inner: _Inner
    items: tuple[_Inner, ...] = ()
    by_name: dict[str, _Inner] = field(default_factory=dict)


def test_schema_rejects_unknown_keys_by_default() -> None:
    with pytest.raises(SchemaError, match="unknown key 'extra'"):
        load(_Outer, {"inner": {"n": 1}, "extra": 1})
    with pytest.raises(SchemaError, match=r"inner: unknown key 'extra'"):
        load(_Outer, {"inner": {"n": 1, "extra": 1}})


def test_schema_ignore_unknown_drops_them_at_every_level_but_stays_strict() -> None:
    data = {
        "inner": {"n": 1, "x": 0},
        "items": [{"n": 2, "y": 0}],
        "by_name": {"a": {"n": 3, "z": 0}},
        "extra": True,
    }
    assert load(_Outer, data, ignore_unknown=True) == _Outer(
        inner=_Inner(1), items=(_Inner(2),), by_name={"a": _Inner(3)}
    )
    with pytest.raises(SchemaError, match=r"items\[0\].n: expected a value >= 0"):
        load(_Outer, {"inner": {"n": 1}, "items": [{"n": -1, "y": 0}]}, ignore_unknown=True)
    with pytest.raises(SchemaError, match=r"inner\.n: required key is missing"):
        load(_Outer, {"inner": {"m": 1}}, ignore_unknown=True)
