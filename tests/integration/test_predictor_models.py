"""The Predictor and card self-tests on the committed models with the real runtimes."""

from __future__ import annotations

import dataclasses
from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from agent.modelcard import ImagePreprocess, ModelCard, SensorPreprocess, card_from_json
from agent.pipeline.predictor import Predictor, derive_card
from agent.pipeline.selftest import SelfTestError, run_self_test
from agent.runtime import Model, load_model

pytestmark = pytest.mark.inference

MODELS = Path(__file__).resolve().parents[2] / "tools" / "models"
DIGITS = ("digits_fp32.onnx", "digits_int8.onnx", "digits_int8.tflite")
CARDS = sorted(p.name.removesuffix(".card.json") for p in MODELS.glob("*.card.json"))


@cache
def card(name: str) -> ModelCard:
    return card_from_json((MODELS / f"{name}.card.json").read_text())


def load(name: str) -> Model:
    return load_model((MODELS / name).read_bytes())


@cache
def held_out() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    with np.load(MODELS / "digits_test.npz") as data:
        return data["images"].astype(np.uint8), data["labels"].astype(np.int64)


def as_bgr_frame(digit: npt.NDArray[np.uint8], factor: int = 8) -> npt.NDArray[np.uint8]:
    """An 8x8 grey digit as a camera-sized BGR frame (nearest upscale, grey in all channels)."""
    big = np.repeat(np.repeat(digit, factor, axis=0), factor, axis=1)
    return np.ascontiguousarray(np.stack([big, big, big], axis=-1))


def test_the_digit_models_are_committed() -> None:
    assert set(DIGITS) <= {p.name for p in MODELS.iterdir()}
    assert set(DIGITS) <= set(CARDS)


@pytest.mark.parametrize("name", DIGITS)
def test_predictor_classifies_held_out_digits_from_bgr_frames(name: str) -> None:
    predictor = Predictor(load(name), card(name))
    images, labels = held_out()
    predicted = [predictor(as_bgr_frame(img))["top"][0]["index"] for img in images]
    accuracy = float(np.mean(np.asarray(predicted) == labels))
    assert accuracy >= 0.95, f"{name}: accuracy {accuracy:.3f} on {len(labels)} held-out digits"
    payload = predictor(as_bgr_frame(images[0]))
    top = payload["top"]
    assert len(top) == card(name).postprocess.top_k  # type: ignore[union-attr]
    assert top[0]["label"] == str(top[0]["index"])
    assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    assert 0.0 < sum(t["score"] for t in top) <= 1.0 + 1e-6


def test_gray_and_bgr_frames_of_a_digit_give_the_same_result() -> None:
    predictor = Predictor(load("digits_fp32.onnx"), card("digits_fp32.onnx"))
    images, _ = held_out()
    for img in images[:20]:
        gray = np.repeat(np.repeat(img, 5, axis=0), 5, axis=1)
        assert predictor(gray) == predictor(as_bgr_frame(img, 5))


def test_int8_pixels_fed_directly_match_the_runtimes_own_quantization() -> None:
    model = load("digits_int8.tflite")
    predictor = Predictor(model, card("digits_int8.tflite"))
    images, _ = held_out()
    for img in images[:30]:
        prepared = predictor.preprocess(as_bgr_frame(img))
        assert prepared.tensors[0].dtype == np.int8  # the float pass was skipped
        floats = (img.astype(np.float32) / 255.0).reshape(1, 8, 8, 1)
        np.testing.assert_array_equal(predictor.infer(prepared)[0], model.run([floats])[0])


def test_a_model_without_a_card_runs_with_derived_preprocessing() -> None:
    model = load("digits_fp32.onnx")
    derived = derive_card(model, name="digits")
    carded_spec = card("digits_fp32.onnx").preprocess
    assert isinstance(carded_spec, ImagePreprocess)
    assert derived.preprocess == dataclasses.replace(carded_spec, size=None, interpolation="linear")
    carded = Predictor(model, card("digits_fp32.onnx"))
    bare = Predictor(model)
    images, _ = held_out()
    for img in images[:20]:
        raw = bare(as_bgr_frame(img))["outputs"][0]
        assert raw["shape"] == [1, 10] and raw["truncated"] is False
        assert int(np.argmax(raw["data"])) == carded(as_bgr_frame(img))["top"][0]["index"]


@pytest.mark.parametrize("name", CARDS)
def test_every_committed_card_passes_its_self_test(name: str) -> None:
    model = load(name)
    report = run_self_test(model, card(name), strict=True)
    assert report.passed
    assert all(r.passed for r in report.results)


@pytest.mark.parametrize("quantized", ["digits_int8.onnx", "digits_int8.tflite"])
def test_fp32_card_fails_against_quantized_weights(quantized: str) -> None:
    # Same architecture, int8 weights: the fp32 card's tight tolerances must notice.
    with pytest.raises(SelfTestError, match=r"^vector '.*': output\[0\]\[\d+\] expected .* got "):
        run_self_test(load(quantized), card("digits_fp32.onnx"), strict=True)


@pytest.mark.parametrize("name", DIGITS)
def test_perturbed_expected_values_fail(name: str) -> None:
    original = card(name)
    vector = original.selftest[0]
    shifted = list(vector.expected)
    shifted[3] += 3 * vector.atol + 0.5
    bad = dataclasses.replace(
        original, selftest=(dataclasses.replace(vector, expected=tuple(shifted)),)
    )
    report = run_self_test(load(name), bad)
    assert not report.passed
    assert report.results[0].detail.startswith(f"vector {vector.name!r}: output[0][3] expected ")


@pytest.mark.parametrize("name", ["vibration_fp32.onnx", "vibration_int8.tflite"])
def test_predictor_flags_the_cards_faulty_window_from_raw_readings(name: str) -> None:
    vib = card(name)
    sensor = vib.preprocess
    assert isinstance(sensor, SensorPreprocess) and sensor.layout == "NTC"
    model = load(name)
    predictor = Predictor(model, vib)
    verdicts = {}
    for vector in vib.selftest:
        # The vectors are normalised model input; undo the card's normalisation to get readings.
        normalised = np.asarray(vector.input, np.float32).reshape(sensor.window, -1)
        readings = normalised * np.asarray(sensor.std, np.float32) + np.asarray(
            sensor.mean, np.float32
        )
        prepared = predictor.preprocess(readings)
        np.testing.assert_allclose(prepared.tensors[0][0], normalised, atol=1e-5)
        payload = predictor(readings)
        assert set(payload) == {"score", "anomaly"}
        verdicts[vector.name] = payload["anomaly"]
    assert verdicts == {"healthy window": False, "faulty window": True}
