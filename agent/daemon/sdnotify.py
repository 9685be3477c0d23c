"""systemd service notifications (``sd_notify``) and the watchdog keep-alive, without libsystemd.

systemd passes ``NOTIFY_SOCKET`` to a ``Type=notify`` service: a path (``/run/systemd/notify``)
or an abstract socket name (``@...``) of an ``AF_UNIX`` datagram socket. Each notification is one
datagram of ``KEY=VALUE`` lines. Without ``NOTIFY_SOCKET`` (not under systemd) every call is a
no-op that returns False, so the daemon runs the same way from a terminal.

The watchdog (``WatchdogSec=``) kills the service when ``WATCHDOG=1`` stops arriving.
:class:`WatchdogKeepAlive` pings from its own thread at half the interval, but only while the
main loop keeps calling :meth:`WatchdogKeepAlive.beat`: a hung main loop stops the pings, and
systemd restarts the service. A thread that pinged unconditionally would hide exactly that hang.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

__all__ = ["SystemdNotifier", "WatchdogKeepAlive", "watchdog_interval"]

log = logging.getLogger(__name__)

_MAX_STATUS_CHARS = 1024


class SystemdNotifier:
    """Sends ``sd_notify`` datagrams to ``NOTIFY_SOCKET``; thread-safe, never raises on send."""

    def __init__(self, *, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens for notifications."""
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; keys are upper-cased.

        Returns:
            True if the datagram was sent, False when disabled or the send failed (logged).

        Raises:
            ValueError: a value holds a newline, which would smuggle in another ``KEY=``.
        """
        lines = []
        for key, value in fields.items():
            text = str(value)
            if "\n" in text:
                raise ValueError(f"sd_notify {key.upper()}: expected one line, got a newline")
            lines.append(f"{key.upper()}={text}")
        return self._send("\n".join(lines).encode())

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: startup finished (systemd then reports the unit as started)."""
        return self.notify(ready=1, **_status(status))

    def status(self, status: str) -> bool:
        """``STATUS=...``: one line shown by ``systemctl status``."""
        return self.notify(**_status(status))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the keep-alive ping."""
        return self.notify(watchdog=1)

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC``; send :meth:`ready` when the reload is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(reloading=1, monotonic_usec=usec, **_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        return self.notify(stopping=1, **_status(status))

    def _send(self, datagram: bytes) -> bool:
        if self._address is None:
            return False
        with self._lock:
            try:
                if self._sock is None:
                    # Non-blocking: a manager that stops reading must not stall the main loop
                    # (a full queue drops this notification; the next one tries again).
                    self._sock = socket.socket(
                        socket.AF_UNIX,
                        socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
                    )
                self._sock.sendto(datagram, self._address)
            except OSError as exc:
                log.warning("sd_notify to %r failed: %s", self._address, exc)
                return False
        return True

    def close(self) -> None:
        """Close the socket (a later notification opens a new one)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _status(status: str | None) -> dict[str, str]:
    if status is None:
        return {}
    return {"status": status.replace("\n", " ")[:_MAX_STATUS_CHARS]}


def _socket_address(value: str) -> str | bytes | None:
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value:
        log.warning(
            "NOTIFY_SOCKET %r is not a path or abstract name; notifications disabled", value
        )
    return None


def watchdog_interval(
    environ: Mapping[str, str] | None = None, *, pid: int | None = None
) -> float | None:
    """The watchdog timeout in seconds from ``WATCHDOG_USEC``, or None when none applies to us.

    None when unset, not a positive integer, or when ``WATCHDOG_PID`` names another process.
    """
    env = os.environ if environ is None else environ
    usec_text = env.get("WATCHDOG_USEC", "")
    try:
        usec = int(usec_text)
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text:
        try:
            if int(pid_text) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 1_000_000


class WatchdogKeepAlive:
    """Pings the watchdog from a thread while the main loop shows it is alive.

    The main loop calls :meth:`beat` every iteration (or :meth:`unhealthy` to withhold pings on
    purpose). Every ``timeout_s / 2`` the thread sends ``WATCHDOG=1`` if the last beat is younger
    than ``stale_after_s`` (default: ``timeout_s``) and no :meth:`unhealthy` came after it. A hang
    is thus detected at most ``stale_after_s + 1.5 * timeout_s`` after the last beat.
    """

    def __init__(
        self,
        notifier: SystemdNotifier,
        *,
        timeout_s: float,
        stale_after_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"watchdog timeout: expected > 0 seconds, got {timeout_s}")
        self._notifier = notifier
        self.period_s = timeout_s / 2
        self._stale_after_s = timeout_s if stale_after_s is None else stale_after_s
        self._stale_reported = False
        self._clock = clock
        self._last_beat: float | None = None
        self._healthy = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0
        self.withheld = 0

    def beat(self) -> None:
        """The main loop made progress."""
        with self._lock:
            self._last_beat = self._clock()
            self._healthy = True
            self._stale_reported = False

    def unhealthy(self, reason: str) -> None:
        """Stop pinging until the next :meth:`beat`; ``reason`` goes to ``STATUS=``."""
        with self._lock:
            was_healthy = self._healthy
            self._healthy = False
        if was_healthy:
            log.warning("watchdog pings withheld: %s", reason)
            self._notifier.status(f"unhealthy: {reason}")

    def tick(self) -> bool:
        """One keep-alive decision: ping if the main loop is fresh. Returns whether it pinged."""
        now = self._clock()
        with self._lock:
            beat, healthy = self._last_beat, self._healthy
            stale = beat is not None and now - beat > self._stale_after_s
            report = healthy and stale and not self._stale_reported
            if report:
                self._stale_reported = True
        if not healthy or beat is None or stale:
            self.withheld += 1
            if report and beat is not None:
                log.warning("watchdog pings withheld: main loop silent for %.1f s", now - beat)
            return False
        if self._notifier.watchdog():
            self.pings += 1
            return True
        return False

    def start(self) -> None:
        """Start the ping thread (a daemon thread; :meth:`stop` ends it)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the ping thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.tick()
