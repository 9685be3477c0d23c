"""Input sources: cameras, network streams, video files, image folders and sensor streams.

Every source implements :class:`Source`: ``open()``, ``read()`` (a sample, or ``None`` at a clean
end), ``close()``, ``describe()`` and ``interrupt()`` (make a blocked ``read()`` return ``None``
soon, from another thread). Images are HxWx3 uint8 arrays in OpenCV's BGR order; sensor windows
are float32 ``(window, channels)`` arrays (see :mod:`agent.pipeline.sensors`).

:func:`parse_source` turns a command-line spec into a source. Live sources (cameras, RTSP/HTTP
streams, serial ports) never end on a failure: they log a WARNING, count it in ``errors``, back
off (capped, jittered exponential) and reconnect. File sources end cleanly at their end, or loop.

OpenCV is optional (the ``camera`` extra) and imported only when a video source opens.
"""

from __future__ import annotations

import abc
import logging
import os
import random
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from agent.modelcard import SensorPreprocess

__all__ = [
    "IMAGE_SUFFIXES",
    "SENSOR_SUFFIXES",
    "VIDEO_SUFFIXES",
    "Backoff",
    "CaptureDevice",
    "ImageFolderSource",
    "LiveCaptureSource",
    "Sample",
    "Source",
    "SourceDependencyError",
    "SourceError",
    "SourceOpenError",
    "VideoFileSource",
    "import_cv2",
    "parse_source",
]

logger = logging.getLogger(__name__)

Sample = npt.NDArray[Any]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
SENSOR_SUFFIXES = frozenset({".csv", ".ndjson", ".jsonl"})
VIDEO_SUFFIXES = frozenset({".avi", ".mp4", ".mkv", ".mov", ".webm", ".mjpg", ".mjpeg", ".ts"})
_URL_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")
_CAMERA_HINT = "pip install 'edge-agent[camera]'"
# FFmpeg open/read timeouts for network streams, so a dead peer cannot block a read forever.
_STREAM_TIMEOUT_MS = 5000
_cv2_quiet = False


class SourceError(Exception):
    """Root of every input-source error."""


class SourceOpenError(SourceError):
    """A source cannot be opened or parsed; the message names it and what was expected."""


class SourceDependencyError(SourceError):
    """A source needs an optional package that is not installed; the message has the hint."""


def import_cv2() -> Any:
    """Import OpenCV, quietening its own logging; raise a one-line install hint if missing."""
    global _cv2_quiet  # noqa: PLW0603 - a once-per-process setting
    if not _cv2_quiet:
        # OpenCV and its FFmpeg print their own warnings to stderr; ours go through logging.
        os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")  # read when cv2 is first imported
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # read on the first capture
    try:
        import cv2  # noqa: PLC0415 - optional dependency, imported on first use
    except ImportError as exc:
        raise SourceDependencyError(
            f"video sources need OpenCV, which is not installed: {_CAMERA_HINT}"
        ) from exc
    if not _cv2_quiet:
        # In case something imported cv2 before us (OpenCV < 4.11 lacks cv2.utils.logging).
        logging_module = getattr(getattr(cv2, "utils", None), "logging", None)
        if logging_module is not None:
            logging_module.setLogLevel(logging_module.LOG_LEVEL_SILENT)
        elif hasattr(cv2, "setLogLevel"):
            cv2.setLogLevel(0)
        _cv2_quiet = True
    return cv2


class Backoff:
    """Capped exponential backoff with jitter: delays grow by ``factor`` up to ``cap`` seconds."""

    def __init__(self, *, initial: float = 0.5, cap: float = 30.0, factor: float = 2.0) -> None:
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self.attempt = 0

    def next_delay(self) -> float:
        """The next delay in seconds: uniformly in [d/2, d] for the capped exponential d."""
        delay = min(self.cap, self.initial * self.factor**self.attempt)
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        """Start again from the initial delay (after a success)."""
        self.attempt = 0


class Source(abc.ABC):
    """A stream of samples. ``read`` is called from one capture thread."""

    #: live sources (cameras, streams, serial ports) drop stale frames and reconnect
    live: bool = False

    def __init__(self) -> None:
        self.fps: float | None = None
        self.frame_size: tuple[int, int] | None = None  # (width, height) of image samples
        self.errors = 0  # failed reads, drops, reconnect attempts, unreadable files
        self.malformed = 0  # malformed sensor lines skipped
        self._interrupted = threading.Event()
        self._opened = False

    @property
    def is_open(self) -> bool:
        """Whether :meth:`open` succeeded and :meth:`close` has not been called since."""
        return self._opened

    def open(self) -> None:
        """Open the source (idempotent).

        Raises:
            SourceOpenError: it cannot be opened.
            SourceDependencyError: an optional package it needs is missing.
        """
        if not self._opened:
            self._interrupted.clear()
            self._open()
            self._opened = True

    def close(self) -> None:
        """Release the source (idempotent)."""
        if self._opened:
            self._opened = False
            self._close()

    def interrupt(self) -> None:
        """Make a blocked or backing-off :meth:`read` return ``None`` soon (any thread)."""
        self._interrupted.set()

    @abc.abstractmethod
    def read(self) -> Sample | None:
        """The next sample, or ``None`` at a clean end (or after :meth:`interrupt`)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line saying what this source is."""

    @abc.abstractmethod
    def _open(self) -> None: ...

    @abc.abstractmethod
    def _close(self) -> None: ...

    def __enter__(self) -> Source:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CaptureDevice(Protocol):
    """The part of ``cv2.VideoCapture`` a capture source uses."""

    def read(self) -> tuple[bool, Any]: ...

    def get(self, prop_id: int) -> float: ...

    def release(self) -> None: ...


CaptureOpener = Callable[[], CaptureDevice]


def _open_capture(
    target: str | int, *, api: str, expected: str, network: bool = False
) -> CaptureDevice:
    cv2 = import_cv2()
    params: list[int] = []
    if network:
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            _STREAM_TIMEOUT_MS,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            _STREAM_TIMEOUT_MS,
        ]
    capture: Any = cv2.VideoCapture(target, getattr(cv2, api), params)
    if not capture.isOpened():
        capture.release()
        raise SourceOpenError(f"cannot open {target!r} (expected {expected})")
    return capture  # type: ignore[no-any-return]


def _capture_metadata(source: Source, capture: CaptureDevice) -> None:
    cv2 = import_cv2()
    fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
    source.fps = fps if 0.0 < fps < 1000.0 else None
    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
    if width > 0 and height > 0:
        source.frame_size = (width, height)


class LiveCaptureSource(Source):
    """A camera (index or device path) or an RTSP/HTTP stream that reconnects when it drops."""

    live = True

    def __init__(
        self,
        target: str | int,
        *,
        kind: str,
        opener: CaptureOpener | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        super().__init__()
        self.target = target
        self.kind = kind
        self.reconnects = 0
        if opener is None:
            network = kind == "stream"
            api = "CAP_FFMPEG" if network else ("CAP_V4L2" if os.name == "posix" else "CAP_ANY")
            expected = "a reachable video stream" if network else "a connected camera"

            def opener() -> CaptureDevice:
                return _open_capture(target, api=api, expected=expected, network=network)

        self._opener = opener
        self._backoff = backoff or Backoff()
        self._capture: CaptureDevice | None = None

    def describe(self) -> str:
        return f"{self.kind} {self.target}"

    def _open(self) -> None:
        self._capture = self._opener()
        _capture_metadata(self, self._capture)

    def _close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def read(self) -> Sample | None:
        while not self._interrupted.is_set():
            capture = self._capture
            if capture is None:
                self._reconnect()
                continue
            ok, frame = capture.read()
            if ok and frame is not None:
                self._backoff.reset()
                return np.asarray(frame)
            self.errors += 1
            logger.warning("%s: read failed (stream dropped?); reconnecting", self.describe())
            capture.release()
            self._capture = None
        return None

    def _reconnect(self) -> None:
        delay = self._backoff.next_delay()
        if self._interrupted.wait(delay):
            return
        try:
            self._capture = self._opener()
        except SourceOpenError as exc:
            self.errors += 1
            logger.warning("%s: reconnect failed: %s", self.describe(), exc)
            return
        self.reconnects += 1
        logger.warning("%s: reconnected", self.describe())


class VideoFileSource(Source):
    """A video file, read once or looped; a truncated file ends early with a WARNING."""

    def __init__(self, path: str | os.PathLike[str], *, loop: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        self.loop = loop
        self._capture: CaptureDevice | None = None
        self._first: Sample | None = None
        self._expected_frames = 0
        self._pass_frames = 0

    def describe(self) -> str:
        return f"video {self.path}" + (" (looping)" if self.loop else "")

    def _open(self) -> None:
        if not self.path.is_file():
            raise SourceOpenError(f"video file not found: {str(self.path)!r}")
        capture = self._open_file()
        ok, frame = capture.read()
        if not ok or frame is None:
            capture.release()
            raise SourceOpenError(
                f"video file {str(self.path)!r}: no decodable frame (expected a video OpenCV "
                "can decode, e.g. MJPG in .avi)"
            )
        _capture_metadata(self, capture)
        cv2 = import_cv2()
        self._expected_frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.frame_size = (int(frame.shape[1]), int(frame.shape[0]))
        self._capture = capture
        self._first = np.asarray(frame)
        self._pass_frames = 0

    def _open_file(self) -> CaptureDevice:
        return _open_capture(
            str(self.path), api="CAP_FFMPEG", expected="a video file OpenCV can decode"
        )

    def _close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None
        self._first = None

    def read(self) -> Sample | None:
        if self._first is not None:
            frame, self._first = self._first, None
            self._pass_frames += 1
            return frame
        while self._capture is not None and not self._interrupted.is_set():
            ok, frame = self._capture.read()
            if ok and frame is not None:
                self._pass_frames += 1
                return np.asarray(frame)
            if 0 < self._pass_frames < self._expected_frames:
                self.errors += 1
                logger.warning(
                    "%s: ended at frame %d of %d (truncated or corrupt)",
                    self.describe(),
                    self._pass_frames,
                    self._expected_frames,
                )
            if not self.loop or self._pass_frames == 0:
                return None
            self._capture.release()
            self._capture = self._open_file()
            self._pass_frames = 0
        return None


class ImageFolderSource(Source):
    """The images of a folder (jpg/png/bmp), in sorted file-name order."""

    def __init__(self, path: str | os.PathLike[str], *, loop: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        self.loop = loop
        self._files: list[Path] = []
        self._next = 0

    def describe(self) -> str:
        return f"image folder {self.path} ({len(self._files)} images)"

    def _open(self) -> None:
        import_cv2()
        if not self.path.is_dir():
            raise SourceOpenError(f"image folder not found: {str(self.path)!r}")
        self._files = sorted(
            p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not self._files:
            raise SourceOpenError(
                f"image folder {str(self.path)!r} has no images (expected .jpg, .png or .bmp)"
            )
        self._next = 0

    def _close(self) -> None:
        self._files = []

    def read(self) -> Sample | None:
        cv2 = import_cv2()
        misses = 0
        while not self._interrupted.is_set():
            if self._next >= len(self._files):
                if not self.loop or misses >= len(self._files):
                    return None
                self._next = 0
            path = self._files[self._next]
            self._next += 1
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                misses += 1
                self.errors += 1
                logger.warning("%s: cannot decode %s; skipped", self.describe(), path.name)
                continue
            if self.frame_size is None:
                self.frame_size = (int(image.shape[1]), int(image.shape[0]))
            return np.asarray(image)
        return None


_SOURCE_KINDS = (
    "a camera index (0) or /dev/videoN, an rtsp:// or http(s):// URL, a video file, an image "
    "folder, a sensor file (.csv/.ndjson) or FIFO, serial:///dev/ttyX?baud=N, or - for stdin"
)


def parse_source(
    spec: str, *, loop: bool = False, sensor: SensorPreprocess | None = None
) -> Source:
    """Build the source a command-line spec names (not opened yet).

    Args:
        spec: see :data:`_SOURCE_KINDS` for what is accepted.
        loop: restart files and folders at their end.
        sensor: the model's sensor windowing; required by (and only by) sensor sources.

    Raises:
        SourceOpenError: the spec names nothing usable, or its kind does not fit the model.
    """
    from agent.pipeline import sensors  # noqa: PLC0415 - keeps image-only users light

    def need_sensor(what: str) -> SensorPreprocess:
        if sensor is None:
            raise SourceOpenError(
                f"source {spec!r} is {what}, which needs a model card with sensor preprocessing"
            )
        return sensor

    def need_image(what: str) -> None:
        if sensor is not None:
            raise SourceOpenError(
                f"source {spec!r} is {what}, but the model expects sensor windows "
                "(expected a .csv/.ndjson file, a FIFO, serial://... or -)"
            )

    if spec == "-":
        return sensors.stdin_source(need_sensor("stdin"))
    if spec.startswith("serial://"):
        return sensors.serial_source(spec, need_sensor("a serial port"))
    if spec.lower().startswith(_URL_SCHEMES):
        need_image("a network stream")
        return LiveCaptureSource(spec, kind="stream")
    if "://" in spec:
        raise SourceOpenError(f"source {spec!r}: unknown URL scheme (expected {_SOURCE_KINDS})")
    if spec.isdigit():
        need_image("a camera")
        return LiveCaptureSource(int(spec), kind="camera")
    if spec.startswith("/dev/video"):
        need_image("a camera")
        return LiveCaptureSource(spec, kind="camera")
    path = Path(spec)
    try:
        mode = path.stat().st_mode
    except OSError:
        raise SourceOpenError(f"source not found: {spec!r} (expected {_SOURCE_KINDS})") from None
    if stat.S_ISDIR(mode):
        need_image("an image folder")
        return ImageFolderSource(path, loop=loop)
    if stat.S_ISFIFO(mode):
        return sensors.fifo_source(path, need_sensor("a FIFO"))
    if path.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
        need_image("an image or video file")
    if sensor is not None or path.suffix.lower() in SENSOR_SUFFIXES:
        return sensors.file_source(path, need_sensor("a sensor file"), loop=loop)
    return VideoFileSource(path, loop=loop)
