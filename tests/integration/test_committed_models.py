"""The committed models match their cards: the card validates, and sha256/size name the file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.modelcard import card_from_json

pytestmark = pytest.mark.inference

MODELS = Path(__file__).resolve().parents[2] / "tools" / "models"
CARDS = sorted(MODELS.glob("*.card.json"))


def test_every_model_file_has_a_card() -> None:
    models = sorted(p for p in MODELS.iterdir() if p.suffix in (".onnx", ".tflite"))
    assert len(models) >= 6
    assert [p.name + ".card.json" for p in models] == [c.name for c in CARDS]


@pytest.mark.parametrize("card_path", CARDS, ids=lambda p: p.name)
def test_card_validates_and_names_its_file(card_path: Path) -> None:
    card = card_from_json(card_path.read_bytes())
    model = card_path.with_name(card_path.name.removesuffix(".card.json"))
    data = model.read_bytes()
    assert card.size == len(data)
    assert card.sha256 == hashlib.sha256(data).hexdigest()
    assert card.format == model.suffix.lstrip(".")
    assert card.license
    assert card.selftest, "every committed model carries self-test vectors"


def test_held_out_digits_have_the_documented_shape() -> None:
    with np.load(MODELS / "digits_test.npz") as data:
        images, labels = data["images"], data["labels"]
    assert images.dtype == np.uint8
    assert images.shape[1:] == (8, 8)
    assert labels.shape == (images.shape[0],)
    assert set(np.unique(labels).tolist()) == set(range(10))


def test_vibration_recording_is_a_200_hz_three_axis_csv() -> None:
    lines = (MODELS / "vibration_test.csv").read_text().splitlines()
    assert lines[0] == "timestamp,ax,ay,az"
    rows = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    assert rows.shape == (800, 4)
    np.testing.assert_allclose(np.diff(rows[:, 0]), 0.005, atol=1e-6)
    assert np.all(np.isfinite(rows))
    # Healthy z sits on gravity; the documented fault (rows 400-463) drifts x away from it.
    assert abs(np.median(rows[:400, 3]) - 1.0) < 0.2
    assert np.ptp(rows[400:464, 1]) > np.ptp(rows[:400, 1])


def test_astronaut_reference_box_lies_on_the_photo() -> None:
    reference = json.loads((MODELS / "astronaut.json").read_text())
    photo = cv2.imdecode(np.frombuffer((MODELS / reference["image"]).read_bytes(), np.uint8), 1)
    assert photo is not None, "astronaut.jpg: expected a decodable JPEG"
    assert photo.shape == (reference["size"][1], reference["size"][0], 3)
    x1, y1, x2, y2 = reference["face_box"]
    assert 0 <= x1 < x2 <= photo.shape[1] and 0 <= y1 < y2 <= photo.shape[0]
    assert 0.5 < reference["face_score"] <= 1.0
