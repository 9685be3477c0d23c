"""The model card: what a model is, and its pre- and post-processing, as validated data.

A card travels inside signed TUF metadata (the ``custom`` field of an image-repository target),
so it is pure data: strict, versioned, unknown keys rejected, sizes bounded. Both the device
(runtime, pipeline, updater) and the controller (packing, inspection) use this one module.

Conventions:
    * Image sizes are ``(width, height)``; boxes are ``[x1, y1, x2, y2]``.
    * Image normalisation is ``(pixel * scale - mean[c]) / std[c]`` per channel, in the colour
      order the card names, before the runtime quantizes float input for quantized tensors.
    * Self-test inputs are model-input tensors (after preprocessing), as float values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.schema import SchemaError, dump, field_meta, load

__all__ = [
    "CARD_SCHEMA_VERSION",
    "MAX_CARD_BYTES",
    "AnomalyPostprocess",
    "ClassificationPostprocess",
    "DetectionPostprocess",
    "ImagePreprocess",
    "ModelCard",
    "ModelCardError",
    "Postprocess",
    "Preprocess",
    "RawPostprocess",
    "SelfTestVector",
    "SensorPreprocess",
    "SsdAnchors",
    "TensorInfo",
    "card_from_json",
    "card_to_json",
]

CARD_SCHEMA_VERSION = 1
MAX_CARD_BYTES = 256 * 1024
MAX_LABELS = 1000
MAX_DIM = 8192

ModelFormat = Literal["tflite", "onnx"]


class ModelCardError(SchemaError):
    """A model card is malformed; the message names the key, the value and what was expected."""


@dataclass(frozen=True)
class ImagePreprocess:
    """Camera/video frame to input tensor."""

    kind: Literal["image"] = "image"
    size: tuple[int, int] | None = field(
        default=None,
        metadata=field_meta(
            "(width, height) to resize to; default: the input tensor's", min=1, max=MAX_DIM
        ),
    )
    interpolation: Literal["nearest", "linear", "area", "cubic"] = field(
        default="linear", metadata=field_meta("resize interpolation")
    )
    letterbox: bool = field(
        default=False, metadata=field_meta("keep aspect ratio and pad instead of stretching")
    )
    pad_value: int = field(
        default=0, metadata=field_meta("letterbox padding value", min=0, max=255)
    )
    color: Literal["RGB", "BGR", "GRAY"] = field(
        default="RGB", metadata=field_meta("channel order the model expects")
    )
    layout: Literal["NHWC", "NCHW"] = field(default="NHWC", metadata=field_meta("tensor layout"))
    scale: float = field(default=1.0, metadata=field_meta("multiplier applied to pixel values"))
    mean: tuple[float, ...] = field(
        default=(0.0,),
        metadata=field_meta("per-channel mean (one value = all)", min_len=1, max_len=4),
    )
    std: tuple[float, ...] = field(
        default=(1.0,),
        metadata=field_meta("per-channel std (one value = all)", min_len=1, max_len=4),
    )

    def __post_init__(self) -> None:
        if any(s == 0 for s in self.std):
            raise ModelCardError("preprocess.std: expected non-zero values, got 0")


@dataclass(frozen=True)
class SensorPreprocess:
    """Sensor readings to input tensor: a sliding window over named channels."""

    kind: Literal["sensor"] = "sensor"
    channels: tuple[str, ...] = field(
        default=(),
        metadata=field_meta("reading keys/columns, in tensor order", min_len=1, max_len=64),
    )
    window: int = field(default=1, metadata=field_meta("samples per window", min=1, max=65536))
    hop: int = field(default=1, metadata=field_meta("samples between windows", min=1, max=65536))
    layout: Literal["NTC", "NCT"] = field(
        default="NTC", metadata=field_meta("NTC = (1, window, channels); NCT transposed")
    )
    mean: tuple[float, ...] = field(
        default=(0.0,),
        metadata=field_meta("per-channel mean (one value = all)", min_len=1, max_len=64),
    )
    std: tuple[float, ...] = field(
        default=(1.0,),
        metadata=field_meta("per-channel std (one value = all)", min_len=1, max_len=64),
    )

    def __post_init__(self) -> None:
        if any(s == 0 for s in self.std):
            raise ModelCardError("preprocess.std: expected non-zero values, got 0")


Preprocess = ImagePreprocess | SensorPreprocess


@dataclass(frozen=True)
class ClassificationPostprocess:
    """Top-k over one score vector."""

    kind: Literal["classification"] = "classification"
    output: int = field(default=0, metadata=field_meta("output tensor index", min=0, max=64))
    top_k: int = field(default=1, metadata=field_meta("how many classes to report", min=1, max=100))
    labels: tuple[str, ...] = field(
        default=(), metadata=field_meta("class labels by index", max_len=MAX_LABELS)
    )
    softmax: bool = field(default=False, metadata=field_meta("apply softmax to the scores"))


@dataclass(frozen=True)
class SsdAnchors:
    """SSD anchor generation (MediaPipe SsdAnchorsCalculator options, as BlazeFace uses)."""

    input_size: tuple[int, int] = field(metadata=field_meta("(width, height)", min=1, max=MAX_DIM))
    strides: tuple[int, ...] = field(
        metadata=field_meta("feature map strides", min=1, max=1024, min_len=1, max_len=16)
    )
    min_scale: float = 0.1484375
    max_scale: float = 0.75
    anchor_offset: tuple[float, float] = (0.5, 0.5)
    aspect_ratios: tuple[float, ...] = field(
        default=(1.0,), metadata=field_meta("aspect ratios per location", min_len=1, max_len=8)
    )
    interpolated_scale_aspect_ratio: float = 1.0
    fixed_anchor_size: bool = True
    reduce_boxes_in_lowest_layer: bool = False


@dataclass(frozen=True)
class DetectionPostprocess:
    """Boxes from SSD-anchor regressors (BlazeFace) or a boxes/classes/scores/count model."""

    kind: Literal["detection"] = "detection"
    layout: Literal["ssd_anchors", "boxes_classes_scores_count"] = "ssd_anchors"
    anchors: SsdAnchors | None = None
    box_scale: tuple[float, float, float, float] = field(
        default=(128.0, 128.0, 128.0, 128.0),
        metadata=field_meta("x, y, w, h scales of the regressor outputs (ssd_anchors)"),
    )
    regressors_output: int = field(
        default=0, metadata=field_meta("regressor tensor index", min=0, max=64)
    )
    scores_output: int = field(default=1, metadata=field_meta("score tensor index", min=0, max=64))
    sigmoid_scores: bool = True
    score_clip: float = field(default=100.0, metadata=field_meta("clip logits to +-this", min=0))
    score_threshold: float = field(default=0.5, metadata=field_meta("minimum score", min=0, max=1))
    iou_threshold: float = field(
        default=0.3, metadata=field_meta("NMS IoU threshold", min=0, max=1)
    )
    max_detections: int = field(
        default=100, metadata=field_meta("upper bound on results", min=1, max=1000)
    )
    labels: tuple[str, ...] = field(
        default=(), metadata=field_meta("labels by class index", max_len=MAX_LABELS)
    )

    def __post_init__(self) -> None:
        if self.layout == "ssd_anchors" and self.anchors is None:
            raise ModelCardError("postprocess.anchors: required when layout is 'ssd_anchors'")


@dataclass(frozen=True)
class AnomalyPostprocess:
    """A scalar anomaly score compared with a threshold (sensor models)."""

    kind: Literal["anomaly"] = "anomaly"
    output: int = field(default=0, metadata=field_meta("output tensor index", min=0, max=64))
    reduce: Literal["value", "mean", "max"] = field(
        default="value", metadata=field_meta("how the output tensor becomes one score")
    )
    threshold: float = field(default=0.5, metadata=field_meta("score above which it is anomalous"))


@dataclass(frozen=True)
class RawPostprocess:
    """Output tensors as they are (dequantized)."""

    kind: Literal["raw"] = "raw"


Postprocess = ClassificationPostprocess | DetectionPostprocess | AnomalyPostprocess | RawPostprocess


@dataclass(frozen=True)
class TensorInfo:
    """Informational copy of a tensor's spec, as measured when the card was made."""

    name: str = field(metadata=field_meta("tensor name", max_len=256))
    shape: tuple[int, ...] = field(
        metadata=field_meta("shape; -1 for dynamic", min=-1, max=1 << 24, max_len=8)
    )
    dtype: Literal["float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool"]
    scale: float = field(default=0.0, metadata=field_meta("quantization scale; 0 = none"))
    zero_point: int = field(default=0, metadata=field_meta("quantization zero point"))


@dataclass(frozen=True)
class SelfTestVector:
    """One input and the expected output, run against a loaded model before activation."""

    name: str = field(default="vector", metadata=field_meta("what this vector checks", max_len=128))
    input: tuple[float, ...] = field(
        default=(), metadata=field_meta("flattened float input tensor", max_len=65536)
    )
    input_seed: int | None = field(
        default=None,
        metadata=field_meta("instead of input: uniform noise in input_range from this seed", min=0),
    )
    input_range: tuple[float, float] = (0.0, 1.0)
    output: int = field(default=0, metadata=field_meta("output tensor index", min=0, max=64))
    expected: tuple[float, ...] = field(
        default=(),
        metadata=field_meta("first values of the flattened dequantized output", max_len=65536),
    )
    atol: float = field(default=1e-3, metadata=field_meta("absolute tolerance", min=0))
    expected_argmax: int | None = field(
        default=None, metadata=field_meta("expected argmax of the output", min=0)
    )

    def __post_init__(self) -> None:
        if bool(self.input) == (self.input_seed is not None):
            raise ModelCardError("selftest: expected exactly one of 'input' or 'input_seed'")
        if not self.expected and self.expected_argmax is None:
            raise ModelCardError("selftest: expected 'expected' values or 'expected_argmax'")


@dataclass(frozen=True)
class ModelCard:
    """Everything the device needs to run a model besides its bytes."""

    name: str = field(metadata=field_meta("model name", min_len=1, max_len=128))
    version: str = field(metadata=field_meta("model version", min_len=1, max_len=64))
    format: ModelFormat
    schema_version: Literal[1] = 1
    description: str = field(default="", metadata=field_meta("free text", max_len=2048))
    license: str = field(default="", metadata=field_meta("license of the weights", max_len=256))
    preprocess: Preprocess | None = None
    postprocess: Postprocess = field(default_factory=RawPostprocess)
    inputs: tuple[TensorInfo, ...] = field(
        default=(), metadata=field_meta("input tensors", max_len=16)
    )
    outputs: tuple[TensorInfo, ...] = field(
        default=(), metadata=field_meta("output tensors", max_len=16)
    )
    quantization: str = field(default="", metadata=field_meta("e.g. int8-static-qdq", max_len=128))
    sha256: str = field(
        default="", metadata=field_meta("sha256 of the plaintext model", max_len=64)
    )
    size: int = field(default=0, metadata=field_meta("plaintext size in bytes", min=0))
    metrics: dict[str, float] = field(
        default_factory=dict, metadata=field_meta("measured metrics, e.g. accuracy", max_len=64)
    )
    selftest: tuple[SelfTestVector, ...] = field(
        default=(), metadata=field_meta("vectors run before activation", max_len=16)
    )

    @classmethod
    def from_dict(cls, data: Any) -> ModelCard:
        """Validate parsed JSON; raises :class:`ModelCardError`."""
        try:
            return load(cls, data, path="card")
        except ModelCardError:
            raise
        except SchemaError as exc:
            raise ModelCardError(str(exc)) from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible data (what travels in signed metadata)."""
        out: dict[str, Any] = dump(self)
        return out


def card_from_json(text: str | bytes) -> ModelCard:
    """Parse and validate a card from JSON text, bounded to :data:`MAX_CARD_BYTES`."""
    if len(text) > MAX_CARD_BYTES:
        raise ModelCardError(f"card: expected at most {MAX_CARD_BYTES} bytes, got {len(text)}")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelCardError(f"card: expected JSON, got a parse error ({exc})") from exc
    return ModelCard.from_dict(data)


def card_to_json(card: ModelCard) -> str:
    """Canonical, human-readable JSON for a card."""
    return json.dumps(card.to_dict(), indent=2, sort_keys=True) + "\n"
