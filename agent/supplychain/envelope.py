"""The model encryption envelope: STREAM over ChaCha20-Poly1305 in fixed-size segments.

Format ``stream-chacha20poly1305-v1`` (all integers big-endian)::

    header   = b"edge-enc" | version:u8 = 1 | segment_size:u32 | nonce_prefix:7 bytes   (20 bytes)
    segment_i = ChaCha20-Poly1305(key, nonce_i, plaintext_i, associated_data=header)
    nonce_i  = nonce_prefix | i:u32 | last:u8 (1 for the final segment, else 0)
    file     = header | segment_0 | segment_1 | ... | segment_{n-1}

Invariants:
    * Every segment but the last holds exactly ``segment_size`` plaintext bytes; the last holds
      1..``segment_size`` bytes (0 only when the whole plaintext is empty, as a single segment).
      The segment layout is therefore a pure function of the ciphertext length.
    * The segment index and the last-segment flag are in the nonce, so reordering, dropping the
      final segment (truncation) or appending segments (trailing data) fail authentication of a
      named segment; the header (with its random nonce prefix) is the associated data of every
      segment, so a changed header or a segment spliced in from another file under the same key
      fails too. Each failure raises :class:`DecryptionError` naming the segment index.
    * One random 256-bit content key per model version. The 7-byte random nonce prefix keeps
      nonces unique even if a key were ever used for a second file.
    * Decryption is all-or-nothing for callers of :func:`decrypt_to_memory`: it returns only
      after every segment authenticated (and, if asked, the plaintext sha256 matched).

Sans-I/O apart from :func:`encrypt_file`, which streams between files for the packer.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from agent.supplychain.errors import DecryptionError, SupplyChainError

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "HEADER_LENGTH",
    "KEY_LENGTH",
    "MAX_SEGMENT_SIZE",
    "MIN_SEGMENT_SIZE",
    "SCHEME",
    "EnvelopeInfo",
    "EnvelopeLayout",
    "SegmentDecryptor",
    "decrypt_to_memory",
    "encrypt_bytes",
    "encrypt_file",
    "new_content_key",
]

SCHEME = "stream-chacha20poly1305-v1"
MAGIC = b"edge-enc"
VERSION = 1
KEY_LENGTH = 32
TAG_LENGTH = 16
NONCE_PREFIX_LENGTH = 7
HEADER_LENGTH = len(MAGIC) + 1 + 4 + NONCE_PREFIX_LENGTH
DEFAULT_SEGMENT_SIZE = 65536
MIN_SEGMENT_SIZE = 64
MAX_SEGMENT_SIZE = 16 * 1024 * 1024
MAX_SEGMENTS = 1 << 32

_HEADER = struct.Struct(f">{len(MAGIC)}sBI{NONCE_PREFIX_LENGTH}s")
_NONCE_SUFFIX = struct.Struct(">IB")


@dataclass(frozen=True)
class EnvelopeInfo:
    """What packing produced: the ciphertext's and the plaintext's digest and length."""

    ciphertext_sha256: str
    ciphertext_length: int
    plaintext_sha256: str
    plaintext_length: int
    segment_size: int
    scheme: str = SCHEME


@dataclass(frozen=True)
class EnvelopeLayout:
    """Where each segment sits in a ciphertext of a given length."""

    segment_size: int
    ciphertext_length: int
    segment_count: int
    plaintext_length: int

    @classmethod
    def for_ciphertext_length(cls, ciphertext_length: int, segment_size: int) -> EnvelopeLayout:
        """Compute the layout; raises :class:`DecryptionError` for an impossible length."""
        body = ciphertext_length - HEADER_LENGTH
        if body < TAG_LENGTH:
            raise DecryptionError(
                f"segment 0: expected at least {HEADER_LENGTH + TAG_LENGTH} ciphertext bytes,"
                f" got {ciphertext_length}"
            )
        stride = segment_size + TAG_LENGTH
        count = max(1, -(-body // stride))
        last = body - (count - 1) * stride
        if count > 1 and last < TAG_LENGTH + 1:
            raise DecryptionError(
                f"segment {count - 1}: expected {TAG_LENGTH + 1}..{stride} bytes, got {last}"
            )
        if count > MAX_SEGMENTS:
            raise DecryptionError(f"segment {MAX_SEGMENTS}: expected at most {MAX_SEGMENTS}")
        return cls(segment_size, ciphertext_length, count, body - count * TAG_LENGTH)

    def segment_range(self, index: int) -> tuple[int, int]:
        """``(start, end)`` byte offsets of segment ``index`` in the ciphertext."""
        if not 0 <= index < self.segment_count:
            raise DecryptionError(f"segment {index}: expected 0..{self.segment_count - 1}")
        stride = self.segment_size + TAG_LENGTH
        start = HEADER_LENGTH + index * stride
        return start, min(start + stride, self.ciphertext_length)


def new_content_key() -> bytes:
    """A fresh random 256-bit content key (one per model version)."""
    return secrets.token_bytes(KEY_LENGTH)


def _cipher(key: bytes | bytearray) -> ChaCha20Poly1305:
    if len(key) != KEY_LENGTH:
        raise DecryptionError(f"content key: expected {KEY_LENGTH} bytes, got {len(key)}")
    return ChaCha20Poly1305(bytes(key))


def _check_segment_size(segment_size: int) -> None:
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise SupplyChainError(
            f"segment size: expected {MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE}, got {segment_size}"
        )


def _make_header(segment_size: int, nonce_prefix: bytes | None) -> bytes:
    _check_segment_size(segment_size)
    prefix = secrets.token_bytes(NONCE_PREFIX_LENGTH) if nonce_prefix is None else nonce_prefix
    if len(prefix) != NONCE_PREFIX_LENGTH:
        raise SupplyChainError(
            f"nonce prefix: expected {NONCE_PREFIX_LENGTH} bytes, got {len(prefix)}"
        )
    return _HEADER.pack(MAGIC, VERSION, segment_size, prefix)


class SegmentDecryptor:
    """Authenticates and decrypts one segment at a time (resumable, out-of-band downloads).

    Build it from the 20-byte header, then pass each segment with its index and whether it is the
    last one (known from :class:`EnvelopeLayout` and the signed ciphertext length).
    """

    def __init__(self, key: bytes | bytearray, header: bytes | bytearray | memoryview) -> None:
        self._cipher = _cipher(key)
        header = bytes(header)
        if len(header) != HEADER_LENGTH:
            raise DecryptionError(
                f"segment 0: expected a {HEADER_LENGTH}-byte header, got {len(header)} bytes"
            )
        magic, version, segment_size, prefix = _HEADER.unpack(header)
        if magic != MAGIC:
            raise DecryptionError(f"segment 0: expected header magic {MAGIC!r}, got {magic!r}")
        if version != VERSION:
            raise DecryptionError(f"segment 0: expected envelope version {VERSION}, got {version}")
        if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
            raise DecryptionError(
                f"segment 0: expected a segment size in {MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE},"
                f" got {segment_size}"
            )
        self.header = header
        self.segment_size: int = segment_size
        self._prefix: bytes = prefix

    @classmethod
    def from_ciphertext(cls, key: bytes | bytearray, ciphertext: bytes) -> SegmentDecryptor:
        """Build from the start of a ciphertext (at least the header)."""
        return cls(key, ciphertext[:HEADER_LENGTH])

    def layout(self, ciphertext_length: int) -> EnvelopeLayout:
        """The segment layout of a ciphertext of ``ciphertext_length`` bytes with this header."""
        return EnvelopeLayout.for_ciphertext_length(ciphertext_length, self.segment_size)

    def decrypt_segment_into(
        self,
        index: int,
        segment: bytes | bytearray | memoryview,
        out: bytearray | memoryview,
        *,
        last: bool,
    ) -> int:
        """Authenticate segment ``index`` and write its plaintext into ``out``; returns its size.

        ``out`` must be exactly ``len(segment) - 16`` bytes long.
        """
        size = len(segment) - TAG_LENGTH
        if size < 0 or size > self.segment_size or (not last and size != self.segment_size):
            raise DecryptionError(
                f"segment {index}: expected {self.segment_size + TAG_LENGTH} bytes"
                f"{' or fewer (last)' if last else ''}, got {len(segment)}"
            )
        if not 0 <= index < MAX_SEGMENTS:
            raise DecryptionError(f"segment {index}: expected an index below {MAX_SEGMENTS}")
        nonce = self._prefix + _NONCE_SUFFIX.pack(index, 1 if last else 0)
        try:
            return int(self._cipher.decrypt_into(nonce, segment, self.header, out))
        except InvalidTag:
            role = "final" if last else "non-final"
            raise DecryptionError(
                f"segment {index}: failed authentication as a {role} segment (tampered,"
                " reordered, truncated or spliced); expected an intact segment"
            ) from None

    def decrypt_segment(
        self, index: int, segment: bytes | bytearray | memoryview, *, last: bool
    ) -> bytes:
        """Authenticate and decrypt segment ``index``; returns its plaintext."""
        out = bytearray(max(0, len(segment) - TAG_LENGTH))
        self.decrypt_segment_into(index, segment, out, last=last)
        return bytes(out)


def decrypt_to_memory(
    source: bytes | bytearray | memoryview | BinaryIO,
    key: bytes | bytearray,
    *,
    expected_plaintext_length: int | None = None,
    expected_plaintext_sha256: str | None = None,
) -> bytearray:
    """Decrypt a whole envelope into one preallocated bytearray (no temporary file).

    ``source`` is the ciphertext in memory or a seekable binary file. When given, the plaintext
    length is checked before decrypting and the sha256 after (hashed segment by segment).

    Raises:
        DecryptionError: naming the first segment that is missing, malformed or not authentic.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        view: memoryview | None = memoryview(source)
        stream: BinaryIO | None = None
        total = len(source)
        header = bytes(source[:HEADER_LENGTH])
    else:
        view = None
        stream = source
        start = stream.tell()
        total = stream.seek(0, io.SEEK_END) - start
        stream.seek(start)
        header = stream.read(HEADER_LENGTH)
    decryptor = SegmentDecryptor(key, header)
    layout = decryptor.layout(total)
    if (
        expected_plaintext_length is not None
        and layout.plaintext_length != expected_plaintext_length
    ):
        raise DecryptionError(
            f"segment {layout.segment_count - 1}: expected {expected_plaintext_length} plaintext"
            f" bytes in all, the ciphertext holds {layout.plaintext_length}"
        )
    plaintext = bytearray(layout.plaintext_length)
    out = memoryview(plaintext)
    hasher = hashlib.sha256() if expected_plaintext_sha256 is not None else None
    stride = layout.segment_size + TAG_LENGTH
    buffer = bytearray(stride) if stream is not None else None
    offset = 0
    last_index = layout.segment_count - 1
    for index in range(layout.segment_count):
        seg_start, seg_end = layout.segment_range(index)
        length = seg_end - seg_start
        if view is not None:
            segment = view[seg_start:seg_end]
        else:
            assert stream is not None and buffer is not None
            segment = memoryview(buffer)[:length]
            got = cast(io.BufferedIOBase, stream).readinto(segment)
            if got != length:
                raise DecryptionError(f"segment {index}: expected {length} bytes, got {got}")
        chunk = out[offset : offset + length - TAG_LENGTH]
        decryptor.decrypt_segment_into(index, segment, chunk, last=index == last_index)
        if hasher is not None:
            hasher.update(chunk)
        offset += length - TAG_LENGTH
    if hasher is not None and hasher.hexdigest() != expected_plaintext_sha256:
        raise DecryptionError(
            f"segment {last_index}: expected plaintext sha256 {expected_plaintext_sha256},"
            f" got {hasher.hexdigest()}"
        )
    return plaintext


class _SegmentEncryptor:
    """Writes the header and then one segment per call; the caller says which one is last."""

    def __init__(self, key: bytes | bytearray, segment_size: int, nonce_prefix: bytes | None):
        if len(key) != KEY_LENGTH:
            raise SupplyChainError(f"content key: expected {KEY_LENGTH} bytes, got {len(key)}")
        self._cipher = ChaCha20Poly1305(bytes(key))
        self.header = _make_header(segment_size, nonce_prefix)
        self._prefix = self.header[-NONCE_PREFIX_LENGTH:]
        self.segment_size = segment_size
        self._index = 0

    def _next_nonce(self, last: bool) -> bytes:
        if self._index >= MAX_SEGMENTS:
            raise SupplyChainError(f"plaintext: expected at most {MAX_SEGMENTS} segments")
        nonce = self._prefix + _NONCE_SUFFIX.pack(self._index, 1 if last else 0)
        self._index += 1
        return nonce

    def seal(self, plaintext: bytes | memoryview, *, last: bool) -> bytes:
        return self._cipher.encrypt(self._next_nonce(last), plaintext, self.header)

    def seal_into(self, plaintext: memoryview, out: memoryview, *, last: bool) -> None:
        self._cipher.encrypt_into(self._next_nonce(last), plaintext, self.header, out)


def encrypt_bytes(
    plaintext: bytes | bytearray | memoryview,
    key: bytes | bytearray,
    *,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    nonce_prefix: bytes | None = None,
) -> bytes:
    """Encrypt ``plaintext`` into a complete envelope (header + segments)."""
    encryptor = _SegmentEncryptor(key, segment_size, nonce_prefix)
    view = memoryview(plaintext)
    count = max(1, -(-len(view) // segment_size))
    sealed = bytearray(HEADER_LENGTH + len(view) + count * TAG_LENGTH)
    sealed[:HEADER_LENGTH] = encryptor.header
    out = memoryview(sealed)
    offset = HEADER_LENGTH
    for index in range(count):
        chunk = view[index * segment_size : (index + 1) * segment_size]
        end = offset + len(chunk) + TAG_LENGTH
        encryptor.seal_into(chunk, out[offset:end], last=index == count - 1)
        offset = end
    return bytes(sealed)


def encrypt_file(
    src: str | os.PathLike[str] | BinaryIO,
    dst: str | os.PathLike[str] | BinaryIO,
    key: bytes | bytearray,
    *,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    progress: Callable[[int], None] | None = None,
    nonce_prefix: bytes | None = None,
) -> EnvelopeInfo:
    """Stream ``src`` into an encrypted envelope at ``dst``, hashing both sides on the way.

    A path ``dst`` is written like :func:`agent.atomicio.atomic_write` (temporary file, fsync,
    rename, fsync of the directory), streamed so the model never sits in memory whole.
    ``progress`` is called with the number of plaintext bytes done after each segment.
    """
    encryptor = _SegmentEncryptor(key, segment_size, nonce_prefix)
    with contextlib.ExitStack() as stack:
        reader: BinaryIO = (
            stack.enter_context(open(src, "rb")) if isinstance(src, (str, os.PathLike)) else src
        )
        if isinstance(dst, (str, os.PathLike)):
            target = Path(dst)
            tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
            writer: BinaryIO = stack.enter_context(open(tmp, "wb"))
            try:
                info = _encrypt_stream(encryptor, reader, writer, progress)
                writer.flush()
                os.fsync(writer.fileno())
            except BaseException:
                writer.close()
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise
            writer.close()
            os.replace(tmp, target)
            dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            return info
        return _encrypt_stream(encryptor, reader, dst, progress)


def _encrypt_stream(
    encryptor: _SegmentEncryptor,
    reader: BinaryIO,
    writer: BinaryIO,
    progress: Callable[[int], None] | None,
) -> EnvelopeInfo:
    plain_hash = hashlib.sha256()
    cipher_hash = hashlib.sha256()
    cipher_length = 0
    plain_length = 0

    def emit(data: bytes) -> None:
        nonlocal cipher_length
        writer.write(data)
        cipher_hash.update(data)
        cipher_length += len(data)

    emit(encryptor.header)
    size = encryptor.segment_size
    current = _read_full(reader, size)
    while True:
        following = _read_full(reader, size) if len(current) == size else b""
        last = not following
        plain_hash.update(current)
        plain_length += len(current)
        emit(encryptor.seal(current, last=last))
        if progress is not None:
            progress(plain_length)
        if last:
            break
        current = following
    return EnvelopeInfo(
        ciphertext_sha256=cipher_hash.hexdigest(),
        ciphertext_length=cipher_length,
        plaintext_sha256=plain_hash.hexdigest(),
        plaintext_length=plain_length,
        segment_size=size,
    )


def _read_full(reader: BinaryIO, size: int) -> bytes:
    parts = []
    remaining = size
    while remaining:
        data = reader.read(remaining)
        if not data:
            break
        parts.append(data)
        remaining -= len(data)
    return b"".join(parts)
