"""Postprocessing steps and payloads against hand-computed values."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from agent.modelcard import (
    AnomalyPostprocess,
    ClassificationPostprocess,
    DetectionPostprocess,
    ImagePreprocess,
    ModelCard,
    SensorPreprocess,
    SsdAnchors,
)
from agent.pipeline.anchors import generate_ssd_anchors
from agent.pipeline.postprocess import (
    RAW_MAX_VALUES,
    ClassificationPlan,
    anomaly_payload,
    classification_payload,
    decode_ssd_boxes,
    detection_payload,
    iou,
    non_max_suppression,
    raw_payload,
    sigmoid,
    softmax,
    top_k,
)
from agent.pipeline.predictor import Predictor
from agent.pipeline.preprocess import FrameGeometry, letterbox_geometry
from agent.pipeline.results import PostprocessError, PredictorError
from agent.runtime.base import Model, TensorSpec

pytestmark = pytest.mark.inference

Outputs = list[npt.NDArray[np.generic]]


class FixedOutputModel(Model):
    """Returns the same outputs whatever the input: the postprocessing is what is under test."""

    format = "tflite"
    runtime_name = "fixed"

    def __init__(self, input_shape: tuple[int, ...], outputs: Outputs) -> None:
        self._input = TensorSpec("in", input_shape, np.dtype("float32"))
        self._outputs = outputs
        self.seen: list[Any] = []

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (self._input,)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(f"out{i}", o.shape, o.dtype) for i, o in enumerate(self._outputs))

    def run(self, inputs: Any) -> Outputs:
        self.seen.append(inputs)
        return self._outputs


# --- classification ---------------------------------------------------------------------------


def test_softmax_matches_hand_values_and_survives_large_logits() -> None:
    np.testing.assert_allclose(softmax([0.0, math.log(3.0)]), [0.25, 0.75], rtol=1e-6)
    np.testing.assert_allclose(softmax([1000.0, 1000.0]), [0.5, 0.5])
    np.testing.assert_allclose(softmax([-1000.0, 0.0]), [0.0, 1.0])


def test_top_k_sorts_by_score_with_label_fallback() -> None:
    top = top_k([0.1, 0.7, 0.2], 2, ("a", "b"))
    assert top == [
        {"index": 1, "label": "b", "score": pytest.approx(0.7)},
        {"index": 2, "label": "2", "score": pytest.approx(0.2)},
    ]
    assert [t["index"] for t in top_k([0.5, 0.5, 0.1], 3)] == [0, 1, 2]  # ties: lower index first
    assert len(top_k([0.5], 5)) == 1


def test_classification_payload_flattens_and_softmaxes() -> None:
    spec = ClassificationPostprocess(output=1, top_k=1, softmax=True, labels=("no", "yes"))
    outputs = [np.zeros(3, np.float32), np.array([[0.0, math.log(3.0)]], np.float32)]
    assert classification_payload(outputs, spec) == {
        "top": [{"index": 1, "label": "yes", "score": 0.75}]
    }
    with pytest.raises(PostprocessError, match="expected an output index below 2, got 5"):
        classification_payload(outputs, ClassificationPostprocess(output=5))


@pytest.mark.parametrize("size", [1, 3, 10, 64, 65, 1000])
@pytest.mark.parametrize("k", [1, 3, 100])
@pytest.mark.parametrize("use_softmax", [False, True])
def test_classification_plan_matches_the_full_softmax_and_sort(
    size: int, k: int, use_softmax: bool
) -> None:
    rng = np.random.default_rng(size * 1000 + k)
    labels = tuple(f"c{i}" for i in range(size // 2))  # the rest fall back to the index
    spec = ClassificationPostprocess(top_k=k, softmax=use_softmax, labels=labels)
    plan = ClassificationPlan(spec)
    for logits in (
        rng.normal(0.0, 4.0, size).astype(np.float32),
        np.round(rng.normal(0.0, 1.0, size)).astype(np.float32),  # many ties
    ):
        scores = softmax(logits) if use_softmax else logits
        expected = top_k(scores, k, labels)
        got = plan([logits.reshape(1, -1)])["top"]
        assert [(c["index"], c["label"]) for c in got] == [
            (c["index"], c["label"]) for c in expected
        ]
        np.testing.assert_allclose(
            [c["score"] for c in got], [c["score"] for c in expected], atol=2e-6
        )


def test_classification_plan_ranks_nan_last_and_converts_other_dtypes() -> None:
    plan = ClassificationPlan(ClassificationPostprocess(top_k=3))
    got = plan([np.array([0.5, np.nan, 0.7, 0.1], np.float32)])["top"]
    assert [c["index"] for c in got] == [2, 0, 3]
    doubles = plan([np.array([[1, 3, 2]], np.int64)])["top"]
    assert [(c["index"], c["score"]) for c in doubles] == [(1, 3.0), (2, 2.0), (0, 1.0)]
    with pytest.raises(PostprocessError, match="non-empty score vector"):
        plan([np.zeros((1, 0), np.float32)])


# --- detection: sigmoid, IoU, NMS, decoding ------------------------------------------------------


def test_sigmoid_and_clip() -> None:
    np.testing.assert_allclose(sigmoid([0.0, math.log(3.0)]), [0.5, 0.75], rtol=1e-6)
    np.testing.assert_allclose(sigmoid([5.0], clip=1.0), [1 / (1 + math.exp(-1))], rtol=1e-6)
    assert np.all(np.isfinite(sigmoid([-1e6, 1e6], clip=100.0)))


def test_iou_hand_values() -> None:
    np.testing.assert_allclose(
        iou([0, 0, 2, 2], [[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6], [0, 0, 0, 0]]),
        [1 / 7, 1.0, 0.0, 0.0],
    )


def test_nms_keeps_the_best_of_overlapping_boxes() -> None:
    boxes = [[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 9]]
    scores = [0.8, 0.9, 0.7, 0.6]
    # Box 1 wins; box 0 (IoU 9/11) and box 3 (IoU 81/119) go; box 2 does not overlap.
    assert non_max_suppression(boxes, scores, 0.3, 10).tolist() == [1, 2]
    assert non_max_suppression(boxes, scores, 0.3, 1).tolist() == [1]
    # A threshold above every overlap keeps everything, best first.
    assert non_max_suppression(boxes, scores, 0.9, 10).tolist() == [1, 0, 2, 3]
    assert non_max_suppression(np.zeros((0, 4)), [], 0.3, 10).tolist() == []


def test_decode_ssd_boxes_hand_made_regressor() -> None:
    anchors = np.array([[0.5, 0.5, 1.0, 1.0], [0.25, 0.75, 0.5, 0.5]], np.float32)
    raw = np.array([[12.8, -6.4, 32.0, 64.0, 99, 99], [0.0, 0.0, 128.0, 128.0, 0, 0]], np.float32)
    boxes = decode_ssd_boxes(raw, anchors, (128.0, 128.0, 128.0, 128.0))
    # centre (0.6, 0.45), size 0.25 x 0.5; second: anchor centre, size 0.5 x 0.5 (anchor-scaled)
    np.testing.assert_allclose(
        boxes, [[0.475, 0.2, 0.725, 0.7], [0.0, 0.5, 0.5, 1.0]], rtol=1e-6, atol=1e-7
    )


TINY_ANCHORS = SsdAnchors(input_size=(16, 16), strides=(8,))  # 2x2 map, 2 anchors per location


def tiny_detection_outputs() -> Outputs:
    anchors = generate_ssd_anchors(TINY_ANCHORS)
    assert anchors.shape == (8, 4)
    raw = np.zeros((1, 8, 6), np.float32)
    logits = np.full((1, 8, 1), -10.0, np.float32)
    # Anchor 0 (centre 4, 4 px) and anchor 1 (same centre): a 4x4 px box, twice; anchor 6
    # (centre 12, 12 px): an 8 x 4 px box shifted 2 px right.
    raw[0, 0, :4] = raw[0, 1, :4] = [0.0, 0.0, 32.0, 32.0]
    raw[0, 6, :4] = [16.0, 0.0, 64.0, 32.0]
    logits[0, 0], logits[0, 1], logits[0, 6], logits[0, 3] = 3.0, 2.0, 1.0, -0.1
    return [raw, logits]


def test_ssd_detection_threshold_nms_and_mapping_to_source() -> None:
    spec = DetectionPostprocess(anchors=TINY_ANCHORS, labels=("face",), score_threshold=0.5)
    anchors = generate_ssd_anchors(TINY_ANCHORS)
    geometry, _ = letterbox_geometry((64, 32), (16, 16), letterbox=True)  # scale 0.25, pad y 4
    payload = detection_payload(tiny_detection_outputs(), spec, geometry, anchors)
    # Input px boxes [2, 2, 6, 6] and [10, 10, 18, 14] -> source (x / 0.25, (y - 4) / 0.25),
    # the second clipped to the 64 x 32 frame. Anchor 1 is suppressed by anchor 0; anchor 3
    # (sigmoid(-0.1) < 0.5) is below the threshold.
    assert payload == {
        "detections": [
            {
                "box": [8.0, 0.0, 24.0, 8.0],
                "score": pytest.approx(1 / (1 + math.exp(-3))),
                "label": "face",
            },
            {
                "box": [40.0, 24.0, 64.0, 32.0],
                "score": pytest.approx(1 / (1 + math.exp(-1))),
                "label": "face",
            },
        ]
    }
    capped = DetectionPostprocess(anchors=TINY_ANCHORS, max_detections=1)
    assert (
        len(detection_payload(tiny_detection_outputs(), capped, geometry, anchors)["detections"])
        == 1
    )
    strict = DetectionPostprocess(anchors=TINY_ANCHORS, score_threshold=0.99)
    assert detection_payload(tiny_detection_outputs(), strict, geometry, anchors) == {
        "detections": []
    }


def test_ssd_detection_rejects_outputs_of_the_wrong_size() -> None:
    spec = DetectionPostprocess(anchors=TINY_ANCHORS)
    anchors = generate_ssd_anchors(TINY_ANCHORS)
    geometry = FrameGeometry((16, 16), (16, 16))
    outputs: Outputs = [np.zeros((1, 7, 16), np.float32), np.zeros((1, 7, 1), np.float32)]
    with pytest.raises(PostprocessError, match="multiple of 8 anchors"):
        detection_payload(outputs, spec, geometry, anchors)
    with pytest.raises(PostprocessError, match="frame geometry"):
        detection_payload(tiny_detection_outputs(), spec, None, anchors)


def ssd_op_outputs() -> Outputs:
    boxes = np.array(
        [[[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.6, 0.6]]], np.float32
    )
    classes = np.array([[2.0, 0.0, 1.0]], np.float32)
    scores = np.array([[0.4, 0.9, 0.8]], np.float32)
    return [boxes, classes, scores, np.array([2.0], np.float32)]


def test_boxes_classes_scores_count_layout() -> None:
    spec = DetectionPostprocess(
        layout="boxes_classes_scores_count", score_threshold=0.3, labels=("person", "cat")
    )
    geometry = FrameGeometry((200, 100), (10, 10), (10 / 200, 10 / 100))
    payload = detection_payload(ssd_op_outputs(), spec, geometry)
    # count = 2 drops the third row; ymin, xmin, ymax, xmax become x1, y1, x2, y2 in source px.
    assert payload == {
        "detections": [
            {"box": [0.0, 0.0, 200.0, 100.0], "score": pytest.approx(0.9), "label": "person"},
            {"box": [40.0, 10.0, 120.0, 50.0], "score": pytest.approx(0.4), "label": "2"},
        ]
    }
    higher = DetectionPostprocess(layout="boxes_classes_scores_count", score_threshold=0.5)
    assert len(detection_payload(ssd_op_outputs(), higher, geometry)["detections"]) == 1
    with pytest.raises(PostprocessError, match="expected 4 outputs"):
        detection_payload(ssd_op_outputs()[:3], spec, geometry)


# --- anomaly and raw ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reduce", "values", "score", "anomaly"),
    [
        ("value", [[0.7]], 0.7, True),
        ("mean", [0.2, 0.4, 0.9], 0.5, False),
        ("max", [0.2, 0.4, 0.9], 0.9, True),
    ],
)
def test_anomaly_reduce(reduce: Any, values: Any, score: float, anomaly: bool) -> None:
    spec = AnomalyPostprocess(reduce=reduce, threshold=0.5)
    payload = anomaly_payload([np.asarray(values, np.float32)], spec)
    assert payload == {"score": pytest.approx(score), "anomaly": anomaly}


def test_anomaly_value_needs_exactly_one_element() -> None:
    with pytest.raises(PostprocessError, match="expected exactly one value, got 2"):
        anomaly_payload([np.zeros(2, np.float32)], AnomalyPostprocess(reduce="value"))


def test_raw_payload_is_bounded_and_json_ready() -> None:
    big = np.arange(2000, dtype=np.float32).reshape(1, 2000)
    small = np.array([[1, 2]], dtype=np.int64)
    payload = raw_payload([big, small], ["logits"])
    first, second = payload["outputs"]
    assert first["name"] == "logits" and first["shape"] == [1, 2000]
    assert len(first["data"]) == RAW_MAX_VALUES and first["data"][-1] == 1023.0
    assert first["truncated"] is True
    assert second == {"name": "output1", "shape": [1, 2], "data": [1, 2], "truncated": False}
    json.dumps(payload)


# --- the predictor wires it together -------------------------------------------------------------


def card(preprocess: Any, postprocess: Any) -> ModelCard:
    return ModelCard(
        name="t", version="1", format="tflite", preprocess=preprocess, postprocess=postprocess
    )


def test_predictor_detection_end_to_end_with_letterbox() -> None:
    model = FixedOutputModel((1, 16, 16, 3), tiny_detection_outputs())
    predictor = Predictor(
        model,
        card(
            ImagePreprocess(letterbox=True, scale=1 / 255),
            DetectionPostprocess(anchors=TINY_ANCHORS, labels=("face",)),
        ),
    )
    frame = np.full((32, 64, 3), 255, np.uint8)
    payload = predictor(frame)
    assert [d["box"] for d in payload["detections"]] == [
        [8.0, 0.0, 24.0, 8.0],
        [40.0, 24.0, 64.0, 32.0],
    ]
    tensor = model.seen[0][0]
    assert tensor.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(tensor[0, 4:12], 1.0)  # content rows
    np.testing.assert_array_equal(tensor[0, :4], 0.0)  # letterbox padding
    json.dumps(payload)


def test_predictor_sensor_anomaly() -> None:
    model = FixedOutputModel((1, 4, 2), [np.array([[0.8]], np.float32)])
    predictor = Predictor(
        model,
        card(SensorPreprocess(channels=("x", "y"), window=4), AnomalyPostprocess(threshold=0.5)),
    )
    prepared = predictor.preprocess(np.zeros((4, 2), np.float32))
    assert prepared.geometry is None and prepared.tensors[0].shape == (1, 4, 2)
    assert predictor(np.zeros((4, 2), np.float32)) == {"score": pytest.approx(0.8), "anomaly": True}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: card(ImagePreprocess(), ClassificationPostprocess(output=3)),
            "postprocess.output: expected an output index below 1, got 3",
        ),
        (
            lambda: card(
                SensorPreprocess(channels=("a",), window=16),
                DetectionPostprocess(anchors=TINY_ANCHORS),
            ),
            "detection expected image preprocessing",
        ),
        (
            lambda: card(
                ImagePreprocess(), DetectionPostprocess(layout="boxes_classes_scores_count")
            ),
            "expected 4 outputs, the model has 1",
        ),
    ],
)
def test_predictor_rejects_cards_that_do_not_fit_the_model(
    make: Callable[[], ModelCard], message: str
) -> None:
    shape: Sequence[int] = (
        (1, 16, 1) if "Sensor" in message or "detection" in message else (1, 16, 16, 3)
    )
    model = FixedOutputModel(tuple(shape), [np.zeros((1, 10), np.float32)])
    with pytest.raises(PredictorError, match=message):
        Predictor(model, make())
