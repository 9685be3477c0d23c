"""``fleetctl model add --allow-failing-selftest``: a deliberately broken version can be staged.

Without the flag a card whose self-test fails is refused with one line; with it the model is
packed, signed and registered, with a loud warning and the failure in the summary (devices still
refuse it: tests/integration/test_daemon.py installs such a version and sees ``failed``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.modelcard import card_from_json, card_to_json
from tools.fleetctl.home import FleetHome
from tools.fleetctl.packing import PackError, pack_model
from tools.videos import MODELS_DIR

pytestmark = pytest.mark.inference

ONNX = MODELS_DIR / "digits_int8.onnx"


def fleetctl(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLEETCTL_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "tools.fleetctl.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.fixture
def broken_card(tmp_path: Path) -> Path:
    """The digits card with a self-test vector expecting the wrong class."""
    card = card_from_json((MODELS_DIR / "digits_int8.onnx.card.json").read_text())
    wrong = dataclasses.replace(card.selftest[0], expected=(), expected_argmax=6)
    path = tmp_path / "broken.card.json"
    path.write_text(card_to_json(dataclasses.replace(card, selftest=(wrong,))))
    return path


def test_cli_refuses_a_failing_selftest_unless_allowed(tmp_path: Path, broken_card: Path) -> None:
    home = tmp_path / "home"
    assert fleetctl(home, "init").returncode == 0
    add = ["model", "add", str(ONNX), "--name", "digits", "--version", "3", "--card"]

    refused = fleetctl(home, *add, str(broken_card))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith("fleetctl: error: self-test vector") and "failed" in error
    listed = fleetctl(home, "model", "list", "--json")
    assert listed.returncode == 0 and "digits" not in listed.stdout

    packed = fleetctl(home, *add, str(broken_card), "--allow-failing-selftest")
    assert packed.returncode == 0, packed.stderr
    assert "WARNING: self-test vector" in packed.stderr
    assert "devices will refuse digits@3" in packed.stderr
    assert "self-test  FAILED, packed anyway" in packed.stdout
    listed = fleetctl(home, "model", "list", "--json")
    assert listed.returncode == 0
    assert ["digits", "3"] in [[m["name"], m["version"]] for m in json.loads(listed.stdout)]


def test_pack_model_signs_the_failing_card_as_given(tmp_path: Path, broken_card: Path) -> None:
    home = FleetHome(tmp_path / "home")
    home.create(image_thresholds={})
    with pytest.raises(PackError, match="self-test vector"):
        pack_model(home, ONNX, name="digits", version="3", card_path=broken_card)
    warnings: list[str] = []
    result = pack_model(
        home,
        ONNX,
        name="digits",
        version="3",
        card_path=broken_card,
        warn=warnings.append,
        allow_failing_selftest=True,
    )
    assert result.selftest.startswith("FAILED")
    assert len(warnings) == 1 and warnings[0].startswith("WARNING: self-test vector")
    signed = home.image().get_target(result.record.target_path)
    assert signed is not None
    card = json.loads(signed.unrecognized_fields["custom"]["card"])
    assert card["selftest"][0]["expected_argmax"] == 6
