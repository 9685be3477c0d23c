"""Sensor sources on real files, a FIFO, stdin and a pseudo-terminal serial port; and a live
network stream that drops and reconnects (served from 127.0.0.1)."""

from __future__ import annotations

import functools
import http.server
import json
import os
import pty
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.modelcard import SensorPreprocess
from agent.pipeline.loop import FrameLoop, FrameResult
from agent.pipeline.sensors import MAX_LINE_BYTES, SensorSource
from agent.pipeline.sources import Backoff, LiveCaptureSource, Source, SourceError, parse_source
from tools.videos import load_digits, write_digits_video

SENSOR = SensorPreprocess(channels=("ax", "ay", "az"), window=4, hop=2)
WAIT = 10.0


def _windows(source: Source) -> list[np.ndarray]:
    windows = []
    with source:
        while (window := source.read()) is not None:
            windows.append(window)
    return windows


def _csv_rows(count: int) -> list[str]:
    return [f"{i * 0.01:.2f},{i},{-i},{i * 10}" for i in range(count)]


@pytest.mark.inference
def test_csv_file_with_garbage_lines(tmp_path: Path) -> None:
    rows = _csv_rows(10)
    garbage = ["1,2", "x,y,z,w", "", "1,2,nan,4", "\xff\xfe", "1,2,3,4,5"]
    lines = ["t,ax,ay,az", *rows[:5], *garbage, *rows[5:]]
    path = tmp_path / "readings.csv"
    path.write_text("\n".join(lines))  # no newline after the last row
    source = parse_source(str(path), sensor=SENSOR)
    windows = _windows(source)
    # 10 readings, window 4, hop 2: windows end at readings 4, 6, 8 and 10.
    assert len(windows) == 4
    assert windows[-1][:, 0].tolist() == [6, 7, 8, 9]
    assert windows[0].shape == (4, 3) and windows[0].dtype == np.float32
    assert source.malformed == 5  # the blank line is not malformed


@pytest.mark.inference
def test_ndjson_with_garbage_and_an_overlong_line(tmp_path: Path) -> None:
    good = [json.dumps({"ax": i, "ay": 0.5, "az": -1, "t": i}) for i in range(8)]
    bad = ['{"ax": 1}', "[1,2,3]", "not json", '{"ax": true, "ay": 1, "az": 1}']
    overlong = '{"ax": "' + "x" * (MAX_LINE_BYTES + 10) + '"}'
    path = tmp_path / "readings.ndjson"
    path.write_text("\n".join([*good[:3], *bad, overlong, *good[3:]]) + "\n")
    source = parse_source(str(path), sensor=SENSOR)
    windows = _windows(source)
    assert len(windows) == 3  # readings 4, 6, 8
    assert windows[0][:, 0].tolist() == [0, 1, 2, 3]
    assert source.malformed == 5


@pytest.mark.inference
def test_a_stream_without_newlines_is_discarded_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "noise.ndjson"
    noise = os.urandom(1024).replace(b"\n", b" ") * (5 * MAX_LINE_BYTES // 1024)
    good = b"".join(b'{"ax": %d, "ay": 0, "az": 0}\n' % i for i in range(4))
    path.write_bytes(noise + b"\n" + good)
    source = parse_source(str(path), sensor=SENSOR)
    windows = _windows(source)
    assert len(windows) == 1
    assert source.malformed == 1
    assert isinstance(source, SensorSource)
    assert len(source._pending) == 0


@pytest.mark.inference
def test_csv_header_without_the_channels_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "readings.csv"
    path.write_text("t,x,y,z\n1,2,3,4\n")
    with pytest.raises(SourceError, match="no column 'ax'"):
        _windows(parse_source(str(path), sensor=SENSOR))


@pytest.mark.inference
def test_looping_sensor_file_reads_the_header_again(tmp_path: Path) -> None:
    path = tmp_path / "readings.csv"
    path.write_text("\n".join(["t,ax,ay,az", *_csv_rows(4)]) + "\n")
    with parse_source(str(path), sensor=SENSOR, loop=True) as source:
        windows = [source.read() for _ in range(3)]
    assert all(w is not None and w[:, 0].tolist() == [0, 1, 2, 3] for w in windows)
    assert source.malformed == 0


@pytest.mark.inference
def test_fifo_with_a_writer_thread(tmp_path: Path) -> None:
    fifo = tmp_path / "sensor.fifo"
    os.mkfifo(fifo)
    source = parse_source(str(fifo), sensor=SENSOR)

    def writer() -> None:
        with open(fifo, "w") as out:
            out.write("t,ax,ay,az\n")
            for row in _csv_rows(6):
                out.write(row + "\n")
                out.flush()
            out.write("garbage\n")

    thread = threading.Thread(target=writer)
    thread.start()
    windows = _windows(source)
    thread.join(WAIT)
    assert [w[:, 0].tolist() for w in windows] == [[0, 1, 2, 3], [2, 3, 4, 5]]
    assert source.malformed == 1


@pytest.mark.inference
def test_fifo_without_a_writer_stops_cleanly(tmp_path: Path) -> None:
    fifo = tmp_path / "idle.fifo"
    os.mkfifo(fifo)
    results: list[FrameResult] = []
    source = parse_source(str(fifo), sensor=SENSOR)

    class Never:
        def preprocess(self, sample: object) -> object:
            raise AssertionError("no sample expected")

        def infer(self, prepared: object) -> list[np.ndarray]:
            return []

        def postprocess(self, outputs: object, prepared: object) -> dict[str, object]:
            return {}

    loop = FrameLoop(source, Never(), results.append)
    loop.start()
    loop.stop(timeout=WAIT)  # no writer ever came: the capture thread is polling an empty FIFO
    assert not source.is_open
    assert results == []


@pytest.mark.inference
def test_stdin_source_in_a_subprocess(tmp_path: Path) -> None:
    script = (
        "import json, sys\n"
        "from agent.modelcard import SensorPreprocess\n"
        "from agent.pipeline.sources import parse_source\n"
        "sensor = SensorPreprocess(channels=('ax', 'ay', 'az'), window=4, hop=2)\n"
        "source = parse_source('-', sensor=sensor)\n"
        "source.open()\n"
        "count = 0\n"
        "while source.read() is not None:\n"
        "    count += 1\n"
        "print(json.dumps({'windows': count, 'malformed': source.malformed}))\n"
    )
    lines = [json.dumps({"ax": i, "ay": 1, "az": 2}) for i in range(10)]
    lines.insert(5, "{broken")
    done = subprocess.run(
        [sys.executable, "-c", script],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(done.stdout) == {"windows": 4, "malformed": 1}


def test_serial_port_on_a_pseudo_terminal() -> None:
    master, slave = pty.openpty()
    port = os.ttyname(slave)
    source = parse_source(f"serial://{port}?baud=115200", sensor=SENSOR)
    assert isinstance(source, SensorSource)
    source.open()
    try:
        # A serial link may start mid-line: noise before the header is skipped.
        payload = "\x00\x13noise\nt,ax,ay,az\n" + "".join(r + "\n" for r in _csv_rows(6))
        os.write(master, payload.encode("latin-1"))
        windows = [source.read() for _ in range(2)]
        assert [w[:, 0].tolist() for w in windows if w is not None] == [
            [0, 1, 2, 3],
            [2, 3, 4, 5],
        ]
        assert source.malformed == 1
        assert source.live
    finally:
        source.interrupt()
        source.close()
        os.close(master)
        os.close(slave)


# -- a network stream that drops: the HTTP server ends each response after one video ------


@pytest.fixture
def video_server(tmp_path: Path) -> Iterator[str]:
    images, _labels = load_digits()
    write_digits_video(tmp_path / "clip.avi", images[:10])
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/clip.avi"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.inference
def test_network_stream_reconnects_after_a_drop(video_server: str) -> None:
    source = parse_source(video_server)
    assert isinstance(source, LiveCaptureSource)
    source._backoff = Backoff(initial=0.001, cap=0.01)
    with source:
        frames = [source.read() for _ in range(25)]
    assert all(f is not None and f.shape == (64, 64, 3) for f in frames)
    assert source.reconnects == 2  # 10 frames per connection
    assert source.errors == 2
