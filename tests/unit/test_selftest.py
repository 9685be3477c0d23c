"""Card self-tests: pass, fail and the one-line details, against a tiny linear model."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from agent.modelcard import ModelCard, SelfTestVector
from agent.pipeline.selftest import (
    SelfTestError,
    VectorResult,
    build_vector_input,
    run_self_test,
)
from agent.runtime.base import InputMismatchError, Model, TensorSpec

pytestmark = pytest.mark.inference

WEIGHTS = np.array([[1.0, 0.0, 0.5], [0.0, 2.0, 0.5]], np.float32)  # 2 inputs -> 3 outputs


class LinearModel(Model):
    """``y = x @ W`` over a (1, 2) input, and the input echoed as a second output."""

    format = "onnx"
    runtime_name = "linear"

    def __init__(self, weights: npt.NDArray[np.float32] = WEIGHTS, dtype: str = "float32") -> None:
        self.weights = weights
        self.dtype = np.dtype(dtype)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("x", (1, 2), self.dtype),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec("y", (1, 3), np.dtype("float32")),
            TensorSpec("echo", (1, 2), np.dtype("float32")),
        )

    def run(self, inputs: Any) -> list[npt.NDArray[np.generic]]:
        x = np.asarray(inputs[0])
        if x.shape != (1, 2) or x.dtype != self.dtype:
            raise InputMismatchError(
                f"input 'x': expected shape (1, 2) {self.dtype}, got {x.shape} {x.dtype}"
            )
        xf = x.astype(np.float32)
        return [xf @ self.weights, xf]


def card(*vectors: SelfTestVector) -> ModelCard:
    return ModelCard(name="linear", version="1", format="onnx", selftest=vectors)


def test_matching_vectors_pass_with_details() -> None:
    report = run_self_test(
        LinearModel(),
        card(
            SelfTestVector(
                name="ones", input=(1.0, 1.0), expected=(1.0, 2.0, 1.0), expected_argmax=1
            ),
            SelfTestVector(name="first-only", input=(2.0, 0.0), expected=(2.0,), atol=0.0),
        ),
    )
    assert report.passed
    assert report.results == [
        VectorResult(
            "ones", True, "vector 'ones': ok, output[0] 3 values within +-0.001 and argmax 1"
        ),
        VectorResult("first-only", True, "vector 'first-only': ok, output[0] 1 values within +-0"),
    ]


def test_a_value_out_of_tolerance_fails_with_one_line() -> None:
    vector = SelfTestVector(name="digit-3", input=(1.0, 0.0), expected=(1.0, 0.0, 0.91), atol=0.05)
    report = run_self_test(LinearModel(), card(vector))
    assert not report.passed
    assert report.results == [
        VectorResult(
            "digit-3", False, "vector 'digit-3': output[0][2] expected 0.91 +-0.05, got 0.5"
        )
    ]


def test_argmax_mismatch_fails() -> None:
    vector = SelfTestVector(name="which", input=(1.0, 0.0), expected_argmax=1)
    report = run_self_test(LinearModel(), card(vector))
    assert report.results[0].detail == "vector 'which': output[0] argmax expected 1, got 0"


def test_different_weights_fail_the_same_card() -> None:
    vectors = (SelfTestVector(name="ones", input=(1.0, 1.0), expected=(1.0, 2.0, 1.0)),)
    assert run_self_test(LinearModel(), card(*vectors)).passed
    other = LinearModel(WEIGHTS * np.float32(1.1))
    report = run_self_test(other, card(*vectors))
    assert not report.passed
    assert report.results[0].detail == "vector 'ones': output[0][0] expected 1 +-0.001, got 1.1"


def test_strict_raises_the_first_failure_after_running_all() -> None:
    vectors = card(
        SelfTestVector(name="good", input=(1.0, 1.0), expected=(1.0,)),
        SelfTestVector(name="bad-a", input=(1.0, 1.0), expected=(5.0,)),
        SelfTestVector(name="bad-b", input=(1.0, 1.0), expected_argmax=0),
    )
    with pytest.raises(
        SelfTestError, match=r"^vector 'bad-a': output\[0\]\[0\] expected 5 \+-0.001, got 1$"
    ):
        run_self_test(LinearModel(), vectors, strict=True)
    report = run_self_test(LinearModel(), vectors)
    assert [r.passed for r in report.results] == [True, False, False]


def test_seeded_noise_input_is_reproducible() -> None:
    noise = np.random.default_rng(7).uniform(-2.0, 3.0, (1, 2)).astype(np.float32)
    vector = SelfTestVector(
        name="noise",
        input_seed=7,
        input_range=(-2.0, 3.0),
        output=1,
        expected=tuple(float(v) for v in noise.ravel()),
        atol=0.0,
    )
    np.testing.assert_array_equal(build_vector_input(vector, LinearModel().inputs[0]), noise)
    assert run_self_test(LinearModel(), card(vector)).passed


def test_no_vectors_pass_vacuously() -> None:
    report = run_self_test(LinearModel(), card(), strict=True)
    assert report.passed and report.results == []


def test_vectors_that_do_not_fit_the_model_fail_instead_of_raising() -> None:
    report = run_self_test(
        LinearModel(),
        card(
            SelfTestVector(name="short", input=(1.0,), expected=(0.0,)),
            SelfTestVector(name="output", input=(1.0, 1.0), output=4, expected=(0.0,)),
            SelfTestVector(name="long", input=(1.0, 1.0), output=1, expected=(1.0, 1.0, 1.0)),
        ),
    )
    assert [r.detail for r in report.results] == [
        "vector 'short': input has 1 values, expected 2 for shape (1, 2)",
        "vector 'output': expected output[4], the model has 2 outputs",
        "vector 'long': output[1] expected at least 3 values, got 2",
    ]


def test_runtime_errors_become_failures() -> None:
    class Broken(LinearModel):
        def run(self, inputs: Any) -> list[npt.NDArray[np.generic]]:
            raise InputMismatchError("input 'x': expected shape (1, 2), got (1, 3)")

    report = run_self_test(
        Broken(), card(SelfTestVector(name="v", input=(1.0, 1.0), expected=(1.0,)))
    )
    assert report.results[0].detail == (
        "vector 'v': expected the model to run, got input 'x': expected shape (1, 2), got (1, 3)"
    )


def test_nan_outputs_fail() -> None:
    nan_model = LinearModel(np.full((2, 3), np.nan, np.float32))
    report = run_self_test(
        nan_model, card(SelfTestVector(name="v", input=(1.0, 1.0), expected=(1.0,), atol=1e9))
    )
    assert report.results[0].detail == "vector 'v': output[0][0] expected 1 +-1e+09, got nan"


def test_plain_integer_inputs_get_rounded_values() -> None:
    vector = SelfTestVector(name="int", input=(1.4, 254.6), expected=(1.0, 510.0), atol=0.0)
    assert build_vector_input(vector, TensorSpec("x", (1, 2), np.dtype("uint8"))).tolist() == [
        [1, 255]
    ]
    assert run_self_test(LinearModel(dtype="uint8"), card(vector)).passed
