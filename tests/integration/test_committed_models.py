"""The committed models match their cards: the card validates, and sha256/size name the file."""

from __future__ import annotations

import hashlib
from pathlib import Path

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
