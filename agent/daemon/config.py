"""The agent's configuration file (``/etc/edge-agent/agent.toml``) as validated, frozen data.

Every section is a frozen dataclass loaded with :mod:`agent.schema`: unknown keys are errors,
every field carries a one-line description, and a bad file fails with one line naming the key,
the value and what was expected. Loading is bounded (:data:`MAX_CONFIG_BYTES`).

Credentials (the device identity keys ``x25519.key`` and ``ed25519.key``, the MQTT client key
and certificate, the fleet CA) live in one credentials directory. Under systemd,
``LoadCredential=`` puts them in ``$CREDENTIALS_DIRECTORY``; without it they are read from
``<state_dir>/identity``, the layout of a ``fleetctl device add`` bundle. See
:meth:`AgentConfig.credentials_dir` for the lookup order.

SIGHUP reloads only the ``[source]``, ``[results]`` and ``[telemetry]`` sections (what the agent
reads and what it sends); :func:`reload_settings` computes the effective config and lists the
changed sections that need a restart instead.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from agent.protocol.errors import TopicError
from agent.protocol.topics import validate_device_id
from agent.schema import SchemaError, field_meta, load

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found]

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "MAX_CONFIG_BYTES",
    "RELOADABLE_SECTIONS",
    "AgentConfig",
    "ConfigError",
    "DeviceConfig",
    "MqttConfig",
    "OutboxConfig",
    "ReloadPlan",
    "ResultsConfig",
    "RuntimeConfig",
    "SourceConfig",
    "TelemetryConfig",
    "UpdateConfig",
    "config_from_toml",
    "load_config",
    "reload_settings",
]

DEFAULT_CONFIG_PATH = "/etc/edge-agent/agent.toml"
MAX_CONFIG_BYTES = 64 * 1024
RELOADABLE_SECTIONS = frozenset({"source", "results", "telemetry"})

_PREFIX = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")
_MQTT_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


class ConfigError(SchemaError):
    """The agent config is unreadable or invalid: names the key, the value, what was expected."""


@dataclass(frozen=True)
class DeviceConfig:
    """``[device]``: who this device is and where it keeps its state and keys."""

    id: str = field(
        metadata=field_meta(
            "device id: MQTT topic level and broker username ([a-z0-9][a-z0-9_-]{0,62})",
            max_len=63,
        )
    )
    state_dir: str = field(
        default="/var/lib/edge-agent",
        metadata=field_meta("absolute path of the private state directory (models, outbox)"),
    )
    credentials_dir: str | None = field(
        default=None,
        metadata=field_meta(
            "absolute directory of the device keys (x25519.key, ed25519.key) and relative MQTT "
            "TLS files; unset: $CREDENTIALS_DIRECTORY, else <state_dir>/identity"
        ),
    )

    def __post_init__(self) -> None:
        try:
            validate_device_id(self.id)
        except TopicError:
            raise ConfigError(
                f"device.id: expected 1-63 of [a-z0-9_-] starting with a letter or digit, "
                f"got {self.id!r}"
            ) from None
        _require_absolute("device.state_dir", self.state_dir)
        if self.credentials_dir is not None:
            _require_absolute("device.credentials_dir", self.credentials_dir)


@dataclass(frozen=True)
class MqttConfig:
    """``[mqtt]``: the broker connection."""

    url: str = field(
        metadata=field_meta("broker URL: mqtts://host:8883 (TLS) or mqtt://host:1883", max_len=512)
    )
    prefix: str = field(
        default="edge/v1", metadata=field_meta("topic prefix shared with the controller")
    )
    ca: str | None = field(
        default=None,
        metadata=field_meta(
            "CA bundle (PEM) that signs the broker certificate; relative to the credentials "
            "directory; unset: system trust store"
        ),
    )
    cert: str | None = field(
        default=None,
        metadata=field_meta("client certificate (PEM), relative to the credentials directory"),
    )
    key: str | None = field(
        default=None,
        metadata=field_meta("client private key (PEM), relative to the credentials directory"),
    )
    password_file: str | None = field(
        default=None,
        metadata=field_meta(
            "file holding the MQTT password (username = device id), relative to the "
            "credentials directory; unset: no password (certificate login)"
        ),
    )
    keepalive_s: int = field(
        default=60, metadata=field_meta("MQTT keepalive in seconds", min=5, max=3600)
    )
    protocol: Literal["auto", "5", "3.1.1"] = field(
        default="auto",
        metadata=field_meta("MQTT protocol version; auto tries 5 then falls back to 3.1.1"),
    )
    reconnect_min_s: float = field(
        default=1.0, metadata=field_meta("first reconnect delay in seconds", min=0.1, max=600)
    )
    reconnect_max_s: float = field(
        default=120.0,
        metadata=field_meta("cap of the jittered exponential reconnect delay", min=1, max=3600),
    )

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in _MQTT_DEFAULT_PORTS or not parts.hostname:
            raise ConfigError(
                f"mqtt.url: expected mqtts://host[:port] or mqtt://..., got {self.url!r}"
            )
        try:
            parts.port  # noqa: B018 - raises ValueError for a port outside 0-65535
        except ValueError:
            raise ConfigError(f"mqtt.url: expected a port in 1-65535, got {self.url!r}") from None
        if parts.path not in ("", "/") or parts.query or parts.username or parts.password:
            raise ConfigError(
                f"mqtt.url: expected only scheme, host and port (credentials are files), "
                f"got {self.url!r}"
            )
        if not _PREFIX.fullmatch(self.prefix):
            raise ConfigError(
                f"mqtt.prefix: expected topic levels of [A-Za-z0-9_.-] joined by '/', "
                f"got {self.prefix!r}"
            )
        if (self.cert is None) != (self.key is None):
            raise ConfigError("mqtt.cert/mqtt.key: expected both or neither, got only one")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ConfigError(
                f"mqtt.reconnect_min_s: expected <= reconnect_max_s ({self.reconnect_max_s}), "
                f"got {self.reconnect_min_s}"
            )

    @property
    def tls(self) -> bool:
        """True for ``mqtts://``."""
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        """The broker host name or address."""
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        """The broker port (8883 for mqtts, 1883 for mqtt when not given)."""
        parts = urlsplit(self.url)
        return parts.port or _MQTT_DEFAULT_PORTS[parts.scheme]


@dataclass(frozen=True)
class SourceConfig:
    """``[source]``: what the model looks at (reloadable with SIGHUP)."""

    spec: str = field(
        metadata=field_meta(
            "input: camera index ('0'), device ('/dev/video0'), stream URL, video file, "
            "or sensor spec",
            min_len=1,
            max_len=1024,
        )
    )
    loop: bool = field(default=False, metadata=field_meta("restart a video file at its end"))
    realtime: bool = field(
        default=True,
        metadata=field_meta("keep only the newest frame and drop stale ones (count the drops)"),
    )


@dataclass(frozen=True)
class RuntimeConfig:
    """``[runtime]``: inference backend options."""

    threads: int = field(
        default=0,
        metadata=field_meta("inference threads; 0 = the runtime's default", min=0, max=64),
    )
    onnx_providers: tuple[str, ...] = field(
        default=("CPUExecutionProvider",),
        metadata=field_meta("onnxruntime execution providers in order of preference", max_len=8),
    )
    tflite_runtime: Literal["auto", "ai_edge_litert", "tflite_runtime"] = field(
        default="auto",
        metadata=field_meta("TFLite interpreter package; auto prefers ai_edge_litert"),
    )


@dataclass(frozen=True)
class TelemetryConfig:
    """``[telemetry]``: metric reports (reloadable with SIGHUP)."""

    interval_s: float = field(
        default=30.0, metadata=field_meta("seconds between telemetry reports", min=1, max=3600)
    )


@dataclass(frozen=True)
class ResultsConfig:
    """``[results]``: which inference results are published (reloadable with SIGHUP)."""

    policy: Literal["every", "on_change", "interval", "above_score"] = field(
        default="on_change",
        metadata=field_meta(
            "every frame, on a change of the top result, at most every interval_s, "
            "or when the score is >= min_score"
        ),
    )
    interval_s: float = field(
        default=1.0,
        metadata=field_meta("minimum seconds between results (policy 'interval')", min=0, max=3600),
    )
    min_score: float = field(
        default=0.5,
        metadata=field_meta("score threshold (policy 'above_score')", min=0.0, max=1.0),
    )
    qos: Literal[0, 1] = field(default=0, metadata=field_meta("MQTT QoS of result messages"))


@dataclass(frozen=True)
class OutboxConfig:
    """``[outbox]``: bounds of the offline store-and-forward queue (oldest dropped first)."""

    max_bytes: int = field(
        default=16 * 1024 * 1024,
        metadata=field_meta("maximum payload bytes kept", min=64 * 1024, max=1024**3),
    )
    max_messages: int = field(
        default=100_000, metadata=field_meta("maximum messages kept", min=10, max=10_000_000)
    )


@dataclass(frozen=True)
class UpdateConfig:
    """``[update]``: health watch after a model update; a breach rolls back."""

    watch_s: float = field(
        default=300.0,
        metadata=field_meta("seconds a new model is watched before commit", min=0, max=86400),
    )
    max_latency_ms: float | None = field(
        default=None,
        metadata=field_meta(
            "p95 inference latency ceiling during the watch; unset: no absolute ceiling",
            min=0.1,
            max=600_000,
        ),
    )
    max_error_rate: float = field(
        default=0.05,
        metadata=field_meta("fraction of failed inferences that rolls back", min=0.0, max=1.0),
    )
    poll_interval_s: float = field(
        default=600.0,
        metadata=field_meta(
            "seconds between director checks (a Notify from the controller checks at once)",
            min=1,
            max=86400,
        ),
    )
    repository_dir: str | None = field(
        default=None,
        metadata=field_meta(
            "absolute path of a repository directory (image/, director/) read instead of the "
            "controller over MQTT: air-gapped devices and tests; unset: over MQTT"
        ),
    )

    def __post_init__(self) -> None:
        if self.repository_dir is not None:
            _require_absolute("update.repository_dir", self.repository_dir)


@dataclass(frozen=True)
class AgentConfig:
    """The whole agent config file."""

    device: DeviceConfig = field(metadata=field_meta("this device"))
    mqtt: MqttConfig = field(metadata=field_meta("broker connection"))
    source: SourceConfig = field(metadata=field_meta("camera, video or sensor input"))
    runtime: RuntimeConfig = field(
        default_factory=RuntimeConfig, metadata=field_meta("inference backend options")
    )
    telemetry: TelemetryConfig = field(
        default_factory=TelemetryConfig, metadata=field_meta("telemetry reports")
    )
    results: ResultsConfig = field(
        default_factory=ResultsConfig, metadata=field_meta("result publishing policy")
    )
    outbox: OutboxConfig = field(
        default_factory=OutboxConfig, metadata=field_meta("offline queue bounds")
    )
    update: UpdateConfig = field(
        default_factory=UpdateConfig, metadata=field_meta("post-update health watch")
    )

    def credentials_dir(self, environ: Mapping[str, str] | None = None) -> Path:
        """Where key files are looked up.

        Order: ``device.credentials_dir`` when set, else ``$CREDENTIALS_DIRECTORY`` (systemd
        ``LoadCredential=``), else ``<state_dir>/identity``. The device identity
        (``agent.supplychain.identity.DeviceIdentity.load``) is read from this directory.
        """
        if self.device.credentials_dir is not None:
            return Path(self.device.credentials_dir)
        env = os.environ if environ is None else environ
        systemd_dir = env.get("CREDENTIALS_DIRECTORY")
        if systemd_dir:
            return Path(systemd_dir)
        return Path(self.device.state_dir) / "identity"

    def credential_path(self, name: str, environ: Mapping[str, str] | None = None) -> Path:
        """Absolute path of a key file: ``name`` itself if absolute, else in the credentials dir."""
        path = Path(name)
        return path if path.is_absolute() else self.credentials_dir(environ) / path


@dataclass(frozen=True)
class ReloadPlan:
    """What a SIGHUP reload does: the config to run with, and what it could not apply."""

    config: AgentConfig
    applied: frozenset[str]
    needs_restart: frozenset[str]


def _require_absolute(key: str, value: str) -> None:
    if not value.startswith("/"):
        raise ConfigError(f"{key}: expected an absolute path, got {value!r}")


def config_from_toml(text: str, *, origin: str = "config") -> AgentConfig:
    """Parse and validate config TOML text; ``origin`` prefixes error messages.

    Raises:
        ConfigError: one line naming the key, the value and what was expected.
    """
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{origin}: expected at most {MAX_CONFIG_BYTES} bytes of TOML")
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: expected valid TOML, got a parse error ({exc})") from exc
    try:
        return load(AgentConfig, data)
    except SchemaError as exc:
        raise ConfigError(f"{origin}: {exc}") from exc


def load_config(path: str | os.PathLike[str] = DEFAULT_CONFIG_PATH) -> AgentConfig:
    """Read and validate the config file at ``path`` (bounded to :data:`MAX_CONFIG_BYTES`).

    Raises:
        ConfigError: the file is missing, unreadable, too large, not UTF-8 TOML, or invalid.
    """
    try:
        with open(path, "rb") as stream:
            raw = stream.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: expected a readable config file ({exc.strerror})") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: expected at most {MAX_CONFIG_BYTES} bytes, the file is larger")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: expected UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc
    return config_from_toml(text, origin=os.fspath(path))


def reload_settings(old: AgentConfig, new: AgentConfig) -> ReloadPlan:
    """Merge a re-read config into the running one, as SIGHUP does.

    Changed sections in :data:`RELOADABLE_SECTIONS` are taken from ``new``; every other section
    keeps its ``old`` value and, if it changed, is listed in ``needs_restart``.
    """
    changed = {
        f.name
        for f in dataclasses.fields(AgentConfig)
        if getattr(old, f.name) != getattr(new, f.name)
    }
    applied = changed & RELOADABLE_SECTIONS
    merged = dataclasses.replace(old, **{name: getattr(new, name) for name in applied})
    return ReloadPlan(
        config=merged, applied=frozenset(applied), needs_restart=frozenset(changed - applied)
    )
