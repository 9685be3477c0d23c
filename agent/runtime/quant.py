"""Affine (scale, zero point) quantization of model inputs and dequantization of outputs.

A quantized tensor holds integers ``q`` that stand for the real values ``scale * (q - zero_point)``.

* :func:`quantize` maps float input to the tensor's integer type:
  ``q = clip(round(x / scale) + zero_point, qmin, qmax)``. Rounding is half away from zero,
  as TFLite's own quantize kernel does (``std::round``); NaN maps to ``zero_point`` (real 0).
* :func:`dequantize` maps integers back to float32: ``scale * (q - zero_point)``.

Only per-tensor parameters are handled: model inputs and outputs are per-tensor in practice.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from agent.runtime.base import UnsupportedModelError

__all__ = ["QUANTIZED_DTYPES", "dequantize", "quantize"]

QUANTIZED_DTYPES = frozenset(
    {np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int16), np.dtype(np.int32)}
)


def quantize(
    values: npt.ArrayLike, scale: float, zero_point: int, dtype: npt.DTypeLike
) -> npt.NDArray[np.integer]:
    """Quantize real values to ``dtype`` with the given scale and zero point.

    Args:
        values: real values (any float array or scalar).
        scale: positive quantization step.
        zero_point: the integer standing for 0.0.
        dtype: an integer dtype (int8, uint8, int16, int32).

    Returns:
        An array of ``dtype``, same shape as ``values``.

    Raises:
        UnsupportedModelError: ``dtype`` is not an integer type or ``scale`` is not positive.
    """
    target = np.dtype(dtype)
    if target not in QUANTIZED_DTYPES:
        raise UnsupportedModelError(
            f"quantize: expected an int8/uint8/int16/int32 dtype, got {target}"
        )
    if not scale > 0.0:
        raise UnsupportedModelError(f"quantize: expected a positive scale, got {scale}")
    info = np.iinfo(target)
    scaled = np.asarray(values, dtype=np.float64) / float(scale)
    rounded = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    shifted = np.where(np.isnan(rounded), 0.0, rounded) + float(zero_point)
    clipped = np.clip(shifted, float(info.min), float(info.max))
    result: npt.NDArray[np.integer] = clipped.astype(target)
    return result


def dequantize(
    values: npt.NDArray[np.integer], scale: float, zero_point: int
) -> npt.NDArray[np.float32]:
    """Real values ``scale * (q - zero_point)`` of quantized integers, as float32."""
    centred = np.asarray(values).astype(np.int64) - int(zero_point)
    result: npt.NDArray[np.float32] = (centred * float(scale)).astype(np.float32)
    return result
