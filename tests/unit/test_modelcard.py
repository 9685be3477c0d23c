"""The model card schema: valid cards round-trip; bad ones name the key that is wrong."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.modelcard import (
    MAX_CARD_BYTES,
    ClassificationPostprocess,
    DetectionPostprocess,
    ImagePreprocess,
    ModelCard,
    ModelCardError,
    RawPostprocess,
    card_from_json,
    card_to_json,
)

pytestmark = pytest.mark.inference


def _card(**extra: Any) -> dict[str, Any]:
    return {"name": "digits", "version": "1.0.0", "format": "tflite", **extra}


def test_minimal_card_defaults_to_raw_output() -> None:
    card = ModelCard.from_dict(_card())
    assert card.postprocess == RawPostprocess()
    assert card.preprocess is None
    assert card.selftest == ()


def test_full_card_round_trips_through_json() -> None:
    card = ModelCard.from_dict(
        _card(
            preprocess={"kind": "image", "size": [8, 8], "color": "GRAY", "scale": 1 / 255},
            postprocess={"kind": "classification", "top_k": 3, "labels": ["a", "b"]},
            metrics={"accuracy": 0.97},
            selftest=[{"name": "zero", "input_seed": 3, "expected_argmax": 0}],
        )
    )
    assert isinstance(card.preprocess, ImagePreprocess)
    assert card.preprocess.size == (8, 8)
    assert isinstance(card.postprocess, ClassificationPostprocess)
    assert card_from_json(card_to_json(card)) == card


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_card(colour="RGB"), "card: unknown key 'colour'"),
        (_card(format="pt"), "card.format: expected one of 'tflite', 'onnx'"),
        (_card(preprocess={"kind": "image", "layout": "HWC"}), "card.preprocess.layout"),
        (_card(preprocess={"kind": "image", "std": [0.0]}), "std: expected non-zero"),
        (_card(postprocess={"kind": "detection"}), "anchors: required"),
        (_card(postprocess={"kind": "segmentation"}), "card.postprocess.kind"),
        (_card(selftest=[{"expected_argmax": 1}]), "exactly one of 'input' or 'input_seed'"),
        (_card(selftest=[{"input_seed": 1}]), "'expected' values or 'expected_argmax'"),
        (_card(postprocess={"kind": "classification", "top_k": 0}), "top_k: expected a value >= 1"),
    ],
)
def test_bad_cards_name_what_is_wrong(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelCardError, match=message.replace("(", r"\(")):
        ModelCard.from_dict(data)


def test_detection_card_with_anchors_loads() -> None:
    card = ModelCard.from_dict(
        _card(
            postprocess={
                "kind": "detection",
                "anchors": {"input_size": [128, 128], "strides": [8, 16, 16, 16]},
            }
        )
    )
    assert isinstance(card.postprocess, DetectionPostprocess)
    assert card.postprocess.anchors is not None
    assert card.postprocess.anchors.strides == (8, 16, 16, 16)


def test_oversized_and_unparseable_json_are_rejected() -> None:
    with pytest.raises(ModelCardError, match="expected at most"):
        card_from_json(" " * (MAX_CARD_BYTES + 1))
    with pytest.raises(ModelCardError, match="expected JSON"):
        card_from_json("{not json")
    with pytest.raises(ModelCardError, match="card: expected an object"):
        card_from_json(json.dumps([1, 2]))
