"""ONNX backend: onnxruntime, with execution providers from the options.

Providers pass through in the order given (``CUDAExecutionProvider``,
``TensorrtExecutionProvider`` on Jetson). One the installed onnxruntime does not offer is
dropped with a WARNING, and CPU is always last, so a config written for a Jetson still runs on a
Raspberry Pi. QDQ-quantized ONNX models keep float inputs and outputs: their tensor specs carry
no quantization parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.runtime.base import (
    CorruptModelError,
    Model,
    ModelRuntimeError,
    RuntimeMissingError,
    RuntimeOptions,
    TensorSpec,
    UnsupportedModelError,
    short_reason,
)
from agent.runtime.tensors import prepare_inputs

__all__ = ["ONNX_DTYPES", "OnnxModel", "choose_providers", "load", "runtime_status"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "no ONNX runtime installed: pip install 'edge-agent[onnx]'"
CPU_PROVIDER = "CPUExecutionProvider"

ONNX_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
}


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime  # noqa: PLC0415 - imported only when an ONNX model is used
    except Exception as exc:  # broken native extensions raise more than ImportError
        raise RuntimeMissingError(f"{INSTALL_HINT} ({short_reason(exc)})") from exc
    return onnxruntime


def runtime_status(options: RuntimeOptions) -> str:
    """``onnxruntime 1.31.1``, or why it is unusable."""
    try:
        return f"onnxruntime {_import_onnxruntime().__version__}"
    except RuntimeMissingError as exc:
        return f"unavailable: {exc}"


def choose_providers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """The requested providers that are available, in order, with CPU last as the fallback."""
    chosen = [name for name in requested if name in available]
    missing = [name for name in requested if name not in available]
    if missing:
        logger.warning(
            "ONNX execution providers %s are not available in this onnxruntime "
            "(available: %s); falling back to %s",
            ", ".join(missing),
            ", ".join(available),
            ", ".join([*[n for n in chosen if n != CPU_PROVIDER], CPU_PROVIDER]),
        )
    if CPU_PROVIDER not in chosen:
        chosen.append(CPU_PROVIDER)
    return chosen


def load(data: bytes, options: RuntimeOptions) -> OnnxModel:
    """Load an ONNX model from bytes in memory.

    Raises:
        RuntimeMissingError: onnxruntime is not installed.
        CorruptModelError: the bytes are not a loadable ONNX model.
        UnsupportedModelError: an operator or opset the runtime lacks, or non-tensor inputs.
    """
    return OnnxModel(data, options=options)


def _spec(node: Any) -> TensorSpec:
    dtype = ONNX_DTYPES.get(str(node.type))
    if dtype is None:
        raise UnsupportedModelError(
            f"onnx tensor {node.name!r}: expected a numeric or bool tensor, got {node.type}"
        )
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    return TensorSpec(name=str(node.name), shape=shape, dtype=dtype)


class OnnxModel(Model):
    """An ONNX model in an onnxruntime inference session."""

    format = "onnx"

    def __init__(self, data: bytes, *, options: RuntimeOptions) -> None:
        ort = _import_onnxruntime()
        session_options = ort.SessionOptions()
        if options.threads > 0:
            session_options.intra_op_num_threads = options.threads
        session_options.log_severity_level = 3  # errors only: load failures are raised anyway
        providers = choose_providers(options.onnx_providers, ort.get_available_providers())
        self.runtime_name = f"onnxruntime {ort.__version__}"
        try:
            session = ort.InferenceSession(data, sess_options=session_options, providers=providers)
        except Exception as exc:  # onnxruntime's errors share no base class worth naming
            reason = short_reason(exc)
            if "NOT_IMPLEMENTED" in reason:
                raise UnsupportedModelError(
                    f"onnx model needs something {self.runtime_name} does not have: {reason}"
                ) from exc
            raise CorruptModelError(
                f"onnx model could not be loaded by {self.runtime_name}: {reason}"
            ) from exc
        self._session: Any = session
        self._inputs = tuple(_spec(node) for node in session.get_inputs())
        self._outputs = tuple(_spec(node) for node in session.get_outputs())
        self._input_names = [spec.name for spec in self._inputs]
        self._output_names = [spec.name for spec in self._outputs]
        logger.debug(
            "loaded a %d-byte onnx model with %s on %s",
            len(data),
            self.runtime_name,
            ", ".join(session.get_providers()),
        )

    @property
    def providers(self) -> tuple[str, ...]:
        """The execution providers the session actually uses, in priority order."""
        if self._session is None:
            return ()
        return tuple(self._session.get_providers())

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def run(
        self, inputs: Sequence[npt.NDArray[np.generic]] | npt.NDArray[np.generic]
    ) -> list[npt.NDArray[np.generic]]:
        if self._session is None:
            raise ModelRuntimeError("onnx model: expected an open model, got a closed one")
        arrays = prepare_inputs(self._inputs, inputs)
        feed = dict(zip(self._input_names, arrays, strict=True))
        try:
            outputs = self._session.run(self._output_names, feed)
        except Exception as exc:
            raise ModelRuntimeError(
                f"onnx inference failed in {self.runtime_name}: {short_reason(exc)}"
            ) from exc
        return [np.asarray(output) for output in outputs]

    def close(self) -> None:
        self._session = None
