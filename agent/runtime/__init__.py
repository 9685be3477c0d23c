"""Inference runtimes behind one interface: load a TFLite or ONNX model from bytes and run it.

``load_model(data)`` sniffs the format, imports that format's backend on first use and returns a
:class:`Model` whose ``run`` quantizes float input and dequantizes quantized output for the caller.
"""

from agent.runtime.base import (
    CorruptModelError,
    InputMismatchError,
    InvalidOptionsError,
    Model,
    ModelRuntimeError,
    RuntimeMissingError,
    RuntimeOptions,
    TensorSpec,
    UnknownFormatError,
    UnsupportedModelError,
)
from agent.runtime.formats import FORMATS, detect_format
from agent.runtime.registry import available_runtimes, load_model

__all__ = [
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
]
