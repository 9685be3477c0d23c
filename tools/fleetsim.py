"""A simulated fleet on one machine: a controller home, a broker, ``fleetctl serve`` and N agents.

Every part is the real thing run as a subprocess: ``fleetctl init``/``model add``/``device add``
build the home, ``fleetctl serve`` is the controller (with its embedded broker, or connected to
a mosquitto running the config ``fleetctl broker config`` wrote), and each device is an
``edge-agent daemon`` with its own state directory (its provisioning bundle) watching its own
generated digits video. Used by ``tests/sim``, ``tools.demo`` and ``tools.bench.fleet``::

    with Fleet(FleetSpec(devices=3), workdir) as fleet:
        fleet.start()
        rollout = fleet.deploy("digits@1", "--all")
        fleet.wait_rollout(rollout, {"succeeded"})

Waiting polls the controller's SQLite registry (WAL; read-only connections) with timeouts; the
only way the controller announces progress is by writing rows there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, TypeVar

__all__ = [
    "MODELS",
    "Fleet",
    "FleetSimError",
    "FleetSpec",
    "MosquittoProcess",
    "free_port",
    "pack_standard_models",
    "run_fleetctl",
    "write_heavy_digits_model",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
ROLLOUT_FINAL_STATES = frozenset({"succeeded", "aborted"})


class FleetSimError(RuntimeError):
    """A fleet process failed to start, a command failed, or a wait timed out."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _script(name: str) -> list[str]:
    """The console script of this environment, else the module through this interpreter."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return [str(candidate)]
    module = {"fleetctl": "tools.fleetctl.cli", "edge-agent": "agent.cli"}[name]
    return [sys.executable, "-m", module]


def run_fleetctl(home: Path, *args: str, timeout: float = 120.0) -> str:
    """Run one ``fleetctl --home HOME ...`` command; returns stdout.

    Raises:
        FleetSimError: non-zero exit (the message carries the command's stderr).
    """
    command = [*_script("fleetctl"), "--home", str(home), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise FleetSimError(
            f"fleetctl {' '.join(args)}: exit {done.returncode}, expected 0: {done.stderr.strip()}"
        )
    return done.stdout


class _LoggedProcess:
    """A subprocess whose stderr is copied to a log file; ``ready`` is set on a marker line."""

    def __init__(self, command: list[str], log_path: Path, ready_marker: str | None) -> None:
        self.log_path = log_path
        self.ready = threading.Event()
        self.exited = threading.Event()
        self._marker = ready_marker
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True
        )
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        stream: IO[str] | None = self.process.stderr
        assert stream is not None
        with self.log_path.open("a") as log:
            for line in stream:
                log.write(line)
                log.flush()
                if self._marker is not None and self._marker in line:
                    self.ready.set()
        self.exited.set()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.05):
            if self.exited.is_set() or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise FleetSimError(f"{what} did not become ready in {timeout:g} s:\n{tail}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.alive:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=timeout)
        self._pump_thread.join(timeout=5)
        return code


class MosquittoProcess:
    """mosquitto running a given config file (``fleetctl broker config``); restartable."""

    def __init__(self, config_file: Path, workdir: Path) -> None:
        binary = os.environ.get("MOSQUITTO") or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise FleetSimError(
                f"mosquitto not found at {binary}: install it (apt install mosquitto)"
            )
        self.binary = binary
        self.config_path = workdir / "mosquitto.run.conf"
        extra = ["log_dest stderr", "log_type all"]
        if os.geteuid() == 0:  # mosquitto drops to user "mosquitto", who cannot read 0700 dirs
            extra.append("user root")
        self.config_path.write_text(config_file.read_text() + "\n" + "\n".join(extra) + "\n")
        self.log_path = workdir / "mosquitto.log"
        self._process: _LoggedProcess | None = None

    def start(self) -> None:
        """Start and wait for mosquitto's "running" line."""
        process = _LoggedProcess(
            [self.binary, "-c", str(self.config_path)], self.log_path, " running"
        )
        self._process = process
        process.wait_ready(15, "mosquitto")

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 20 s)."""
        process, self._process = self._process, None
        if process is not None:
            process.stop()

    def restart(self) -> None:
        """Stop and start on the same port (clients see their connections drop)."""
        self.stop()
        self.start()


BrokerKind = Literal["embedded", "mosquitto"]


@dataclass(frozen=True)
class FleetSpec:
    """What to build: devices, broker, and the knobs that make a fleet fast to observe."""

    devices: int = 3
    broker: BrokerKind = "embedded"
    telemetry_interval_s: float = 1.0
    watch_s: float = 2.0
    fps: float = 10.0
    frames: int = 60
    tags: dict[str, tuple[str, ...]] = field(default_factory=dict)  # device id -> tags
    metrics: bool = True
    device_log_level: str = "INFO"

    def device_ids(self) -> list[str]:
        """``dev-01`` ... ``dev-NN``."""
        return [f"dev-{n:02d}" for n in range(1, self.devices + 1)]


class Fleet:
    """One simulated fleet in ``workdir``: build with :meth:`create`, run with :meth:`start`."""

    def __init__(self, spec: FleetSpec, workdir: Path) -> None:
        self.spec = spec
        self.workdir = Path(workdir)
        self.home = self.workdir / "home"
        self.logs = self.workdir / "logs"
        self.port = free_port()
        self.metrics_port = free_port() if spec.metrics else 0
        self.broker: MosquittoProcess | None = None
        self.controller: _LoggedProcess | None = None
        self.agents: dict[str, _LoggedProcess] = {}
        self.models: dict[str, str] = {}  # NAME@VERSION -> what it is
        self._created = False

    # -- building ------------------------------------------------------------------------------

    def device_dir(self, device_id: str) -> Path:
        """The device's bundle, used as its state directory."""
        return self.workdir / "devices" / device_id

    def create(self, *, progress: Callable[[str], None] = logger.info) -> None:
        """Init the home, the broker config (mosquitto), models, devices, videos and configs."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        run_fleetctl(self.home, "init")
        if self.spec.broker == "mosquitto":
            broker_dir = self.workdir / "broker"
            run_fleetctl(
                self.home,
                "broker",
                "config",
                "--out",
                str(broker_dir),
                "--port",
                str(self.port),
                "--host",
                "127.0.0.1",
            )
            self.broker = MosquittoProcess(broker_dir / "mosquitto.conf", broker_dir)
        progress("packing models (encrypt, sign, self-test)")
        self.models = pack_standard_models(self.home, self.workdir / "models")
        progress(f"enrolling {self.spec.devices} devices and generating their videos")
        from tools.videos import load_digits, write_digits_video  # noqa: PLC0415 - cv2

        images, _labels = load_digits()
        for index, device_id in enumerate(self.spec.device_ids()):
            bundle = self.device_dir(device_id)
            tags = [arg for tag in self.spec.tags.get(device_id, ()) for arg in ("--tag", tag)]
            run_fleetctl(self.home, "device", "add", device_id, "--out", str(bundle), *tags)
            start = (index * 17) % max(1, len(images) - self.spec.frames)
            video = write_digits_video(
                bundle / "digits.avi", images[start : start + self.spec.frames], fps=self.spec.fps
            )
            (bundle / "agent.toml").write_text(self._agent_toml(device_id, bundle, video))
        self._created = True

    def _agent_toml(self, device_id: str, bundle: Path, video: Path) -> str:
        if self.spec.broker == "mosquitto":
            mqtt = (
                f'url = "mqtts://127.0.0.1:{self.port}"\n'
                'ca = "ca.crt"\ncert = "client.crt"\nkey = "client.key"\n'
            )
        else:  # the embedded broker: the bundle's password, username = device id
            mqtt = f'url = "mqtt://127.0.0.1:{self.port}"\npassword_file = "broker-password"\n'
        return (
            f'[device]\nid = "{device_id}"\nstate_dir = "{bundle}"\n\n'
            f"[mqtt]\n{mqtt}keepalive_s = 5\nreconnect_min_s = 0.2\nreconnect_max_s = 2.0\n\n"
            f'[source]\nspec = "{video}"\nloop = true\nrealtime = true\n\n'
            f"[telemetry]\ninterval_s = {self.spec.telemetry_interval_s}\n\n"
            f'[results]\npolicy = "interval"\ninterval_s = 1.0\n\n'
            f"[update]\nwatch_s = {self.spec.watch_s}\npoll_interval_s = 600\n"
        )

    # -- processes -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the broker (mosquitto), the controller and every device."""
        if not self._created:
            self.create()
        if self.broker is not None:
            self.broker.start()
        self.start_controller()
        for device_id in self.spec.device_ids():
            self.start_device(device_id)

    def start_controller(self) -> None:
        """Start ``fleetctl serve`` and wait for its "serving" log line."""
        command = [
            *_script("fleetctl"),
            "--home",
            str(self.home),
            "serve",
            "--metrics-port",
            str(self.metrics_port),
        ]
        if self.spec.broker == "mosquitto":
            command += ["--broker", f"mqtts://127.0.0.1:{self.port}"]
        else:
            command += ["--listen", f"127.0.0.1:{self.port}"]
        self.controller = _LoggedProcess(command, self.logs / "controller.log", " serving ")
        self.controller.wait_ready(60, "fleetctl serve")

    def stop_controller(self) -> None:
        """SIGTERM the controller and wait for it."""
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def start_device(self, device_id: str) -> None:
        """Start the device's ``edge-agent daemon`` and wait until it runs."""
        config = self.device_dir(device_id) / "agent.toml"
        command = [
            *_script("edge-agent"),
            "daemon",
            "--config",
            str(config),
            "--log-level",
            self.spec.device_log_level,
        ]
        agent = _LoggedProcess(command, self.logs / f"{device_id}.log", " running as ")
        self.agents[device_id] = agent
        agent.wait_ready(60, f"edge-agent daemon {device_id}")

    def kill_device(self, device_id: str) -> None:
        """SIGKILL the device (no clean shutdown: power cut)."""
        self.agents.pop(device_id).stop(signal.SIGKILL)

    def stop_device(self, device_id: str) -> int:
        """SIGTERM the device; returns its exit status."""
        return self.agents.pop(device_id).stop()

    def restart_device(self, device_id: str) -> None:
        """SIGTERM, then start again."""
        self.stop_device(device_id)
        self.start_device(device_id)

    def device_log(self, device_id: str) -> str:
        """Everything the device logged so far (all its boots)."""
        return (self.logs / f"{device_id}.log").read_text(errors="replace")

    def close(self) -> None:
        """Stop every process this fleet started (devices, controller, broker)."""
        for device_id in list(self.agents):
            self.agents.pop(device_id).stop(timeout=10)
        self.stop_controller()
        if self.broker is not None:
            self.broker.stop()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- operating -----------------------------------------------------------------------------

    def controller_login(self) -> tuple[str, str]:
        """Username and password of the controller on the embedded broker (once it started)."""
        from tools.fleetctl.broker_acl import controller_password  # noqa: PLC0415
        from tools.fleetctl.pki import CONTROLLER_USER  # noqa: PLC0415

        return CONTROLLER_USER, controller_password(self.home)

    def fleetctl(self, *args: str) -> str:
        """Run a fleetctl command on this fleet's home."""
        return run_fleetctl(self.home, *args)

    def deploy(self, model: str, *args: str) -> int:
        """``fleetctl deploy MODEL ARGS...``; returns the rollout id."""
        data = json.loads(self.fleetctl("deploy", model, *args, "--json"))
        return int(data["id"])

    def rollout(self, rollout_id: int) -> dict[str, Any]:
        """``fleetctl rollout show ID --json``."""
        data: dict[str, Any] = json.loads(
            self.fleetctl("rollout", "show", str(rollout_id), "--json")
        )
        return data

    def devices(self) -> dict[str, dict[str, Any]]:
        """``fleetctl devices --json`` by device id."""
        return {row["id"]: row for row in json.loads(self.fleetctl("devices", "--json"))}

    def query(self, sql: str, params: Iterable[object] = ()) -> list[tuple[Any, ...]]:
        """Rows from the controller's registry (read-only; empty while a table does not exist)."""
        uri = f"file:{self.home / 'registry.sqlite'}?mode=ro"
        try:
            db = sqlite3.connect(uri, uri=True, timeout=10)
        except sqlite3.OperationalError:
            return []
        try:
            return db.execute(sql, tuple(params)).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        finally:
            db.close()

    def events(self, device_id: str) -> list[tuple[str, str | None, str | None]]:
        """The device's (kind, version, reason) events in arrival order."""
        return [
            (str(kind), version, reason)
            for kind, version, reason in self.query(
                "SELECT kind, version, reason FROM events WHERE device_id = ? ORDER BY id",
                (device_id,),
            )
        ]

    def wait_for(self, probe: Callable[[], _T | None], what: str, timeout: float = 60.0) -> _T:
        """Poll ``probe`` until it returns a truthy value; returns it.

        Raises:
            FleetSimError: the timeout passed, or a fleet process died meanwhile.
        """
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while True:
            value = probe()
            if value:
                return value
            if self.controller is not None and not self.controller.alive:
                raise FleetSimError(f"waiting for {what}: fleetctl serve exited")
            if time.monotonic() > deadline:
                raise FleetSimError(f"waiting for {what}: not reached within {timeout:g} s")
            pause.wait(0.1)

    def wait_rollout(
        self, rollout_id: int, states: Iterable[str] = ROLLOUT_FINAL_STATES, timeout: float = 120.0
    ) -> dict[str, Any]:
        """Wait until the rollout is in one of ``states``; returns ``rollout show`` of it."""
        wanted = frozenset(states)

        def probe() -> dict[str, Any] | None:
            rows = self.query("SELECT state FROM rollouts WHERE id = ?", (rollout_id,))
            return self.rollout(rollout_id) if rows and rows[0][0] in wanted else None

        return self.wait_for(probe, f"rollout {rollout_id} in {sorted(wanted)}", timeout)

    def wait_models(
        self, expected: dict[str, str], timeout: float = 120.0
    ) -> dict[str, dict[str, Any]]:
        """Wait until each device reports the expected ``NAME@VERSION`` (state + telemetry)."""

        def probe() -> dict[str, dict[str, Any]] | None:
            rows = self.devices()
            ok = all(rows.get(d, {}).get("model") == m for d, m in expected.items())
            return rows if ok else None

        return self.wait_for(probe, f"models {expected}", timeout)


# -- models --------------------------------------------------------------------------------------

MODELS = {
    "digits@1": "int8 TFLite digits classifier",
    "digits@2": "int8 ONNX digits classifier (same card semantics)",
    "digits@3": "broken: its card's self-test expects the wrong class (fails on the device)",
    "digits@4": "fp32 ONNX digits classifier plus ~12 M extra multiply-adds (slower, same output)",
}


def write_heavy_digits_model(out: Path, *, width: int = 1024, layers: int = 12) -> Path:
    """``digits_fp32.onnx`` with extra compute whose result is multiplied by 0 into the logits.

    The outputs are those of the fp32 model (its card and self-test hold), the invoke time is
    that of ``layers`` dense ``width x width`` layers more: an honest slower version.
    """
    import numpy as np  # noqa: PLC0415
    import onnx  # noqa: PLC0415 - only this model needs it
    from onnx import helper, numpy_helper  # noqa: PLC0415

    from tools.videos import MODELS_DIR  # noqa: PLC0415

    model = onnx.load(str(MODELS_DIR / "digits_fp32.onnx"))
    graph = model.graph
    logits = graph.output[0].name
    inner = logits + "_inner"
    for node in graph.node:
        node.output[:] = [inner if name == logits else name for name in node.output]
    rng = np.random.default_rng(7)
    scale = 1.0 / np.sqrt(width)
    weights = [(rng.standard_normal((64, width)) * 0.125).astype(np.float32)]
    weights += [
        (rng.standard_normal((width, width)) * scale).astype(np.float32) for _ in range(layers)
    ]
    graph.initializer.extend(
        [numpy_helper.from_array(w, f"heavy_w{i}") for i, w in enumerate(weights)]
        + [
            numpy_helper.from_array(np.array([1, 64], np.int64), "heavy_shape"),
            numpy_helper.from_array(np.zeros((1,), np.float32), "heavy_zero"),
        ]
    )
    nodes = [helper.make_node("Reshape", [graph.input[0].name, "heavy_shape"], ["heavy_h0"])]
    for i in range(len(weights)):
        nodes.append(helper.make_node("MatMul", [f"heavy_h{i}", f"heavy_w{i}"], [f"heavy_m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"heavy_m{i}"], [f"heavy_h{i + 1}"]))
    last = f"heavy_h{len(weights)}"
    nodes += [
        helper.make_node("ReduceSum", [last], ["heavy_sum"], keepdims=1),
        helper.make_node("Mul", ["heavy_sum", "heavy_zero"], ["heavy_nothing"]),
        helper.make_node("Add", [inner, "heavy_nothing"], [logits]),
    ]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    shutil.copyfile(
        MODELS_DIR / "digits_fp32.onnx.card.json", out.with_name(out.name + ".card.json")
    )
    return out


def _pack_broken(home: Path, scratch: Path) -> None:
    """digits@3: the fp32 ONNX model with a card whose self-test vectors expect the wrong class.

    ``fleetctl model add`` refuses a model whose self-test fails unless told to pack it anyway
    (``--allow-failing-selftest``); devices still refuse it, which is what the fleet tests check.
    """
    from tools.videos import MODELS_DIR  # noqa: PLC0415

    card = json.loads((MODELS_DIR / "digits_fp32.onnx.card.json").read_text())
    for vector in card["selftest"]:
        if vector.get("expected_argmax") is not None:
            vector["expected_argmax"] = (vector["expected_argmax"] + 1) % 10
        if vector.get("expected"):
            vector["expected"] = vector["expected"][1:] + vector["expected"][:1]
    card_path = scratch / "digits_broken.card.json"
    card_path.write_text(json.dumps(card))
    run_fleetctl(
        home,
        "model",
        "add",
        str(MODELS_DIR / "digits_fp32.onnx"),
        "--name",
        "digits",
        "--version",
        "3",
        "--card",
        str(card_path),
        "--allow-failing-selftest",
    )


def pack_standard_models(home: Path, scratch: Path) -> dict[str, str]:
    """Pack :data:`MODELS` into the home; returns them."""
    from tools.videos import MODELS_DIR  # noqa: PLC0415

    scratch.mkdir(parents=True, exist_ok=True)
    run_fleetctl(
        home,
        "model",
        "add",
        str(MODELS_DIR / "digits_int8.tflite"),
        "--name",
        "digits",
        "--version",
        "1",
    )
    run_fleetctl(
        home,
        "model",
        "add",
        str(MODELS_DIR / "digits_int8.onnx"),
        "--name",
        "digits",
        "--version",
        "2",
    )
    _pack_broken(home, scratch)
    heavy = write_heavy_digits_model(scratch / "digits_heavy.onnx")
    run_fleetctl(home, "model", "add", str(heavy), "--name", "digits", "--version", "4")
    return dict(MODELS)


def main(argv: list[str] | None = None) -> int:
    """``python -m tools.fleetsim``: build and run a fleet until Ctrl-C."""
    import argparse  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m tools.fleetsim", description=__doc__)
    parser.add_argument("--devices", type=int, default=3, help="number of agents (default 3)")
    parser.add_argument("--broker", choices=("embedded", "mosquitto"), default="embedded")
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fleetsim-"))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())
    with Fleet(FleetSpec(devices=args.devices, broker=args.broker), workdir) as fleet:
        fleet.start()
        print(f"fleet of {args.devices} running in {workdir}; models: {', '.join(fleet.models)}")
        print(f"try: fleetctl --home {fleet.home} deploy digits@1 --all; Ctrl-C stops the fleet")
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
