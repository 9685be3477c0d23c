"""Input checks and conversions shared by the backends."""

from __future__ import annotations

import numpy as np
import pytest

from agent.runtime import InputMismatchError, TensorSpec
from agent.runtime.tensors import convert_outputs, prepare_inputs, shape_matches

FLOAT_IMAGE = TensorSpec("x", (1, 8, 8, 1), np.dtype(np.float32))
INT8_IMAGE = TensorSpec("input", (1, 8, 8, 1), np.dtype(np.int8), scale=1 / 255, zero_point=-128)
DYNAMIC = TensorSpec("frames", (-1, 3), np.dtype(np.float32))
INDICES = TensorSpec("ids", (4,), np.dtype(np.int64))


def test_mismatched_shape_is_one_line_naming_input_shape_and_dtype() -> None:
    with pytest.raises(InputMismatchError) as caught:
        prepare_inputs([FLOAT_IMAGE], np.zeros((8, 8)))
    assert str(caught.value) == (
        "input 'x': expected shape (1, 8, 8, 1) float32, got (8, 8) float64"
    )


def test_wrong_input_count() -> None:
    with pytest.raises(InputMismatchError, match=r"expected 1 input\(s\) \('x'\), got 2"):
        prepare_inputs([FLOAT_IMAGE], [np.zeros((1, 8, 8, 1))] * 2)


def test_float64_is_cast_for_a_float32_tensor() -> None:
    (out,) = prepare_inputs([FLOAT_IMAGE], [np.full((1, 8, 8, 1), 0.5)])
    assert out.dtype == np.float32
    assert out.flags.c_contiguous
    assert np.all(out == 0.5)


def test_integer_input_for_a_float_tensor_is_refused() -> None:
    with pytest.raises(InputMismatchError, match="got \\(1, 8, 8, 1\\) uint8"):
        prepare_inputs([FLOAT_IMAGE], np.zeros((1, 8, 8, 1), dtype=np.uint8))


def test_float_input_for_a_quantized_tensor_is_quantized() -> None:
    x = np.zeros((1, 8, 8, 1), dtype=np.float32)
    x[0, 0, 0, 0] = 1.0
    x[0, 0, 1, 0] = 0.5  # 127.5 -> 128 -> 0
    (out,) = prepare_inputs([INT8_IMAGE], x)
    assert out.dtype == np.int8
    assert out[0, 0, 0, 0] == 127
    assert out[0, 0, 1, 0] == 0
    assert out[0, 1, 0, 0] == -128


def test_input_of_the_tensor_dtype_passes_unchanged() -> None:
    q = np.arange(64, dtype=np.int8).reshape(1, 8, 8, 1)
    (out,) = prepare_inputs([INT8_IMAGE], [q])
    assert out.dtype == np.int8
    assert np.array_equal(out, q)


def test_other_integer_type_for_a_quantized_tensor_is_refused() -> None:
    with pytest.raises(InputMismatchError, match="or float, quantized for you"):
        prepare_inputs([INT8_IMAGE], np.zeros((1, 8, 8, 1), dtype=np.uint8))


def test_non_quantized_integer_tensor_needs_its_exact_dtype() -> None:
    (out,) = prepare_inputs([INDICES], np.arange(4, dtype=np.int64))
    assert out.dtype == np.int64
    with pytest.raises(InputMismatchError, match="expected shape \\(4,\\) int64"):
        prepare_inputs([INDICES], np.arange(4, dtype=np.float32))


def test_dynamic_dimensions_accept_any_size_but_not_any_rank() -> None:
    (out,) = prepare_inputs([DYNAMIC], np.zeros((5, 3), dtype=np.float32))
    assert out.shape == (5, 3)
    with pytest.raises(InputMismatchError):
        prepare_inputs([DYNAMIC], np.zeros((5, 4), dtype=np.float32))
    with pytest.raises(InputMismatchError):
        prepare_inputs([DYNAMIC], np.zeros((1, 5, 3), dtype=np.float32))
    assert shape_matches((-1, 3), (0, 3))
    assert not shape_matches((2, 3), (3, 2))


def test_quantized_outputs_are_dequantized_others_pass() -> None:
    logits = TensorSpec("logits", (1, 3), np.dtype(np.int8), scale=0.5, zero_point=1)
    scores = TensorSpec("scores", (1, 3), np.dtype(np.float32))
    raw_logits = np.array([[1, 3, -1]], dtype=np.int8)
    raw_scores = np.array([[0.1, 0.2, 0.7]], dtype=np.float32)
    out_logits, out_scores = convert_outputs([logits, scores], [raw_logits, raw_scores])
    assert out_logits.dtype == np.float32
    assert out_logits.tolist() == [[0.0, 1.0, -1.0]]
    assert out_scores is raw_scores
