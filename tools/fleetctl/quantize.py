"""Post-training int8 quantization of float ONNX models, with accuracy and size before/after.

Uses onnxruntime's static quantization in QDQ format (int8 weights and activations, per-channel
weights), calibrated on the ``x`` array of an ``.npz`` file. When the file also holds ``y``
labels, top-1 accuracy of the float and the int8 model is measured on the same samples, so the
operator sees what quantization cost before the model ships. Needs ``onnxruntime`` and ``onnx``
(the ``controller`` extra).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tools.fleetctl import FleetctlError

__all__ = ["QUANTIZATION_LABEL", "QuantizationError", "QuantizeResult", "quantize_onnx_int8"]

logger = logging.getLogger(__name__)

QUANTIZATION_LABEL = "int8-static-qdq"
_MAX_CALIBRATION_SAMPLES = 512


class QuantizationError(FleetctlError):
    """The model or the calibration data cannot be used for int8 quantization."""


@dataclass(frozen=True)
class QuantizeResult:
    """The quantized model bytes and what changed."""

    model: bytes
    float_size: int
    int8_size: int
    calibration_samples: int
    float_accuracy: float | None
    int8_accuracy: float | None


def _load_calibration(path: Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[Any] | None]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data.files:
                raise QuantizationError(
                    f"{path}: expected an array 'x' of float inputs, got {sorted(data.files)}"
                )
            x = np.asarray(data["x"], dtype=np.float32)
            y = np.asarray(data["y"]) if "y" in data.files else None
    except (OSError, ValueError) as exc:
        raise QuantizationError(f"{path}: expected a readable .npz file ({exc})") from exc
    if x.ndim < 2 or len(x) == 0:
        raise QuantizationError(f"{path}: 'x' must hold at least one sample, got shape {x.shape}")
    if y is not None and len(y) != len(x):
        raise QuantizationError(f"{path}: expected {len(x)} labels in 'y', got {len(y)}")
    return x, y


def _session(model: bytes) -> Any:
    import onnxruntime as ort  # noqa: PLC0415 - heavy, optional; only when quantizing

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _batches(session: Any, x: npt.NDArray[np.float32]) -> Iterator[npt.NDArray[np.float32]]:
    """Samples shaped for the model's input 0 (one at a time when the batch dim is fixed)."""
    shape = session.get_inputs()[0].shape
    fixed_batch = isinstance(shape[0], int) and shape[0] >= 1
    if fixed_batch or len(shape) != x.ndim:
        for sample in x:
            yield sample.reshape([d if isinstance(d, int) else 1 for d in shape])
    else:
        step = 64
        for start in range(0, len(x), step):
            yield x[start : start + step]


def _accuracy(model: bytes, x: npt.NDArray[np.float32], y: npt.NDArray[Any]) -> float:
    session = _session(model)
    name = session.get_inputs()[0].name
    predictions: list[int] = []
    for batch in _batches(session, x):
        scores = np.asarray(session.run(None, {name: batch})[0])
        predictions.extend(int(p) for p in scores.reshape(len(batch), -1).argmax(axis=1))
    labels = y.reshape(len(y), -1).argmax(axis=1) if y.ndim > 1 else y.astype(np.int64)
    return float(np.mean(np.asarray(predictions) == labels))


def quantize_onnx_int8(model: bytes, calibration: Path) -> QuantizeResult:
    """Quantize a float ONNX model to int8 (static, QDQ) calibrated on ``calibration``'s ``x``.

    Raises:
        QuantizationError: bad calibration data, a model that is not float ONNX, or a failure
            of onnxruntime's quantizer.
    """
    try:
        from onnxruntime.quantization import (  # noqa: PLC0415 - heavy, optional
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_static,
        )
    except ImportError as exc:
        raise QuantizationError(
            f"onnxruntime quantization is unavailable ({exc}); expected"
            " `pip install 'edge-agent[onnx,controller]'`"
        ) from exc
    x, y = _load_calibration(calibration)
    try:
        float_session = _session(model)
    except Exception as exc:  # onnxruntime raises its own unrelated exception types
        raise QuantizationError(f"model: expected a loadable ONNX model ({exc})") from exc
    input_name = float_session.get_inputs()[0].name
    calibration_batches = list(_batches(float_session, x[:_MAX_CALIBRATION_SAMPLES]))

    class NpzReader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._items = iter(calibration_batches)

        def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
            batch = next(self._items, None)
            return None if batch is None else {input_name: batch}

    with tempfile.TemporaryDirectory(prefix="fleetctl-quant-") as scratch:
        source = Path(scratch) / "float.onnx"
        target = Path(scratch) / "int8.onnx"
        source.write_bytes(model)
        previous_disable = logging.root.manager.disable
        logging.disable(logging.WARNING)  # the quantizer's advice goes to the root logger
        try:
            quantize_static(
                str(source),
                str(target),
                NpzReader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
            )
        except Exception as exc:  # the quantizer raises many unrelated exception types
            raise QuantizationError(f"model: onnxruntime quantization failed ({exc})") from exc
        finally:
            logging.disable(previous_disable)
        quantized = target.read_bytes()
    float_accuracy = int8_accuracy = None
    if y is not None:
        float_accuracy = _accuracy(model, x, y)
        int8_accuracy = _accuracy(quantized, x, y)
    logger.info("quantized %d -> %d bytes", len(model), len(quantized))
    return QuantizeResult(
        model=quantized,
        float_size=len(model),
        int8_size=len(quantized),
        calibration_samples=min(len(x), _MAX_CALIBRATION_SAMPLES),
        float_accuracy=float_accuracy,
        int8_accuracy=int8_accuracy,
    )
