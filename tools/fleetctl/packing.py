"""Packing a model for the fleet: card, self-test, optional int8 quantization, encryption, signing.

``pack_model`` takes a plaintext ``.tflite``/``.onnx`` file and leaves behind:

* an encrypted artifact (``agent.supplychain.envelope``, a fresh 256-bit content key) added to
  the image repository as ``models/{name}/{version}/model.{format}.enc`` with ``custom`` =
  ``ImageTargetCustom(card, EncryptionInfo(...))``, signed with the image targets keys;
* a registry row with the hashes, sizes, card and the content key (for later grants).

The plaintext never enters the repository. The card is read from ``--card``, else from
``MODEL.card.json`` beside the model, else derived from the model's tensors; its name, version,
format, sha256 and size are always set from what is being packed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.modelcard import ModelCard, ModelCardError, card_from_json
from agent.pipeline.predictor import derive_card
from agent.pipeline.selftest import build_vector_input, run_self_test
from agent.runtime import Model, ModelRuntimeError, RuntimeMissingError, detect_format, load_model
from agent.supplychain.envelope import DEFAULT_SEGMENT_SIZE, encrypt_file, new_content_key
from agent.supplychain.targets import EncryptionInfo, ImageTargetCustom, target_path
from tools.fleetctl import FleetctlError
from tools.fleetctl.home import FleetHome
from tools.fleetctl.quantize import QUANTIZATION_LABEL, QuantizeResult, quantize_onnx_int8
from tools.fleetctl.registry import ModelRecord

__all__ = [
    "MAX_PACK_BYTES",
    "PackError",
    "PackResult",
    "image_custom_metadata",
    "pack_model",
    "read_card",
]

logger = logging.getLogger(__name__)

MAX_PACK_BYTES = 2 * 1024**3
_SUFFIX_FORMATS = {".tflite": "tflite", ".onnx": "onnx"}


class PackError(FleetctlError):
    """The model, its card or its self-test is not acceptable for packing."""


@dataclass(frozen=True)
class PackResult:
    """What ``model add`` did."""

    record: ModelRecord
    selftest: str  # "passed (n vectors)", "no vectors", or "skipped: <reason>"
    quantized: QuantizeResult | None


def _model_format(path: Path, data: bytes) -> str:
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        try:
            fmt = detect_format(data)
        except ModelRuntimeError as exc:
            raise PackError(f"{path}: expected a .tflite or .onnx model ({exc})") from exc
    if fmt not in ("tflite", "onnx"):
        raise PackError(f"{path}: expected a .tflite or .onnx model, got {path.suffix!r}")
    return fmt


def read_card(path: Path) -> ModelCard:
    """Load and validate a card file; raises :class:`PackError` with the card's own message."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise PackError(f"{path}: cannot read the card ({exc.strerror})") from exc
    try:
        return card_from_json(text)
    except ModelCardError as exc:
        raise PackError(f"{path}: {exc}") from exc


def _load_runtime_model(data: bytes, fmt: str) -> tuple[Model | None, str]:
    """``(model, "")`` or ``(None, reason)`` when no runtime for ``fmt`` is installed."""
    try:
        return load_model(data, format=fmt), ""
    except RuntimeMissingError as exc:
        return None, str(exc)
    except ModelRuntimeError as exc:
        raise PackError(f"model: expected a {fmt} model the runtime can load ({exc})") from exc


def _run_selftest(model: Any, card: ModelCard) -> str:
    report = run_self_test(model, card)
    if not report.passed:
        failed = next(r for r in report.results if not r.passed)
        raise PackError(f"self-test vector {failed.name!r} failed: {failed.detail}")
    return f"passed ({len(report.results)} vectors)" if report.results else "no vectors"


def _rerecord_vectors(model: Any, card: ModelCard) -> ModelCard:
    """Re-record the expected output values of each vector from the quantized model.

    Float expectations do not hold for int8 outputs; the argmax expectations are kept and still
    checked, so a quantization that changes a vector's class is refused.
    """
    vectors = []
    for vector in card.selftest:
        if not vector.expected:
            vectors.append(vector)
            continue
        tensor = model.inputs[0]
        outputs = model.run([build_vector_input(vector, tensor)])
        flat = np.asarray(outputs[vector.output], dtype=np.float64).reshape(-1)
        expected = tuple(float(v) for v in flat[: len(vector.expected)])
        vectors.append(dataclasses.replace(vector, expected=expected, atol=max(vector.atol, 0.02)))
    return dataclasses.replace(card, selftest=tuple(vectors))


def _card_beside(model_path: Path) -> Path | None:
    beside = model_path.with_name(model_path.name + ".card.json")
    return beside if beside.is_file() else None


def _derived_card(model: Model | None, fmt: str) -> ModelCard:
    if model is not None:
        try:
            return derive_card(model)
        except Exception as exc:  # PredictorError: fall back to the minimal card
            logger.warning("cannot derive a card from the model (%s); using a raw card", exc)
    return ModelCard(name="model", version="0", format=fmt)  # type: ignore[arg-type]


def pack_model(
    home: FleetHome,
    model_path: Path,
    *,
    name: str,
    version: str,
    card_path: Path | None = None,
    calibration: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] = logger.warning,
    allow_failing_selftest: bool = False,
) -> PackResult:
    """Pack, encrypt, sign and register ``model_path`` as NAME@VERSION.

    Args:
        progress: called with ``(bytes_done, bytes_total)`` while encrypting.
        warn: receives one-line warnings (e.g. no runtime installed to self-test).
        allow_failing_selftest: pack a model whose card self-test fails (with a loud warning),
            e.g. to stage a broken version for rollback drills; devices still refuse it.

    Raises:
        PackError, RegistryError, RepositoryError: one-line reasons to refuse.
    """
    target_path(name, version, "onnx")  # validates name and version before any work
    with home.registry() as registry:
        if registry.find_model(name, version) is not None:
            raise PackError(f"model {name}@{version} exists already; expected a new version")
    try:
        size = model_path.stat().st_size
    except OSError as exc:
        raise PackError(f"{model_path}: cannot read the model ({exc.strerror})") from exc
    if size == 0 or size > MAX_PACK_BYTES:
        raise PackError(f"{model_path}: expected 1..{MAX_PACK_BYTES} bytes, got {size}")
    data = model_path.read_bytes()
    fmt = _model_format(model_path, data)
    path = target_path(name, version, fmt)

    quantized: QuantizeResult | None = None
    if calibration is not None:
        if fmt != "onnx":
            raise PackError(f"--quantize: expected a float ONNX model, got a {fmt} model")
        quantized = quantize_onnx_int8(data, calibration)
        data = quantized.model

    card_file = card_path if card_path is not None else _card_beside(model_path)
    given_card = read_card(card_file) if card_file is not None else None  # errors before work
    model, missing = _load_runtime_model(data, fmt)
    card = given_card if given_card is not None else _derived_card(model, fmt)
    if quantized is not None:
        metrics = dict(card.metrics)
        if quantized.int8_accuracy is not None:
            metrics["accuracy"] = round(quantized.int8_accuracy, 6)
        if quantized.float_accuracy is not None:
            metrics["float_accuracy"] = round(quantized.float_accuracy, 6)
            metrics.pop("test_samples", None)  # described the float model's accuracy
            metrics["accuracy_samples"] = float(quantized.calibration_samples)
        card = dataclasses.replace(card, quantization=QUANTIZATION_LABEL, metrics=metrics)
        if model is not None:
            card = _rerecord_vectors(model, card)
    card = dataclasses.replace(
        card,
        name=name,
        version=version,
        format=fmt,  # type: ignore[arg-type]
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )
    card = _revalidate(card)
    if model is None:
        selftest = f"skipped: {missing}"
        warn(f"warning: self-test skipped, no runtime for {fmt} ({missing})")
    else:
        try:
            selftest = _run_selftest(model, card)
        except PackError as exc:
            if not allow_failing_selftest:
                raise
            warn(
                f"WARNING: {exc}; packed anyway (--allow-failing-selftest):"
                f" devices will refuse {card.name}@{card.version}"
            )
            selftest = f"FAILED, packed anyway ({exc})"

    key = new_content_key()
    image = home.image()
    scratch = home.root / "tmp"
    scratch.mkdir(mode=0o700, exist_ok=True)
    ciphertext = scratch / f"{os.getpid()}.enc"
    total = len(data)
    try:
        info = encrypt_file(
            io.BytesIO(data),
            ciphertext,
            key,
            segment_size=DEFAULT_SEGMENT_SIZE,
            progress=None if progress is None else (lambda done: progress(done, total)),
        )
        custom = ImageTargetCustom(
            card=card,
            encryption=EncryptionInfo(
                scheme="stream-chacha20poly1305-v1",
                segment_size=info.segment_size,
                plaintext_sha256=info.plaintext_sha256,
                plaintext_length=info.plaintext_length,
            ),
        )
        custom.check_path(path)
        target = image.add_target(path, ciphertext, image_custom_metadata(custom))
    finally:
        ciphertext.unlink(missing_ok=True)
    if target.hashes["sha256"] != info.ciphertext_sha256:
        raise PackError(f"{path}: ciphertext changed while it was being added; expected no race")
    with home.registry() as registry:
        record = registry.add_model(
            name=name,
            version=version,
            format=fmt,
            target_path=path,
            plaintext_sha256=info.plaintext_sha256,
            plaintext_size=info.plaintext_length,
            ciphertext_sha256=info.ciphertext_sha256,
            ciphertext_size=info.ciphertext_length,
            card=card.to_dict(),
            content_key=key,
        )
    return PackResult(record=record, selftest=selftest, quantized=quantized)


def image_custom_metadata(custom: ImageTargetCustom) -> dict[str, Any]:
    """``custom`` as it is signed into image targets metadata: the card as its JSON text.

    TUF signs the canonical JSON of the metadata, and canonical JSON has no floats, while
    every real card has some (normalisation, quantization scales, self-test values). The card
    therefore travels as one string, ``card_to_json(card)``, bounded like any card file; the
    encryption data holds only strings and integers and stays an object.
    """
    return custom.to_dict()  # ImageTargetCustom.to_dict emits the card as card_to_json text


def _revalidate(card: ModelCard) -> ModelCard:
    """Round-trip through the strict loader, so a replaced field is checked like a parsed one."""
    try:
        return ModelCard.from_dict(card.to_dict())
    except ModelCardError as exc:
        raise PackError(f"card: {exc}") from exc
