"""Sources: spec parsing, video files (generated), image folders, reconnect, sensor windowing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.modelcard import SensorPreprocess
from agent.pipeline.sensors import MalformedLineError, SensorReadingParser, SensorWindower
from agent.pipeline.sources import (
    Backoff,
    CaptureDevice,
    ImageFolderSource,
    LiveCaptureSource,
    Source,
    SourceError,
    SourceOpenError,
    VideoFileSource,
    import_cv2,
    parse_source,
)
from tools.videos import load_digits, write_digits_folder, write_digits_video

pytestmark = pytest.mark.inference

SENSOR = SensorPreprocess(channels=("ax", "ay", "az"), window=4, hop=2)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    images, _labels = load_digits()
    return images[:12]


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory, digits: np.ndarray) -> Path:
    return write_digits_video(tmp_path_factory.mktemp("video") / "digits.avi", digits)


def _drain(source: Source, limit: int = 10_000) -> list[Any]:
    frames: list[Any] = []
    while len(frames) < limit:
        frame = source.read()
        if frame is None:
            break
        frames.append(frame)
    return frames


# -- parse_source ---------------------------------------------------------------------------


def test_parse_picks_the_kind(tmp_path: Path, video: Path) -> None:
    camera = parse_source("0")
    assert isinstance(camera, LiveCaptureSource) and camera.target == 0 and camera.live
    assert isinstance(parse_source("/dev/video2"), LiveCaptureSource)
    stream = parse_source("rtsp://127.0.0.1:8554/cam")
    assert isinstance(stream, LiveCaptureSource) and stream.kind == "stream"
    assert isinstance(parse_source("https://127.0.0.1/x.mjpg"), LiveCaptureSource)
    assert isinstance(parse_source(str(video)), VideoFileSource)
    assert isinstance(parse_source(str(tmp_path)), ImageFolderSource)
    csv = tmp_path / "r.csv"
    csv.write_text("ax,ay,az\n")
    assert parse_source(str(csv), sensor=SENSOR).live is False
    assert "stdin" in parse_source("-", sensor=SENSOR).describe()
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    assert "FIFO" in parse_source(str(fifo), sensor=SENSOR).describe()
    serial = parse_source("serial:///dev/ttyUSB0?baud=9600", sensor=SENSOR)
    assert serial.describe() == "serial /dev/ttyUSB0 @ 9600" and serial.live


@pytest.mark.parametrize(
    ("spec", "sensor", "message"),
    [
        ("/no/such/file.avi", None, "source not found"),
        ("ftp://host/x", None, "unknown URL scheme"),
        ("-", None, "needs a model card with sensor preprocessing"),
        ("serial:///dev/ttyUSB0", None, "needs a model card with sensor"),
        ("0", SENSOR, "the model expects sensor windows"),
        ("rtsp://127.0.0.1/x", SENSOR, "the model expects sensor windows"),
        ("serial:///dev/ttyUSB0?baud=fast", SENSOR, "baud 'fast'"),
        ("serial:///dev/ttyUSB0?parity=N", SENSOR, "unknown option 'parity'"),
        ("serial://host/dev/ttyUSB0", SENSOR, "expected serial:///dev/NAME"),
    ],
)
def test_parse_rejects_with_one_clear_line(
    spec: str, sensor: SensorPreprocess | None, message: str
) -> None:
    with pytest.raises(SourceOpenError, match=message) as info:
        parse_source(spec, sensor=sensor)
    assert "\n" not in str(info.value)


def test_sensor_file_needs_a_sensor_card(tmp_path: Path) -> None:
    path = tmp_path / "r.ndjson"
    path.write_text("{}\n")
    with pytest.raises(SourceOpenError, match="sensor preprocessing"):
        parse_source(str(path))


def test_missing_camera_fails_to_open() -> None:
    source = parse_source("/dev/video63")
    with pytest.raises(SourceOpenError, match="expected a connected camera"):
        source.open()


# -- video files and folders ----------------------------------------------------------------


def test_video_file_reads_every_frame(video: Path, digits: np.ndarray) -> None:
    with VideoFileSource(video) as source:
        assert source.frame_size == (64, 64)
        assert source.fps == pytest.approx(30.0)
        frames = _drain(source)
    assert len(frames) == len(digits)
    assert frames[0].shape == (64, 64, 3) and frames[0].dtype == np.uint8
    # MJPG is lossy, but an 8x8 block average gives the digit back closely.
    small = frames[3][:, :, 0].reshape(8, 8, 8, 8).mean(axis=(1, 3))
    assert np.abs(small - digits[3]).mean() < 6
    assert source.errors == 0


def test_looping_video_restarts(video: Path, digits: np.ndarray) -> None:
    with VideoFileSource(video, loop=True) as source:
        frames = _drain(source, limit=3 * len(digits) + 1)
    assert len(frames) == 3 * len(digits) + 1
    assert np.array_equal(frames[0], frames[len(digits)])


def test_truncated_video_ends_early_or_fails_clearly(tmp_path: Path) -> None:
    images, _labels = load_digits()
    data = write_digits_video(tmp_path / "long.avi", images[:60]).read_bytes()
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(data[: len(data) // 2])
    with VideoFileSource(truncated) as source:
        frames = _drain(source)
    assert 0 < len(frames) < 60
    assert source.errors == 1
    # Cut before the first frame's data: nothing to decode, a clear error at open.
    truncated.write_bytes(data[: len(data) // 5])
    with pytest.raises(SourceOpenError, match=r"truncated\.avi"):
        VideoFileSource(truncated).open()


@pytest.mark.parametrize("content", [b"", os.urandom(4096), b"RIFF\x00\x00"])
def test_undecodable_video_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.avi"
    path.write_bytes(content)
    with pytest.raises(SourceOpenError, match=r"bad\.avi"):
        VideoFileSource(path).open()


def test_image_folder_sorted_and_skips_unreadable(tmp_path: Path, digits: np.ndarray) -> None:
    paths = write_digits_folder(tmp_path, digits[:5])
    (tmp_path / "0002b.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("ignored")
    with ImageFolderSource(tmp_path) as source:
        frames = _drain(source)
    assert len(frames) == 5
    assert source.errors == 1
    cv2 = import_cv2()
    assert np.array_equal(frames[4], cv2.imread(str(paths[4])))


def test_image_folder_loops_and_rejects_empty(tmp_path: Path, digits: np.ndarray) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceOpenError, match="has no images"):
        ImageFolderSource(empty).open()
    write_digits_folder(tmp_path / "two", digits[:2])
    with ImageFolderSource(tmp_path / "two", loop=True) as source:
        assert len(_drain(source, limit=7)) == 7


# -- live sources: backoff and reconnect ----------------------------------------------------


def test_backoff_grows_with_jitter_and_caps() -> None:
    backoff = Backoff(initial=1.0, cap=8.0)
    delays = [backoff.next_delay() for _ in range(6)]
    for delay, ceiling in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert backoff.next_delay() <= 1.0


class FlakyCamera:
    """Opens real captures of a video file, failing the attempts listed in ``fail``."""

    def __init__(self, video: Path, fail: set[int]) -> None:
        self.video = video
        self.fail = fail
        self.attempts = 0

    def __call__(self) -> CaptureDevice:
        self.attempts += 1
        if self.attempts in self.fail:
            raise SourceOpenError("camera unplugged")
        cv2 = import_cv2()
        capture: CaptureDevice = cv2.VideoCapture(str(self.video), cv2.CAP_FFMPEG)
        return capture


def test_live_source_reconnects_after_a_drop(video: Path, digits: np.ndarray) -> None:
    opener = FlakyCamera(video, fail={2, 3})
    source = LiveCaptureSource("cam", kind="camera", opener=opener, backoff=Backoff(initial=0.001))
    source.open()
    # The end of the file plays a camera dropping out; attempts 2 and 3 fail, 4 reconnects.
    frames = [source.read() for _ in range(2 * len(digits))]
    assert all(f is not None and f.shape == (64, 64, 3) for f in frames)
    assert opener.attempts == 4
    assert source.reconnects == 1
    assert source.errors == 3  # one dropped read, two failed reconnects
    source.interrupt()
    assert source.read() is None
    source.close()


def test_live_source_first_open_failure_is_reported(video: Path) -> None:
    source = LiveCaptureSource("cam", kind="camera", opener=FlakyCamera(video, fail={1}))
    with pytest.raises(SourceOpenError, match="unplugged"):
        source.open()
    assert not source.is_open


# -- sensor parsing and windowing -----------------------------------------------------------


def test_windows_are_emitted_per_hop() -> None:
    windower = SensorWindower(window=4, hop=2)
    out = [windower.push((float(i), 0.0)) for i in range(9)]
    emitted = [(i, w) for i, w in enumerate(out) if w is not None]
    assert [i for i, _ in emitted] == [3, 5, 7]
    first = emitted[0][1]
    assert first.dtype == np.float32 and first.shape == (4, 2)
    assert first[:, 0].tolist() == [0, 1, 2, 3]
    assert emitted[1][1][:, 0].tolist() == [2, 3, 4, 5]


def test_csv_parser_maps_columns_by_header() -> None:
    parser = SensorReadingParser(("ax", "az"))
    assert parser.parse(b"t,az,ax\n") is None
    assert parser.parse(b"1.0,9.8,0.5") == (0.5, 9.8)
    assert parser.parse(b"  ") is None
    for bad in (b"1,2", b"1,x,3", b"1,nan,2", b"1,2,3,4"):
        with pytest.raises(MalformedLineError):
            parser.parse(bad)


def test_csv_header_without_a_channel_is_a_config_error() -> None:
    parser = SensorReadingParser(("ax", "ay"))
    with pytest.raises(SourceError, match="no column 'ay'"):
        parser.parse(b"ax,by")
    lenient = SensorReadingParser(("ax", "ay"), strict_header=False)
    with pytest.raises(MalformedLineError):
        lenient.parse(b"\xff\xfe garbage")
    assert lenient.parse(b"ay,ax") is None
    assert lenient.parse(b"1,2") == (2.0, 1.0)


def test_json_parser_checks_every_channel() -> None:
    parser = SensorReadingParser(("ax", "ay"))
    assert parser.parse(b'{"ax": 1, "ay": -2.5, "extra": "ok"}') == (1.0, -2.5)
    for bad in (
        b'{"ax": 1}',
        b'{"ax": true, "ay": 1}',
        b'{"ax": "1", "ay": 1}',
        b"[1, 2]",
        b'{"ax": 1, "ay": ',
        b'{"ax": NaN, "ay": 1}',
        b'{"ax": 1, "ay": 1}\xff',
    ):
        with pytest.raises(MalformedLineError):
            parser.parse(bad)
