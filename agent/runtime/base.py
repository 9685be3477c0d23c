"""The one interface every inference backend implements, and the runtime's errors.

A backend loads a model from bytes in memory (decrypted models never touch disk), describes its
input and output tensors, and runs. Quantization is handled for the caller: float input is
quantized with the tensor's scale and zero point, quantized output is dequantized to float32.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = [
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
]

TFLITE_RUNTIME_CHOICES = ("auto", "ai_edge_litert", "tflite_runtime")


class ModelRuntimeError(Exception):
    """Root of every error raised by the inference runtimes."""


class UnknownFormatError(ModelRuntimeError):
    """The model's format is not one we know (expected tflite or onnx)."""


class CorruptModelError(ModelRuntimeError):
    """The bytes do not form a model the runtime can load."""


class RuntimeMissingError(ModelRuntimeError):
    """No installed runtime can run this format; the message carries the pip install hint."""


class InputMismatchError(ModelRuntimeError):
    """An input's count, shape or dtype does not match the model."""


class UnsupportedModelError(ModelRuntimeError):
    """The model loads but uses something the agent cannot feed (e.g. a non-tensor input)."""


class InvalidOptionsError(ModelRuntimeError):
    """A :class:`RuntimeOptions` value is out of range."""


@dataclass(frozen=True)
class TensorSpec:
    """A model tensor: name, shape (-1 for dynamic), dtype and quantization parameters."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[np.generic]
    scale: float = 0.0
    zero_point: int = 0

    @property
    def quantized(self) -> bool:
        """True when the tensor holds integers that stand for ``scale * (q - zero_point)``."""
        return self.scale != 0.0 and np.issubdtype(self.dtype, np.integer)


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run a model; passed through from the agent config."""

    threads: int = 0  # 0 lets the runtime choose
    onnx_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    tflite_runtime: str = "auto"  # "auto", "ai_edge_litert" or "tflite_runtime"
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise InvalidOptionsError(f"threads: expected 0 (auto) or more, got {self.threads}")
        if self.tflite_runtime not in TFLITE_RUNTIME_CHOICES:
            choices = ", ".join(TFLITE_RUNTIME_CHOICES)
            raise InvalidOptionsError(
                f"tflite_runtime: expected one of {choices}, got {self.tflite_runtime!r}"
            )
        if not self.onnx_providers:
            raise InvalidOptionsError("onnx_providers: expected at least one provider, got none")


class Model(abc.ABC):
    """A loaded model, ready to run. Not thread-safe: one worker owns it."""

    format: str
    runtime_name: str

    @property
    @abc.abstractmethod
    def inputs(self) -> tuple[TensorSpec, ...]:
        """Input tensor specs, in the order :meth:`run` takes them."""

    @property
    @abc.abstractmethod
    def outputs(self) -> tuple[TensorSpec, ...]:
        """Output tensor specs, in the order :meth:`run` returns them."""

    @abc.abstractmethod
    def run(
        self, inputs: Sequence[npt.NDArray[np.generic]] | npt.NDArray[np.generic]
    ) -> list[npt.NDArray[np.generic]]:
        """Run one inference.

        Float input for a quantized tensor is quantized; already-typed input passes as is.
        Quantized outputs come back dequantized as float32; others as the model returns them.

        Raises:
            InputMismatchError: wrong number of inputs, shape or dtype.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release native resources (optional)."""

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def short_reason(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, bounded: runtime errors can be pages long."""
    text = str(exc).strip()
    lines = text.splitlines()
    line = lines[0].strip() if lines else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
