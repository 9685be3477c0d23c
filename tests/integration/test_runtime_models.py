"""The runtimes on the committed models: accuracy, cross-runtime agreement, cards, bad input.

Runs in the primary environment (LiteRT, numpy 2) and in the legacy one (tflite-runtime 2.14,
numpy<2). Both environments check the held-out accuracy against the labels and the agreement of
TFLite with onnxruntime in the same environment, so the two TFLite runtimes are compared through
the labels and through onnxruntime. ``EDGE_AGENT_EXPECT_TFLITE`` names the TFLite runtime that
must have loaded the models (``ai_edge_litert`` or ``tflite_runtime``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from agent.modelcard import ModelCard, card_from_json
from agent.runtime import (
    InputMismatchError,
    Model,
    ModelRuntimeError,
    RuntimeOptions,
    UnsupportedModelError,
    available_runtimes,
    detect_format,
    load_model,
)
from agent.runtime.tflite import PROBE_MODEL

pytestmark = pytest.mark.inference

MODELS = Path(__file__).resolve().parents[2] / "tools" / "models"
DIGITS = ("digits_fp32.onnx", "digits_int8.onnx", "digits_int8.tflite")
TFLITE_RUNTIMES = ("ai_edge_litert", "tflite_runtime")
EXPECTED_TFLITE = os.environ.get("EDGE_AGENT_EXPECT_TFLITE", "")

# Two-input models: out = a + b, with the ADD operator at version 1 and at version 999
# (which no runtime implements).
ADD_MODEL = bytes.fromhex(
    "1800000054464c3300000e00140010000c000800000004000e000000fc000000180000000800000003000000"
    "010000000400000014ffffff01000000100000000c00140010000c00080004000c000000100000002c000000"
    "300000004c000000010000001000000000000a000c000000080004000a0000001c0000002000000001000000"
    "0200000002000000000000000100000001000000020000000200000000000000010000000300000050000000"
    "2400000004000000c8ffffff10000000040000000100000001000000030000006f757400e4ffffff10000000"
    "04000000010000000100000001000000620000000c000c0008000000000004000c0000001000000004000000"
    "0100000001000000010000006100000001000000080000000400040004000000"
)
ADD_V999_MODEL = bytes.fromhex(
    "1800000054464c3300000e00140010000c000800000004000e0000000c010000280000000800000003000000"
    "010000001000000000000a0008000000000004000a000000e703000001000000100000000c00140010000c00"
    "080004000c000000100000002c000000300000004c000000010000001000000000000a000c00000008000400"
    "0a0000001c000000200000000100000002000000020000000000000001000000010000000200000002000000"
    "000000000100000003000000500000002400000004000000c8ffffff10000000040000000100000001000000"
    "030000006f757400e4ffffff1000000004000000010000000100000001000000620000000c000c0008000000"
    "000004000c000000100000000400000001000000010000000100000061000000010000000800000004000400"
    "04000000"
)


@cache
def model_bytes(name: str) -> bytes:
    return (MODELS / name).read_bytes()


@cache
def card(name: str) -> ModelCard:
    return card_from_json((MODELS / f"{name}.card.json").read_text())


@cache
def held_out() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    with np.load(MODELS / "digits_test.npz") as data:
        images = data["images"].astype(np.float32) / 255.0
        labels = data["labels"].astype(np.int64)
    return images.reshape(-1, 1, 8, 8, 1), labels


@cache
def predictions(name: str) -> npt.NDArray[np.int64]:
    images, _ = held_out()
    with load_model(model_bytes(name)) as model:
        top1 = [int(np.argmax(model.run(image)[0])) for image in images]
    return np.array(top1, dtype=np.int64)


def test_held_out_set_is_there() -> None:
    images, labels = held_out()
    assert images.shape[1:] == (1, 8, 8, 1)
    assert len(images) == len(labels) >= 300
    assert set(labels.tolist()) == set(range(10))


def test_tflite_models_load_in_the_expected_runtime() -> None:
    model = load_model(model_bytes("digits_int8.tflite"))
    name, version = model.runtime_name.split(" ")
    if EXPECTED_TFLITE:
        assert name == EXPECTED_TFLITE
    assert name in TFLITE_RUNTIMES
    assert version[0].isdigit()
    assert available_runtimes()["tflite"] == model.runtime_name


def test_onnx_models_load_in_onnxruntime() -> None:
    import onnxruntime  # noqa: PLC0415 - the test checks what the backend reports

    model = load_model(model_bytes("digits_fp32.onnx"))
    assert model.runtime_name == f"onnxruntime {onnxruntime.__version__}"
    assert available_runtimes()["onnx"] == model.runtime_name


@pytest.mark.parametrize("name", DIGITS)
def test_format_is_sniffed(name: str) -> None:
    assert detect_format(model_bytes(name)) == name.rsplit(".", 1)[1]
    assert load_model(model_bytes(name)).format == card(name).format


@pytest.mark.parametrize("name", DIGITS)
def test_held_out_accuracy(name: str) -> None:
    _, labels = held_out()
    accuracy = float(np.mean(predictions(name) == labels))
    assert accuracy >= 0.95
    # The card's figure was measured when the model was made, with the reference runtime.
    assert abs(accuracy - card(name).metrics["accuracy"]) <= 0.01


def test_int8_tflite_and_int8_onnx_agree() -> None:
    agreement = float(np.mean(predictions("digits_int8.tflite") == predictions("digits_int8.onnx")))
    assert agreement >= 0.98


def test_int8_models_agree_with_fp32() -> None:
    fp32 = predictions("digits_fp32.onnx")
    assert float(np.mean(predictions("digits_int8.onnx") == fp32)) >= 0.98
    assert float(np.mean(predictions("digits_int8.tflite") == fp32)) >= 0.98


@pytest.mark.parametrize("name", DIGITS)
def test_card_tensor_info_matches_the_runtime(name: str) -> None:
    model = load_model(model_bytes(name))
    for infos, specs in ((card(name).inputs, model.inputs), (card(name).outputs, model.outputs)):
        assert len(infos) == len(specs)
        for info, spec in zip(infos, specs, strict=True):
            assert info.name == spec.name
            assert info.shape == spec.shape
            assert info.dtype == str(spec.dtype)
            assert info.scale == pytest.approx(spec.scale, rel=1e-6)
            assert info.zero_point == spec.zero_point


@pytest.mark.parametrize("name", DIGITS)
def test_card_self_test_vectors(name: str) -> None:
    model = load_model(model_bytes(name))
    for vector in card(name).selftest:
        assert vector.input, "the digits cards carry explicit inputs"
        image = np.array(vector.input, dtype=np.float32).reshape(model.inputs[0].shape)
        output = model.run(image)[vector.output]
        assert output.dtype == np.float32
        flat = output.reshape(-1)
        if vector.expected:
            expected = np.array(vector.expected, dtype=np.float32)
            assert np.allclose(flat[: len(expected)], expected, atol=vector.atol)
        if vector.expected_argmax is not None:
            assert int(np.argmax(flat)) == vector.expected_argmax


def test_quantized_tflite_takes_float_or_int8_and_dequantizes() -> None:
    model = load_model(model_bytes("digits_int8.tflite"))
    (spec,) = model.inputs
    (out_spec,) = model.outputs
    assert spec.quantized
    assert out_spec.quantized
    images, _ = held_out()
    image = images[7]
    pre_quantized = np.clip(np.round(image / spec.scale) + spec.zero_point, -128, 127).astype(
        np.int8
    )
    from_float = model.run(image)[0]
    from_int8 = model.run(pre_quantized)[0]
    assert from_float.dtype == np.float32
    assert np.array_equal(from_float, from_int8)
    # Dequantized values lie on the output's quantization grid.
    steps = np.asarray(from_float, dtype=np.float32) / out_spec.scale + out_spec.zero_point
    assert np.allclose(steps, np.round(steps), atol=1e-3)


@pytest.mark.parametrize("name", DIGITS)
def test_wrong_input_is_refused(name: str) -> None:
    model = load_model(model_bytes(name))
    with pytest.raises(InputMismatchError, match=r"input 'input': expected shape \(1, 8, 8, 1\)"):
        model.run(np.zeros((8, 8)))
    with pytest.raises(InputMismatchError, match=r"got \(1, 8, 8, 1\) uint8"):
        model.run(np.zeros((1, 8, 8, 1), dtype=np.uint8))
    with pytest.raises(InputMismatchError, match=r"expected 1 input\(s\)"):
        model.run([np.zeros((1, 8, 8, 1), dtype=np.float32)] * 2)


@pytest.mark.parametrize("name", DIGITS)
def test_threads_option_gives_the_same_outputs(name: str) -> None:
    images, _ = held_out()
    one = load_model(model_bytes(name), options=RuntimeOptions(threads=1))
    two = load_model(model_bytes(name), options=RuntimeOptions(threads=2))
    for image in images[:20]:
        assert np.allclose(one.run(image)[0], two.run(image)[0], atol=1e-5)


@pytest.mark.parametrize("name", DIGITS)
def test_a_closed_model_refuses_to_run(name: str) -> None:
    model = load_model(model_bytes(name))
    model.close()
    with pytest.raises(ModelRuntimeError, match="got a closed one"):
        model.run(np.zeros((1, 8, 8, 1), dtype=np.float32))


def test_unavailable_onnx_provider_falls_back_to_cpu(caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime  # noqa: PLC0415

    options = RuntimeOptions(onnx_providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    with caplog.at_level(logging.WARNING, logger="agent.runtime.onnx"):
        model = load_model(model_bytes("digits_fp32.onnx"), options=options)
    providers = model.providers  # type: ignore[attr-defined]
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert providers[0] == "CUDAExecutionProvider"
    else:
        assert providers == ("CPUExecutionProvider",)
        assert any(
            record.levelno == logging.WARNING and "CUDAExecutionProvider" in record.getMessage()
            for record in caplog.records
        )
    images, _ = held_out()
    assert int(np.argmax(model.run(images[0])[0])) == predictions("digits_fp32.onnx")[0]


def test_each_installed_tflite_runtime_can_be_forced() -> None:
    forced = []
    for name in TFLITE_RUNTIMES:
        if importlib.util.find_spec(name) is None:
            continue
        status = available_runtimes(RuntimeOptions(tflite_runtime=name))["tflite"]
        if status.startswith("unavailable"):
            # Installed but unusable here (tflite-runtime 2.14 under numpy 2): said so plainly.
            assert "cannot run models" in status or "not importable" in status
            continue
        model: Model = load_model(PROBE_MODEL, options=RuntimeOptions(tflite_runtime=name))
        assert model.runtime_name.startswith(f"{name} ")
        assert model.run(np.array([2.5]))[0].tolist() == [2.5]
        forced.append(name)
    assert forced, "no working TFLite runtime"
    if EXPECTED_TFLITE:
        assert EXPECTED_TFLITE in forced


_CORRUPTION_PROBE = """
import json, random, sys
from agent.runtime import CorruptModelError, UnknownFormatError, load_model

data = open(sys.argv[1], "rb").read()
rng = random.Random(7)
cases = {"empty": b"", "random": rng.randbytes(len(data))}
for fraction in (0.02, 0.1, 0.5, 0.9, 0.99):
    cases[f"truncated {fraction}"] = data[: int(len(data) * fraction)]
cases["truncated -1"] = data[:-1]
for index in range(8):
    flipped = bytearray(data)
    flipped[index] ^= 0xFF
    cases[f"flipped byte {index}"] = bytes(flipped)
for index in range(8, 64):
    flipped = bytearray(data)
    flipped[index] = rng.randrange(256)
    cases[f"random byte {index}"] = bytes(flipped)
outcomes = {}
for label, case in cases.items():
    try:
        load_model(case)
        outcomes[label] = "loaded"
    except (CorruptModelError, UnknownFormatError) as exc:
        outcomes[label] = type(exc).__name__ + ": " + str(exc)
print(json.dumps(outcomes))
"""


@pytest.mark.parametrize("name", DIGITS)
def test_corrupt_model_bytes_give_errors_never_a_crash(name: str) -> None:
    # A child process, so a runtime that crashes on bad bytes fails this test, not the suite.
    result = subprocess.run(
        [sys.executable, "-c", _CORRUPTION_PROBE, str(MODELS / name)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    outcomes: dict[str, str] = json.loads(result.stdout.splitlines()[-1])
    fmt = name.rsplit(".", 1)[1]
    # The format markers: TFLite's identifier at bytes 4..8, ONNX's leading ir_version tag.
    marker = "flipped byte 4" if fmt == "tflite" else "flipped byte 0"
    for label in ("empty", "random", marker):
        assert outcomes[label].startswith("UnknownFormatError"), (label, outcomes[label])
    for label in ("truncated 0.1", "truncated 0.5", "truncated 0.9", "truncated -1"):
        assert outcomes[label].startswith(f"CorruptModelError: {fmt} model"), outcomes[label]
    for label, outcome in outcomes.items():
        assert outcome == "loaded" or "\n" not in outcome, label
        if label.startswith("truncated") or label in ("empty", "random"):
            assert outcome != "loaded", label


def test_a_model_with_two_inputs_runs() -> None:
    model = load_model(ADD_MODEL)
    assert [spec.name for spec in model.inputs] == ["a", "b"]
    (out,) = model.run([np.array([1.5]), np.array([2.0], dtype=np.float32)])
    assert out.tolist() == [3.5]
    with pytest.raises(InputMismatchError, match=r"expected 2 input\(s\) \('a', 'b'\), got 1"):
        model.run(np.array([1.5], dtype=np.float32))


def test_an_operator_version_the_runtime_lacks_is_unsupported_not_corrupt() -> None:
    with pytest.raises(UnsupportedModelError, match=r"needs an operator .* 'ADD' version '999'"):
        load_model(ADD_V999_MODEL)
