"""Swapping between the int8 TFLite and int8 ONNX digits models while a video plays: every frame
appears once, in order, and each result comes from exactly one model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.modelcard import card_from_json
from agent.pipeline.loop import CaptureMode, FrameLoop, FrameResult
from agent.pipeline.predictor import Predictor
from agent.pipeline.sources import VideoFileSource
from agent.runtime import load_model
from tools.videos import MODELS_DIR, load_digits, write_digits_video

pytestmark = pytest.mark.inference


class Tagged:
    """A real Predictor whose every stage carries its tag through to the payload."""

    def __init__(self, model_file: str) -> None:
        path = MODELS_DIR / model_file
        card = card_from_json(Path(f"{path}.card.json").read_bytes())
        self.tag = model_file
        self.predictor = Predictor(load_model(path.read_bytes()), card)

    def preprocess(self, sample: Any) -> Any:
        return self.tag, self.predictor.preprocess(sample)

    def infer(self, prepared: Any) -> Any:
        tag, inner = prepared
        return tag, self.tag, self.predictor.infer(inner)

    def postprocess(self, outputs: Any, prepared: Any) -> dict[str, Any]:
        pre_tag, infer_tag, raw = outputs
        payload = self.predictor.postprocess(raw, prepared[1])
        return {**payload, "tags": [pre_tag, infer_tag, self.tag]}


@pytest.mark.parametrize("capture", ["auto", "thread", "inline"])
def test_swapping_models_mid_video_loses_no_frame(tmp_path: Path, capture: CaptureMode) -> None:
    images, labels = load_digits()
    count = 300
    video = write_digits_video(tmp_path / "digits.avi", images, count=count)
    tflite, onnx = Tagged("digits_int8.tflite"), Tagged("digits_int8.onnx")
    results: list[FrameResult] = []
    loop = FrameLoop(
        VideoFileSource(video), tflite, results.append, realtime=False, capture=capture
    )
    loop.start()
    swaps = 0
    while not loop.wait(0):
        old = loop.swap(onnx if loop.predictor is tflite else tflite)
        assert old in (tflite, onnx)
        swaps += 1
    loop.stop()

    assert [r.frame for r in results] == list(range(count))
    assert loop.stats.inference_errors == 0
    assert loop.stats.swaps == swaps >= 1
    tags = [r.payload["tags"] for r in results]
    assert all(len(set(t)) == 1 for t in tags), "a frame ran on two models"
    used = {t[0] for t in tags}
    if swaps >= 2:
        assert used == {"digits_int8.tflite", "digits_int8.onnx"}
    predicted = np.array([int(r.payload["top"][0]["label"]) for r in results])
    expected = labels[np.arange(count) % len(labels)]
    assert (predicted == expected).mean() > 0.9
