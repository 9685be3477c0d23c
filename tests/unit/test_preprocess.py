"""Preprocessing steps, plans and card derivation against hand-computed values."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.modelcard import ImagePreprocess, ModelCard, SensorPreprocess
from agent.pipeline.predictor import (
    Predictor,
    PreprocessOverrides,
    derive_card,
)
from agent.pipeline.preprocess import (
    FrameGeometry,
    convert_color,
    letterbox_geometry,
    normalisation_constants,
    plan_image,
    plan_sensor,
    resize_frame,
)
from agent.pipeline.results import PredictorError, PreprocessError
from agent.runtime.base import Model, TensorSpec

pytestmark = pytest.mark.inference


def spec(
    shape: tuple[int, ...], dtype: str = "float32", scale: float = 0.0, zp: int = 0
) -> TensorSpec:
    return TensorSpec("x", shape, np.dtype(dtype), scale, zp)


class EchoModel(Model):
    """A model that returns its input: enough to exercise the predictor's plumbing."""

    format = "onnx"
    runtime_name = "echo"

    def __init__(self, inputs: Sequence[TensorSpec]) -> None:
        self._inputs = tuple(inputs)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("y", self._inputs[0].shape, np.dtype("float32")),)

    def run(self, inputs: Any) -> list[npt.NDArray[np.generic]]:
        return [np.asarray(inputs[0], dtype=np.float32)]


# --- resize and letterbox -------------------------------------------------------------------


def test_resize_area_averages_blocks() -> None:
    frame = np.array([[0, 4, 8, 8], [4, 8, 8, 8], [0, 0, 2, 2], [0, 0, 2, 2]], dtype=np.uint8)
    out, geometry = resize_frame(frame, (2, 2), interpolation="area")
    np.testing.assert_array_equal(out, [[4, 8], [0, 2]])
    assert geometry == FrameGeometry((4, 4), (2, 2), (0.5, 0.5), (0.0, 0.0))


def test_resize_nearest_upscale_repeats_pixels() -> None:
    frame = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    out, _ = resize_frame(frame, (4, 2), interpolation="nearest")
    np.testing.assert_array_equal(out, [[1, 1, 2, 2], [3, 3, 4, 4]])


def test_resize_linear_interpolates_between_pixels() -> None:
    frame = np.array([[0, 100]], dtype=np.uint8)
    out, _ = resize_frame(frame, (4, 1), interpolation="linear")
    # Half-pixel centres: dst x maps to src (x + 0.5) / 2 - 0.5 -> -0.25, 0.25, 0.75, 1.25.
    np.testing.assert_array_equal(out, [[0, 25, 75, 100]])


def test_resize_keeps_a_channel_axis_and_skips_same_size() -> None:
    frame = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    same, _ = resize_frame(frame, (2, 2))
    assert same is frame
    gray = np.zeros((4, 4, 1), dtype=np.uint8)
    out, _ = resize_frame(gray, (2, 2))
    assert out.shape == (2, 2, 1)


def test_letterbox_pads_centred_and_maps_a_box_back() -> None:
    frame = np.full((2, 4, 3), 200, dtype=np.uint8)  # 4 wide, 2 tall
    out, geometry = resize_frame(frame, (4, 4), letterbox=True, pad_value=7)
    assert out.shape == (4, 4, 3)
    np.testing.assert_array_equal(out[[0, 3]], 7)
    np.testing.assert_array_equal(out[1:3], 200)
    assert geometry.offset == (0.0, 1.0)
    assert geometry.scale == (1.0, 1.0)
    np.testing.assert_allclose(geometry.boxes_to_source([[1, 1, 3, 3]]), [[1, 0, 3, 2]])


def test_letterbox_geometry_of_a_wide_frame() -> None:
    geometry, content = letterbox_geometry((640, 480), (128, 128), letterbox=True)
    assert content == (128, 96)
    assert geometry.offset == (0.0, 16.0)
    np.testing.assert_allclose(geometry.boxes_to_source([[0, 16, 128, 112]]), [[0, 0, 640, 480]])
    np.testing.assert_allclose(geometry.boxes_to_source([[-5, 0, 200, 128]]), [[0, 0, 640, 480]])
    unclipped = geometry.boxes_to_source([[0, 0, 64, 64]], clip=False)
    np.testing.assert_allclose(unclipped, [[0, -80, 320, 240]])


def test_stretch_geometry_scales_each_axis() -> None:
    geometry, content = letterbox_geometry((640, 480), (128, 128), letterbox=False)
    assert content == (128, 128)
    np.testing.assert_allclose(geometry.boxes_to_source([[32, 32, 64, 64]]), [[160, 120, 320, 240]])


sizes = st.tuples(st.integers(1, 1920), st.integers(1, 1080))


@given(source=sizes, target=st.tuples(st.integers(1, 320), st.integers(1, 320)))
def test_letterbox_round_trip_and_centring(
    source: tuple[int, int], target: tuple[int, int]
) -> None:
    geometry, (new_w, new_h) = letterbox_geometry(source, target, letterbox=True)
    assert 1 <= new_w <= target[0] and 1 <= new_h <= target[1]
    assert new_w == target[0] or new_h == target[1]  # one side fills the input
    left, top = geometry.offset
    assert abs((target[0] - new_w - left) - left) <= 1
    assert abs((target[1] - new_h - top) - top) <= 1
    # The whole source frame lands exactly on the content rectangle, and back.
    whole = [[0, 0, source[0], source[1]]]
    np.testing.assert_allclose(
        geometry.boxes_to_input(whole), [[left, top, left + new_w, top + new_h]], atol=1e-3
    )
    box = np.array([[0.1 * source[0], 0.2 * source[1], 0.7 * source[0], 0.9 * source[1]]])
    back = geometry.boxes_to_source(geometry.boxes_to_input(box))
    np.testing.assert_allclose(back, box, rtol=1e-5, atol=1e-3)


@given(
    source=st.tuples(st.integers(1, 64), st.integers(1, 64)),
    target=st.tuples(st.integers(1, 32), st.integers(1, 32)),
)
def test_letterboxed_content_sits_where_the_geometry_says(
    source: tuple[int, int], target: tuple[int, int]
) -> None:
    frame = np.full((source[1], source[0], 3), 255, dtype=np.uint8)
    out, geometry = resize_frame(frame, target, letterbox=True, pad_value=0)
    x1, y1, x2, y2 = geometry.boxes_to_input([[0, 0, source[0], source[1]]])[0]
    mask = np.zeros(out.shape[:2], dtype=bool)
    mask[round(y1) : round(y2), round(x1) : round(x2)] = True
    assert np.all(out[mask] == 255)
    assert np.all(out[~mask] == 0)


# --- colour and normalisation ---------------------------------------------------------------


def test_bgr_to_rgb_swaps_channels() -> None:
    frame = np.array([[[10, 20, 30]]], dtype=np.uint8)
    np.testing.assert_array_equal(convert_color(frame, "RGB"), [[[30, 20, 10]]])
    assert convert_color(frame, "BGR") is frame


def test_bgr_to_gray_uses_luma_weights() -> None:
    # 0.299 R + 0.587 G + 0.114 B
    frame = np.array([[[0, 0, 255], [0, 255, 0], [255, 0, 0]]], dtype=np.uint8)
    np.testing.assert_array_equal(convert_color(frame, "GRAY")[..., 0], [[76, 150, 29]])


def test_gray_frames_become_three_channels_for_rgb_models() -> None:
    frame = np.array([[5, 6]], dtype=np.uint8)
    np.testing.assert_array_equal(convert_color(frame, "RGB"), [[[5, 5, 5], [6, 6, 6]]])
    assert convert_color(frame, "GRAY").shape == (1, 2, 1)


def test_bgra_frames_drop_alpha() -> None:
    frame = np.array([[[10, 20, 30, 255]]], dtype=np.uint8)
    np.testing.assert_array_equal(convert_color(frame, "RGB"), [[[30, 20, 10]]])


def test_normalisation_constants_fold_scale_mean_std() -> None:
    a, b = normalisation_constants(1 / 255, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0), 3)
    pixels = np.array([0.0, 255.0, 51.0])
    # (x * scale - mean) / std by hand: (0 - 0.5)/0.5, (1 - 0.25)/0.25, (0.2 - 0)/2
    np.testing.assert_allclose(pixels * a + b, [-1.0, 3.0, 0.1], rtol=1e-6)
    with pytest.raises(PreprocessError, match=r"preprocess\.mean: expected 1 or 3 values, got 2"):
        normalisation_constants(1.0, (0.1, 0.2), (1.0,), 3)


def test_image_plan_normalises_in_rgb_nhwc() -> None:
    plan = plan_image(
        ImagePreprocess(size=(1, 1), color="RGB", scale=1 / 255, mean=(0.5,), std=(0.5,)),
        spec((1, 1, 1, 3)),
    )
    tensor, _ = plan.apply(np.array([[[0, 255, 51]]], dtype=np.uint8))  # B, G, R
    assert tensor.dtype == np.float32 and tensor.shape == (1, 1, 1, 3)
    np.testing.assert_allclose(tensor[0, 0, 0], [-0.6, 1.0, -1.0], rtol=1e-6)


def test_image_plan_transposes_to_nchw() -> None:
    plan = plan_image(ImagePreprocess(color="BGR", layout="NCHW"), spec((1, 3, 2, 2)))
    frame = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    tensor, _ = plan.apply(frame)
    assert tensor.shape == (1, 3, 2, 2) and tensor.flags["C_CONTIGUOUS"]
    for c in range(3):
        np.testing.assert_array_equal(tensor[0, c], frame[:, :, c])


def test_uint8_input_with_identity_normalisation_skips_floats() -> None:
    plan = plan_image(ImagePreprocess(color="BGR"), spec((1, 2, 2, 3), "uint8"))
    frame = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    tensor, _ = plan.apply(frame)
    assert plan.mode == "uint8" and tensor.dtype == np.uint8
    np.testing.assert_array_equal(tensor[0], frame)


def test_int8_input_quantized_like_the_scale_gets_shifted_pixels() -> None:
    tensor_spec = spec((1, 1, 3, 1), "int8", scale=1 / 255, zp=-128)
    plan = plan_image(ImagePreprocess(color="GRAY", scale=1 / 255), tensor_spec)
    tensor, _ = plan.apply(np.array([[0, 128, 255]], dtype=np.uint8))
    assert plan.mode == "int8_shift" and tensor.dtype == np.int8
    np.testing.assert_array_equal(tensor.ravel(), [-128, 0, 127])


def test_quantized_input_with_other_normalisation_gets_floats() -> None:
    tensor_spec = spec((1, 1, 1, 1), "int8", scale=1 / 255, zp=0)
    plan = plan_image(ImagePreprocess(color="GRAY", scale=1 / 255), tensor_spec)
    tensor, _ = plan.apply(np.array([[255]], dtype=np.uint8))
    assert plan.mode == "float" and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor.ravel(), [1.0])


def test_plain_integer_input_gets_rounded_values() -> None:
    plan = plan_image(ImagePreprocess(color="GRAY", scale=0.5), spec((1, 1, 2, 1), "uint8"))
    tensor, _ = plan.apply(np.array([[3, 255]], dtype=np.uint8))
    assert plan.mode == "integer" and tensor.dtype == np.uint8
    np.testing.assert_array_equal(tensor.ravel(), [2, 128])  # rint(1.5), rint(127.5): to even


@pytest.mark.parametrize(
    ("image", "shape", "message"),
    [
        (ImagePreprocess(color="RGB"), (1, 8, 8, 1), "RGB needs 3 channel"),
        (ImagePreprocess(size=(4, 8)), (1, 8, 8, 3), "width 4 does not match"),
        (ImagePreprocess(), (1, -1, -1, 3), "preprocess.size: required"),
        (ImagePreprocess(), (8, 8, 3), "expected a 4-D image tensor"),
        (ImagePreprocess(mean=(1.0, 2.0)), (1, 8, 8, 3), "preprocess.mean"),
    ],
)
def test_image_plan_rejects_mismatches(
    image: ImagePreprocess, shape: tuple[int, ...], message: str
) -> None:
    with pytest.raises(PreprocessError, match=message):
        plan_image(image, spec(shape))


def test_image_plan_takes_size_from_a_dynamic_tensor_spec() -> None:
    plan = plan_image(ImagePreprocess(size=(6, 4)), spec((1, -1, -1, 3)))
    tensor, geometry = plan.apply(np.zeros((8, 12, 3), dtype=np.uint8))
    assert tensor.shape == (1, 4, 6, 3)
    assert geometry.scale == (0.5, 0.5)


def test_image_plan_rejects_non_uint8_frames() -> None:
    plan = plan_image(ImagePreprocess(), spec((1, 2, 2, 3)))
    with pytest.raises(PreprocessError, match="uint8 image"):
        plan.apply(np.zeros((2, 2, 3), dtype=np.float32))


# --- sensor windows ---------------------------------------------------------------------------


def test_sensor_plan_normalises_per_channel_ntc() -> None:
    sensor = SensorPreprocess(channels=("a", "b"), window=3, mean=(1.0, 10.0), std=(2.0, 5.0))
    plan = plan_sensor(sensor, spec((1, 3, 2)))
    window = np.array([[1, 10], [3, 15], [5, 0]], dtype=np.float32)
    tensor = plan.apply(window)
    assert tensor.shape == (1, 3, 2) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor[0], [[0, 0], [1, 1], [2, -2]])


def test_sensor_plan_transposes_to_nct() -> None:
    sensor = SensorPreprocess(channels=("a", "b"), window=3, layout="NCT")
    plan = plan_sensor(sensor, spec((1, 2, 3)))
    window = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(plan.apply(window)[0], window.T)


def test_sensor_plan_rejects_wrong_shapes() -> None:
    sensor = SensorPreprocess(channels=("a",), window=4)
    with pytest.raises(PreprocessError, match=r"expected shape \(1, 4, 1\)"):
        plan_sensor(sensor, spec((1, 5, 1)))
    plan = plan_sensor(sensor, spec((1, 4, 1)))
    with pytest.raises(PreprocessError, match=r"expected shape \(4, 1\), got \(3, 1\)"):
        plan.apply(np.zeros((3, 1), dtype=np.float32))


def test_sensor_preprocessing_does_not_need_cv2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` fail
    plan = plan_sensor(SensorPreprocess(channels=("a",), window=2), spec((1, 2, 1)))
    np.testing.assert_array_equal(plan.apply(np.ones((2, 1), np.float32)), [[[1], [1]]])
    image = plan_image(ImagePreprocess(color="RGB"), spec((1, 4, 4, 3)))
    with pytest.raises(PreprocessError, match=r"edge-agent\[camera\]"):
        image.apply(np.zeros((8, 8, 3), dtype=np.uint8))


# --- derive_card and overrides ----------------------------------------------------------------


def derived(shape: tuple[int, ...], dtype: str = "float32", **overrides: Any) -> ModelCard:
    model = EchoModel([spec(shape, dtype)])
    return derive_card(model, overrides=PreprocessOverrides(**overrides))


def test_derive_card_nhwc_float_rgb() -> None:
    card = derived((1, 224, 160, 3))
    assert card.preprocess == ImagePreprocess(color="RGB", layout="NHWC", scale=1 / 255)
    assert card.postprocess.kind == "raw"
    assert card.inputs[0].shape == (1, 224, 160, 3)
    plan = plan_image(card.preprocess, spec((1, 224, 160, 3)))
    assert plan.size == (160, 224)


def test_derive_card_nchw_gray_uint8() -> None:
    card = derived((1, 1, 28, 28), "uint8")
    assert card.preprocess == ImagePreprocess(color="GRAY", layout="NCHW", scale=1.0)


def test_derive_card_int8_scales_to_unit_range() -> None:
    card = derived((1, 8, 8, 3), "int8")
    assert isinstance(card.preprocess, ImagePreprocess)
    assert card.preprocess.scale == pytest.approx(1 / 255)


def test_derive_card_sensor_window() -> None:
    card = derived((1, 50, 3))
    assert card.preprocess == SensorPreprocess(
        channels=("c0", "c1", "c2"), window=50, hop=50, layout="NTC"
    )


def test_overrides_replace_derived_values() -> None:
    card = derived(
        (1, -1, -1, 3), size=(96, 64), color="BGR", mean=(0.5,), std=(0.25,), letterbox=True
    )
    assert card.preprocess == ImagePreprocess(
        size=(96, 64), color="BGR", scale=1 / 255, mean=(0.5,), std=(0.25,), letterbox=True
    )


def test_derive_card_errors_say_what_was_expected() -> None:
    with pytest.raises(PreprocessError, match="pass the layout explicitly"):
        derived((1, 5, 5, 5))
    with pytest.raises(PreprocessError, match="expected a 4-D image or 3-D"):
        derived((1, 10))
    with pytest.raises(PreprocessError, match="override 'color'"):
        derived((1, 50, 3), color="RGB")
    with pytest.raises(PreprocessError, match=r"override: .*layout"):
        derived((1, 50, 3), layout="NHWC")


def test_predictor_without_card_runs_and_reports_raw_outputs() -> None:
    predictor = Predictor(EchoModel([spec((1, 2, 2, 1), "uint8")]))
    payload = predictor(np.array([[0, 255], [10, 20]], dtype=np.uint8))
    assert payload == {
        "outputs": [
            {
                "name": "y",
                "shape": [1, 2, 2, 1],
                "data": [0.0, 255.0, 10.0, 20.0],
                "truncated": False,
            }
        ]
    }


def test_predictor_applies_overrides_to_a_card() -> None:
    card = ModelCard(name="m", version="1", format="onnx", preprocess=ImagePreprocess(color="GRAY"))
    predictor = Predictor(
        EchoModel([spec((1, 1, 1, 1))]), card, overrides=PreprocessOverrides(scale=0.5)
    )
    assert isinstance(predictor.card.preprocess, ImagePreprocess)
    assert predictor.card.preprocess.scale == 0.5
    prepared = predictor.preprocess(np.array([[8]], dtype=np.uint8))
    np.testing.assert_array_equal(prepared.tensors[0].ravel(), [4.0])


def test_predictor_rejects_multi_input_models() -> None:
    with pytest.raises(PredictorError, match="exactly one input tensor, got 2"):
        Predictor(EchoModel([spec((1, 2, 2, 3)), spec((1, 2))]))


def test_gray_plan_converts_before_resizing_and_never_returns_the_frame() -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)
    plan = plan_image(
        ImagePreprocess(color="GRAY", scale=1.0, interpolation="area"), spec((1, 5, 8, 1), "uint8")
    )
    tensor, geometry = plan.apply(frame)
    gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    expected = cv2.resize(gray, (8, 5), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(tensor.reshape(5, 8), expected)
    assert geometry.scale == (8 / 64, 5 / 40)
    same_size = plan_image(ImagePreprocess(color="GRAY", scale=1.0), spec((1, 2, 2, 1), "uint8"))
    gray_frame = np.arange(4, dtype=np.uint8).reshape(2, 2)
    out, _ = same_size.apply(gray_frame)
    out[...] = 9
    np.testing.assert_array_equal(gray_frame, [[0, 1], [2, 3]])


def test_image_plan_handles_each_frame_shape_with_its_own_geometry() -> None:
    plan = plan_image(ImagePreprocess(size=(4, 4), letterbox=True, color="RGB"), spec((1, 4, 4, 3)))
    wide = np.zeros((2, 8, 3), dtype=np.uint8)
    wide[..., 2] = 255  # red in BGR
    tall = np.zeros((8, 2, 4), dtype=np.uint8)  # BGRA
    for _ in range(2):  # the second pass reuses the compiled steps
        tensor, geometry = plan.apply(wide)
        assert geometry.offset == (0.0, 1.0) and geometry.scale == (0.5, 0.5)
        np.testing.assert_allclose(tensor[0, 1, :, 0], 255.0)  # red first after BGR -> RGB
        np.testing.assert_allclose(tensor[0, 0], 0.0)  # padding row
        tensor, geometry = plan.apply(tall)
        assert geometry.offset == (1.0, 0.0) and tensor.shape == (1, 4, 4, 3)
    with pytest.raises(PreprocessError, match="channels, got 2"):
        plan.apply(np.zeros((2, 2, 2), dtype=np.uint8))
