"""The TFLite flatbuffer structure check that guards runtimes without a verifier."""

from __future__ import annotations

import struct

import pytest

from agent.runtime.tflite import PROBE_MODEL
from agent.runtime.tflite_check import TfliteStructureError, check_tflite_structure


def test_a_sound_model_passes() -> None:
    check_tflite_structure(PROBE_MODEL)


@pytest.mark.parametrize("length", range(len(PROBE_MODEL)))
def test_every_truncation_is_refused(length: int) -> None:
    with pytest.raises(TfliteStructureError):
        check_tflite_structure(PROBE_MODEL[:length])


@pytest.mark.parametrize("root", [0, 2, len(PROBE_MODEL) - 2, 0xFFFFFFF0])
def test_root_offsets_that_point_nowhere_are_refused(root: int) -> None:
    damaged = struct.pack("<I", root) + PROBE_MODEL[4:]
    with pytest.raises(TfliteStructureError):
        check_tflite_structure(damaged)


def _replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1
    return data.replace(old, new)


def test_a_string_without_its_terminator_is_refused() -> None:
    # The tensor name "x" is stored as length 1, b"x", NUL.
    damaged = _replace_once(PROBE_MODEL, b"\x01\x00\x00\x00x\x00", b"\x01\x00\x00\x00xy")
    with pytest.raises(TfliteStructureError, match="not NUL-terminated"):
        check_tflite_structure(damaged)


def test_a_vector_longer_than_the_buffer_is_refused() -> None:
    damaged = _replace_once(PROBE_MODEL, b"\x01\x00\x00\x00x\x00", b"\xff\xff\x00\x00x\x00")
    with pytest.raises(TfliteStructureError, match="lies outside the 156-byte model"):
        check_tflite_structure(damaged)


def test_errors_are_one_line() -> None:
    with pytest.raises(TfliteStructureError) as caught:
        check_tflite_structure(PROBE_MODEL[:40])
    assert "\n" not in str(caught.value)
