"""Format sniffing: TFLite file identifier, ONNX ModelProto top-level walk."""

from __future__ import annotations

import random

import pytest

from agent.runtime import UnknownFormatError, detect_format, load_model
from agent.runtime.tflite import PROBE_MODEL


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def onnx_like_model() -> bytes:
    """A ModelProto as exporters lay it out: ir_version, producer, graph, opset_import."""
    graph = _field(1, b"node-bytes" * 50) + _field(2, b"graph")
    opset = _field(1, b"") + b"\x10\x11"  # domain "", version 17
    return (
        b"\x08\x08"  # ir_version 8
        + _field(2, b"pytorch")
        + _field(3, b"2.3")
        + _field(7, graph)
        + _field(8, opset)
    )


def test_tflite_identifier_at_bytes_4_to_8() -> None:
    assert detect_format(PROBE_MODEL) == "tflite"
    assert detect_format(b"\x00\x00\x00\x00TFL3") == "tflite"
    assert detect_format(bytearray(b"\x1c\x00\x00\x00TFL3rest")) == "tflite"


def test_onnx_model_proto_is_recognised() -> None:
    model = onnx_like_model()
    assert detect_format(model) == "onnx"
    assert detect_format(memoryview(model)) == "onnx"


def test_truncated_onnx_is_still_onnx_so_loading_reports_it_corrupt() -> None:
    model = onnx_like_model()
    assert detect_format(model[: len(model) // 2]) == "onnx"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"TFL3",
        b"\x08",  # ir_version tag, value missing
        b"\x08\x00" + _field(7, b"g"),  # ir_version 0
        b"\x08\x08\x98\x01\x00",  # field 19 is not a ModelProto field
        b"\x08\x08\x3d\x00\x00\x00\x00",  # graph (7) with a 32-bit wire type
        b"\x12\x03abc",  # producer_name first: not how a ModelProto is written
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        b"PK\x03\x04 a zip archive",
        b'{"name": "model"}',
        b"hello world, not a model",
    ],
)
def test_other_bytes_are_unknown(data: bytes) -> None:
    with pytest.raises(UnknownFormatError, match="expected a TFLite flatbuffer"):
        detect_format(data)


def test_random_bytes_are_rarely_taken_for_onnx() -> None:
    rng = random.Random(1234)
    blobs = [rng.randbytes(rng.randrange(1, 4096)) for _ in range(2000)]
    formats = []
    for blob in blobs:
        try:
            formats.append(detect_format(blob))
        except UnknownFormatError:
            formats.append("unknown")
    assert formats.count("tflite") == 0
    assert formats.count("onnx") <= 3  # needs 0x08, a small ir_version and valid tags after


def test_unknown_format_message_shows_the_first_bytes() -> None:
    with pytest.raises(UnknownFormatError, match=r"got 5 bytes starting 68 65 6c 6c 6f"):
        detect_format(b"hello")


def test_load_model_refuses_an_unknown_format_name() -> None:
    with pytest.raises(UnknownFormatError, match="unknown model format 'pytorch'"):
        load_model(PROBE_MODEL, format="pytorch")
