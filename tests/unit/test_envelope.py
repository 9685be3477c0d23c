"""The STREAM envelope: round trips, and every structural attack fails naming a segment."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.supplychain.envelope import (
    HEADER_LENGTH,
    EnvelopeLayout,
    SegmentDecryptor,
    decrypt_to_memory,
    encrypt_bytes,
    encrypt_file,
    new_content_key,
)
from agent.supplychain.errors import DecryptionError, SupplyChainError

SEG = 64
STRIDE = SEG + 16


def _segments(ciphertext: bytes) -> tuple[bytes, list[bytes]]:
    body = ciphertext[HEADER_LENGTH:]
    return ciphertext[:HEADER_LENGTH], [body[i : i + STRIDE] for i in range(0, len(body), STRIDE)]


def _segment_named(exc: pytest.ExceptionInfo[DecryptionError], index: int) -> None:
    assert re.match(rf"^segment {index}: ", str(exc.value)), str(exc.value)
    assert "\n" not in str(exc.value)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=5 * SEG + 7))
def test_round_trip_any_length(plaintext: bytes) -> None:
    key = new_content_key()
    ciphertext = encrypt_bytes(plaintext, key, segment_size=SEG)
    assert decrypt_to_memory(ciphertext, key) == plaintext
    assert decrypt_to_memory(io.BytesIO(ciphertext), key) == plaintext
    layout = EnvelopeLayout.for_ciphertext_length(len(ciphertext), SEG)
    assert layout.plaintext_length == len(plaintext)
    assert layout.segment_count == max(1, -(-len(plaintext) // SEG))


def test_encrypt_file_matches_encrypt_bytes_and_reports_digests(tmp_path: Path) -> None:
    key = new_content_key()
    plaintext = bytes(range(256)) * 10  # exactly 40 segments of 64
    src = tmp_path / "model.onnx"
    src.write_bytes(plaintext)
    seen: list[int] = []
    info = encrypt_file(
        src,
        tmp_path / "model.enc",
        key,
        segment_size=SEG,
        progress=seen.append,
        nonce_prefix=b"p" * 7,
    )
    ciphertext = (tmp_path / "model.enc").read_bytes()
    assert ciphertext == encrypt_bytes(plaintext, key, segment_size=SEG, nonce_prefix=b"p" * 7)
    assert info.ciphertext_sha256 == hashlib.sha256(ciphertext).hexdigest()
    assert info.ciphertext_length == len(ciphertext)
    assert info.plaintext_sha256 == hashlib.sha256(plaintext).hexdigest()
    assert info.plaintext_length == len(plaintext)
    assert seen[-1] == len(plaintext) and len(seen) == 40
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_two_encryptions_differ_by_nonce_prefix() -> None:
    key = new_content_key()
    assert encrypt_bytes(b"x" * 100, key) != encrypt_bytes(b"x" * 100, key)


def test_expected_sha256_and_length_are_checked() -> None:
    key = new_content_key()
    ciphertext = encrypt_bytes(b"a" * 200, key, segment_size=SEG)
    good = hashlib.sha256(b"a" * 200).hexdigest()
    assert decrypt_to_memory(ciphertext, key, expected_plaintext_sha256=good) == b"a" * 200
    with pytest.raises(DecryptionError, match="expected plaintext sha256") as exc:
        decrypt_to_memory(ciphertext, key, expected_plaintext_sha256="0" * 64)
    _segment_named(exc, 3)
    with pytest.raises(DecryptionError, match="expected 201 plaintext bytes"):
        decrypt_to_memory(ciphertext, key, expected_plaintext_length=201)


@pytest.fixture
def sample() -> tuple[bytes, bytes, bytes]:
    key = new_content_key()
    plaintext = bytes(range(250))  # 4 segments: 64, 64, 64, 58
    return key, plaintext, encrypt_bytes(plaintext, key, segment_size=SEG)


def test_flipped_bit_names_its_segment(sample: tuple[bytes, bytes, bytes]) -> None:
    key, _, ciphertext = sample
    tampered = bytearray(ciphertext)
    tampered[HEADER_LENGTH + 2 * STRIDE + 5] ^= 0x01
    with pytest.raises(DecryptionError) as exc:
        decrypt_to_memory(bytes(tampered), key)
    _segment_named(exc, 2)


def test_reordered_segments_fail(sample: tuple[bytes, bytes, bytes]) -> None:
    key, _, ciphertext = sample
    header, segs = _segments(ciphertext)
    swapped = header + segs[1] + segs[0] + segs[2] + segs[3]
    with pytest.raises(DecryptionError) as exc:
        decrypt_to_memory(swapped, key)
    _segment_named(exc, 0)


def test_truncation_at_a_segment_boundary_fails(sample: tuple[bytes, bytes, bytes]) -> None:
    key, _, ciphertext = sample
    header, segs = _segments(ciphertext)
    with pytest.raises(DecryptionError) as exc:
        decrypt_to_memory(header + b"".join(segs[:3]), key)  # missing last segment
    _segment_named(exc, 2)


def test_truncation_inside_a_segment_fails(sample: tuple[bytes, bytes, bytes]) -> None:
    key, _, ciphertext = sample
    with pytest.raises(DecryptionError) as exc:
        decrypt_to_memory(ciphertext[:-10], key)
    _segment_named(exc, 3)


def test_trailing_data_fails(sample: tuple[bytes, bytes, bytes]) -> None:
    key, _, ciphertext = sample
    with pytest.raises(DecryptionError) as exc:
        decrypt_to_memory(ciphertext + b"\x00" * 5, key)  # glued onto the short last segment
    _segment_named(exc, 3)
    with pytest.raises(DecryptionError) as exc:
        decrypt_to_memory(ciphertext + b"\x00" * STRIDE, key)  # old last is no longer last
    _segment_named(exc, 3)
    full = encrypt_bytes(bytes(4 * SEG), key, segment_size=SEG)
    with pytest.raises(DecryptionError, match=r"expected 17\.\.80 bytes, got 5") as exc:
        decrypt_to_memory(full + b"\x00" * 5, key)  # too short to be a segment at all
    _segment_named(exc, 4)


def test_segment_spliced_from_another_file_under_the_same_key_fails(
    sample: tuple[bytes, bytes, bytes],
) -> None:
    key, _, ciphertext = sample
    other = encrypt_bytes(bytes(250), key, segment_size=SEG)
    header, segs = _segments(ciphertext)
    _, other_segs = _segments(other)
    spliced = header + segs[0] + other_segs[1] + segs[2] + segs[3]
    with pytest.raises(DecryptionError) as exc:
        decrypt_to_memory(spliced, key)
    _segment_named(exc, 1)


def test_changed_header_fails(sample: tuple[bytes, bytes, bytes]) -> None:
    key, _, ciphertext = sample
    tampered = bytearray(ciphertext)
    tampered[-HEADER_LENGTH - 1] ^= 1  # last byte, sanity: payload tamper
    tampered = bytearray(ciphertext)
    tampered[HEADER_LENGTH - 1] ^= 1  # nonce prefix
    with pytest.raises(DecryptionError) as exc:
        decrypt_to_memory(bytes(tampered), key)
    _segment_named(exc, 0)
    bad_version = bytearray(ciphertext)
    bad_version[8] = 2
    with pytest.raises(DecryptionError, match="expected envelope version 1, got 2"):
        decrypt_to_memory(bytes(bad_version), key)
    with pytest.raises(DecryptionError, match="expected header magic"):
        decrypt_to_memory(b"X" + ciphertext[1:], key)


def test_wrong_key_fails_at_segment_zero(sample: tuple[bytes, bytes, bytes]) -> None:
    _, _, ciphertext = sample
    with pytest.raises(DecryptionError) as exc:
        decrypt_to_memory(ciphertext, new_content_key())
    _segment_named(exc, 0)
    with pytest.raises(DecryptionError, match="expected 32 bytes, got 16"):
        decrypt_to_memory(ciphertext, b"k" * 16)


def test_segment_decryptor_verifies_segments_as_they_arrive(
    sample: tuple[bytes, bytes, bytes],
) -> None:
    key, plaintext, ciphertext = sample
    decryptor = SegmentDecryptor.from_ciphertext(key, ciphertext)
    layout = decryptor.layout(len(ciphertext))
    out = b""
    for index in range(layout.segment_count):
        start, end = layout.segment_range(index)
        out += decryptor.decrypt_segment(
            index, ciphertext[start:end], last=index == layout.segment_count - 1
        )
    assert out == plaintext
    start, end = layout.segment_range(3)
    with pytest.raises(DecryptionError) as exc:
        decryptor.decrypt_segment(3, ciphertext[start:end], last=False)
    _segment_named(exc, 3)


def test_empty_plaintext_is_one_final_segment() -> None:
    key = new_content_key()
    ciphertext = encrypt_bytes(b"", key, segment_size=SEG)
    assert len(ciphertext) == HEADER_LENGTH + 16
    assert decrypt_to_memory(ciphertext, key) == b""
    with pytest.raises(DecryptionError) as exc:
        decrypt_to_memory(ciphertext[:HEADER_LENGTH], key)
    _segment_named(exc, 0)


def test_segment_size_bounds() -> None:
    with pytest.raises(SupplyChainError, match="segment size"):
        encrypt_bytes(b"x", new_content_key(), segment_size=8)
