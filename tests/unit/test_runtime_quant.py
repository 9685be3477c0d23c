"""Quantization math against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.runtime import UnsupportedModelError
from agent.runtime.quant import dequantize, quantize


def test_uint8_rounds_half_away_from_zero_and_clips_both_ends() -> None:
    # scale 0.5, zero point 10: q = round(x / 0.5) + 10
    x = np.array([0.0, 1.0, 1.25, -1.25, 0.75, 200.0, -10.0], dtype=np.float32)
    q = quantize(x, 0.5, 10, np.uint8)
    assert q.dtype == np.uint8
    # 1.25/0.5 = 2.5 -> 3; -2.5 -> -3; 1.5 -> 2; 400 + 10 clips to 255; -20 + 10 clips to 0
    assert q.tolist() == [10, 12, 13, 7, 12, 255, 0]


def test_int8_rounding_clipping_and_nan() -> None:
    # scale 0.25, zero point -3
    x = np.array([0.125, -0.125, 0.375, -0.375, 100.0, -100.0, 0.0, np.nan, np.inf, -np.inf])
    q = quantize(x, 0.25, -3, np.int8)
    assert q.dtype == np.int8
    # 0.5 -> 1 -> -2; -0.5 -> -1 -> -4; 1.5 -> 2 -> -1; -1.5 -> -2 -> -5; 397 -> 127;
    # -403 -> -128; 0 -> -3; NaN -> zero point; +-inf clip
    assert q.tolist() == [-2, -4, -1, -5, 127, -128, -3, -3, 127, -128]


def test_quantize_keeps_shape() -> None:
    x = np.zeros((1, 8, 8, 1), dtype=np.float64)
    q = quantize(x, 1 / 255, -128, np.int8)
    assert q.shape == (1, 8, 8, 1)
    assert np.all(q == -128)


def test_dequantize_uint8_and_int8_to_float32() -> None:
    d = dequantize(np.array([0, 10, 255], dtype=np.uint8), 0.5, 10)
    assert d.dtype == np.float32
    assert d.tolist() == [-5.0, 0.0, 122.5]
    d = dequantize(np.array([-128, -3, 127], dtype=np.int8), 0.25, -3)
    assert d.dtype == np.float32
    assert d.tolist() == [-31.25, 0.0, 32.5]


def test_dequantize_does_not_overflow_the_integer_type() -> None:
    # 127 - (-128) = 255 does not fit int8: the subtraction must be done wider.
    d = dequantize(np.array([127], dtype=np.int8), 1.0, -128)
    assert d.tolist() == [255.0]


@pytest.mark.parametrize("dtype", [np.float32, np.uint64, np.bool_])
def test_quantize_refuses_non_quantized_dtypes(dtype: type) -> None:
    with pytest.raises(UnsupportedModelError, match="expected an int8/uint8/int16/int32 dtype"):
        quantize(np.zeros(2), 0.5, 0, dtype)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_quantize_refuses_non_positive_scale(scale: float) -> None:
    with pytest.raises(UnsupportedModelError, match="positive scale"):
        quantize(np.zeros(2), scale, 0, np.int8)


@given(
    value=st.floats(min_value=-1.0, max_value=1.0),
    zero_point=st.integers(min_value=-20, max_value=20),
)
def test_round_trip_error_is_at_most_half_a_step(value: float, zero_point: int) -> None:
    scale = 1 / 100  # int8 with |zero point| <= 20 covers [-1, 1] without clipping
    q = quantize(np.array([value]), scale, zero_point, np.int8)
    back = float(dequantize(q, scale, zero_point)[0])
    assert abs(back - value) <= scale / 2 + 1e-6
