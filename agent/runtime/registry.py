"""The backend registry: model format -> backend module, imported only when first used.

Importing :mod:`agent.runtime` stays light (no onnxruntime, no LiteRT): a backend module, and with
it its native runtime, is imported when a model of its format is loaded or when
:func:`available_runtimes` is asked. A runtime that is not installed is an error only then.
"""

from __future__ import annotations

import importlib
import logging
from typing import Protocol, cast

from agent.runtime.base import Model, RuntimeOptions, UnknownFormatError
from agent.runtime.formats import FORMATS, detect_format

__all__ = ["BACKENDS", "available_runtimes", "load_model"]

logger = logging.getLogger(__name__)

BACKENDS: dict[str, str] = {"tflite": "agent.runtime.tflite", "onnx": "agent.runtime.onnx"}


class _Backend(Protocol):
    def load(self, data: bytes, options: RuntimeOptions) -> Model: ...

    def runtime_status(self, options: RuntimeOptions) -> str: ...


def _backend(model_format: str) -> _Backend:
    module_name = BACKENDS.get(model_format)
    if module_name is None:
        raise UnknownFormatError(
            f"unknown model format {model_format!r}: expected one of {', '.join(FORMATS)}"
        )
    return cast(_Backend, importlib.import_module(module_name))


def load_model(
    data: bytes | bytearray,
    *,
    format: str | None = None,
    options: RuntimeOptions | None = None,
) -> Model:
    """Load a model from bytes in memory with the backend for its format.

    Args:
        data: the plaintext model (never written to disk).
        format: ``"tflite"`` or ``"onnx"``; sniffed from the bytes when omitted.
        options: threads, ONNX providers, TFLite runtime choice.

    Raises:
        UnknownFormatError: the format is neither TFLite nor ONNX.
        RuntimeMissingError: no installed runtime for the format (with the install hint).
        CorruptModelError: the runtime cannot load the bytes.
        UnsupportedModelError: the model needs an operator the runtime lacks, or has inputs or
            outputs the agent cannot feed.
    """
    model_format = format if format is not None else detect_format(data)
    backend = _backend(model_format)
    model = backend.load(bytes(data), options if options is not None else RuntimeOptions())
    logger.debug("loaded %s model with %s", model_format, model.runtime_name)
    return model


def available_runtimes(options: RuntimeOptions | None = None) -> dict[str, str]:
    """Format -> runtime name and version, or ``unavailable: <reason>``."""
    chosen = options if options is not None else RuntimeOptions()
    return {name: _backend(name).runtime_status(chosen) for name in BACKENDS}
