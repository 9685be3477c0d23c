"""``python -m tools.bench supplychain``: model envelope throughput and packing time.

Measures, on one machine in one run (medians of ``--runs`` repetitions):

* streaming decrypt + verify (per-segment ChaCha20-Poly1305 into one preallocated bytearray,
  plus the plaintext sha256) against a one-shot ChaCha20-Poly1305 decrypt of the same bytes;
  the target is a ratio of at least 0.5;
* streaming decrypt alone, and encryption (in memory and file to file);
* the time to pack a model: encrypt + hash, and adding the signed target to a fresh image
  repository with the controller's repository code.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from agent.modelcard import ModelCard
from agent.supplychain.envelope import (
    DEFAULT_SEGMENT_SIZE,
    decrypt_to_memory,
    encrypt_bytes,
    encrypt_file,
    new_content_key,
)
from agent.supplychain.targets import EncryptionInfo, ImageTargetCustom, target_path
from tools.bench.table import median, print_table

__all__ = ["main"]

_MIB = 1024 * 1024


def _time(fn: Callable[[], object], runs: int) -> float:
    """Median wall time of ``fn`` over ``runs`` calls (after one warm-up)."""
    fn()
    samples: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return median(samples)


def main(argv: list[str] | None = None) -> int:
    """Run the supply-chain benchmark and print its tables."""
    parser = argparse.ArgumentParser(prog="python -m tools.bench supplychain", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=20, help="model size (default 20 MiB)")
    parser.add_argument("--runs", type=int, default=7, help="repetitions per measurement")
    parser.add_argument(
        "--segment-size", type=int, default=DEFAULT_SEGMENT_SIZE, help="envelope segment size"
    )
    args = parser.parse_args(argv)
    size: int = args.size_mib * _MIB
    plaintext = os.urandom(size)
    key = new_content_key()
    sealed = encrypt_bytes(plaintext, key, segment_size=args.segment_size)
    digest = hashlib.sha256(plaintext).hexdigest()
    nonce = os.urandom(12)
    one_shot_cipher = ChaCha20Poly1305(key)
    one_shot = one_shot_cipher.encrypt(nonce, plaintext, None)

    def streaming_verify() -> object:
        return decrypt_to_memory(
            sealed, key, expected_plaintext_length=size, expected_plaintext_sha256=digest
        )

    assert streaming_verify() == plaintext
    t_stream_verify = _time(streaming_verify, args.runs)
    t_stream = _time(lambda: decrypt_to_memory(sealed, key), args.runs)
    t_one_shot = _time(lambda: one_shot_cipher.decrypt(nonce, one_shot, None), args.runs)
    t_one_shot_hash = _time(
        lambda: hashlib.sha256(one_shot_cipher.decrypt(nonce, one_shot, None)).digest(), args.runs
    )
    t_sha = _time(lambda: hashlib.sha256(plaintext).digest(), args.runs)
    t_encrypt = _time(lambda: encrypt_bytes(plaintext, key, segment_size=args.segment_size), 3)

    def mibs(seconds: float) -> float:
        return size / _MIB / seconds

    print_table(
        f"Envelope throughput ({args.size_mib} MiB, {args.segment_size // 1024} KiB segments,"
        f" median of {args.runs})",
        ["operation", "MiB/s", "ms", "ratio vs one-shot decrypt"],
        [
            ["one-shot ChaCha20-Poly1305 decrypt", mibs(t_one_shot), t_one_shot * 1e3, 1.0],
            [
                "one-shot decrypt + sha256",
                mibs(t_one_shot_hash),
                t_one_shot_hash * 1e3,
                t_one_shot / t_one_shot_hash,
            ],
            ["streaming decrypt", mibs(t_stream), t_stream * 1e3, t_one_shot / t_stream],
            [
                "streaming decrypt + verify (target >= 0.5)",
                mibs(t_stream_verify),
                t_stream_verify * 1e3,
                t_one_shot / t_stream_verify,
            ],
            ["sha256 alone (bounds any verify)", mibs(t_sha), t_sha * 1e3, t_one_shot / t_sha],
            [
                "streaming encrypt (memory)",
                mibs(t_encrypt),
                t_encrypt * 1e3,
                t_one_shot / t_encrypt,
            ],
        ],
    )

    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="bench-supplychain-") as tmp:
        src = Path(tmp) / "model.onnx"
        src.write_bytes(plaintext)
        dst = Path(tmp) / "model.onnx.enc"
        start = time.perf_counter()
        info = encrypt_file(src, dst, new_content_key(), segment_size=args.segment_size)
        t_pack = time.perf_counter() - start
        rows.append(["encrypt + hash (file to file, fsync)", t_pack * 1e3, mibs(t_pack)])
        try:
            from tools.fleetctl.keys import KeyStore  # noqa: PLC0415 - controller is optional
            from tools.fleetctl.repository import ImageRepository  # noqa: PLC0415
        except ImportError:
            rows.append(["add signed target", "n/a (no tools.fleetctl.repository)", "-"])
        else:
            image = ImageRepository.create(Path(tmp) / "repo" / "image", KeyStore(Path(tmp) / "k"))
            card = ModelCard(name="bench", version="1", format="onnx")
            custom = ImageTargetCustom(
                card,
                EncryptionInfo(
                    scheme="stream-chacha20poly1305-v1",
                    segment_size=args.segment_size,
                    plaintext_sha256=info.plaintext_sha256,
                    plaintext_length=info.plaintext_length,
                ),
            )
            start = time.perf_counter()
            image.add_target(target_path("bench", "1", "onnx"), dst, custom.to_dict())
            t_sign = time.perf_counter() - start
            rows.append(
                ["add signed target (hash, copy, sign 3 roles)", t_sign * 1e3, mibs(t_sign)]
            )
            rows.append(["total pack", (t_pack + t_sign) * 1e3, mibs(t_pack + t_sign)])
    print_table(f"Packing a {args.size_mib} MiB model (one run)", ["step", "ms", "MiB/s"], rows)
    return 0
