"""The Predictor: one model and its card, turning a frame or sensor window into a result payload.

``Predictor(model, card)`` compiles the card's preprocessing against the model's input tensor
once (sizes, channels and constants are checked at construction, not per frame), then
``predictor(sample)`` runs preprocess -> infer -> postprocess and returns a JSON-ready payload
(see :mod:`agent.pipeline.results`).

A model without a card still runs: :func:`derive_card` reads input tensor 0 (4-D -> image, NHWC
or NCHW from where the 1- or 3-channel dimension is; 3-D ``(1, T, C)`` -> sensor window) and
reports raw outputs; :class:`PreprocessOverrides` (the bring-your-own-model CLI flags) adjust
what was derived, or a card's own preprocessing.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, cast

import numpy as np
import numpy.typing as npt

from agent.modelcard import (
    AnomalyPostprocess,
    ClassificationPostprocess,
    DetectionPostprocess,
    ImagePreprocess,
    ModelCard,
    ModelCardError,
    Preprocess,
    RawPostprocess,
    SensorPreprocess,
    TensorInfo,
)
from agent.pipeline.anchors import generate_ssd_anchors
from agent.pipeline.postprocess import (
    ClassificationPlan,
    anomaly_payload,
    detection_payload,
    raw_payload,
)
from agent.pipeline.preprocess import FrameGeometry, ImagePlan, SensorPlan, plan_image, plan_sensor
from agent.pipeline.results import PredictorError, PreprocessError
from agent.runtime.base import Model, TensorSpec

__all__ = [
    "FrameGeometry",
    "Predictor",
    "Prepared",
    "PreprocessOverrides",
    "derive_card",
]

logger = logging.getLogger(__name__)

_TENSOR_DTYPES = ("float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool")
_IMAGE_ONLY = ("size", "color", "scale", "interpolation", "letterbox")


class Prepared(NamedTuple):
    """A preprocessed sample: the tensors for :meth:`Model.run` and how to map boxes back.

    A named tuple: built once per frame, so it is kept as cheap as possible.
    """

    tensors: list[npt.NDArray[Any]]
    geometry: FrameGeometry | None  # None for sensor windows


@dataclass(frozen=True)
class PreprocessOverrides:
    """Bring-your-own-model flags; each one set replaces the card's or the derived value."""

    size: tuple[int, int] | None = None  # (width, height)
    color: Literal["RGB", "BGR", "GRAY"] | None = None
    layout: Literal["NHWC", "NCHW", "NTC", "NCT"] | None = None
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: Literal["nearest", "linear", "area", "cubic"] | None = None
    letterbox: bool | None = None

    def apply(self, spec: Preprocess) -> Preprocess:
        """``spec`` with every set override replacing its value; raises :class:`PreprocessError`."""
        changes = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if isinstance(spec, SensorPreprocess):
            image_only = sorted(k for k in changes if k in _IMAGE_ONLY)
            if image_only:
                raise PreprocessError(
                    f"override {image_only[0]!r}: expected only mean, std or layout for a "
                    "sensor model"
                )
        try:
            changed = dataclasses.replace(spec, **changes)
            # Re-validate through the strict loader: overrides get the card's checks and messages.
            return _validated_preprocess(changed)
        except ModelCardError as exc:
            raise PreprocessError(f"override: {exc}") from exc


def _validated_preprocess(spec: Preprocess) -> Preprocess:
    probe = ModelCard(name="probe", version="0", format="onnx", preprocess=spec)
    loaded = ModelCard.from_dict(probe.to_dict()).preprocess
    return spec if loaded is None else loaded


def _derive_preprocess(tensor: TensorSpec, overrides: PreprocessOverrides) -> Preprocess:
    shape = tensor.shape
    if len(shape) == 3:
        layout = overrides.layout or "NTC"
        window, channels = (shape[1], shape[2]) if layout == "NTC" else (shape[2], shape[1])
        if window < 1 or channels < 1:
            raise PreprocessError(
                f"input '{tensor.name}': expected a static (1, T, C) shape, got {shape}"
            )
        return SensorPreprocess(
            channels=tuple(f"c{i}" for i in range(channels)),
            window=window,
            hop=window,
            layout="NCT" if layout == "NCT" else "NTC",
        )
    if len(shape) != 4:
        raise PreprocessError(
            f"input '{tensor.name}': expected a 4-D image or 3-D (1, T, C) sensor tensor to "
            f"derive preprocessing from, got shape {shape}"
        )
    image_layout: Literal["NHWC", "NCHW"]
    if overrides.layout == "NHWC" or (overrides.layout is None and shape[3] in (1, 3)):
        image_layout = "NHWC"
    elif overrides.layout == "NCHW" or (overrides.layout is None and shape[1] in (1, 3)):
        image_layout = "NCHW"
    else:
        raise PreprocessError(
            f"input '{tensor.name}': expected 1 or 3 channels in dim 1 (NCHW) or dim 3 (NHWC), "
            f"got shape {shape}; pass the layout explicitly"
        )
    channels = shape[3] if image_layout == "NHWC" else shape[1]
    dtype = np.dtype(tensor.dtype)
    return ImagePreprocess(
        color="GRAY" if channels == 1 else "RGB",
        layout=image_layout,
        scale=1.0 if dtype == np.uint8 else 1.0 / 255.0,
    )


def _tensor_infos(specs: tuple[TensorSpec, ...]) -> tuple[TensorInfo, ...]:
    infos = []
    for spec in specs:
        dtype = np.dtype(spec.dtype).name
        if dtype not in _TENSOR_DTYPES:
            return ()
        infos.append(
            TensorInfo(
                name=spec.name,
                shape=spec.shape,
                dtype=dtype,  # type: ignore[arg-type]  # checked against the Literal above
                scale=spec.scale,
                zero_point=spec.zero_point,
            )
        )
    return tuple(infos)


def derive_card(
    model: Model, *, name: str = "model", overrides: PreprocessOverrides | None = None
) -> ModelCard:
    """A card for a model that came without one: preprocessing from input 0, raw outputs.

    Raises:
        PredictorError: the model has no input, or its input shape says nothing usable.
    """
    if not model.inputs:
        raise PredictorError("model: expected at least one input tensor, got none")
    overrides = overrides or PreprocessOverrides()
    preprocess = overrides.apply(_derive_preprocess(model.inputs[0], overrides))
    fmt = model.format if model.format in ("tflite", "onnx") else "onnx"
    return ModelCard(
        name=name,
        version="0",
        format=fmt,  # type: ignore[arg-type]  # narrowed to the Literal just above
        description="derived from the model's input tensor",
        preprocess=preprocess,
        postprocess=RawPostprocess(),
        inputs=_tensor_infos(model.inputs),
        outputs=_tensor_infos(model.outputs),
    )


class Predictor:
    """Runs one model with its card. Not thread-safe: one worker owns it (like the model)."""

    def __init__(
        self,
        model: Model,
        card: ModelCard | None = None,
        *,
        overrides: PreprocessOverrides | None = None,
    ) -> None:
        """Compile the card against the model; raises :class:`PredictorError` on a mismatch.

        ``card`` is kept as given, except that a missing preprocess is derived from the model
        and ``overrides`` are applied to it, so ``self.card.preprocess`` is what runs.
        """
        self.model = model
        if card is None:
            card = derive_card(model, overrides=overrides)
        elif card.preprocess is None:
            derived = _derive_preprocess(self._input(model), overrides or PreprocessOverrides())
            card = dataclasses.replace(
                card, preprocess=(overrides or PreprocessOverrides()).apply(derived)
            )
        elif overrides is not None:
            card = dataclasses.replace(card, preprocess=overrides.apply(card.preprocess))
        self.card = card
        tensor = self._input(model)
        self._plan: ImagePlan | SensorPlan
        if isinstance(card.preprocess, ImagePreprocess):
            self._plan = plan_image(card.preprocess, tensor)
        elif isinstance(card.preprocess, SensorPreprocess):
            self._plan = plan_sensor(card.preprocess, tensor)
        else:  # every branch above set a preprocess; kept for the type checker
            raise PredictorError("preprocess: expected an image or sensor spec, got none")
        self._anchors: npt.NDArray[np.float32] | None = None
        post = card.postprocess
        if isinstance(post, DetectionPostprocess):
            if isinstance(card.preprocess, SensorPreprocess):
                raise PredictorError("postprocess: detection expected image preprocessing")
            if post.layout == "ssd_anchors" and post.anchors is not None:
                self._anchors = generate_ssd_anchors(post.anchors)
        self._check_output_indexes()
        self._classify = (
            ClassificationPlan(post) if isinstance(post, ClassificationPostprocess) else None
        )
        self._image_plan = self._plan if isinstance(self._plan, ImagePlan) else None
        self._sensor_plan = self._plan if isinstance(self._plan, SensorPlan) else None
        logger.debug(
            "predictor for %s %s: %s preprocess (%s input), %s postprocess",
            card.name,
            card.version,
            card.preprocess.kind,
            getattr(self._plan, "mode", "float"),
            post.kind,
        )

    @staticmethod
    def _input(model: Model) -> TensorSpec:
        if len(model.inputs) != 1:
            raise PredictorError(
                f"model: expected exactly one input tensor, got {len(model.inputs)}"
            )
        return model.inputs[0]

    def _check_output_indexes(self) -> None:
        post = self.card.postprocess
        count = len(self.model.outputs)
        wanted: dict[str, int] = {}
        if isinstance(post, (ClassificationPostprocess, AnomalyPostprocess)):
            wanted["output"] = post.output
        elif isinstance(post, DetectionPostprocess):
            if post.layout == "ssd_anchors":
                wanted["regressors_output"] = post.regressors_output
                wanted["scores_output"] = post.scores_output
            elif count < 4:
                raise PredictorError(
                    "postprocess.layout: boxes_classes_scores_count expected 4 outputs, "
                    f"the model has {count}"
                )
        for key, index in wanted.items():
            if index >= count:
                raise PredictorError(
                    f"postprocess.{key}: expected an output index below {count}, got {index}"
                )

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(width, height) frames are resized to, or None for a sensor model."""
        return self._plan.size if isinstance(self._plan, ImagePlan) else None

    def preprocess(self, sample: npt.NDArray[Any]) -> Prepared:
        """Image: HxWx3 uint8 BGR or HxW gray; sensor: ``(window, channels)`` float32."""
        if self._image_plan is not None:
            tensor, geometry = self._image_plan.apply(sample)
            return Prepared([tensor], geometry)
        assert self._sensor_plan is not None  # the constructor set one of the two plans
        return Prepared([self._sensor_plan.apply(np.asarray(sample))], None)

    def infer(self, prepared: Prepared) -> list[npt.NDArray[Any]]:
        """Run the model on prepared tensors; runtime errors pass through unchanged."""
        return self.model.run(prepared.tensors)

    def postprocess(self, outputs: list[npt.NDArray[Any]], prepared: Prepared) -> dict[str, Any]:
        """Turn outputs into the card's JSON-ready payload."""
        if self._classify is not None:
            return cast("dict[str, Any]", self._classify(outputs))  # a fresh dict per call
        post = self.card.postprocess
        payload: Any
        if isinstance(post, DetectionPostprocess):
            payload = detection_payload(outputs, post, prepared.geometry, self._anchors)
        elif isinstance(post, AnomalyPostprocess):
            payload = anomaly_payload(outputs, post)
        else:
            payload = raw_payload(outputs, [spec.name for spec in self.model.outputs])
        result: dict[str, Any] = dict(payload)
        return result

    def __call__(self, sample: npt.NDArray[Any]) -> dict[str, Any]:
        """Preprocess, infer and postprocess one sample."""
        prepared = self.preprocess(sample)
        return self.postprocess(self.infer(prepared), prepared)
