"""Target paths and the ``custom`` data of image and director targets, as strict dataclasses.

Image target ``models/{name}/{version}/model.{format}.enc``::

    custom = {"card": <ModelCard as JSON text>, "encryption": {"scheme":
              "stream-chacha20poly1305-v1", "segment_size": 65536, "plaintext_sha256": hex,
              "plaintext_length": int}}

The card travels as one JSON string (``card_to_json``): TUF signs canonical JSON, which has no
floats, and real cards hold floats. Loading also accepts the card as an object.

Director target (same path, length and hashes as the image target)::

    custom = {"device_id": id, "grant": <Grant>}

Everything is loaded with :mod:`agent.schema`: unknown keys are errors, sizes are bounded, and
a card must name the same model, version and format as its target path (and, when the card
states them, the same plaintext digest and size as the encryption data). Pure data, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.modelcard import ModelCard, ModelFormat, card_from_json, card_to_json
from agent.schema import SchemaError, dump, field_meta, load
from agent.supplychain.envelope import MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE
from agent.supplychain.errors import GrantError, TargetMetadataError
from agent.supplychain.grants import Grant

__all__ = [
    "MAX_MODEL_BYTES",
    "DirectorTargetCustom",
    "EncryptionInfo",
    "ImageTargetCustom",
    "ParsedTargetPath",
    "parse_target_path",
    "target_path",
]

MAX_MODEL_BYTES = 4 * 1024**3
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_PATH = re.compile(
    r"^models/(?P<name>[^/]+)/(?P<version>[^/]+)/model\.(?P<format>tflite|onnx)\.enc$"
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FORMATS: tuple[ModelFormat, ...] = ("tflite", "onnx")


def _check_component(kind: str, value: str) -> None:
    if not _NAME.match(value) or ".." in value:
        raise TargetMetadataError(
            f"model {kind}: expected 1-128 of [A-Za-z0-9._+-] starting alphanumeric, without"
            f" '..', got {value!r}"
        )


def target_path(name: str, version: str, fmt: str) -> str:
    """The image/director target path of a model version: ``models/{name}/{version}/model.{fmt}.enc``."""  # noqa: E501
    _check_component("name", name)
    _check_component("version", version)
    if fmt not in _FORMATS:
        raise TargetMetadataError(f"model format: expected one of {_FORMATS}, got {fmt!r}")
    return f"models/{name}/{version}/model.{fmt}.enc"


@dataclass(frozen=True)
class ParsedTargetPath:
    """The parts of a model target path."""

    name: str
    version: str
    format: ModelFormat


def parse_target_path(path: str) -> ParsedTargetPath:
    """Split a target path; raises :class:`TargetMetadataError` for anything else."""
    match = _PATH.match(path)
    if match is None:
        raise TargetMetadataError(
            f"target path: expected models/NAME/VERSION/model.FORMAT.enc, got {path[:80]!r}"
        )
    parsed = ParsedTargetPath(
        match["name"], match["version"], "tflite" if match["format"] == "tflite" else "onnx"
    )
    _check_component("name", parsed.name)
    _check_component("version", parsed.version)
    return parsed


def _check_sha256(name: str, value: str) -> None:
    if not _SHA256.match(value):
        raise TargetMetadataError(f"{name}: expected 64 lowercase hex digits, got {value[:70]!r}")


@dataclass(frozen=True)
class EncryptionInfo:
    """How an image target is encrypted, and what its plaintext must hash to."""

    scheme: Literal["stream-chacha20poly1305-v1"]
    segment_size: int = field(
        metadata=field_meta(
            "plaintext bytes per segment", min=MIN_SEGMENT_SIZE, max=MAX_SEGMENT_SIZE
        )
    )
    plaintext_sha256: str = field(
        metadata=field_meta("sha256 of the plaintext model", min_len=64, max_len=64)
    )
    plaintext_length: int = field(
        metadata=field_meta("plaintext size in bytes", min=0, max=MAX_MODEL_BYTES)
    )

    def __post_init__(self) -> None:
        _check_sha256("encryption.plaintext_sha256", self.plaintext_sha256)


def _load(cls: type[Any], data: Any, path: str) -> Any:
    try:
        return load(cls, data, path=path)
    except TargetMetadataError:
        raise
    except (SchemaError, GrantError) as exc:
        raise TargetMetadataError(str(exc)) from exc


@dataclass(frozen=True)
class ImageTargetCustom:
    """The ``custom`` field of an image-repository target: the card and the encryption data."""

    card: ModelCard
    encryption: EncryptionInfo

    def __post_init__(self) -> None:
        if self.card.sha256 and self.card.sha256 != self.encryption.plaintext_sha256:
            raise TargetMetadataError(
                f"card.sha256: expected {self.encryption.plaintext_sha256} (the encryption"
                f" plaintext_sha256), got {self.card.sha256}"
            )
        if self.card.size and self.card.size != self.encryption.plaintext_length:
            raise TargetMetadataError(
                f"card.size: expected {self.encryption.plaintext_length} (the encryption"
                f" plaintext_length), got {self.card.size}"
            )

    @classmethod
    def from_dict(cls, data: Any) -> ImageTargetCustom:
        """Strictly load (card as JSON text or object); raises :class:`TargetMetadataError`."""
        if isinstance(data, dict) and isinstance(data.get("card"), str):
            try:
                card = card_from_json(data["card"])
            except SchemaError as exc:
                raise TargetMetadataError(f"custom.{exc}") from exc
            data = {**data, "card": card.to_dict()}
        loaded: ImageTargetCustom = _load(cls, data, "custom")
        return loaded

    def to_dict(self) -> dict[str, Any]:
        """JSON data for ``TargetFile.unrecognized_fields['custom']`` (card as JSON text)."""
        out: dict[str, Any] = dump(self)
        out["card"] = card_to_json(self.card)
        return out

    def check_path(self, path: str) -> None:
        """Require the card to name the model, version and format of target ``path``."""
        parsed = parse_target_path(path)
        got = (self.card.name, self.card.version, self.card.format)
        want = (parsed.name, parsed.version, parsed.format)
        if got != want:
            raise TargetMetadataError(
                f"card of {path!r}: expected name/version/format {want}, got {got}"
            )


@dataclass(frozen=True)
class DirectorTargetCustom:
    """The ``custom`` field of a director target: which device, and its key grant."""

    device_id: str = field(metadata=field_meta("device this target is for", min_len=1, max_len=128))
    grant: Grant

    @classmethod
    def from_dict(cls, data: Any) -> DirectorTargetCustom:
        """Strictly load; raises :class:`TargetMetadataError`."""
        loaded: DirectorTargetCustom = _load(cls, data, "custom")
        return loaded

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible data for ``TargetFile.unrecognized_fields['custom']``."""
        out: dict[str, Any] = dump(self)
        return out
