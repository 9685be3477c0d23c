"""Process and board health for telemetry: CPU %, RSS, temperature, Raspberry Pi throttling.

Everything is read from ``/proc`` and ``/sys`` (plus ``vcgencmd`` as a fallback on a Pi), and
every path is a constructor argument so tests can point at a fake tree. A reading that is not
available on this board (no thermal zone, not a Pi) is None, never an error: telemetry goes on.

Pi throttling bits (``vcgencmd get_throttled``; the firmware driver exposes the same word at
``/sys/devices/platform/soc/soc:firmware/get_throttled``):

    bit 0  under-voltage now            bit 16  under-voltage has occurred
    bit 1  ARM frequency capped now     bit 17  frequency capping has occurred
    bit 2  throttled now                bit 18  throttling has occurred
    bit 3  soft temperature limit now   bit 19  soft temperature limit has occurred

The sysfs file is preferred: ``vcgencmd`` needs ``/dev/vchiq`` (or ``/dev/vcio``), which the
hardened unit does not allow.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ProcessCpuMeter",
    "SystemProbe",
    "SystemSnapshot",
    "ThrottleFlags",
    "decode_throttled",
    "read_rss_bytes",
    "read_temperatures",
    "read_throttled",
]

log = logging.getLogger(__name__)

THROTTLED_SYSFS = (
    "/sys/devices/platform/soc/soc:firmware/get_throttled",
    "/sys/devices/platform/soc*/*firmware/get_throttled",  # Raspberry Pi 5 naming
)
_VCGENCMD_TIMEOUT_S = 2.0
_FLAG_BITS = {
    "under_voltage": 0,
    "freq_capped": 1,
    "throttled": 2,
    "soft_temp_limit": 3,
    "under_voltage_occurred": 16,
    "freq_capped_occurred": 17,
    "throttled_occurred": 18,
    "soft_temp_limit_occurred": 19,
}


@dataclass(frozen=True)
class ThrottleFlags:
    """The Raspberry Pi firmware's throttling word, decoded."""

    raw: int
    under_voltage: bool
    freq_capped: bool
    throttled: bool
    soft_temp_limit: bool
    under_voltage_occurred: bool
    freq_capped_occurred: bool
    throttled_occurred: bool
    soft_temp_limit_occurred: bool

    def active(self) -> list[str]:
        """Names of the flags that are set, in bit order."""
        return [name for name in _FLAG_BITS if getattr(self, name)]


def decode_throttled(value: int) -> ThrottleFlags:
    """Decode the ``get_throttled`` word into named flags."""
    return ThrottleFlags(
        raw=value, **{name: bool(value >> bit & 1) for name, bit in _FLAG_BITS.items()}
    )


def _parse_throttled(text: str) -> int | None:
    """``throttled=0x50005`` (vcgencmd) or ``50005`` (sysfs, hexadecimal without prefix)."""
    value = text.strip().removeprefix("throttled=")
    try:
        return int(value, 16)
    except ValueError:
        return None


def read_throttled(
    sysfs_paths: tuple[str, ...] = THROTTLED_SYSFS, vcgencmd: str | None = "vcgencmd"
) -> ThrottleFlags | None:
    """The Pi's throttling flags, or None on a board that does not report them.

    Args:
        sysfs_paths: files (glob patterns allowed) tried first, in order.
        vcgencmd: the command tried next if found on ``PATH`` (None: never run it).
    """
    for pattern in sysfs_paths:
        for path in sorted(glob.glob(pattern)):
            try:
                text = Path(path).read_text()
            except OSError:
                continue
            value = _parse_throttled(text)
            if value is not None:
                return decode_throttled(value)
    command = shutil.which(vcgencmd) if vcgencmd else None
    if command is None:
        return None
    try:
        done = subprocess.run(
            [command, "get_throttled"],
            capture_output=True,
            text=True,
            timeout=_VCGENCMD_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("vcgencmd get_throttled failed: %s", exc)
        return None
    value = _parse_throttled(done.stdout) if done.returncode == 0 else None
    return None if value is None else decode_throttled(value)


def read_temperatures(
    thermal_root: str | os.PathLike[str] = "/sys/class/thermal",
) -> dict[str, float]:
    """Readable thermal zones as ``{"<zone>:<type>": degrees Celsius}``; unreadable ones skipped."""
    temps: dict[str, float] = {}
    for zone in sorted(Path(thermal_root).glob("thermal_zone*")):
        try:
            millidegrees = int((zone / "temp").read_text().strip())
        except (OSError, ValueError):  # some zones fail reads with EINVAL/ENODATA when idle
            continue
        try:
            kind = (zone / "type").read_text().strip()
        except OSError:
            kind = "unknown"
        temps[f"{zone.name}:{kind}"] = millidegrees / 1000.0
    return temps


def read_rss_bytes(status_path: str | os.PathLike[str] = "/proc/self/status") -> int | None:
    """Resident set size from ``VmRSS`` (kB) in ``/proc/<pid>/status``."""
    try:
        with open(status_path) as stream:
            for line in stream:
                if line.startswith("VmRSS:"):
                    parts = line.split()
                    return int(parts[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_cpu_ticks(stat_path: str | os.PathLike[str]) -> int | None:
    """utime + stime (fields 14 and 15) of ``/proc/<pid>/stat``."""
    try:
        text = Path(stat_path).read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return int(fields[11]) + int(fields[12])  # fields 14, 15 counting from 1 overall
    except (IndexError, ValueError):
        return None


class ProcessCpuMeter:
    """CPU use of a process since the previous sample, in percent of one core (may exceed 100)."""

    def __init__(
        self,
        stat_path: str | os.PathLike[str] = "/proc/self/stat",
        *,
        clock: Callable[[], float] = time.monotonic,
        ticks_per_second: int | None = None,
    ) -> None:
        self._stat_path = stat_path
        self._clock = clock
        self._hz = ticks_per_second or os.sysconf("SC_CLK_TCK")
        self._last: tuple[float, int] | None = None
        ticks = _read_cpu_ticks(stat_path)
        if ticks is not None:
            self._last = (clock(), ticks)

    def sample(self) -> float | None:
        """Percent since the last call (or construction); None if unreadable or no time passed."""
        ticks = _read_cpu_ticks(self._stat_path)
        now = self._clock()
        if ticks is None:
            return None
        last, self._last = self._last, (now, ticks)
        if last is None or now <= last[0] or ticks < last[1]:
            return None
        return 100.0 * (ticks - last[1]) / self._hz / (now - last[0])


@dataclass(frozen=True)
class SystemSnapshot:
    """One reading of process and board health."""

    cpu_percent: float | None
    rss_bytes: int | None
    temperature_c: float | None
    temperatures_c: dict[str, float]
    throttle: ThrottleFlags | None


class SystemProbe:
    """Reads a :class:`SystemSnapshot`; every source path can be redirected (tests, containers)."""

    def __init__(
        self,
        *,
        proc_self: str | os.PathLike[str] = "/proc/self",
        thermal_root: str | os.PathLike[str] = "/sys/class/thermal",
        throttled_paths: tuple[str, ...] = THROTTLED_SYSFS,
        vcgencmd: str | None = "vcgencmd",
        clock: Callable[[], float] = time.monotonic,
        ticks_per_second: int | None = None,
    ) -> None:
        self._status_path = Path(proc_self) / "status"
        self._thermal_root = thermal_root
        self._throttled_paths = throttled_paths
        self._vcgencmd = vcgencmd
        self._cpu = ProcessCpuMeter(
            Path(proc_self) / "stat", clock=clock, ticks_per_second=ticks_per_second
        )

    def snapshot(self) -> SystemSnapshot:
        """Read everything now; CPU % covers the time since the previous snapshot."""
        temps = read_temperatures(self._thermal_root)
        return SystemSnapshot(
            cpu_percent=self._cpu.sample(),
            rss_bytes=read_rss_bytes(self._status_path),
            temperature_c=max(temps.values()) if temps else None,
            temperatures_c=temps,
            throttle=read_throttled(self._throttled_paths, self._vcgencmd),
        )
