"""The agent config: strict loading, one-line errors, credential lookup, SIGHUP reload rules."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from agent.daemon.config import (
    MAX_CONFIG_BYTES,
    AgentConfig,
    ConfigError,
    config_from_toml,
    load_config,
    reload_settings,
)

MINIMAL = """
[device]
id = "cam-01"
[mqtt]
url = "mqtts://broker.example.net"
[source]
spec = "/dev/video0"
"""


def test_minimal_config_fills_defaults() -> None:
    config = config_from_toml(MINIMAL)
    assert config.device.id == "cam-01"
    assert config.device.state_dir == "/var/lib/edge-agent"
    assert config.mqtt.tls and config.mqtt.port == 8883 and config.mqtt.host == "broker.example.net"
    assert config.mqtt.prefix == "edge/v1"
    assert config.results.policy == "on_change"
    assert config.outbox.max_bytes == 16 * 1024 * 1024
    assert config.runtime.onnx_providers == ("CPUExecutionProvider",)
    assert config.update.max_latency_ms is None


def test_plain_mqtt_default_port() -> None:
    config = config_from_toml(MINIMAL.replace("mqtts://broker.example.net", "mqtt://10.0.0.2"))
    assert not config.mqtt.tls and config.mqtt.port == 1883


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (MINIMAL + "bogus = 1\n", "source: unknown key 'bogus'"),
        (MINIMAL + "[results]\nqos = 2\n", "results.qos: expected one of 0, 1, got 2"),
        (MINIMAL + "[results]\npolicy = 'sometimes'\n", "results.policy: expected one of"),
        (
            MINIMAL + "[telemetry]\ninterval_s = 0.5\n",
            "telemetry.interval_s: expected a value >= 1",
        ),
        (MINIMAL + "[outbox]\nmax_messages = 'many'\n", "outbox.max_messages: expected an integer"),
        (MINIMAL + "[runtime]\nthreads = true\n", "runtime.threads: expected an integer, got True"),
        (MINIMAL.replace('"cam-01"', '"cam/01"'), "device.id: expected 1-63 of"),
        (MINIMAL.replace('"cam-01"', '"+"'), "device.id: expected"),
        (MINIMAL.replace("mqtts://broker.example.net", "https://x"), "mqtt.url: expected mqtts://"),
        (
            MINIMAL.replace("mqtts://broker.example.net", "mqtts://h:99999"),
            "mqtt.url: expected a port",
        ),
        (MINIMAL.replace("mqtts://broker.example.net", "mqtts://u:p@h"), "credentials are files"),
        (MINIMAL.replace("[mqtt]", "[mqtt]\ncert = 'c.pem'"), "mqtt.cert/mqtt.key: expected both"),
        (
            MINIMAL.replace("[mqtt]", "[mqtt]\nprefix = 'edge/#'"),
            "mqtt.prefix: expected topic levels",
        ),
        (
            MINIMAL.replace("[mqtt]", "[mqtt]\nreconnect_min_s = 30.0\nreconnect_max_s = 10.0"),
            "mqtt.reconnect_min_s: expected <= reconnect_max_s",
        ),
        (
            MINIMAL.replace("[device]", "[device]\nstate_dir = 'var/lib'"),
            "device.state_dir: expected an absolute",
        ),
        (MINIMAL.replace('spec = "/dev/video0"', 'spec = ""'), "source.spec: expected at least 1"),
        (MINIMAL.replace("[source]\nspec", "[source]\nspecs"), "source: unknown key 'specs'"),
        ("[device]\nid = 'x'\n", "mqtt: required key is missing"),
        ("[device\n", "expected valid TOML"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(toml: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_toml(toml, origin="agent.toml")
    message = str(info.value)
    assert expected in message
    assert message.startswith("agent.toml: ")
    assert "\n" not in message


def test_every_field_has_a_description() -> None:
    sections = typing.get_type_hints(AgentConfig)
    for section in dataclasses.fields(AgentConfig):
        assert section.metadata.get("doc"), f"[{section.name}] has no description"
        for f in dataclasses.fields(sections[section.name]):
            assert f.metadata.get("doc"), f"{section.name}.{f.name} has no description"


def test_load_config_reads_file_and_names_it_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(MINIMAL)
    assert load_config(path).source.spec == "/dev/video0"
    path.write_text(MINIMAL + "[results]\nmin_score = 1.5\n")
    with pytest.raises(ConfigError, match=rf"^{path}: results.min_score: expected a value <= 1.0"):
        load_config(path)


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a readable config file"):
        load_config(tmp_path / "absent.toml")


def test_load_config_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(MINIMAL + "#" * MAX_CONFIG_BYTES)
    with pytest.raises(ConfigError, match=f"at most {MAX_CONFIG_BYTES} bytes"):
        load_config(path)


def test_load_config_rejects_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(MINIMAL.encode() + b"# \xff\xfe\n")
    with pytest.raises(ConfigError, match="expected UTF-8 text"):
        load_config(path)


def test_credentials_lookup_order(tmp_path: Path) -> None:
    config = config_from_toml(MINIMAL)
    assert config.credentials_dir({}) == Path("/var/lib/edge-agent/identity")
    systemd = {"CREDENTIALS_DIRECTORY": "/run/credentials/edge-agent.service"}
    assert config.credential_path("x25519.key", systemd) == Path(
        "/run/credentials/edge-agent.service/x25519.key"
    )
    assert config.credential_path("/etc/ssl/ca.pem", systemd) == Path("/etc/ssl/ca.pem")
    explicit = config_from_toml(MINIMAL.replace("[device]", "[device]\ncredentials_dir = '/k'"))
    assert explicit.credential_path("x25519.key", systemd) == Path("/k/x25519.key")


def test_reload_applies_only_source_and_output_sections() -> None:
    old = config_from_toml(MINIMAL)
    new = config_from_toml(
        MINIMAL.replace("/dev/video0", "/dev/video2").replace("mqtts://broker", "mqtts://other")
        + "[results]\npolicy = 'every'\n[outbox]\nmax_messages = 50\n"
    )
    plan = reload_settings(old, new)
    assert plan.applied == {"source", "results"}
    assert plan.needs_restart == {"mqtt", "outbox"}
    assert plan.config.source.spec == "/dev/video2"
    assert plan.config.results.policy == "every"
    assert plan.config.mqtt == old.mqtt  # not applied until a restart
    assert plan.config.outbox == old.outbox


def test_reload_with_no_change() -> None:
    config = config_from_toml(MINIMAL)
    plan = reload_settings(config, config_from_toml(MINIMAL))
    assert plan.applied == frozenset() and plan.needs_restart == frozenset()
    assert plan.config == config


def test_config_is_frozen() -> None:
    config = config_from_toml(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.device.id = "other"  # type: ignore[misc]
