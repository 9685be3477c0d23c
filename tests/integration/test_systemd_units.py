"""The systemd units: hardening score, offline verification, the settings the daemon relies on,
and that the inference runtimes work under MemoryDenyWriteExecute=.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.supplychain.identity import ED25519_KEY_FILE, X25519_KEY_FILE

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
MODELS = ROOT / "tools" / "models"
MAX_EXPOSURE = 2.0
ANALYZE = shutil.which("systemd-analyze")


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None, "systemd-analyze not found: install the 'systemd' package"
    return subprocess.run(
        [ANALYZE, *args], capture_output=True, text=True, timeout=120, check=False
    )


def _exposure(unit: Path) -> float:
    done = _analyze("security", "--offline=yes", "--no-pager", str(unit))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, f"no score in systemd-analyze output: {done.stdout[-500:]} {done.stderr}"
    return float(match.group(1))


def _settings(unit: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> values, in order (keys such as DeviceAllow= repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


@pytest.mark.parametrize("name", ["edge-agent.service", "fleetctl.service"])
def test_exposure_is_at_most_two(name: str) -> None:
    assert _exposure(UNITS / name) <= MAX_EXPOSURE


def test_a_plain_unit_scores_badly(tmp_path: Path) -> None:
    """The score check above can fail: an unhardened unit is far above the bar."""
    plain = tmp_path / "plain.service"
    plain.write_text("[Service]\nExecStart=/usr/bin/edge-agent daemon\n")
    assert _exposure(plain) > 9.0


@pytest.mark.parametrize(
    ("name", "program"), [("edge-agent.service", "edge-agent"), ("fleetctl.service", "fleetctl")]
)
def test_units_verify_cleanly(name: str, program: str, tmp_path: Path) -> None:
    # verify checks that ExecStart= exists: point it at the installed console script.
    executable = Path(sys.executable).with_name(program)
    assert executable.exists(), f"{executable}: the project is not installed in this venv"
    unit = tmp_path / name
    unit.write_text((UNITS / name).read_text().replace(f"/usr/bin/{program}", str(executable)))
    done = _analyze("verify", "--man=no", str(unit))
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", f"systemd-analyze verify warnings: {done.stderr}"


def test_edge_agent_unit_settings() -> None:
    unit = _settings(UNITS / "edge-agent.service")
    expected_single = {
        "Service.Type": "notify",
        "Service.ExecStart": "/usr/bin/edge-agent daemon --config /etc/edge-agent/agent.toml",
        "Service.ExecReload": "/bin/kill -HUP $MAINPID",
        "Service.WatchdogSec": "30",
        "Service.Restart": "on-failure",
        "Service.StateDirectory": "edge-agent",
        "Service.StateDirectoryMode": "0700",
        "Service.UMask": "0077",
        "Service.DynamicUser": "yes",
        "Service.SupplementaryGroups": "video dialout",
        "Service.DevicePolicy": "closed",
        "Service.MemoryDenyWriteExecute": "yes",
        "Service.RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }
    for key, value in expected_single.items():
        assert unit.get(key) == [value], key
    assert unit["Service.DeviceAllow"] == [
        "char-video4linux rw",
        "char-ttyUSB rw",
        "char-ttyACM rw",
    ]
    credentials = [value.split(":", 1)[0] for value in unit["Service.LoadCredential"]]
    assert credentials == [X25519_KEY_FILE, ED25519_KEY_FILE]  # what DeviceIdentity.load reads
    assert "Service.PrivateDevices" not in unit  # it would hide the cameras
    assert "Service.ProcSubset" not in unit  # it would hide /proc/cpuinfo from the runtimes


_MDWE_SCRIPT = r"""
import ctypes, mmap, sys
from pathlib import Path
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(f"prctl(PR_SET_MDWE) failed, errno {ctypes.get_errno()}: kernel older than 6.3?")
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("a W+X mapping was allowed: the restriction is not in force")
except OSError:
    pass
import numpy as np
from agent.runtime import UnsupportedModelError, load_model
for path in sys.argv[1:]:
    try:
        model = load_model(Path(path).read_bytes())
    except UnsupportedModelError as exc:  # e.g. an op newer than tflite-runtime 2.14 knows
        print(Path(path).name, "unsupported", exc)
        continue
    with model:
        inputs = [
            np.zeros([d if d > 0 else 1 for d in spec.shape], dtype=spec.dtype)
            for spec in model.inputs
        ]
        outputs = model.run(inputs)
        print(Path(path).name, model.runtime_name, [o.shape for o in outputs])
"""


@pytest.mark.inference
def test_runtimes_work_without_writable_executable_memory() -> None:
    """What MemoryDenyWriteExecute=yes enforces, applied with prctl(PR_SET_MDWE) (Linux 6.3+)."""
    models = sorted([*MODELS.glob("*.onnx"), *MODELS.glob("*.tflite")])
    assert any(p.suffix == ".onnx" for p in models) and any(p.suffix == ".tflite" for p in models)
    done = subprocess.run(
        [sys.executable, "-c", _MDWE_SCRIPT, *map(str, models)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ran = [line.split() for line in done.stdout.splitlines() if " unsupported " not in line]
    assert {name.rsplit(".", 1)[1] for name, *_ in ran} == {"onnx", "tflite"}, done.stdout
