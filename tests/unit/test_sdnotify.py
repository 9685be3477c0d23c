"""sd_notify over a real AF_UNIX datagram socket (path and abstract), and the watchdog keep-alive."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.daemon.sdnotify import SystemdNotifier, WatchdogKeepAlive, watchdog_interval


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    yield sock, {"NOTIFY_SOCKET": str(tmp_path / "notify")}
    sock.close()


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def test_ready_and_status(listener: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = listener
    notifier = SystemdNotifier(environ=env)
    assert notifier.enabled
    assert notifier.ready(status="model v3 running")
    assert sock.recv(4096) == b"READY=1\nSTATUS=model v3 running"
    assert notifier.status("line one\nREADY=1")  # a newline cannot inject a second field
    assert _fields(sock.recv(4096)) == {"STATUS": "line one READY=1"}
    notifier.close()


def test_watchdog_stopping(listener: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = listener
    notifier = SystemdNotifier(environ=env)
    notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    notifier.stopping("SIGTERM")
    assert _fields(sock.recv(4096)) == {"STOPPING": "1", "STATUS": "SIGTERM"}
    notifier.close()


def test_reloading_carries_monotonic_usec(listener: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = listener
    notifier = SystemdNotifier(environ=env)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = _fields(sock.recv(4096))
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after
    notifier.close()


def test_abstract_socket() -> None:
    name = f"edge-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
        notifier.close()


def test_disabled_without_notify_socket() -> None:
    notifier = SystemdNotifier(environ={})
    assert not notifier.enabled
    assert not notifier.ready()


def test_unsupported_address_disables(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert "notifications disabled" in caplog.text


def test_send_failure_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.WARNING):
        assert not notifier.watchdog()
    assert "sd_notify" in caplog.text and "failed" in caplog.text


def test_newline_in_other_fields_is_refused(listener: tuple[socket.socket, dict[str, str]]) -> None:
    notifier = SystemdNotifier(environ=listener[1])
    with pytest.raises(ValueError, match="expected one line"):
        notifier.notify(errno="1\nREADY=1")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, pid=4242) == expected


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_keepalive_pings_only_while_main_loop_beats(
    listener: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, env = listener
    clock = FakeClock()
    keepalive = WatchdogKeepAlive(SystemdNotifier(environ=env), timeout_s=30, clock=clock)
    assert keepalive.period_s == 15
    assert not keepalive.tick()  # no beat yet: the main loop has not started
    keepalive.beat()
    clock.now += 14
    assert keepalive.tick()
    assert sock.recv(4096) == b"WATCHDOG=1"
    clock.now += 17  # 31 s since the last beat: the main loop is hung
    assert not keepalive.tick()
    keepalive.beat()
    assert keepalive.tick()
    assert sock.recv(4096) == b"WATCHDOG=1"
    keepalive.unhealthy("camera gone")
    assert _fields(sock.recv(4096)) == {"STATUS": "unhealthy: camera gone"}
    assert not keepalive.tick()
    assert (keepalive.pings, keepalive.withheld) == (2, 3)
    sock.settimeout(0)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)  # nothing else was sent


def test_keepalive_thread_pings_at_half_the_interval(
    listener: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, env = listener
    keepalive = WatchdogKeepAlive(
        SystemdNotifier(environ=env),
        timeout_s=0.1,
        clock=lambda: 5.0,  # never stale
    )
    keepalive.beat()
    keepalive.start()
    try:
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        keepalive.stop()
    assert keepalive.pings >= 2


def test_keepalive_rejects_bad_timeout() -> None:
    with pytest.raises(ValueError, match="expected > 0 seconds"):
        WatchdogKeepAlive(SystemdNotifier(environ={}), timeout_s=0)


def test_a_manager_that_stops_reading_never_blocks_the_sender(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    try:
        notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": str(path)})
        results = [notifier.status("x" * 1024) for _ in range(5000)]  # never read: the queue fills
        assert results[0] is True
        assert results[-1] is False  # dropped, not blocked
        notifier.close()
    finally:
        receiver.close()
