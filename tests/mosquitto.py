"""A real mosquitto broker for tests: free loopback port, generated config, start/stop/restart.

Usage::

    from tests.mosquitto import Mosquitto

    @pytest.fixture
    def broker(tmp_path: Path) -> Iterator[Mosquitto]:
        with Mosquitto(tmp_path) as mosquitto:
            yield mosquitto

``extra_config`` lines go into ``mosquitto.conf`` under the listener (TLS, ACLs...). To run a
config written elsewhere (e.g. by ``fleetctl broker config``), pass ``config_file`` and the
``port`` its listener uses: the file is copied with logging lines appended. Readiness is
detected from mosquitto's own log line, then confirmed with one TCP connect; nothing sleeps.
The binary is ``$MOSQUITTO`` or ``/usr/sbin/mosquitto`` (CI: ``apt-get install mosquitto``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

__all__ = ["Mosquitto", "MosquittoError", "free_port", "mosquitto_binary"]


class MosquittoError(RuntimeError):
    """The test broker could not be started or stopped."""


def mosquitto_binary() -> str:
    """Path of the mosquitto executable."""
    candidate = os.environ.get("MOSQUITTO") or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(candidate).exists():
        raise MosquittoError(
            f"mosquitto not found at {candidate}: install it (apt install mosquitto)"
        )
    return candidate


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """One mosquitto process on 127.0.0.1 with a generated config; restartable on the same port."""

    def __init__(
        self,
        workdir: Path,
        *,
        extra_config: Iterable[str] = (),
        allow_anonymous: bool = True,
        start_timeout: float = 10.0,
        config_file: Path | None = None,
        port: int | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if config_file is not None and port is None:
            raise MosquittoError("config_file given without the port its listener uses")
        self.port = free_port() if port is None else port
        self.host = "127.0.0.1"
        self.start_timeout = start_timeout
        extra_config = list(extra_config)
        self.log_path = self.workdir / "mosquitto.log"
        self.config_path = self.workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if allow_anonymous else 'false'}",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            # As root, mosquitto drops to user "mosquitto", who cannot read pytest's 0700 tmp dirs.
            *(["user root"] if os.geteuid() == 0 else []),
            *extra_config,
        ]
        if config_file is not None:
            own = lines[: len(lines) - len(extra_config)]
            logging_lines = [line for line in own if line.startswith(("log_", "conn", "user"))]
            lines = [Path(config_file).read_text(), *logging_lines, *extra_config]
        self.config_path.write_text("\n".join(lines) + "\n")
        self._process: subprocess.Popen[bytes] | None = None
        self._log_lines: list[str] = []

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def log(self) -> str:
        """Everything the broker logged so far."""
        return "".join(self._log_lines)

    def start(self) -> None:
        """Start the broker and wait until it accepts connections."""
        if self._process is not None:
            raise MosquittoError("mosquitto is already running")
        ready = threading.Event()
        process = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._process = process

        def pump() -> None:
            assert process.stderr is not None
            with self.log_path.open("a") as log:
                for raw in process.stderr:
                    line = raw.decode(errors="replace")
                    self._log_lines.append(line)
                    log.write(line)
                    log.flush()
                    if line.rstrip().endswith(" running"):  # logged once listeners are open
                        ready.set()
            ready.set()  # exited: stop waiting, the check below reports it

        threading.Thread(target=pump, name="mosquitto-log", daemon=True).start()
        if not ready.wait(self.start_timeout) or process.poll() is not None:
            self.stop()
            raise MosquittoError(f"mosquitto did not start on port {self.port}:\n{self.log}")
        with socket.create_connection((self.host, self.port), timeout=self.start_timeout):
            pass

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after 5 s)."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def restart(self) -> None:
        """Stop and start again on the same port (clients see the connection drop)."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._process is not None and self._process.poll() is None
