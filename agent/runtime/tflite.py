"""TFLite backend: LiteRT (``ai_edge_litert``) or, on older systems, ``tflite_runtime``.

Whether a runtime works is decided by building an interpreter for a tiny built-in model, not by
importing it: tflite-runtime 2.14 imports under numpy 2 and fails only when used. The result is
cached per process. Models are structurally checked first (see :mod:`agent.runtime.tflite_check`)
because tflite-runtime does not verify flatbuffers and crashes on damaged ones.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Sequence
from dataclasses import dataclass
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
from agent.runtime.tensors import convert_outputs, prepare_inputs
from agent.runtime.tflite_check import TfliteStructureError, check_tflite_structure

__all__ = ["PROBE_MODEL", "TfliteModel", "load", "runtime_status", "select_runtime"]

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "no TFLite runtime installed: pip install 'edge-agent[tflite]' "
    "(or 'edge-agent[tflite-legacy]' with numpy<2)"
)

# Import name -> distribution name, in the order "auto" tries them.
RUNTIMES = {"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime"}

# A complete TFLite model: one float32 tensor of shape (1,) that is both input and output.
PROBE_MODEL = bytes.fromhex(
    "1800000054464c3300000e0010000c0000000800000004000e00000070000000080000000300000001000000"
    "1000000000000a0010000c00080004000a0000000c0000001000000014000000010000000000000001000000"
    "0000000001000000100000000c000c0008000000000004000c00000010000000040000000100000001000000"
    "010000007800000001000000080000000400040004000000"
)


@dataclass(frozen=True)
class TfliteRuntime:
    """An installed, working TFLite interpreter implementation."""

    name: str
    version: str
    interpreter_class: Any

    @property
    def label(self) -> str:
        """``ai_edge_litert 2.3.0``."""
        return f"{self.name} {self.version}"


# How TFLite says a sound model uses an operator (or operator version) it does not implement.
_MISSING_OP_MARKERS = ("Didn't find op for builtin opcode", "unresolved custom op")

_probed: dict[str, TfliteRuntime | str] = {}


def _probe(name: str) -> TfliteRuntime | str:
    """The runtime if it can run the probe model, else the reason it cannot."""
    if name in _probed:
        return _probed[name]
    result: TfliteRuntime | str
    try:
        module = importlib.import_module(f"{name}.interpreter")
    except Exception as exc:  # broken native extensions raise more than ImportError
        result = f"{name} is not importable ({short_reason(exc)})"
    else:
        try:
            version = importlib.metadata.version(RUNTIMES[name])
        except importlib.metadata.PackageNotFoundError:
            version = str(getattr(importlib.import_module(name), "__version__", "unknown"))
        try:
            interpreter = module.Interpreter(model_content=PROBE_MODEL)
            interpreter.allocate_tensors()
            interpreter.invoke()
        except Exception as exc:
            result = f"{name} {version} is installed but cannot run models ({short_reason(exc)})"
        else:
            result = TfliteRuntime(name, version, module.Interpreter)
    if isinstance(result, str):
        logger.debug("TFLite runtime unavailable: %s", result)
    _probed[name] = result
    return result


def select_runtime(options: RuntimeOptions) -> TfliteRuntime:
    """The runtime ``options.tflite_runtime`` asks for, or the first working one for ``auto``.

    Raises:
        RuntimeMissingError: no such runtime works here; the message carries the install hint.
    """
    names = list(RUNTIMES) if options.tflite_runtime == "auto" else [options.tflite_runtime]
    reasons = []
    for name in names:
        probed = _probe(name)
        if isinstance(probed, TfliteRuntime):
            return probed
        reasons.append(probed)
    raise RuntimeMissingError(f"{INSTALL_HINT} ({'; '.join(reasons)})")


def runtime_status(options: RuntimeOptions) -> str:
    """``ai_edge_litert 2.3.0``, or why no TFLite runtime is usable."""
    try:
        return select_runtime(options).label
    except RuntimeMissingError as exc:
        return f"unavailable: {exc}"


def load(data: bytes, options: RuntimeOptions) -> TfliteModel:
    """Load a TFLite model from bytes in memory.

    Raises:
        RuntimeMissingError: no working TFLite runtime.
        CorruptModelError: the bytes are not a loadable TFLite model.
        UnsupportedModelError: an operator (version) the runtime lacks, or input/output tensors
            the agent cannot feed.
    """
    runtime = select_runtime(options)
    return TfliteModel(data, runtime=runtime, threads=options.threads)


def _spec(detail: dict[str, Any]) -> TensorSpec:
    signature = detail.get("shape_signature")
    shape = signature if signature is not None and len(signature) else detail["shape"]
    scale, zero_point = detail.get("quantization", (0.0, 0))
    params = detail.get("quantization_parameters") or {}
    scales = params.get("scales")
    if scales is not None and len(scales) > 1:
        raise UnsupportedModelError(
            f"tensor {detail['name']!r}: expected per-tensor quantization, "
            f"got {len(scales)} per-channel scales"
        )
    return TensorSpec(
        name=str(detail["name"]),
        shape=tuple(int(d) for d in shape),
        dtype=np.dtype(detail["dtype"]),
        scale=float(scale),
        zero_point=int(zero_point),
    )


class TfliteModel(Model):
    """A TFLite model loaded in a TFLite interpreter."""

    format = "tflite"

    def __init__(self, data: bytes, *, runtime: TfliteRuntime, threads: int = 0) -> None:
        try:
            check_tflite_structure(data)
        except TfliteStructureError as exc:
            raise CorruptModelError(f"tflite model is damaged: {exc}") from exc
        try:
            interpreter = runtime.interpreter_class(
                model_content=data, num_threads=threads if threads > 0 else None
            )
            interpreter.allocate_tensors()
            # Reading the details decodes tensor names: damaged ones fail here (UnicodeError).
            input_details = interpreter.get_input_details()
            output_details = interpreter.get_output_details()
        except (ValueError, RuntimeError) as exc:
            reason = short_reason(exc)
            if any(marker in reason for marker in _MISSING_OP_MARKERS):
                raise UnsupportedModelError(
                    f"tflite model needs an operator {runtime.label} does not have: {reason}"
                ) from exc
            raise CorruptModelError(
                f"tflite model could not be loaded by {runtime.label}: {reason}"
            ) from exc
        # The interpreter may point into the buffer: keep it alive as long as the interpreter.
        self._data = data
        self._interpreter: Any = interpreter
        self.runtime_name = runtime.label
        self._input_indices = [int(d["index"]) for d in input_details]
        self._output_indices = [int(d["index"]) for d in output_details]
        self._current_shapes = [tuple(int(x) for x in d["shape"]) for d in input_details]
        self._inputs = tuple(_spec(d) for d in input_details)
        self._outputs = tuple(_spec(d) for d in output_details)
        logger.debug("loaded a %d-byte tflite model with %s", len(data), self.runtime_name)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def run(
        self, inputs: Sequence[npt.NDArray[np.generic]] | npt.NDArray[np.generic]
    ) -> list[npt.NDArray[np.generic]]:
        if self._interpreter is None:
            raise ModelRuntimeError("tflite model: expected an open model, got a closed one")
        arrays = prepare_inputs(self._inputs, inputs)
        interpreter = self._interpreter
        resized = False
        for position, array in enumerate(arrays):
            if array.shape != self._current_shapes[position]:
                interpreter.resize_tensor_input(self._input_indices[position], array.shape)
                self._current_shapes[position] = array.shape
                resized = True
        try:
            if resized:
                interpreter.allocate_tensors()
            for index, array in zip(self._input_indices, arrays, strict=True):
                interpreter.set_tensor(index, array)
            interpreter.invoke()
            outputs = [interpreter.get_tensor(index) for index in self._output_indices]
        except (ValueError, RuntimeError) as exc:
            raise ModelRuntimeError(
                f"tflite inference failed in {self.runtime_name}: {short_reason(exc)}"
            ) from exc
        return convert_outputs(self._outputs, outputs)

    def close(self) -> None:
        self._interpreter = None
        self._data = b""
