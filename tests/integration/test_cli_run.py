"""``edge-agent run`` end to end in a subprocess: JSON lines, summary, exit codes, Ctrl-C."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.cli.run import ResultPrinter, describe_payload
from agent.pipeline.loop import FrameResult
from tools.videos import MODELS_DIR, load_digits, write_digits_video, write_face_video

pytestmark = pytest.mark.inference

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")
TFLITE = MODELS_DIR / "digits_int8.tflite"
VIBRATION = MODELS_DIR / "vibration_fp32.onnx"  # loads in every supported runtime version
FRAMES = 40


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGE_AGENT, "run", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images, _labels = load_digits()
    return write_digits_video(tmp_path_factory.mktemp("cli") / "digits.avi", images[:FRAMES])


def test_json_lines_carry_frame_ts_latency_and_payload(video: Path) -> None:
    done = _run("--model", str(TFLITE), "--source", str(video), "--json")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["frame"] for line in lines] == list(range(FRAMES))
    _images, labels = load_digits()
    for line in lines:
        assert isinstance(line["ts"], float) and line["ts"] > 1.6e9
        assert isinstance(line["latency_ms"], float) and line["latency_ms"] >= 0
        assert len(line["top"]) == 3  # the card's top_k
    predicted = np.array([int(line["top"][0]["label"]) for line in lines])
    assert (predicted == labels[:FRAMES]).mean() > 0.9
    summary = json.loads(done.stderr.strip().splitlines()[-1])["summary"]
    assert summary["frames"] == FRAMES
    assert summary["dropped"] == 0
    assert {"p50_ms", "p95_ms", "p99_ms"} <= set(summary["latency"]["invoke"])


def test_frames_limits_the_results(video: Path) -> None:
    done = _run("--model", str(TFLITE), "--source", str(video), "--json", "--frames", "5")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["frame"] for line in done.stdout.splitlines()] == list(range(5))


def test_text_output_has_live_lines_and_a_summary(video: Path) -> None:
    done = _run("--model", str(TFLITE), "--source", str(video), "--frames", "3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("frame 0  top ") and lines[0].endswith(" ms")
    assert any(line.startswith("frames 3 in ") and "fps" in line for line in lines)
    assert any(line.split()[:4] == ["latency", "ms", "p50", "p95"] for line in lines)
    assert any(line.strip().startswith("invoke") for line in lines)
    assert done.stderr == ""


def test_card_is_found_next_to_the_model_or_derived(tmp_path: Path, video: Path) -> None:
    bare = tmp_path / "digits.tflite"
    shutil.copy(TFLITE, bare)
    done = _run("--model", str(bare), "--source", str(video), "--json", "--frames", "1")
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout)
    assert "outputs" in line and "top" not in line  # no card: raw outputs
    done = _run(
        "--model", str(bare), "--card", f"{TFLITE}.card.json", "--source", str(video),
        "--json", "--frames", "1",
    )  # fmt: skip
    assert "top" in json.loads(done.stdout)


def test_sensor_model_on_a_csv_file() -> None:
    done = _run(
        "--model", str(VIBRATION), "--source", str(MODELS_DIR / "vibration_test.csv"), "--json"
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines and all(isinstance(line["anomaly"], bool) for line in lines)
    assert all(isinstance(line["score"], float) for line in lines)


def test_ctrl_c_prints_the_summary_and_exits_130(video: Path) -> None:
    process = subprocess.Popen(
        [EDGE_AGENT, "run", "--model", str(TFLITE), "--source", str(video), "--loop"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    first = process.stdout.readline()
    assert first.startswith("frame 0")
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "fps" in out and "latency ms" in out


def _one_error_line(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("edge-agent: error: ")
    for needle in needles:
        assert needle in lines[0]
    assert done.stdout == ""
    return lines[0]


def test_missing_model(video: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.tflite"
    _one_error_line(_run("--model", str(missing), "--source", str(video)), "model file not found")


def test_corrupt_model(video: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.tflite"
    data = TFLITE.read_bytes()
    corrupt.write_bytes(data[:8] + os.urandom(len(data) - 8))
    _one_error_line(_run("--model", str(corrupt), "--source", str(video)), str(corrupt))
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(os.urandom(2048))
    _one_error_line(_run("--model", str(garbage), "--source", str(video)), str(garbage))


def test_card_with_an_unknown_key(video: Path, tmp_path: Path) -> None:
    card = json.loads(Path(f"{TFLITE}.card.json").read_text())
    card["preprocess"]["gamma"] = 2.2
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card))
    done = _run("--model", str(TFLITE), "--card", str(path), "--source", str(video))
    _one_error_line(done, "gamma", "preprocess")


def test_source_that_cannot_be_opened(tmp_path: Path) -> None:
    _one_error_line(
        _run("--model", str(TFLITE), "--source", str(tmp_path / "none.avi")), "source not found"
    )
    bad = tmp_path / "bad.avi"
    bad.write_bytes(os.urandom(4096))
    _one_error_line(_run("--model", str(TFLITE), "--source", str(bad)), "bad.avi")
    _one_error_line(_run("--model", str(TFLITE), "--source", "/dev/video63"), "camera")


def test_card_shape_does_not_match_the_model(video: Path, tmp_path: Path) -> None:
    card = json.loads(Path(f"{TFLITE}.card.json").read_text())
    card["inputs"][0]["shape"] = [1, 28, 28, 1]
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card))
    done = _run("--model", str(TFLITE), "--card", str(path), "--source", str(video))
    _one_error_line(done, "shape", "[1, 8, 8, 1]", "[1, 28, 28, 1]")


def test_image_model_on_a_sensor_source() -> None:
    done = _run("--model", str(TFLITE), "--source", str(MODELS_DIR / "vibration_test.csv"))
    _one_error_line(done, "sensor preprocessing")


def test_bad_override_is_one_line(video: Path) -> None:
    done = _run("--model", str(TFLITE), "--source", str(video), "--mean", "1,2,3,4,5")
    _one_error_line(done, "mean")


def test_sensor_model_on_a_video_file(video: Path) -> None:
    done = _run("--model", str(VIBRATION), "--source", str(video))
    _one_error_line(done, "expects sensor windows")


def test_sensor_csv_without_the_channels(tmp_path: Path) -> None:
    path = tmp_path / "readings.csv"
    path.write_text("t,x,y,z\n1,2,3,4\n")
    done = _run("--model", str(VIBRATION), "--source", str(path), "--json")
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert lines[0] == (
        f"edge-agent: error: sensor file {path}: sensor CSV header 't,x,y,z' has no column "
        "'ax' (expected columns ax, ay, az)"
    )
    assert json.loads(lines[1])["summary"]["frames"] == 0


def test_face_detector_on_a_panning_video(tmp_path: Path) -> None:
    video = write_face_video(tmp_path / "face.avi", count=4)
    model = MODELS_DIR / "blazeface_short_range.tflite"
    done = _run("--model", str(model), "--source", str(video), "--json")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 4
    reference = json.loads((MODELS_DIR / "astronaut.json").read_text())["face_box"]
    best = max(lines[0]["detections"], key=lambda d: d["score"])
    assert best["label"] == "face"
    assert _iou(best["box"], reference) > 0.7


def _iou(a: list[float], b: list[float]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area - inter)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_line_is_redrawn_in_place_on_a_terminal() -> None:
    out = _Terminal()
    printer = ResultPrinter(out, as_json=False)
    for frame in range(3):
        printer(FrameResult(frame, 1.7e9, 1.5, {"score": 0.25, "anomaly": frame == 2}))
    printer.finish()
    text = out.getvalue()
    assert "\n" not in text[:-1]  # one line, redrawn with carriage returns
    assert text.startswith("\rframe 0  score 0.250 normal  1.5 ms\x1b[K")
    assert text.endswith("\rframe 2  score 0.250 ANOMALY  1.5 ms\x1b[K\n")


def test_payloads_read_well() -> None:
    assert describe_payload({"top": [{"index": 3, "label": "three", "score": 0.9}]}) == (
        "top three (0.90)"
    )
    detections = {"detections": [{"box": [1, 2, 30, 40], "score": 0.8, "label": "face"}]}
    assert describe_payload(detections) == "1 detections, best face 0.80 [1,2,30,40]"
    assert describe_payload({"detections": []}) == "no detections"
    outputs = {"outputs": [{"name": "logits", "shape": [1, 10], "data": []}]}
    assert describe_payload(outputs) == "outputs logits[1, 10]"
