"""Model format sniffing from the first bytes of a model: ``tflite`` or ``onnx``.

* TFLite models are FlatBuffers whose file identifier ``TFL3`` sits at bytes 4..8.
* ONNX models are a serialized protobuf ``ModelProto``. Serializers write fields in field-number
  order, so a model starts with ``ir_version`` (field 1, varint). We accept the bytes when they
  start that way and the top-level fields that follow are ``ModelProto`` fields with the right
  wire types, up to the end of the data or to a length that runs past it (a truncated model is
  still an ONNX model, and loading it then reports it as corrupt). Walking the top level skips
  each length-delimited field in one step, so the cost does not grow with the model size.
"""

from __future__ import annotations

from agent.runtime.base import UnknownFormatError

__all__ = ["FORMATS", "detect_format"]

FORMATS = ("tflite", "onnx")

TFLITE_IDENTIFIER = b"TFL3"

_VARINT = 0
_I64 = 1
_LEN = 2
_I32 = 5

# ModelProto field number -> wire type (onnx.proto3).
_MODEL_PROTO_FIELDS = {
    1: _VARINT,  # ir_version
    2: _LEN,  # producer_name
    3: _LEN,  # producer_version
    4: _LEN,  # domain
    5: _VARINT,  # model_version
    6: _LEN,  # doc_string
    7: _LEN,  # graph
    8: _LEN,  # opset_import
    14: _LEN,  # metadata_props
    20: _LEN,  # training_info
    25: _LEN,  # functions
    26: _LEN,  # configuration
}
_MAX_IR_VERSION = 1000
_MAX_TOP_LEVEL_FIELDS = 10_000


class _Truncated(Exception):
    """The data ends inside a field."""


class _NotOnnx(Exception):
    """The data is not a ModelProto."""


def detect_format(data: bytes | bytearray | memoryview) -> str:
    """Return ``"tflite"`` or ``"onnx"`` for model bytes.

    Raises:
        UnknownFormatError: the bytes are neither (the message shows the first bytes).
    """
    head = bytes(data[:8])
    if len(head) == 8 and head[4:8] == TFLITE_IDENTIFIER:
        return "tflite"
    if _looks_like_onnx(data):
        return "onnx"
    raise UnknownFormatError(
        f"unknown model format: expected a TFLite flatbuffer ('TFL3' at bytes 4..8) or an ONNX "
        f"ModelProto, got {len(data)} bytes starting {head.hex(' ') or '(empty)'}"
    )


def _looks_like_onnx(data: bytes | bytearray | memoryview) -> bool:
    view = memoryview(data)
    try:
        pos, field_number, wire_type = _read_tag(view, 0)
        if field_number != 1 or wire_type != _VARINT:
            return False
        pos, ir_version = _read_varint(view, pos)
    except (_Truncated, _NotOnnx):
        return False
    if not 1 <= ir_version <= _MAX_IR_VERSION:
        return False
    try:
        for _ in range(_MAX_TOP_LEVEL_FIELDS):
            if pos == len(view):
                return True
            pos, field_number, wire_type = _read_tag(view, pos)
            if _MODEL_PROTO_FIELDS.get(field_number) != wire_type:
                return False
            pos = _skip_value(view, pos, wire_type)
        return True
    except _Truncated:
        return True
    except _NotOnnx:
        return False


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(view):
            raise _Truncated
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return pos, value
    raise _NotOnnx


def _read_tag(view: memoryview, pos: int) -> tuple[int, int, int]:
    pos, key = _read_varint(view, pos)
    return pos, key >> 3, key & 0x7


def _skip_value(view: memoryview, pos: int, wire_type: int) -> int:
    if wire_type == _VARINT:
        pos, _ = _read_varint(view, pos)
        return pos
    if wire_type == _LEN:
        pos, length = _read_varint(view, pos)
        end = pos + length
    elif wire_type == _I64:
        end = pos + 8
    else:
        end = pos + 4
    if end > len(view):
        raise _Truncated
    return end
