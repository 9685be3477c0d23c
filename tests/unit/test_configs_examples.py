"""The annotated example configs in configs/ load, and document every key of their schema."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from agent.daemon.config import AgentConfig, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
AGENT_EXAMPLES = sorted(CONFIGS.glob("agent*.toml"))


def test_there_is_an_agent_example() -> None:
    assert CONFIGS / "agent.toml" in AGENT_EXAMPLES


@pytest.mark.parametrize("path", AGENT_EXAMPLES, ids=lambda p: p.name)
def test_agent_example_loads(path: Path) -> None:
    config = load_config(path)
    assert config.device.id
    assert config.mqtt.tls, "examples should show TLS to the broker"


def _documented_keys(text: str) -> set[str]:
    """``section.key`` for every key set or commented out (``# key = ...``) in a TOML text."""
    keys: set[str] = set()
    section = ""
    for line in text.splitlines():
        header = re.match(r"\s*\[([a-z_]+)\]", line)
        if header:
            section = header.group(1)
            continue
        key = re.match(r"\s*#?\s*([a-z_]+)\s*=", line)
        if key and section:
            keys.add(f"{section}.{key.group(1)}")
    return keys


def test_agent_example_mentions_every_schema_key() -> None:
    sections = typing.get_type_hints(AgentConfig)
    expected = {
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(AgentConfig)
        for f in dataclasses.fields(sections[section.name])
    }
    documented = _documented_keys((CONFIGS / "agent.toml").read_text())
    assert expected - documented == set(), "keys missing from configs/agent.toml"
    assert documented - expected == set(), "configs/agent.toml mentions keys the schema lacks"


def test_example_defaults_match_schema_defaults() -> None:
    """Keys set in the example without a "required" note show the schema's default value."""
    example = load_config(CONFIGS / "agent.toml")
    for name in ("runtime", "telemetry", "results", "outbox", "update"):
        section = getattr(example, name)
        assert section == type(section)(), f"[{name}] in configs/agent.toml differs from defaults"
    assert example.mqtt.keepalive_s == 60 and example.mqtt.protocol == "auto"
    assert example.device.state_dir == "/var/lib/edge-agent"
    assert example.source.realtime and not example.source.loop
