"""The real ``fleetctl`` command in subprocesses: init, model add, device add, assign, errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tuf.ngclient import Updater  # type: ignore[attr-defined]

from agent.modelcard import card_from_json
from agent.supplychain.envelope import decrypt_to_memory
from agent.supplychain.fetcher import LocalDirectoryFetcher
from agent.supplychain.grants import open_grant
from agent.supplychain.identity import DeviceIdentity
from agent.supplychain.targets import DirectorTargetCustom, EncryptionInfo

pytestmark = pytest.mark.integration

MODELS = Path(__file__).resolve().parents[2] / "tools" / "models"
TFLITE = MODELS / "digits_int8.tflite"
PATH = "models/digits/1/model.tflite.enc"


def fleetctl(home: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLEETCTL_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "tools.fleetctl.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fleetctl") and " error: " in lines[0]
    assert needle in lines[0]


def director_updater(bundle: Path, fetcher: LocalDirectoryFetcher) -> Updater:
    return Updater(
        str(bundle / "tuf" / "director"),
        "repo://director/pi-01/metadata/",
        fetcher=fetcher,
        bootstrap=None,
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    ok(fleetctl(path, "init", "--root-threshold", "2", "--root-keys", "3"))
    return path


def test_init_add_enrol_assign_and_the_device_can_decrypt(home: Path, tmp_path: Path) -> None:
    keys = list((home / "keys").iterdir())
    assert len(keys) == 12  # 3 image root + 3 director root + 3 + 3 online/targets
    assert all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in keys)
    assert stat.S_IMODE((home / "registry.sqlite").stat().st_mode) == 0o600

    out = ok(fleetctl(home, "model", "add", str(TFLITE), "--name", "digits", "--version", "1"))
    assert PATH in out and "self-test  passed" in out
    bundle = tmp_path / "bundle"
    ok(fleetctl(home, "device", "add", "pi-01", "--tag", "lab", "--out", str(bundle)))
    ok(fleetctl(home, "assign", "pi-01", "digits@1"))

    models = json.loads(ok(fleetctl(home, "model", "list", "--json")))
    assert [(m["name"], m["version"], m["devices"]) for m in models] == [("digits", "1", ["pi-01"])]
    inspect = json.loads(ok(fleetctl(home, "model", "inspect", "digits@1", "--json")))
    assert inspect["card"]["sha256"] == inspect["plaintext_sha256"]
    assert inspect["plaintext_size"] == TFLITE.stat().st_size
    devices = json.loads(ok(fleetctl(home, "device", "list", "--json")))
    assert devices[0]["id"] == "pi-01" and devices[0]["assigned"] == "digits@1"

    # The bundle is a device state seed: verify with ngclient, open the grant, decrypt.
    assert stat.S_IMODE((bundle / "identity" / "x25519.key").stat().st_mode) == 0o600
    identity = DeviceIdentity.load(bundle / "identity")
    device_doc = json.loads((bundle / "device.json").read_text())
    assert device_doc["public_keys"] == identity.public_keys().to_dict()
    fetcher = LocalDirectoryFetcher(home / "repo")
    (bundle / "dl").mkdir()
    director = director_updater(bundle, fetcher)
    director.refresh()
    image = Updater(
        str(bundle / "tuf" / "image"),
        "repo://image/metadata/",
        str(bundle / "dl"),
        "repo://image/targets/",
        fetcher=fetcher,
        bootstrap=None,
    )
    image.refresh()
    director_info = director.get_targetinfo(PATH)
    image_info = image.get_targetinfo(PATH)
    assert director_info is not None and image_info is not None
    assert (director_info.length, director_info.hashes) == (image_info.length, image_info.hashes)
    grant = DirectorTargetCustom.from_dict(director_info.custom).grant
    key = open_grant(
        grant,
        identity.x25519,
        device_id="pi-01",
        target_path=PATH,
        ciphertext_sha256=image_info.hashes["sha256"],
    )
    card = card_from_json(image_info.custom["card"])
    encryption = EncryptionInfo(**image_info.custom["encryption"])
    assert card.sha256 == encryption.plaintext_sha256
    ciphertext = Path(image.download_target(image_info)).read_bytes()
    plaintext = decrypt_to_memory(
        ciphertext, key, expected_plaintext_sha256=encryption.plaintext_sha256
    )
    assert bytes(plaintext) == TFLITE.read_bytes()

    rotated = ok(fleetctl(home, "keys", "rotate", "timestamp", "--repo", "director"))
    assert "root is now version 2" in rotated
    follower = director_updater(bundle, fetcher)
    follower.refresh()  # follows the new root (an Updater refreshes once)
    assert follower.get_targetinfo(PATH) is not None
    ok(fleetctl(home, "timestamp", "refresh"))
    director_updater(bundle, fetcher).refresh()

    ok(fleetctl(home, "device", "remove", "pi-01"))
    revoked = director_updater(bundle, fetcher)
    revoked.refresh()
    assert revoked.get_targetinfo(PATH) is None
    one_line_error(fleetctl(home, "assign", "pi-01", "digits@1"), "removed")


def test_errors_are_one_line_with_status_2(home: Path, tmp_path: Path) -> None:
    one_line_error(fleetctl(home, "init"), "exists and is not empty")
    one_line_error(fleetctl(home, "assign", "pi-01", "nope@1"), "not found")
    one_line_error(fleetctl(home, "model", "inspect", "nope@1"), "not found")
    one_line_error(fleetctl(home, "model", "inspect", "nope"), "NAME@VERSION")
    one_line_error(
        fleetctl(home, "device", "add", "Bad/Id", "--out", str(tmp_path / "b")), "device id"
    )
    bad_card = tmp_path / "bad.card.json"
    bad_card.write_text('{"name": "digits", "version": "1", "format": "tflite", "colour": 1}')
    one_line_error(
        fleetctl(
            home,
            "model",
            "add",
            str(TFLITE),
            "--name",
            "d",
            "--version",
            "1",
            "--card",
            str(bad_card),
        ),
        "unknown key 'colour'",
    )
    ok(fleetctl(home, "model", "add", str(TFLITE), "--name", "d", "--version", "1"))
    one_line_error(
        fleetctl(home, "model", "add", str(TFLITE), "--name", "d", "--version", "1"),
        "exists already",
    )
    one_line_error(fleetctl(home, "model", "frobnicate"), "invalid choice")
    one_line_error(fleetctl(tmp_path / "nohome", "model", "list"), "not a fleetctl home")


def test_device_with_its_own_keys_gets_a_bundle_without_private_keys(
    home: Path, tmp_path: Path
) -> None:
    identity = DeviceIdentity.generate()
    public = tmp_path / "public-keys.json"
    public.write_text(json.dumps(identity.public_keys().to_dict()))
    ok(fleetctl(home, "device", "add", "cam-7", "--public-keys", str(public), cwd=tmp_path))
    bundle = tmp_path / "cam-7-bundle"
    # No private keys; only the embedded broker's login, which the controller has to generate.
    assert sorted(p.name for p in (bundle / "identity").iterdir()) == ["broker-password"]
    assert (bundle / "tuf" / "image" / "root.json").is_file()
    assert 'id = "cam-7"' in (bundle / "agent.toml").read_text()
    ok(fleetctl(home, "model", "add", str(TFLITE), "--name", "digits", "--version", "1"))
    ok(fleetctl(home, "assign", "cam-7", "digits@1"))


def test_quantize_fp32_onnx_reports_accuracy_before_and_after(home: Path, tmp_path: Path) -> None:
    with np.load(MODELS / "digits_test.npz") as data:
        x = (data["images"].astype(np.float32) / 255.0).reshape(-1, 8, 8, 1)[:100]
        y = data["labels"][:100]
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, x=x, y=y)
    out = ok(
        fleetctl(
            home,
            "model",
            "add",
            str(MODELS / "digits_fp32.onnx"),
            "--name",
            "digits-q",
            "--version",
            "1",
            "--quantize",
            str(calibration),
        )
    )
    assert "quantized:" in out and "accuracy on 100 calibration samples" in out
    inspect = json.loads(ok(fleetctl(home, "model", "inspect", "digits-q@1", "--json")))
    card = inspect["card"]
    assert card["quantization"] == "int8-static-qdq"
    assert card["metrics"]["accuracy"] > 0.9
    assert inspect["plaintext_size"] < (MODELS / "digits_fp32.onnx").stat().st_size
    np.savez(tmp_path / "nox.npz", y=y)
    one_line_error(
        fleetctl(
            home,
            "model",
            "add",
            str(MODELS / "digits_fp32.onnx"),
            "--name",
            "q2",
            "--version",
            "1",
            "--quantize",
            str(tmp_path / "nox.npz"),
        ),
        "expected an array 'x'",
    )
