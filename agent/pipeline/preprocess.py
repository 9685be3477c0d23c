"""Camera frames and sensor windows to input tensors, as the model card describes them.

A spec from the card is compiled once against the model's input tensor into a plan
(:func:`plan_image`, :func:`plan_sensor`) that validates sizes, channels and constants up front;
applying a plan to a sample is then a short, allocation-light hot path:

* image: resize (or letterbox) with cv2, colour conversion from OpenCV's BGR, normalisation
  ``(x * scale - mean[c]) / std[c]`` folded into one multiply-add ``x * a[c] + b[c]`` in float32,
  layout (NHWC/NCHW) and batch dimension. When the input tensor is uint8/int8 and the
  normalisation followed by the runtime's quantization is the identity (or a shift by 128), the
  pixels go in as integers and the float pass is skipped.
* sensor: ``(window, channels)`` float32 per-channel normalisation to ``(1, T, C)`` or
  ``(1, C, T)``; no cv2 needed.

cv2 is an optional dependency (the ``camera`` extra), imported inside the functions that use it.
:class:`FrameGeometry` records how model-input pixels map back to source pixels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from agent.modelcard import ImagePreprocess, SensorPreprocess
from agent.pipeline.results import PreprocessError
from agent.runtime.base import TensorSpec

__all__ = [
    "FrameGeometry",
    "ImagePlan",
    "SensorPlan",
    "convert_color",
    "letterbox_geometry",
    "normalisation_constants",
    "plan_image",
    "plan_sensor",
    "resize_frame",
]

FloatArray = npt.NDArray[np.float32]
Interpolation = Literal["nearest", "linear", "area", "cubic"]
# How the normalised pixels reach the tensor: float32 (the runtime quantizes if needed), the uint8
# pixels unchanged, the pixels shifted by -128 into int8, or rounded into a plain integer tensor.
InputMode = Literal["float", "uint8", "int8_shift", "integer"]

_IDENTITY_TOLERANCE = 1e-6


@dataclass(frozen=True)
class FrameGeometry:
    """How model-input pixel coordinates map back to source-frame pixels.

    ``input = source * scale + offset`` per axis; a stretch resize has zero offset and a scale per
    axis, a letterbox has (nearly) equal scales and the centring padding as offset.
    """

    source_size: tuple[int, int]  # (width, height) of the original frame
    input_size: tuple[int, int]  # (width, height) of the model input
    scale: tuple[float, float] = (1.0, 1.0)  # (x, y) source-to-input scale of the content
    offset: tuple[float, float] = (0.0, 0.0)  # (x, y) padding before the content, input pixels

    def boxes_to_source(
        self, boxes: npt.ArrayLike, *, clip: bool = True
    ) -> npt.NDArray[np.float64]:
        """Map ``(N, 4)`` ``[x1, y1, x2, y2]`` boxes in input pixels to source pixels."""
        out = np.array(boxes, dtype=np.float64).reshape(-1, 4)
        out[:, 0::2] = (out[:, 0::2] - self.offset[0]) / self.scale[0]
        out[:, 1::2] = (out[:, 1::2] - self.offset[1]) / self.scale[1]
        if clip:
            np.clip(out[:, 0::2], 0.0, self.source_size[0], out=out[:, 0::2])
            np.clip(out[:, 1::2], 0.0, self.source_size[1], out=out[:, 1::2])
        return out

    def boxes_to_input(self, boxes: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map ``(N, 4)`` boxes in source pixels to input pixels (the inverse mapping)."""
        out = np.array(boxes, dtype=np.float64).reshape(-1, 4)
        out[:, 0::2] = out[:, 0::2] * self.scale[0] + self.offset[0]
        out[:, 1::2] = out[:, 1::2] * self.scale[1] + self.offset[1]
        return out


def letterbox_geometry(
    source_size: tuple[int, int], input_size: tuple[int, int], *, letterbox: bool
) -> tuple[FrameGeometry, tuple[int, int]]:
    """Geometry of a stretch or letterbox resize, and the size the content is resized to.

    The recorded scale is the content's actual size over the source size per axis (what
    cv2.resize does), so mapping boxes back is exact even when rounding made the axes differ.
    """
    src_w, src_h = source_size
    in_w, in_h = input_size
    if not letterbox:
        return FrameGeometry(source_size, input_size, (in_w / src_w, in_h / src_h)), input_size
    ratio = min(in_w / src_w, in_h / src_h)
    new_w = min(in_w, max(1, round(src_w * ratio)))
    new_h = min(in_h, max(1, round(src_h * ratio)))
    pad_x, pad_y = (in_w - new_w) // 2, (in_h - new_h) // 2
    geometry = FrameGeometry(
        source_size, input_size, (new_w / src_w, new_h / src_h), (float(pad_x), float(pad_y))
    )
    return geometry, (new_w, new_h)


def _cv2() -> Any:
    try:
        import cv2  # noqa: PLC0415 - optional 'camera' extra, kept off the import path
    except ImportError as exc:
        raise PreprocessError(
            "image preprocessing needs OpenCV: expected it installed "
            "(pip install 'edge-agent[camera]')"
        ) from exc
    return cv2


def resize_frame(
    frame: npt.NDArray[np.uint8],
    size: tuple[int, int],
    *,
    interpolation: Interpolation = "linear",
    letterbox: bool = False,
    pad_value: int = 0,
) -> tuple[npt.NDArray[np.uint8], FrameGeometry]:
    """Resize a frame to ``size`` (width, height), stretching or letterboxing; returns geometry."""
    cv2 = _cv2()
    src_h, src_w = frame.shape[:2]
    geometry, (new_w, new_h) = letterbox_geometry((src_w, src_h), size, letterbox=letterbox)
    flag = {
        "nearest": cv2.INTER_NEAREST,
        "linear": cv2.INTER_LINEAR,
        "area": cv2.INTER_AREA,
        "cubic": cv2.INTER_CUBIC,
    }[interpolation]
    resized = frame
    if (new_w, new_h) != (src_w, src_h):
        resized = cv2.resize(frame, (new_w, new_h), interpolation=flag)
        if frame.ndim == 3 and resized.ndim == 2:  # cv2 drops a trailing channel axis of 1
            resized = resized[:, :, None]
    if (new_w, new_h) != size:
        pad_x, pad_y = int(geometry.offset[0]), int(geometry.offset[1])
        out = np.full((size[1], size[0], *resized.shape[2:]), pad_value, dtype=np.uint8)
        out[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized
        resized = out
    return resized, geometry


def convert_color(
    image: npt.NDArray[np.uint8], target: Literal["RGB", "BGR", "GRAY"]
) -> npt.NDArray[np.uint8]:
    """Convert a BGR, BGRA or gray (HxW or HxWx1) image to ``target``; returns HxWxC."""
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels == 1:
        gray = image.reshape(image.shape[0], image.shape[1], 1)
        if target == "GRAY":
            return gray
        return np.repeat(gray, 3, axis=2)
    cv2 = _cv2()
    codes = {
        (3, "RGB"): cv2.COLOR_BGR2RGB,
        (3, "GRAY"): cv2.COLOR_BGR2GRAY,
        (4, "RGB"): cv2.COLOR_BGRA2RGB,
        (4, "BGR"): cv2.COLOR_BGRA2BGR,
        (4, "GRAY"): cv2.COLOR_BGRA2GRAY,
    }
    if channels == 3 and target == "BGR":
        return image
    code = codes.get((channels, target))
    if code is None:
        raise PreprocessError(f"frame: expected 1, 3 (BGR) or 4 (BGRA) channels, got {channels}")
    out: npt.NDArray[np.uint8] = cv2.cvtColor(image, code)
    return out if out.ndim == 3 else out[:, :, None]


def normalisation_constants(
    scale: float, mean: tuple[float, ...], std: tuple[float, ...], channels: int
) -> tuple[FloatArray, FloatArray]:
    """Fold ``(x * scale - mean[c]) / std[c]`` into ``x * a[c] + b[c]``; returns ``(a, b)``."""
    for name, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise PreprocessError(
                f"preprocess.{name}: expected 1 or {channels} values, got {len(values)}"
            )
    mean_c = np.broadcast_to(np.asarray(mean, dtype=np.float64), (channels,))
    std_c = np.broadcast_to(np.asarray(std, dtype=np.float64), (channels,))
    a = (scale / std_c).astype(np.float32)
    b = (-mean_c / std_c).astype(np.float32)
    return a, b


def _input_mode(tensor: TensorSpec, a: FloatArray, b: FloatArray) -> InputMode:
    """Pick the cheapest way to feed pixels into ``tensor`` that gives the same values."""
    dtype = np.dtype(tensor.dtype)
    if not np.issubdtype(dtype, np.integer):
        return "float"
    # The runtime quantizes float input as q = round(f / s) + z; plain integer tensors take f.
    s, z = (tensor.scale, tensor.zero_point) if tensor.quantized else (1.0, 0)
    unit_gain = bool(np.all(np.abs(a / s - 1.0) < _IDENTITY_TOLERANCE))
    shift = b / s + z
    if dtype == np.uint8 and unit_gain and np.all(np.abs(shift) < _IDENTITY_TOLERANCE):
        return "uint8"
    if dtype == np.int8 and unit_gain and np.all(np.abs(shift + 128.0) < _IDENTITY_TOLERANCE):
        return "int8_shift"
    return "float" if tensor.quantized else "integer"


def _static(dim: int) -> int | None:
    return dim if dim > 0 else None


class _Route(NamedTuple):
    """How frames of one shape are prepared: the compiled steps and the (shared) geometry."""

    steps: tuple[Callable[[npt.NDArray[np.uint8]], npt.NDArray[np.uint8]], ...]
    geometry: FrameGeometry
    finish: Callable[[npt.NDArray[np.uint8]], npt.NDArray[Any]]  # pixels -> input tensor


#: frame shapes whose route a plan keeps (a source normally has one)
_ROUTE_CACHE = 8


@dataclass(frozen=True, eq=False)
class ImagePlan:
    """A compiled image preprocessing: frame in, input tensor and geometry out.

    The steps for a frame shape (colour conversion before or after the resize, resize, padding,
    channel repeat) and its geometry are worked out on the first frame of that shape and reused:
    the per-frame path is a few cv2/numpy calls with no branching on the spec. For a GRAY input
    the colour conversion runs before the resize (a 1-channel resize is ~2-3x cheaper than a
    3-channel one); for RGB/BGR it runs after, on the smaller image.
    """

    tensor: TensorSpec
    size: tuple[int, int]
    channels: int
    color: Literal["RGB", "BGR", "GRAY"]
    layout: Literal["NHWC", "NCHW"]
    interpolation: Interpolation
    letterbox: bool
    pad_value: int
    gain: FloatArray  # a[c]
    bias: FloatArray  # b[c]
    mode: InputMode
    _routes: dict[tuple[int, ...], _Route] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def row_gain(self) -> FloatArray:
        """a[c] tiled along one NHWC row of the resized image."""
        return self._rows[0]

    @property
    def row_bias(self) -> FloatArray:
        """b[c] tiled along one NHWC row of the resized image."""
        return self._rows[1]

    @functools.cached_property
    def _rows(self) -> tuple[FloatArray, FloatArray]:
        return np.tile(self.gain, self.size[0]), np.tile(self.bias, self.size[0])

    @functools.cached_property
    def _nhwc_shape(self) -> tuple[int, int, int, int]:
        return (1, self.size[1], self.size[0], self.channels)

    def apply(self, frame: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], FrameGeometry]:
        """Preprocess one HxWx3 BGR / HxWx4 BGRA / HxW gray uint8 frame."""
        route = self._routes.get(frame.shape)
        if route is None or (frame.dtype is not _UINT8 and frame.dtype != _UINT8):
            route = self._route(frame)
        pixels = frame
        for step in route.steps:
            pixels = step(pixels)
        return route.finish(pixels), route.geometry

    def _finish(self, pixels: npt.NDArray[np.uint8]) -> npt.NDArray[Any]:
        """HxW (one channel) or HxWxC uint8 pixels at the input size -> the input tensor."""
        if self.layout == "NCHW":
            chw = pixels.reshape(self.size[1], self.size[0], self.channels).transpose(2, 0, 1)
            return self._fill(chw, self.gain[:, None, None], self.bias[:, None, None])[None]
        # NHWC: one row is W*C interleaved values; per-channel constants tiled along the row keep
        # numpy's inner loop long (broadcasting over a trailing axis of 3 is ~3x slower).
        rows = pixels.reshape(self.size[1], self.size[0] * self.channels)
        return self._fill(rows, self.row_gain, self.row_bias).reshape(self._nhwc_shape)

    def _route(self, frame: npt.NDArray[Any]) -> _Route:
        """Compile (and cache) the steps for frames shaped like ``frame``."""
        if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or min(frame.shape[:2]) < 1:
            raise PreprocessError(
                "frame: expected an HxWx3 (BGR) or HxW (gray) uint8 image, "
                f"got shape {tuple(frame.shape)} dtype {frame.dtype}"
            )
        channels = 1 if frame.ndim == 2 else frame.shape[2]
        if channels not in (1, 3, 4):
            raise PreprocessError(
                f"frame: expected 1, 3 (BGR) or 4 (BGRA) channels, got {channels}"
            )
        cv2 = _cv2()
        src_h, src_w = frame.shape[:2]
        geometry, content = letterbox_geometry((src_w, src_h), self.size, letterbox=self.letterbox)
        steps: list[Callable[[npt.NDArray[np.uint8]], npt.NDArray[np.uint8]]] = []
        if channels > 1 and self.color == "GRAY":
            code = cv2.COLOR_BGR2GRAY if channels == 3 else cv2.COLOR_BGRA2GRAY
            steps.append(functools.partial(cv2.cvtColor, code=code))
            channels = 1
        if content != (src_w, src_h):
            flag = _interpolation_flag(cv2, self.interpolation)
            steps.append(functools.partial(cv2.resize, dsize=content, interpolation=flag))
        if content != self.size:
            steps.append(functools.partial(self._pad, content=content, geometry=geometry))
        if channels == 4:
            target = cv2.COLOR_BGRA2RGB if self.color == "RGB" else cv2.COLOR_BGRA2BGR
            steps.append(functools.partial(cv2.cvtColor, code=target))
        elif channels == 3 and self.color == "RGB":
            steps.append(functools.partial(cv2.cvtColor, code=cv2.COLOR_BGR2RGB))
        elif channels == 1 and self.color != "GRAY":
            steps.append(_gray_to_three)
        finish: Callable[[npt.NDArray[np.uint8]], npt.NDArray[Any]] = self._finish
        if self.mode == "int8_shift" and self.layout == "NHWC":  # the int8 models' fast path
            finish = functools.partial(_shift_to_int8, shape=self._nhwc_shape)
        route = _Route(tuple(steps), geometry, finish)
        if len(self._routes) >= _ROUTE_CACHE:
            self._routes.clear()
        self._routes[frame.shape] = route
        return route

    def _pad(
        self,
        resized: npt.NDArray[np.uint8],
        *,
        content: tuple[int, int],
        geometry: FrameGeometry,
    ) -> npt.NDArray[np.uint8]:
        out = np.full((self.size[1], self.size[0], *resized.shape[2:]), self.pad_value, np.uint8)
        pad_x, pad_y = int(geometry.offset[0]), int(geometry.offset[1])
        out[pad_y : pad_y + content[1], pad_x : pad_x + content[0]] = resized
        return out

    def _fill(
        self, pixels: npt.NDArray[np.uint8], gain: FloatArray, bias: FloatArray
    ) -> npt.NDArray[Any]:
        mode = self.mode
        if mode == "int8_shift":
            shifted: npt.NDArray[np.uint8] = np.bitwise_xor(pixels, _SIGN_BIT, order="C")
            return shifted.view(np.int8)  # C order also for an NCHW (transposed) view
        if mode == "uint8":
            return np.array(pixels, order="C")  # a copy: never hand out the frame itself
        out = np.empty(pixels.shape, dtype=np.float32)
        np.multiply(pixels, gain, out=out)
        np.add(out, bias, out=out)
        if mode == "integer":
            info = np.iinfo(np.dtype(self.tensor.dtype).name)
            np.clip(np.rint(out, out=out), info.min, info.max, out=out)
            return out.astype(self.tensor.dtype)
        return out


_SIGN_BIT = np.uint8(0x80)
_UINT8 = np.dtype(np.uint8)


def _shift_to_int8(
    pixels: npt.NDArray[np.uint8], *, shape: tuple[int, ...]
) -> npt.NDArray[np.int8]:
    """uint8 pixels minus 128 as a new C-order int8 tensor of ``shape``."""
    shifted: npt.NDArray[np.uint8] = np.bitwise_xor(pixels, _SIGN_BIT, order="C")
    return shifted.view(np.int8).reshape(shape)


def _gray_to_three(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    return np.repeat(pixels.reshape(pixels.shape[0], pixels.shape[1], 1), 3, axis=2)


def _interpolation_flag(cv2: Any, interpolation: Interpolation) -> int:
    flags: dict[str, int] = {
        "nearest": cv2.INTER_NEAREST,
        "linear": cv2.INTER_LINEAR,
        "area": cv2.INTER_AREA,
        "cubic": cv2.INTER_CUBIC,
    }
    return flags[interpolation]


def plan_image(spec: ImagePreprocess, tensor: TensorSpec) -> ImagePlan:
    """Compile an image spec against a 4-D input tensor; raises :class:`PreprocessError`."""
    shape = tensor.shape
    if len(shape) != 4 or shape[0] not in (1, -1):
        raise PreprocessError(
            f"input '{tensor.name}': expected a 4-D image tensor with batch 1, got shape {shape}"
        )
    if spec.layout == "NHWC":
        height, width, channel_dim = shape[1], shape[2], shape[3]
    else:
        channel_dim, height, width = shape[1], shape[2], shape[3]
    channels = 1 if spec.color == "GRAY" else 3
    if _static(channel_dim) not in (None, channels):
        raise PreprocessError(
            f"preprocess.color: {spec.color} needs {channels} channel(s), input "
            f"'{tensor.name}' {spec.layout} shape {shape} has {channel_dim}"
        )
    tensor_size = (_static(width), _static(height))
    if spec.size is not None:
        size = spec.size
        for axis, want, have in (("width", size[0], width), ("height", size[1], height)):
            if have > 0 and have != want:
                raise PreprocessError(
                    f"preprocess.size: {axis} {want} does not match input '{tensor.name}' "
                    f"{spec.layout} shape {shape}"
                )
    elif tensor_size[0] is None or tensor_size[1] is None:
        raise PreprocessError(
            f"preprocess.size: required because input '{tensor.name}' has dynamic shape {shape}"
        )
    else:
        size = (tensor_size[0], tensor_size[1])
    gain, bias = normalisation_constants(spec.scale, spec.mean, spec.std, channels)
    return ImagePlan(
        tensor=tensor,
        size=size,
        channels=channels,
        color=spec.color,
        layout=spec.layout,
        interpolation=spec.interpolation,
        letterbox=spec.letterbox,
        pad_value=spec.pad_value,
        gain=gain,
        bias=bias,
        mode=_input_mode(tensor, gain, bias),
    )


@dataclass(frozen=True, eq=False)
class SensorPlan:
    """A compiled sensor preprocessing: ``(window, channels)`` in, input tensor out."""

    tensor: TensorSpec
    window: int
    channels: int
    layout: Literal["NTC", "NCT"]
    gain: FloatArray
    bias: FloatArray

    def apply(self, window: npt.NDArray[Any]) -> FloatArray:
        """Normalise one window per channel and lay it out as ``(1, T, C)`` or ``(1, C, T)``."""
        if window.shape != (self.window, self.channels):
            raise PreprocessError(
                f"sensor window: expected shape ({self.window}, {self.channels}), "
                f"got {tuple(window.shape)}"
            )
        out: FloatArray = np.multiply(window, self.gain, dtype=np.float32)
        np.add(out, self.bias, out=out)
        if self.layout == "NCT":
            out = np.ascontiguousarray(out.T)
        return out[None]


def plan_sensor(spec: SensorPreprocess, tensor: TensorSpec) -> SensorPlan:
    """Compile a sensor spec against a 3-D input tensor; raises :class:`PreprocessError`."""
    channels = len(spec.channels)
    want = (1, spec.window, channels) if spec.layout == "NTC" else (1, channels, spec.window)
    if len(tensor.shape) != 3 or not all(
        have in (w, -1) for have, w in zip(tensor.shape, want, strict=True)
    ):
        raise PreprocessError(
            f"input '{tensor.name}': expected shape {want} for a {spec.layout} window of "
            f"{spec.window} x {channels} channels, got {tensor.shape}"
        )
    gain, bias = normalisation_constants(1.0, spec.mean, spec.std, channels)
    return SensorPlan(tensor, spec.window, channels, spec.layout, gain, bias)
