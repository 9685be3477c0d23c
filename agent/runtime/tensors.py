"""Checks caller input against a model's tensor specs and converts it; converts outputs back.

Shared by every backend so that all of them accept and reject the same things:

* count: one array per input (a bare array is accepted for a one-input model);
* shape: same rank, every dimension equal unless the model's is dynamic (-1);
* dtype: input of the tensor's own dtype passes as is; float input for a quantized tensor is
  quantized; any float input for a float tensor is cast to its dtype; anything else is refused.

Quantized outputs are dequantized to float32; other outputs are returned as the runtime gave them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from agent.runtime.base import InputMismatchError, TensorSpec
from agent.runtime.quant import dequantize, quantize

__all__ = ["convert_outputs", "describe", "prepare_inputs", "shape_matches"]


def describe(shape: Sequence[int], dtype: np.dtype[np.generic]) -> str:
    """``(1, 8, 8, 1) float32``: how shapes and dtypes appear in messages."""
    return f"{tuple(int(d) for d in shape)} {dtype}"


def shape_matches(expected: Sequence[int], actual: Sequence[int]) -> bool:
    """True when ``actual`` has the rank of ``expected`` and agrees on every fixed dimension."""
    if len(expected) != len(actual):
        return False
    return all(e < 0 or e == a for e, a in zip(expected, actual, strict=True))


def prepare_inputs(
    specs: Sequence[TensorSpec],
    inputs: Sequence[npt.NDArray[np.generic]] | npt.NDArray[np.generic],
) -> list[npt.NDArray[np.generic]]:
    """Check ``inputs`` against ``specs`` and return contiguous arrays of the tensors' dtypes.

    Raises:
        InputMismatchError: wrong count, shape or dtype, as one line naming the input.
    """
    arrays = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
    if len(arrays) != len(specs):
        names = ", ".join(repr(spec.name) for spec in specs)
        raise InputMismatchError(f"expected {len(specs)} input(s) ({names}), got {len(arrays)}")
    return [
        _prepare_one(spec, np.asarray(array)) for spec, array in zip(specs, arrays, strict=True)
    ]


def _prepare_one(spec: TensorSpec, array: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    def mismatch() -> InputMismatchError:
        wanted = describe(spec.shape, spec.dtype)
        if spec.quantized:
            wanted += " (or float, quantized for you)"
        got = describe(array.shape, array.dtype)
        return InputMismatchError(f"input {spec.name!r}: expected shape {wanted}, got {got}")

    if not shape_matches(spec.shape, array.shape):
        raise mismatch()
    if array.dtype == spec.dtype:
        return np.ascontiguousarray(array)
    is_float_input = np.issubdtype(array.dtype, np.floating)
    if spec.quantized and is_float_input:
        return quantize(array, spec.scale, spec.zero_point, spec.dtype)
    if np.issubdtype(spec.dtype, np.floating) and is_float_input:
        return np.ascontiguousarray(array, dtype=spec.dtype)
    raise mismatch()


def convert_outputs(
    specs: Sequence[TensorSpec], outputs: Sequence[npt.NDArray[np.generic]]
) -> list[npt.NDArray[np.generic]]:
    """Dequantize quantized outputs to float32; pass the others through."""
    converted: list[npt.NDArray[np.generic]] = []
    for spec, output in zip(specs, outputs, strict=True):
        if spec.quantized:
            converted.append(dequantize(output, spec.scale, spec.zero_point))  # type: ignore[arg-type]
        else:
            converted.append(output)
    return converted
