"""Sensor sources: readings from a file, FIFO, serial port or stdin, cut into windows.

Readings are lines of newline-delimited JSON objects (``{"ax": 0.1, "ay": 0.0, "az": 9.8}``) or
CSV with a header row (``ax,ay,az``); the format is detected from the first line. The card's
:class:`~agent.modelcard.SensorPreprocess` names the channels (keys or columns, in tensor order)
and the window and hop: a sample is a float32 ``(window, channels)`` array, emitted when the first
window is full and then every ``hop`` readings.

A malformed line (bad JSON, missing or non-numeric channel, wrong column count, non-UTF-8, longer
than :data:`MAX_LINE_BYTES`) is counted in ``malformed`` and skipped, never fatal; a garbage
stream without newlines is discarded as it arrives, so it cannot grow memory. A CSV header that
lacks a channel is a configuration error for files and FIFOs (``SourceError``); live serial links
instead keep looking for a header, as they may start mid-line.

Serial ports need pyserial (the ``serial`` extra, imported on first use); on a read error they
back off and reconnect like the other live sources. A FIFO or stdin ends at end-of-file.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import json
import logging
import math
import os
import select
import stat
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

from agent.modelcard import SensorPreprocess
from agent.pipeline.sources import (
    Backoff,
    Sample,
    Source,
    SourceDependencyError,
    SourceError,
    SourceOpenError,
)

__all__ = [
    "MAX_LINE_BYTES",
    "SensorReadingParser",
    "SensorSource",
    "SensorWindower",
    "fifo_source",
    "file_source",
    "serial_source",
    "stdin_source",
]

logger = logging.getLogger(__name__)

MAX_LINE_BYTES = 64 * 1024
_CHUNK = 64 * 1024
_POLL_SECONDS = 0.2  # how often a blocked read looks at the interrupt flag
_DEFAULT_BAUD = 115200


class MalformedLineError(ValueError):
    """One input line is not a valid reading; it is counted and skipped."""


class SensorReadingParser:
    """Turns lines into channel tuples; JSON objects or CSV with a header (auto-detected)."""

    def __init__(self, channels: tuple[str, ...], *, strict_header: bool = True) -> None:
        self.channels = channels
        self.strict_header = strict_header
        self._mode: str | None = None
        self._columns: tuple[int, ...] = ()
        self._width = 0

    def reset(self) -> None:
        """Forget the detected format and header (a file starts again)."""
        self._mode = None

    def parse(self, line: bytes) -> tuple[float, ...] | None:
        """A reading, or ``None`` for a blank or header line.

        Raises:
            MalformedLineError: the line is not a valid reading.
            SourceError: a strict CSV header lacks a channel.
        """
        text = line.strip()
        if not text:
            return None
        if self._mode is None:
            if text.startswith(b"{"):
                self._mode = "json"
            else:
                self._read_header(text)
                return None
        return self._parse_json(text) if self._mode == "json" else self._parse_csv(text)

    def _read_header(self, text: bytes) -> None:
        try:
            names = [name.strip().strip('"') for name in text.decode("utf-8").split(",")]
        except UnicodeDecodeError:
            names = []
        missing = [c for c in self.channels if c not in names]
        if not missing:
            self._columns = tuple(names.index(c) for c in self.channels)
            self._width = len(names)
            self._mode = "csv"
            return
        if self.strict_header:
            raise SourceError(
                f"sensor CSV header {_clip(text)!r} has no column {missing[0]!r} "
                f"(expected columns {', '.join(self.channels)})"
            )
        raise MalformedLineError("line before the CSV header")

    def _parse_json(self, text: bytes) -> tuple[float, ...]:
        try:
            obj = json.loads(text)
        except ValueError as exc:  # includes UnicodeDecodeError
            raise MalformedLineError(f"not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise MalformedLineError("expected a JSON object")
        values = []
        for channel in self.channels:
            value = obj.get(channel)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MalformedLineError(f"channel {channel!r}: expected a number")
            values.append(_finite(float(value), channel))
        return tuple(values)

    def _parse_csv(self, text: bytes) -> tuple[float, ...]:
        parts = text.split(b",")
        if len(parts) != self._width:
            raise MalformedLineError(f"expected {self._width} columns, got {len(parts)}")
        values = []
        for channel, column in zip(self.channels, self._columns, strict=True):
            try:
                number = float(parts[column])
            except ValueError:
                raise MalformedLineError(f"channel {channel!r}: expected a number") from None
            values.append(_finite(number, channel))
        return tuple(values)


def _finite(value: float, channel: str) -> float:
    if not math.isfinite(value):
        raise MalformedLineError(f"channel {channel!r}: expected a finite number")
    return value


def _clip(text: bytes) -> str:
    shown = "".join(c if c.isprintable() else "?" for c in text[:60].decode("utf-8", "replace"))
    return shown + ("..." if len(text) > 60 else "")


class SensorWindower:
    """Sliding windows over readings: the first when ``window`` are in, then every ``hop``."""

    def __init__(self, window: int, hop: int) -> None:
        self.window = window
        self.hop = hop
        self._rows: collections.deque[tuple[float, ...]] = collections.deque(maxlen=window)
        self._due = window

    def reset(self) -> None:
        """Drop buffered readings."""
        self._rows.clear()
        self._due = self.window

    def push(self, reading: tuple[float, ...]) -> Sample | None:
        """Add one reading; return a float32 ``(window, channels)`` array when one is due."""
        self._rows.append(reading)
        self._due -= 1
        if self._due > 0 or len(self._rows) < self.window:
            return None
        self._due = self.hop
        return np.asarray(self._rows, dtype=np.float32)


class _ByteStream(abc.ABC):
    """Where sensor bytes come from. ``read_chunk``: bytes, ``b""`` at EOF, None if none yet."""

    live = False

    @abc.abstractmethod
    def describe(self) -> str: ...

    @abc.abstractmethod
    def open(self) -> None: ...

    @abc.abstractmethod
    def read_chunk(self, interrupted: threading.Event) -> bytes | None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def rewind(self) -> bool:
        return False

    def interrupt(self) -> None:
        return None


def _read_fd(fd: int) -> bytes | None:
    ready, _, _ = select.select([fd], [], [], _POLL_SECONDS)
    if not ready:
        return None
    return os.read(fd, _CHUNK)


class _FileStream(_ByteStream):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def describe(self) -> str:
        return f"sensor file {self.path}"

    def open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise SourceOpenError(f"cannot open sensor file {str(self.path)!r}: {exc}") from None

    def read_chunk(self, interrupted: threading.Event) -> bytes | None:
        assert self._fd is not None
        return os.read(self._fd, _CHUNK)

    def rewind(self) -> bool:
        assert self._fd is not None
        os.lseek(self._fd, 0, os.SEEK_SET)
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _FifoStream(_ByteStream):
    """A named pipe, opened without blocking: until a writer comes, reads just find no data.

    (On Linux a FIFO reports end-of-file only after a writer has connected and gone.)
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def describe(self) -> str:
        return f"sensor FIFO {self.path}"

    def open(self) -> None:
        try:
            mode = self.path.stat().st_mode
            if not stat.S_ISFIFO(mode):
                raise SourceOpenError(f"{str(self.path)!r}: expected a FIFO")
            self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise SourceOpenError(f"cannot open FIFO {str(self.path)!r}: {exc}") from None

    def read_chunk(self, interrupted: threading.Event) -> bytes | None:
        assert self._fd is not None
        try:
            return _read_fd(self._fd)
        except BlockingIOError:
            return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _StdinStream(_ByteStream):
    def describe(self) -> str:
        return "sensor stdin"

    def open(self) -> None:
        return None

    def read_chunk(self, interrupted: threading.Event) -> bytes | None:
        return _read_fd(0)

    def close(self) -> None:
        return None  # stdin belongs to the process


class _SerialStream(_ByteStream):
    live = True

    def __init__(self, port: str, baud: int) -> None:
        self.port = port
        self.baud = baud
        self._serial: Any = None

    def describe(self) -> str:
        return f"serial {self.port} @ {self.baud}"

    def open(self) -> None:
        try:
            import serial  # noqa: PLC0415 - optional dependency
        except ImportError as exc:
            raise SourceDependencyError(
                "serial sources need pyserial, which is not installed: "
                "pip install 'edge-agent[serial]'"
            ) from exc
        try:
            self._serial = serial.Serial(self.port, baudrate=self.baud, timeout=_POLL_SECONDS)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise SourceOpenError(f"cannot open serial port {self.port!r}: {exc}") from None

    def read_chunk(self, interrupted: threading.Event) -> bytes | None:
        data: bytes = self._serial.read(max(1, min(self._serial.in_waiting, _CHUNK)))
        return data or None  # an empty read is a timeout, not an end

    def close(self) -> None:
        if self._serial is not None:
            with contextlib.suppress(OSError):
                self._serial.close()
            self._serial = None


class SensorSource(Source):
    """Windows of sensor readings from a byte stream."""

    def __init__(
        self, stream: _ByteStream, sensor: SensorPreprocess, *, loop: bool = False
    ) -> None:
        super().__init__()
        self.live = stream.live
        self.loop = loop
        self.reconnects = 0
        self._stream = stream
        self._parser = SensorReadingParser(sensor.channels, strict_header=not stream.live)
        self._windower = SensorWindower(sensor.window, sensor.hop)
        self._lines: collections.deque[bytes] = collections.deque()
        self._pending = b""
        self._discarding = False
        self._backoff = Backoff()

    def describe(self) -> str:
        return self._stream.describe()

    def _open(self) -> None:
        self._stream.open()

    def _close(self) -> None:
        self._stream.close()

    def interrupt(self) -> None:
        super().interrupt()
        self._stream.interrupt()

    def read(self) -> Sample | None:
        while not self._interrupted.is_set():
            if self._lines:
                sample = self._consume(self._lines.popleft())
                if sample is not None:
                    return sample
                continue
            try:
                chunk = self._stream.read_chunk(self._interrupted)
            except OSError as exc:
                if not self.live:
                    raise SourceError(f"{self.describe()}: read failed: {exc}") from None
                self._reconnect(exc)
                continue
            if chunk is None:
                continue
            if chunk:
                self._split(chunk)
                continue
            # End of file: the last line may lack its newline.
            if self._pending and not self._discarding:
                self._lines.append(self._pending)
                self._pending = b""
                continue
            self._pending, self._discarding = b"", False
            if self.loop and self._stream.rewind():
                self._parser.reset()
                self._windower.reset()
                continue
            return None
        return None

    def _split(self, chunk: bytes) -> None:
        if self._discarding:
            newline = chunk.find(b"\n")
            if newline < 0:
                return
            chunk = chunk[newline + 1 :]
            self._discarding = False
        parts = (self._pending + chunk).split(b"\n")
        self._pending = parts.pop()
        self._lines.extend(parts)
        if len(self._pending) > MAX_LINE_BYTES:
            self._malformed(f"line longer than {MAX_LINE_BYTES} bytes")
            self._pending = b""
            self._discarding = True

    def _consume(self, line: bytes) -> Sample | None:
        if len(line) > MAX_LINE_BYTES:
            self._malformed(f"line longer than {MAX_LINE_BYTES} bytes")
            return None
        try:
            reading = self._parser.parse(line)
        except MalformedLineError as exc:
            self._malformed(str(exc))
            return None
        return None if reading is None else self._windower.push(reading)

    def _malformed(self, why: str) -> None:
        self.malformed += 1
        level = logging.WARNING if self.malformed == 1 else logging.DEBUG
        logger.log(level, "%s: malformed line skipped (%s)", self.describe(), why)

    def _reconnect(self, exc: OSError) -> None:
        self.errors += 1
        logger.warning("%s: read failed (%s); reconnecting", self.describe(), exc)
        self._stream.close()
        self._pending, self._discarding = b"", False
        self._lines.clear()
        while not self._interrupted.wait(self._backoff.next_delay()):
            try:
                self._stream.open()
            except SourceOpenError as err:
                self.errors += 1
                logger.warning("%s: reconnect failed: %s", self.describe(), err)
                continue
            self.reconnects += 1
            self._backoff.reset()
            logger.warning("%s: reconnected", self.describe())
            return


def file_source(path: Path, sensor: SensorPreprocess, *, loop: bool = False) -> SensorSource:
    """Readings from a regular file (CSV or NDJSON)."""
    return SensorSource(_FileStream(path), sensor, loop=loop)


def fifo_source(path: Path, sensor: SensorPreprocess) -> SensorSource:
    """Readings from a named pipe; ends when its writer closes it."""
    return SensorSource(_FifoStream(path), sensor)


def stdin_source(sensor: SensorPreprocess) -> SensorSource:
    """Readings from standard input; ends at end-of-file."""
    return SensorSource(_StdinStream(), sensor)


def serial_source(spec: str, sensor: SensorPreprocess) -> SensorSource:
    """Readings from ``serial:///dev/ttyUSB0?baud=115200`` (baud optional, default 115200)."""
    url = urllib.parse.urlsplit(spec)
    if url.netloc or not url.path:
        raise SourceOpenError(f"source {spec!r}: expected serial:///dev/NAME?baud=N")
    query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"baud"})
    if unknown:
        raise SourceOpenError(f"source {spec!r}: unknown option {unknown[0]!r} (expected baud)")
    baud_text = query.get("baud", [str(_DEFAULT_BAUD)])[-1]
    if not baud_text.isdigit() or not 50 <= int(baud_text) <= 4_000_000:
        raise SourceOpenError(
            f"source {spec!r}: baud {baud_text!r} (expected an integer 50..4000000)"
        )
    return SensorSource(_SerialStream(url.path, int(baud_text)), sensor)
