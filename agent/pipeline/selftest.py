"""Card self-tests: run the card's vectors through a loaded model before it is activated.

Each :class:`~agent.modelcard.SelfTestVector` names a model-input tensor (its values, or a seed
for ``numpy.random.default_rng(seed).uniform(lo, hi, shape)`` noise) and what the output must
look like (the first values of one flattened, dequantized output within ``atol``, and/or its
argmax). A model that is not the one the card describes (wrong weights, wrong quantization,
a corrupted or swapped file) fails here instead of producing plausible nonsense in production.

A card with no vectors passes vacuously (``results == []``); whether that is acceptable is the
caller's policy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.modelcard import ModelCard, SelfTestVector
from agent.runtime.base import Model, ModelRuntimeError, TensorSpec

__all__ = ["SelfTestError", "SelfTestReport", "VectorResult", "build_vector_input", "run_self_test"]

logger = logging.getLogger(__name__)


class SelfTestError(Exception):
    """A model failed its card's self-test; the message is the first failing vector's detail."""


@dataclass(frozen=True)
class VectorResult:
    """The outcome of one vector, with a one-line ``detail`` saying what was compared."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class SelfTestReport:
    """All vectors' outcomes; ``passed`` when every one passed (or there were none)."""

    passed: bool
    results: list[VectorResult]


class _VectorFailure(Exception):
    """Internal: a vector failed; carries the detail line."""


def _num(value: float) -> str:
    return f"{value:.6g}"


def build_vector_input(vector: SelfTestVector, tensor: TensorSpec) -> npt.NDArray[Any]:
    """The vector's input as an array of the input tensor's shape (dynamic dims taken as 1).

    Float values go in as float32 (the runtime quantizes them for quantized tensors); a plain
    integer tensor gets them rounded.

    Raises:
        SelfTestError: the vector's values do not fill the tensor's shape.
    """
    shape = tuple(d if d > 0 else 1 for d in tensor.shape)
    if vector.input_seed is not None:
        lo, hi = vector.input_range
        data = np.random.default_rng(vector.input_seed).uniform(lo, hi, shape).astype(np.float32)
    else:
        values = np.asarray(vector.input, dtype=np.float32)
        size = int(np.prod(shape))
        if values.size != size:
            raise SelfTestError(
                f"input has {values.size} values, expected {size} for shape {shape}"
            )
        data = values.reshape(shape)
    dtype = np.dtype(tensor.dtype)
    if np.issubdtype(dtype, np.integer) and not tensor.quantized:
        info = np.iinfo(dtype.name)
        return np.clip(np.rint(data), info.min, info.max).astype(dtype)
    return data


def _check_vector(model: Model, vector: SelfTestVector) -> str:
    """Run one vector; return the pass detail or raise :class:`_VectorFailure`."""
    label = f"vector {vector.name!r}"
    if not model.inputs:
        raise _VectorFailure(f"{label}: expected a model with an input tensor, got none")
    try:
        data = build_vector_input(vector, model.inputs[0])
    except SelfTestError as exc:
        raise _VectorFailure(f"{label}: {exc}") from exc
    try:
        outputs = model.run([data])
    except ModelRuntimeError as exc:
        raise _VectorFailure(f"{label}: expected the model to run, got {exc}") from exc
    if vector.output >= len(outputs):
        raise _VectorFailure(
            f"{label}: expected output[{vector.output}], the model has {len(outputs)} outputs"
        )
    flat = np.asarray(outputs[vector.output], dtype=np.float64).ravel()
    where = f"output[{vector.output}]"
    expected = np.asarray(vector.expected, dtype=np.float64)
    if flat.size < expected.size:
        raise _VectorFailure(
            f"{label}: {where} expected at least {expected.size} values, got {flat.size}"
        )
    got = flat[: expected.size]
    # NaN compares false, so a NaN output fails instead of slipping through.
    bad = np.flatnonzero(~(np.abs(got - expected) <= vector.atol))
    if bad.size:
        i = int(bad[0])
        raise _VectorFailure(
            f"{label}: {where}[{i}] expected {_num(expected[i])} +-{_num(vector.atol)}, "
            f"got {_num(got[i])}"
        )
    parts = []
    if expected.size:
        parts.append(f"{expected.size} values within +-{_num(vector.atol)}")
    if vector.expected_argmax is not None:
        argmax = int(np.argmax(flat)) if flat.size else -1
        if argmax != vector.expected_argmax:
            raise _VectorFailure(
                f"{label}: {where} argmax expected {vector.expected_argmax}, got {argmax}"
            )
        parts.append(f"argmax {argmax}")
    return f"{label}: ok, {where} {' and '.join(parts)}"


def run_self_test(model: Model, card: ModelCard, *, strict: bool = False) -> SelfTestReport:
    """Run every vector of ``card`` against ``model``.

    Raises:
        SelfTestError: ``strict`` and a vector failed (the message is the first failure's detail).
    """
    results: list[VectorResult] = []
    for vector in card.selftest:
        try:
            detail = _check_vector(model, vector)
        except _VectorFailure as exc:
            results.append(VectorResult(vector.name, False, str(exc)))
            logger.warning("self-test of %s %s failed: %s", card.name, card.version, exc)
        else:
            results.append(VectorResult(vector.name, True, detail))
            logger.debug("self-test of %s %s: %s", card.name, card.version, detail)
    report = SelfTestReport(all(r.passed for r in results), results)
    if strict and not report.passed:
        raise SelfTestError(next(r.detail for r in results if not r.passed))
    return report
