"""The public surface, lazy backend imports, options validation and missing-runtime errors."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest

import agent.runtime
from agent.runtime import (
    InvalidOptionsError,
    RuntimeMissingError,
    RuntimeOptions,
    TensorSpec,
    available_runtimes,
    load_model,
)
from agent.runtime import tflite as tflite_backend
from agent.runtime.onnx import choose_providers
from agent.runtime.tflite import PROBE_MODEL

HEAVY_MODULES = ("onnxruntime", "ai_edge_litert", "tflite_runtime", "cv2")


def test_public_surface() -> None:
    assert set(agent.runtime.__all__) == {
        "FORMATS",
        "CorruptModelError",
        "InputMismatchError",
        "InvalidOptionsError",
        "Model",
        "ModelRuntimeError",
        "RuntimeMissingError",
        "RuntimeOptions",
        "TensorSpec",
        "UnknownFormatError",
        "UnsupportedModelError",
        "available_runtimes",
        "detect_format",
        "load_model",
    }
    for name in agent.runtime.__all__:
        assert getattr(agent.runtime, name) is not None
    assert agent.runtime.FORMATS == ("tflite", "onnx")


def test_importing_the_runtime_package_imports_no_native_runtime() -> None:
    code = (
        "import sys\n"
        "import agent.runtime\n"
        "from agent.runtime import detect_format, RuntimeOptions\n"
        "import agent.runtime.tflite, agent.runtime.onnx\n"
        "detect_format(agent.runtime.tflite.PROBE_MODEL)\n"
        f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def _uninstall(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    # None in sys.modules is how Python marks a module as absent: importing it fails.
    monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.setitem(sys.modules, f"{package}.interpreter", None)


def test_forcing_a_tflite_runtime_that_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    _uninstall(monkeypatch, "tflite_runtime")
    monkeypatch.setattr(tflite_backend, "_probed", {})
    options = RuntimeOptions(tflite_runtime="tflite_runtime")
    with pytest.raises(RuntimeMissingError) as caught:
        load_model(PROBE_MODEL, options=options)
    message = str(caught.value)
    assert message.startswith(
        "no TFLite runtime installed: pip install 'edge-agent[tflite]' "
        "(or 'edge-agent[tflite-legacy]' with numpy<2)"
    )
    assert "tflite_runtime is not importable" in message
    assert "\n" not in message
    assert available_runtimes(options)["tflite"].startswith("unavailable: no TFLite runtime")


def test_no_tflite_runtime_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    _uninstall(monkeypatch, "tflite_runtime")
    _uninstall(monkeypatch, "ai_edge_litert")
    monkeypatch.setattr(tflite_backend, "_probed", {})
    with pytest.raises(RuntimeMissingError, match=r"ai_edge_litert is not importable.*; tflite_r"):
        load_model(PROBE_MODEL)


def test_missing_onnxruntime_is_an_error_only_when_an_onnx_model_is_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    onnx_header = b"\x08\x08\x12\x07pytorch"
    with pytest.raises(RuntimeMissingError, match=r"pip install 'edge-agent\[onnx\]'"):
        load_model(onnx_header)
    assert available_runtimes()["onnx"].startswith("unavailable: no ONNX runtime installed")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threads": -1}, "threads: expected 0 \\(auto\\) or more, got -1"),
        ({"tflite_runtime": "tensorflow"}, "tflite_runtime: expected one of auto, ai_edge_lit"),
        ({"onnx_providers": ()}, "onnx_providers: expected at least one provider"),
    ],
)
def test_options_are_validated(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidOptionsError, match=message):
        RuntimeOptions(**kwargs)  # type: ignore[arg-type]


def test_unavailable_providers_fall_back_to_cpu_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.runtime.onnx"):
        chosen = choose_providers(
            ["TensorrtExecutionProvider", "CUDAExecutionProvider"], ["CPUExecutionProvider"]
        )
    assert chosen == ["CPUExecutionProvider"]
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "TensorrtExecutionProvider, CUDAExecutionProvider are not available" in (
        record.getMessage()
    )


def test_available_providers_keep_their_order_and_cpu_comes_last(
    caplog: pytest.LogCaptureFixture,
) -> None:
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    with caplog.at_level(logging.WARNING):
        chosen = choose_providers(["CUDAExecutionProvider", "TensorrtExecutionProvider"], available)
    assert chosen == ["CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"]
    assert caplog.records == []


def test_tensor_spec_quantized_needs_an_integer_type_and_a_scale() -> None:
    assert TensorSpec("q", (1,), np.dtype(np.int8), scale=0.1).quantized
    assert not TensorSpec("q", (1,), np.dtype(np.int8)).quantized
    assert not TensorSpec("f", (1,), np.dtype(np.float32), scale=0.1).quantized
