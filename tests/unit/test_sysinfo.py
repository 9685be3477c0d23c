"""Process and board health readings against fake /proc and /sys trees (and the real /proc)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agent.daemon.sysinfo import (
    ProcessCpuMeter,
    SystemProbe,
    decode_throttled,
    read_rss_bytes,
    read_temperatures,
    read_throttled,
)

STAT_TEMPLATE = "4242 (python3 (edge) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 {utime} {stime} 0 0 20 0 3 0 100 5000000 2000 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _write_stat(path: Path, utime: int, stime: int) -> None:
    path.write_text(STAT_TEMPLATE.format(utime=utime, stime=stime))


def _zone(root: Path, index: int, kind: str, temp: str | None) -> None:
    zone = root / f"thermal_zone{index}"
    zone.mkdir(parents=True)
    (zone / "type").write_text(kind + "\n")
    if temp is None:
        (zone / "temp").mkdir()  # reading it fails, like a zone that returns EINVAL
    else:
        (zone / "temp").write_text(temp + "\n")


@pytest.mark.parametrize(
    ("word", "active"),
    [
        (0x0, []),
        (0x50005, ["under_voltage", "throttled", "under_voltage_occurred", "throttled_occurred"]),
        (0x20002, ["freq_capped", "freq_capped_occurred"]),
        (0x80000, ["soft_temp_limit_occurred"]),
        (0x8, ["soft_temp_limit"]),
        (0xE0000, ["freq_capped_occurred", "throttled_occurred", "soft_temp_limit_occurred"]),
    ],
)
def test_decode_throttled(word: int, active: list[str]) -> None:
    flags = decode_throttled(word)
    assert flags.raw == word
    assert flags.active() == active


def test_throttled_from_sysfs(tmp_path: Path) -> None:
    (tmp_path / "get_throttled").write_text("50005\n")
    flags = read_throttled((str(tmp_path / "get_throttled"),), vcgencmd=None)
    assert flags is not None and flags.under_voltage and flags.throttled_occurred
    assert not flags.soft_temp_limit


def test_throttled_sysfs_glob_pattern(tmp_path: Path) -> None:
    firmware = tmp_path / "soc@107c000000" / "soc@107c000000:firmware"
    firmware.mkdir(parents=True)
    (firmware / "get_throttled").write_text("0\n")
    flags = read_throttled((str(tmp_path / "soc*" / "*firmware" / "get_throttled"),), vcgencmd=None)
    assert flags is not None and flags.active() == []


def test_throttled_falls_back_to_vcgencmd(tmp_path: Path) -> None:
    tool = tmp_path / "vcgencmd"
    tool.write_text('#!/bin/sh\n[ "$1" = get_throttled ] && echo throttled=0x20002\n')
    tool.chmod(0o755)
    flags = read_throttled((str(tmp_path / "absent"),), vcgencmd=str(tool))
    assert flags is not None and flags.active() == ["freq_capped", "freq_capped_occurred"]


def test_throttled_unavailable_is_none(tmp_path: Path) -> None:
    failing = tmp_path / "vcgencmd"
    failing.write_text("#!/bin/sh\necho 'VCHI initialization failed' >&2\nexit 255\n")
    failing.chmod(0o755)
    garbage = tmp_path / "get_throttled"
    garbage.write_text("not hex\n")
    assert read_throttled((str(garbage),), vcgencmd=str(failing)) is None
    assert read_throttled((str(tmp_path / "absent"),), vcgencmd=None) is None
    assert read_throttled((), vcgencmd=str(tmp_path / "no-such-tool")) is None


def test_temperatures_skip_unreadable_zones(tmp_path: Path) -> None:
    _zone(tmp_path, 0, "cpu-thermal", "48312")
    _zone(tmp_path, 1, "gpu-thermal", None)
    _zone(tmp_path, 2, "junk", "n/a")
    _zone(tmp_path, 3, "soc-thermal", "51000")
    assert read_temperatures(tmp_path) == {
        "thermal_zone0:cpu-thermal": 48.312,
        "thermal_zone3:soc-thermal": 51.0,
    }
    assert read_temperatures(tmp_path / "absent") == {}


def test_rss_from_status(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tpython3\nVmPeak:\t  90000 kB\nVmRSS:\t   51234 kB\nThreads:\t3\n")
    assert read_rss_bytes(status) == 51234 * 1024
    status.write_text("Name:\tkthread\n")
    assert read_rss_bytes(status) is None
    assert read_rss_bytes(tmp_path / "absent") is None


def test_real_rss_is_plausible() -> None:
    rss = read_rss_bytes()
    assert rss is not None and 1 << 20 < rss < 1 << 36


def test_cpu_percent_from_tick_deltas(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    clock = FakeClock()
    _write_stat(stat, 100, 50)
    meter = ProcessCpuMeter(stat, clock=clock, ticks_per_second=100)
    clock.now += 2.0
    _write_stat(stat, 200, 100)  # 150 ticks = 1.5 CPU-seconds in 2 s
    assert meter.sample() == pytest.approx(75.0)
    clock.now += 1.0
    _write_stat(stat, 400, 200)  # 300 ticks in 1 s: three cores busy
    assert meter.sample() == pytest.approx(300.0)
    assert meter.sample() is None  # no time passed


def test_cpu_unreadable_stat(tmp_path: Path) -> None:
    meter = ProcessCpuMeter(tmp_path / "absent", ticks_per_second=100)
    assert meter.sample() is None


def test_real_cpu_meter_sees_work() -> None:
    meter = ProcessCpuMeter()
    hz = os.sysconf("SC_CLK_TCK")
    start = time.process_time()
    deadline = time.monotonic() + 20
    while time.process_time() - start < 5 / hz and time.monotonic() < deadline:
        sum(i * i for i in range(10_000))
    percent = meter.sample()
    assert percent is not None and percent > 0


def test_probe_snapshot_from_fake_tree(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    _write_stat(proc / "stat", 10, 10)
    (proc / "status").write_text("VmRSS:\t 2048 kB\n")
    thermal = tmp_path / "thermal"
    _zone(thermal, 0, "cpu-thermal", "61500")
    _zone(thermal, 1, "pmic", "44000")
    (tmp_path / "get_throttled").write_text("80008\n")
    clock = FakeClock()
    probe = SystemProbe(
        proc_self=proc,
        thermal_root=thermal,
        throttled_paths=(str(tmp_path / "get_throttled"),),
        vcgencmd=None,
        clock=clock,
        ticks_per_second=100,
    )
    clock.now += 1.0
    _write_stat(proc / "stat", 30, 10)
    snap = probe.snapshot()
    assert snap.cpu_percent == pytest.approx(20.0)
    assert snap.rss_bytes == 2048 * 1024
    assert snap.temperature_c == 61.5
    assert snap.throttle is not None and snap.throttle.soft_temp_limit
    assert snap.throttle.active() == ["soft_temp_limit", "soft_temp_limit_occurred"]


def test_probe_on_a_board_without_sensors(tmp_path: Path) -> None:
    probe = SystemProbe(
        proc_self=tmp_path, thermal_root=tmp_path, throttled_paths=(), vcgencmd=None
    )
    snap = probe.snapshot()
    assert (snap.cpu_percent, snap.rss_bytes, snap.temperature_c, snap.throttle) == (
        None,
        None,
        None,
        None,
    )
