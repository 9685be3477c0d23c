"""Versioned JSON messages of the wire protocol, as frozen dataclasses.

Sans-I/O: :func:`encode` turns a message into bytes, :func:`decode` turns untrusted bytes into a
validated message or raises :class:`MessageError` with a one-line reason.

Rules every message follows:
    * ``v`` is the protocol revision the sender speaks (:data:`PROTOCOL_VERSION`). Revisions within
      one topic prefix (``edge/v1``) only *add* optional fields, so receivers accept any ``v >= 1``
      and ignore fields they do not know (forward compatibility). An incompatible change moves to a
      new prefix (``edge/v2``), so old and new never parse each other's messages.
    * A payload is at most :data:`MAX_MESSAGE_BYTES` of UTF-8 JSON, one object, no duplicate keys,
      no NaN/Infinity. Known fields are checked strictly (types, ranges, lengths).
    * Times are Unix seconds (float, UTC); ``boot_id`` + ``seq`` identify a device message so the
      controller can deduplicate store-and-forward replays.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from agent.protocol.errors import MessageError
from agent.protocol.topics import TopicKind
from agent.schema import SchemaError, dump, field_meta, load

__all__ = [
    "ACK_KINDS",
    "EVENT_KINDS",
    "MAX_ACK_RANGES",
    "MAX_MESSAGE_BYTES",
    "MAX_REQUEST_LENGTH",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "REQUEST_ID_BYTES",
    "Ack",
    "ActiveModel",
    "EventMessage",
    "Hardware",
    "LatencyStats",
    "Message",
    "Notify",
    "RepoRequest",
    "ResultMessage",
    "StateMessage",
    "TelemetryMessage",
    "TelemetryMetrics",
    "ThrottleFlags",
    "decode",
    "encode",
    "seq_ranges",
]

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
REQUEST_ID_BYTES = 16
MAX_REQUEST_LENGTH = 1024 * 1024  # one repository chunk; see agent.protocol.framing
MAX_SEQ = 2**63 - 1

EVENT_KINDS = frozenset(
    {
        "refreshing",
        "up-to-date",
        "fetching",
        "fetched",
        "verified",
        "unsealed",
        "loaded",
        "self-test-passed",
        "self-test-failed",
        "activated",
        "committed",
        "failed",
        "rolled-back",
    }
)
_EVENT_KIND = re.compile(r"[a-z][a-z0-9-]{0,31}")
_REQUEST_ID = re.compile(f"[0-9a-f]{{{2 * REQUEST_ID_BYTES}}}")
_REPO_PATH = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")

_NAME = 128


def _version_field() -> Any:
    return field(
        default=PROTOCOL_VERSION,
        metadata=field_meta("protocol revision of the sender", min=1, max=1_000_000),
    )


_BOOT_ID = field_meta("random id of this agent process run", min_len=1, max_len=64)
_SEQ = field_meta("per-boot, per-topic sequence number", min=0, max=MAX_SEQ)
_TS = field_meta("when the message was produced, Unix seconds", min=0, max=1e11)


# ---- state -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    """What the device is."""

    model: str = field(default="", metadata=field_meta("board, e.g. 'Raspberry Pi 4 Model B'"))
    arch: str = field(default="", metadata=field_meta("machine, e.g. 'aarch64'", max_len=32))
    os: str = field(default="", metadata=field_meta("OS release, e.g. 'Debian 12'", max_len=_NAME))
    cpu_count: int = field(default=0, metadata=field_meta("logical CPUs", min=0, max=4096))
    memory_bytes: int = field(default=0, metadata=field_meta("total RAM", min=0, max=2**50))
    accelerators: tuple[str, ...] = field(
        default=(), metadata=field_meta("e.g. 'cuda', 'edgetpu'", max_len=16)
    )


@dataclass(frozen=True)
class ActiveModel:
    """The model the device runs now."""

    name: str = field(metadata=field_meta("model name", min_len=1, max_len=_NAME))
    version: str = field(metadata=field_meta("model version", min_len=1, max_len=64))
    backend: str = field(default="", metadata=field_meta("runtime backend in use", max_len=32))
    target: str = field(default="", metadata=field_meta("repository target path", max_len=512))


@dataclass(frozen=True)
class StateMessage:
    """Retained on ``{p}/dev/{d}/state``: the birth message, or the Last Will's offline mark."""

    online: bool = field(metadata=field_meta("false only in the Last Will / clean shutdown"))
    v: int = _version_field()
    boot_id: str | None = field(
        default=None, metadata=field_meta("agent process run", min_len=1, max_len=64)
    )
    agent_version: str | None = field(
        default=None, metadata=field_meta("edge-agent version", max_len=64)
    )
    ts: float | None = field(default=None, metadata=field_meta("Unix seconds", min=0, max=1e11))
    backends: tuple[str, ...] = field(
        default=(), metadata=field_meta("inference backends available", max_len=16)
    )
    hardware: Hardware | None = field(default=None, metadata=field_meta("device hardware"))
    active_model: ActiveModel | None = field(
        default=None, metadata=field_meta("model running now; null if none")
    )

    def __post_init__(self) -> None:
        if self.online and (self.boot_id is None or self.agent_version is None):
            raise ValueError("an online state needs boot_id and agent_version")


# ---- telemetry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one pipeline stage over the reporting interval, in milliseconds."""

    count: int = field(metadata=field_meta("samples in the interval", min=0, max=MAX_SEQ))
    p50: float = field(default=0.0, metadata=field_meta("median", min=0))
    p95: float = field(default=0.0, metadata=field_meta("95th percentile", min=0))
    p99: float = field(default=0.0, metadata=field_meta("99th percentile", min=0))
    max: float = field(default=0.0, metadata=field_meta("maximum", min=0))


@dataclass(frozen=True)
class ThrottleFlags:
    """Raspberry Pi firmware throttling flags (``vcgencmd get_throttled``): now and since boot."""

    under_voltage: bool = False
    freq_capped: bool = False
    throttled: bool = False
    soft_temp_limit: bool = False
    under_voltage_occurred: bool = False
    freq_capped_occurred: bool = False
    throttled_occurred: bool = False
    soft_temp_limit_occurred: bool = False

    @classmethod
    def from_bitmask(cls, mask: int) -> ThrottleFlags:
        """Build from the firmware bitmask (bits 0-3 now, 16-19 since boot)."""
        return cls(*(bool(mask >> bit & 1) for bit in (0, 1, 2, 3, 16, 17, 18, 19)))


@dataclass(frozen=True)
class TelemetryMetrics:
    """Aggregated over one reporting interval."""

    interval_s: float = field(default=0.0, metadata=field_meta("interval length", min=0))
    latency_ms: dict[str, LatencyStats] = field(
        default_factory=dict,
        metadata=field_meta("per stage: capture, preprocess, inference, postprocess", max_len=16),
    )
    fps: float = field(default=0.0, metadata=field_meta("frames inferred per second", min=0))
    frames: int = field(default=0, metadata=field_meta("frames inferred", min=0, max=MAX_SEQ))
    drops: int = field(default=0, metadata=field_meta("stale frames dropped", min=0, max=MAX_SEQ))
    errors: int = field(default=0, metadata=field_meta("inference errors", min=0, max=MAX_SEQ))
    cpu_percent: float | None = field(default=None, metadata=field_meta("agent CPU", min=0))
    rss_bytes: int | None = field(default=None, metadata=field_meta("agent RSS", min=0))
    temperature_c: float | None = field(default=None, metadata=field_meta("SoC temperature"))
    throttled: ThrottleFlags | None = field(default=None, metadata=field_meta("Pi throttling"))
    outbox_backlog: int = field(
        default=0, metadata=field_meta("messages waiting in the outbox", min=0, max=MAX_SEQ)
    )
    reconnects: int = field(default=0, metadata=field_meta("since boot", min=0, max=MAX_SEQ))
    model: str | None = field(default=None, metadata=field_meta("name@version", max_len=200))
    extra: dict[str, float] = field(
        default_factory=dict, metadata=field_meta("other numeric gauges", max_len=64)
    )


@dataclass(frozen=True)
class TelemetryMessage:
    """On ``{p}/dev/{d}/telemetry``."""

    boot_id: str = field(metadata=_BOOT_ID)
    seq: int = field(metadata=_SEQ)
    ts: float = field(metadata=_TS)
    metrics: TelemetryMetrics = field(metadata=field_meta("the interval's aggregates"))
    v: int = _version_field()


# ---- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventMessage:
    """On ``{p}/dev/{d}/events``: one update lifecycle transition.

    Senders use a kind from :data:`EVENT_KINDS` (checked by :func:`encode`); receivers accept any
    well-formed kind so a newer agent's kinds do not break an older controller.
    """

    boot_id: str = field(metadata=_BOOT_ID)
    seq: int = field(metadata=_SEQ)
    ts: float = field(metadata=_TS)
    kind: str = field(metadata=field_meta("lifecycle step, see EVENT_KINDS", max_len=32))
    v: int = _version_field()
    target: str | None = field(
        default=None, metadata=field_meta("repository target path", max_len=512)
    )
    version: str | None = field(default=None, metadata=field_meta("model version", max_len=64))
    previous_version: str | None = field(
        default=None, metadata=field_meta("version before this update", max_len=64)
    )
    reason: str | None = field(
        default=None, metadata=field_meta("one line: why it failed", max_len=1024)
    )
    report: dict[str, Any] | None = field(
        default=None,
        metadata=field_meta("signed report envelope (agent.supplychain.reports)", max_len=8),
    )

    def __post_init__(self) -> None:
        if _EVENT_KIND.fullmatch(self.kind) is None:
            raise ValueError(f"kind {self.kind!r}: expected lowercase letters, digits and '-'")


# ---- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultMessage:
    """On ``{p}/dev/{d}/results``: one inference result (payload shapes: agent.pipeline.results)."""

    boot_id: str = field(metadata=_BOOT_ID)
    seq: int = field(metadata=_SEQ)
    ts: float = field(metadata=_TS)  # for results: when the frame was captured
    kind: Literal["classification", "detection", "anomaly", "raw"] = field(
        metadata=field_meta("postprocess kind; selects the shape of result")
    )
    result: dict[str, Any] = field(metadata=field_meta("the payload", max_len=8))
    v: int = _version_field()
    model: str = field(default="", metadata=field_meta("model name", max_len=_NAME))
    model_version: str = field(default="", metadata=field_meta("model version", max_len=64))
    latency_ms: float | None = field(default=None, metadata=field_meta("capture to result", min=0))


# ---- repository fetch --------------------------------------------------------------------------


@dataclass(frozen=True)
class RepoRequest:
    """On ``{p}/dev/{d}/repo/req``: fetch ``length`` bytes of ``path`` from ``offset``.

    The controller answers on ``{p}/dev/{d}/repo/resp`` with one binary frame carrying the same
    request id (16 random bytes, hex here, raw in the frame).
    """

    request_id: str = field(metadata=field_meta("32 lowercase hex digits", max_len=64))
    path: str = field(
        metadata=field_meta(
            "repository path, e.g. 'director/metadata/timestamp.json'", min_len=1, max_len=512
        )
    )
    offset: int = field(default=0, metadata=field_meta("first byte", min=0, max=2**62))
    length: int = field(
        default=MAX_REQUEST_LENGTH,
        metadata=field_meta("bytes wanted at most", min=1, max=MAX_REQUEST_LENGTH),
    )
    v: int = _version_field()

    def __post_init__(self) -> None:
        if _REQUEST_ID.fullmatch(self.request_id) is None:
            raise ValueError(
                f"request_id {self.request_id[:40]!r}: expected {2 * REQUEST_ID_BYTES} "
                "lowercase hex digits"
            )
        if _REPO_PATH.fullmatch(self.path) is None or any(
            part in (".", "..") for part in self.path.split("/")
        ):
            raise ValueError(
                f"path {self.path[:60]!r}: expected a relative path of [A-Za-z0-9._-] "
                "segments without '.' or '..'"
            )

    @property
    def request_id_bytes(self) -> bytes:
        """The request id as the 16 bytes a response frame carries."""
        return bytes.fromhex(self.request_id)


# ---- acknowledgements --------------------------------------------------------------------------

#: seq ranges per list in one Ack; more ranges go in further Acks (see :func:`seq_ranges`)
MAX_ACK_RANGES = 256
#: the Ack lists, named after the topic kinds whose messages they acknowledge
ACK_KINDS: tuple[Literal["telemetry", "events"], ...] = ("telemetry", "events")

_RANGES = field_meta("inclusive [first, last] seq ranges", max_len=MAX_ACK_RANGES)


@dataclass(frozen=True)
class Ack:
    """On ``{p}/dev/{d}/ack``: the controller has stored these messages of boot ``boot_id``.

    Ranges are inclusive ``[first, last]`` pairs with ``first <= last``. A duplicate the controller
    already had is acknowledged too: what matters to the device is that it may forget it.
    """

    boot_id: str = field(metadata=_BOOT_ID)
    v: int = _version_field()
    telemetry: tuple[tuple[int, int], ...] = field(default=(), metadata=_RANGES)
    events: tuple[tuple[int, int], ...] = field(default=(), metadata=_RANGES)

    def __post_init__(self) -> None:
        for name in ACK_KINDS:
            for first, last in getattr(self, name):
                if not 0 <= first <= last <= MAX_SEQ:
                    raise ValueError(
                        f"{name} range [{first}, {last}]: expected 0 <= first <= last <= {MAX_SEQ}"
                    )


def seq_ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted, merged inclusive ranges: ``[1, 2, 3, 7]`` -> ``[(1, 3), (7, 7)]``."""
    ranges: list[tuple[int, int]] = []
    for seq in sorted(set(seqs)):
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], seq)
        else:
            ranges.append((seq, seq))
    return ranges


@dataclass(frozen=True)
class Notify:
    """On ``{p}/dev/{d}/notify``: a nudge to refresh now. Carries no authority: metadata does."""

    ts: float = field(metadata=_TS)
    reason: str = field(
        default="director-changed", metadata=field_meta("why the nudge", max_len=64)
    )
    v: int = _version_field()


Message = (
    StateMessage | TelemetryMessage | EventMessage | ResultMessage | RepoRequest | Notify | Ack
)
M = TypeVar("M", bound=Message)

MESSAGE_TYPES: dict[TopicKind, type[Message]] = {
    "state": StateMessage,
    "telemetry": TelemetryMessage,
    "results": ResultMessage,
    "events": EventMessage,
    "repo/req": RepoRequest,
    "notify": Notify,
    "ack": Ack,
}


# ---- codec -------------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise MessageError(f"duplicate key {key[:40]!r}: expected each key once")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise MessageError(f"JSON constant {name}: expected finite numbers only")


def encode(message: Message) -> bytes:
    """Serialize ``message`` to compact UTF-8 JSON.

    Raises:
        MessageError: the result would exceed MAX_MESSAGE_BYTES, or an event kind is unknown.
    """
    if isinstance(message, EventMessage) and message.kind not in EVENT_KINDS:
        raise MessageError(
            f"event kind {message.kind!r}: expected one of {', '.join(sorted(EVENT_KINDS))}"
        )
    try:
        text = json.dumps(dump(message), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise MessageError(f"{type(message).__name__}: not encodable as JSON: {exc}") from exc
    data = text.encode("utf-8")
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(
            f"{type(message).__name__} is {len(data)} bytes: expected at most {MAX_MESSAGE_BYTES}"
        )
    return data


def decode(cls: type[M], payload: bytes) -> M:
    """Parse and validate untrusted ``payload`` as a ``cls`` message.

    Raises:
        MessageError: one line naming what was wrong and what was expected.
    """
    name = cls.__name__
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MessageError(f"{name} is {len(payload)} bytes: expected at most {MAX_MESSAGE_BYTES}")
    try:
        data = json.loads(
            payload.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
        )
    except MessageError as exc:
        raise MessageError(f"{name}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise MessageError(f"{name}: expected UTF-8, got a bad byte at {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise MessageError(f"{name}: expected JSON, got {exc.msg} at byte {exc.pos}") from None
    except RecursionError:
        raise MessageError(
            f"{name}: JSON nested too deeply, expected a shallower document"
        ) from None
    except ValueError:
        # json.loads raises a plain ValueError for an integer longer than Python converts
        # (sys.get_int_max_str_digits(), 4300 digits by default).
        raise MessageError(
            f"{name}: expected JSON integers of at most {sys.get_int_max_str_digits()} digits,"
            " got a longer one"
        ) from None
    if not isinstance(data, dict):
        raise MessageError(f"{name}: expected a JSON object, got {type(data).__name__}")
    try:
        return load(cls, data, path=name, ignore_unknown=True)
    except SchemaError as exc:
        raise MessageError(str(exc)) from None
    except RecursionError:
        raise MessageError(
            f"{name}: JSON nested too deeply, expected a shallower document"
        ) from None
