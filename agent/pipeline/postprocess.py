"""Model outputs to JSON-ready payloads, as the model card's postprocess spec describes.

* classification: optional (numerically stable) softmax, top-k by score, labels by index.
* detection, ``ssd_anchors`` layout (BlazeFace): regressors decoded against SSD anchors as
  MediaPipe's TensorsToDetectionsCalculator does (``reverse_output_order``: x, y, w, h), scores
  ``sigmoid(clip(logit, +-score_clip))``, threshold, then plain greedy NMS by score (MediaPipe
  blends overlapping face boxes with weighted NMS; plain NMS keeps the single best box instead).
* detection, ``boxes_classes_scores_count`` layout (TFLite SSD postprocess op): outputs in that
  order, boxes ``ymin, xmin, ymax, xmax`` normalised; the op has already done NMS.
* anomaly: the output reduced to one score (single value, mean or max) against a threshold.
* raw: every output flattened, bounded to :data:`RAW_MAX_VALUES` values each.

Detection boxes are mapped from model-input coordinates back to source-frame pixels through the
:class:`~agent.pipeline.preprocess.FrameGeometry`, clipped to the frame, rounded to 0.1 px.
"""

from __future__ import annotations

import array
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.modelcard import AnomalyPostprocess, ClassificationPostprocess, DetectionPostprocess
from agent.pipeline.preprocess import FrameGeometry
from agent.pipeline.results import (
    AnomalyPayload,
    ClassificationPayload,
    ClassScore,
    DetectionPayload,
    PostprocessError,
    RawOutput,
    RawPayload,
)

__all__ = [
    "RAW_MAX_VALUES",
    "ClassificationPlan",
    "anomaly_payload",
    "classification_payload",
    "decode_ssd_boxes",
    "detection_payload",
    "iou",
    "non_max_suppression",
    "raw_payload",
    "sigmoid",
    "softmax",
    "top_k",
]

RAW_MAX_VALUES = 1024
_SCORE_DIGITS = 6

FloatArray = npt.NDArray[np.float32]


def softmax(logits: npt.ArrayLike) -> FloatArray:
    """Softmax over a 1-D vector, shifted by its maximum so large logits do not overflow."""
    x = np.asarray(logits, dtype=np.float64).ravel()
    e = np.exp(x - x.max())
    out: FloatArray = (e / e.sum()).astype(np.float32)
    return out


def sigmoid(logits: npt.ArrayLike, clip: float | None = None) -> FloatArray:
    """Logistic function, with the logits first clipped to ``+-clip`` when given."""
    x = np.asarray(logits, dtype=np.float32)
    if clip is not None:
        x = np.clip(x, -clip, clip)
    out: FloatArray = (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)
    return out


def _label(labels: Sequence[str], index: int) -> str:
    return labels[index] if 0 <= index < len(labels) else str(index)


def top_k(scores: npt.ArrayLike, k: int, labels: Sequence[str] = ()) -> list[ClassScore]:
    """The ``k`` best classes, best first; ties keep the lower index first."""
    flat = np.asarray(scores, dtype=np.float32).ravel()
    order = np.argsort(-flat, kind="stable")[:k]
    return [
        {"index": int(i), "label": _label(labels, int(i)), "score": _round(flat[i])} for i in order
    ]


def iou(box: npt.ArrayLike, boxes: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Intersection over union of one ``[x1, y1, x2, y2]`` box with each of ``(N, 4)`` boxes."""
    a = np.asarray(box, dtype=np.float64)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    inter_w = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0.0, None)
    inter_h = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0.0, None)
    inter = inter_w * inter_h
    area_a = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0)
    area_b = np.clip(b[:, 2] - b[:, 0], 0.0, None) * np.clip(b[:, 3] - b[:, 1], 0.0, None)
    union = area_a + area_b - inter
    out: npt.NDArray[np.float64] = np.divide(
        inter, union, out=np.zeros_like(inter), where=union > 0
    )
    return out


def non_max_suppression(
    boxes: npt.ArrayLike, scores: npt.ArrayLike, iou_threshold: float, limit: int
) -> npt.NDArray[np.intp]:
    """Greedy NMS: indices of kept boxes, best score first, at most ``limit``.

    A box is dropped when its IoU with an already kept box is above ``iou_threshold``.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, dtype=np.float64).ravel(), kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < limit:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        order = rest[iou(b[best], b[rest]) <= iou_threshold]
    return np.asarray(keep, dtype=np.intp)


def decode_ssd_boxes(
    raw: npt.ArrayLike,
    anchors: npt.NDArray[np.float32],
    box_scale: tuple[float, float, float, float],
) -> FloatArray:
    """Decode ``(N, >=4)`` regressors (x, y, w, h first) into normalised ``[x1, y1, x2, y2]``."""
    r = np.asarray(raw, dtype=np.float32)
    if r.ndim != 2:
        r = r.reshape(anchors.shape[0], -1)
    if r.shape[1] < 4:
        raise PostprocessError(
            f"regressors: expected at least 4 values per anchor, got {r.shape[1]}"
        )
    x_scale, y_scale, w_scale, h_scale = box_scale
    ax, ay, aw, ah = anchors[:, 0], anchors[:, 1], anchors[:, 2], anchors[:, 3]
    cx = r[:, 0] / x_scale * aw + ax
    cy = r[:, 1] / y_scale * ah + ay
    half_w = r[:, 2] / w_scale * aw / 2
    half_h = r[:, 3] / h_scale * ah / 2
    return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)


def _round(value: Any) -> float:
    return round(float(value), _SCORE_DIGITS)


def _output(outputs: Sequence[npt.NDArray[Any]], index: int, what: str) -> npt.NDArray[Any]:
    if index >= len(outputs):
        raise PostprocessError(
            f"postprocess.{what}: expected an output index below {len(outputs)}, got {index}"
        )
    return outputs[index]


def classification_payload(
    outputs: Sequence[npt.NDArray[Any]], spec: ClassificationPostprocess
) -> ClassificationPayload:
    """Top-k classes of ``outputs[spec.output]``, flattened."""
    return ClassificationPlan(spec)(outputs)


#: score vectors up to this length are ranked in plain Python (cheaper than numpy's call overhead)
_SMALL_VECTOR = 64


class ClassificationPlan:
    """A compiled classification postprocess: ``plan(outputs)`` -> the top-k payload.

    Labels are resolved once per score-vector length. Ranking uses the scores themselves
    (softmax is monotonic), the top k only (``argpartition`` for long vectors), and softmax
    probabilities are computed for the reported classes only, from the sum over all of them.
    Ties keep the lower index first, as :func:`top_k`.
    """

    def __init__(self, spec: ClassificationPostprocess) -> None:
        self.output = spec.output
        self.k = spec.top_k
        self.softmax = spec.softmax
        self.labels = spec.labels
        self._names: tuple[str, ...] = ()

    def _names_for(self, size: int) -> tuple[str, ...]:
        if len(self._names) != size:
            self._names = tuple(_label(self.labels, i) for i in range(size))
        return self._names

    def __call__(self, outputs: Sequence[npt.NDArray[Any]]) -> ClassificationPayload:
        """The payload for one inference's outputs; raises :class:`PostprocessError`."""
        raw = _output(outputs, self.output, "output")
        flat = raw.ravel() if raw.dtype == np.float32 else np.asarray(raw, np.float32).ravel()
        size = flat.size
        if size == 0:
            raise PostprocessError(
                "classification: expected a non-empty score vector, got 0 values"
            )
        if size <= _SMALL_VECTOR:
            values: list[float] = flat.tolist()
            if math.isfinite(sum(values)):  # no NaN or inf: Python's sort and exp are exact here
                return self._small(values)
        return self._large(flat)

    def _small(self, values: list[float]) -> ClassificationPayload:
        names = self._names_for(len(values))
        k = self.k
        if k == 1:
            best = max(values)
            order = [values.index(best)]
        else:  # stable: equal scores keep the lower index first
            order = sorted(range(len(values)), key=values.__getitem__, reverse=True)[:k]
        if self.softmax:
            peak = max(values)
            total = math.fsum([math.exp(v - peak) for v in values])
            # through float32, as the full softmax vector would be
            probabilities = array.array("f", [math.exp(values[i] - peak) / total for i in order])
            scores = [round(p, _SCORE_DIGITS) for p in probabilities.tolist()]
        else:
            scores = [round(values[i], _SCORE_DIGITS) for i in order]
        return {
            "top": [
                {"index": i, "label": names[i], "score": score}
                for i, score in zip(order, scores, strict=True)
            ]
        }

    def _large(self, flat: FloatArray) -> ClassificationPayload:
        names = self._names_for(flat.size)
        k = min(self.k, flat.size)
        negated = -flat
        kth = np.partition(negated, k - 1)[k - 1]
        if np.isnan(kth):
            order = np.argsort(negated, kind="stable")[:k]
        else:  # every score tied with the k-th one, in index order, then the best k of them
            candidates = np.flatnonzero(negated <= kth)
            order = candidates[np.argsort(negated[candidates], kind="stable")[:k]]
        reported = flat[order]
        if self.softmax:
            x = flat.astype(np.float64)
            peak = x.max()
            total = np.exp(x - peak).sum()
            reported = (np.exp(reported.astype(np.float64) - peak) / total).astype(np.float32)
        return {
            "top": [
                {"index": int(i), "label": names[int(i)], "score": _round(score)}
                for i, score in zip(order.tolist(), reported, strict=True)
            ]
        }


def _detections(
    boxes_input_px: npt.NDArray[Any],
    scores: npt.NDArray[Any],
    classes: npt.NDArray[Any],
    labels: Sequence[str],
    geometry: FrameGeometry,
) -> DetectionPayload:
    source = geometry.boxes_to_source(boxes_input_px)
    return {
        "detections": [
            {
                "box": [round(float(v), 1) for v in box],
                "score": _round(score),
                "label": _label(labels, int(cls)),
            }
            for box, score, cls in zip(source, scores, classes, strict=True)
        ]
    }


def _to_input_pixels(boxes: npt.NDArray[Any], geometry: FrameGeometry) -> npt.NDArray[Any]:
    in_w, in_h = geometry.input_size
    return boxes * np.asarray([in_w, in_h, in_w, in_h], dtype=np.float32)


def detection_payload(
    outputs: Sequence[npt.NDArray[Any]],
    spec: DetectionPostprocess,
    geometry: FrameGeometry | None,
    anchors: npt.NDArray[np.float32] | None = None,
) -> DetectionPayload:
    """Detections in source pixels, best first; ``anchors`` are needed for ``ssd_anchors``."""
    if geometry is None:
        raise PostprocessError("detection: expected an image sample with frame geometry, got none")
    if spec.layout == "boxes_classes_scores_count":
        return _ssd_op_payload(outputs, spec, geometry)
    if anchors is None:
        raise PostprocessError("detection: expected SSD anchors for layout 'ssd_anchors'")
    raw_boxes = _output(outputs, spec.regressors_output, "regressors_output")
    raw_scores = np.asarray(_output(outputs, spec.scores_output, "scores_output"), np.float32)
    count = anchors.shape[0]
    if raw_boxes.size % count or raw_scores.size % count:
        raise PostprocessError(
            f"detection: expected outputs with a multiple of {count} anchors, got shapes "
            f"{tuple(raw_boxes.shape)} and {tuple(raw_scores.shape)}"
        )
    per_class = raw_scores.reshape(count, -1)
    if spec.sigmoid_scores:
        per_class = sigmoid(per_class, spec.score_clip)
    classes = per_class.argmax(axis=1)
    scores = per_class[np.arange(count), classes]
    candidates = np.flatnonzero(scores >= spec.score_threshold)
    regressors = np.asarray(raw_boxes, dtype=np.float32).reshape(count, -1)
    boxes = decode_ssd_boxes(regressors[candidates], anchors[candidates], spec.box_scale)
    boxes = _to_input_pixels(boxes, geometry)
    keep = non_max_suppression(boxes, scores[candidates], spec.iou_threshold, spec.max_detections)
    return _detections(
        boxes[keep], scores[candidates][keep], classes[candidates][keep], spec.labels, geometry
    )


def _ssd_op_payload(
    outputs: Sequence[npt.NDArray[Any]], spec: DetectionPostprocess, geometry: FrameGeometry
) -> DetectionPayload:
    if len(outputs) < 4:
        raise PostprocessError(
            f"detection: expected 4 outputs (boxes, classes, scores, count), got {len(outputs)}"
        )
    boxes = np.asarray(outputs[0], dtype=np.float32)
    classes = np.asarray(outputs[1], dtype=np.float32).ravel()
    scores = np.asarray(outputs[2], dtype=np.float32).ravel()
    if boxes.size != 4 * scores.size or classes.size != scores.size:
        raise PostprocessError(
            "detection: expected boxes [1, N, 4], classes [1, N], scores [1, N], got shapes "
            f"{tuple(outputs[0].shape)}, {tuple(outputs[1].shape)}, {tuple(outputs[2].shape)}"
        )
    count = int(np.asarray(outputs[3]).ravel()[0]) if np.asarray(outputs[3]).size else 0
    count = max(0, min(count, scores.size))
    yxyx = boxes.reshape(-1, 4)[:count]
    xyxy = yxyx[:, [1, 0, 3, 2]]
    scores, classes = scores[:count], classes[:count]
    order = np.argsort(-scores, kind="stable")
    order = order[scores[order] >= spec.score_threshold][: spec.max_detections]
    return _detections(
        _to_input_pixels(xyxy[order], geometry),
        scores[order],
        classes[order],
        spec.labels,
        geometry,
    )


def anomaly_payload(
    outputs: Sequence[npt.NDArray[Any]], spec: AnomalyPostprocess
) -> AnomalyPayload:
    """One score from ``outputs[spec.output]`` and whether it is above the threshold."""
    values = np.asarray(_output(outputs, spec.output, "output"), dtype=np.float64).ravel()
    if values.size == 0 or (spec.reduce == "value" and values.size != 1):
        raise PostprocessError(
            f"anomaly: reduce '{spec.reduce}' expected "
            f"{'exactly one value' if spec.reduce == 'value' else 'values'}, got {values.size}"
        )
    score = float(values.max() if spec.reduce == "max" else values.mean())
    return {"score": _round(score), "anomaly": score > spec.threshold}


def raw_payload(outputs: Sequence[npt.NDArray[Any]], names: Sequence[str]) -> RawPayload:
    """Every output flattened to at most :data:`RAW_MAX_VALUES` values, with its name and shape."""
    items: list[RawOutput] = []
    for i, out in enumerate(outputs):
        arr = np.asarray(out)
        flat = arr.ravel()
        items.append(
            {
                "name": names[i] if i < len(names) else f"output{i}",
                "shape": [int(d) for d in arr.shape],
                "data": flat[:RAW_MAX_VALUES].tolist(),
                "truncated": flat.size > RAW_MAX_VALUES,
            }
        )
    return {"outputs": items}
