"""What the predictor hands out: JSON-ready result payload types, and its error root.

A payload is exactly one of four shapes, chosen by the card's postprocess kind:

* classification: ``{"top": [{"index": 3, "label": "3", "score": 0.97}, ...]}``
* detection: ``{"detections": [{"box": [x1, y1, x2, y2], "score": 0.93, "label": "face"}]}``
  with boxes in source-frame pixels, rounded to 0.1 px
* anomaly: ``{"score": 0.12, "anomaly": false}``
* raw: ``{"outputs": [{"name": "...", "shape": [...], "data": [...], "truncated": false}]}``
"""

from __future__ import annotations

from typing import TypedDict

__all__ = [
    "AnomalyPayload",
    "ClassScore",
    "ClassificationPayload",
    "Detection",
    "DetectionPayload",
    "PostprocessError",
    "PredictorError",
    "PreprocessError",
    "RawOutput",
    "RawPayload",
]


class PredictorError(Exception):
    """Root of the predictor's errors: a card, model and sample that do not fit together."""


class PreprocessError(PredictorError):
    """A sample or preprocessing spec does not fit the model's input tensor."""


class PostprocessError(PredictorError):
    """Model outputs do not have the shape the card's postprocessing expects."""


class ClassScore(TypedDict):
    """One class of a classification result."""

    index: int
    label: str
    score: float


class ClassificationPayload(TypedDict):
    """Top-k classes, best first."""

    top: list[ClassScore]


class Detection(TypedDict):
    """One detected object; ``box`` is ``[x1, y1, x2, y2]`` in source-frame pixels."""

    box: list[float]
    score: float
    label: str


class DetectionPayload(TypedDict):
    """Detections, best first."""

    detections: list[Detection]


class AnomalyPayload(TypedDict):
    """A scalar anomaly score and whether it crossed the card's threshold."""

    score: float
    anomaly: bool


class RawOutput(TypedDict):
    """One output tensor, flattened and bounded."""

    name: str
    shape: list[int]
    data: list[float] | list[int]
    truncated: bool


class RawPayload(TypedDict):
    """All output tensors as they came out of the model."""

    outputs: list[RawOutput]
