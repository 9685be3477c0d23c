"""Signed device reports: an Ed25519 signature over the report's canonical JSON.

Canonical JSON here is ``json.dumps(report, sort_keys=True, separators=(",", ":"),
ensure_ascii=True, allow_nan=False)`` encoded as ASCII, so the controller and the device derive
the same bytes from the same data whatever the transport did to whitespace or key order. The
envelope is ``{"report": {...}, "signature": base64, "alg": "ed25519"}``. A report is trusted
only through :func:`verify_report`, which returns the report exactly as signed.

Sans-I/O: dicts and key objects in, dicts out.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.supplychain.errors import ReportError

__all__ = ["MAX_REPORT_BYTES", "REPORT_ALG", "canonical_json", "sign_report", "verify_report"]

REPORT_ALG = "ed25519"
MAX_REPORT_BYTES = 64 * 1024
_ENVELOPE_KEYS = {"report", "signature", "alg"}


def canonical_json(data: Any) -> bytes:
    """The canonical bytes that get signed; raises :class:`ReportError` for non-JSON data."""
    try:
        text = json.dumps(
            data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise ReportError(f"report: expected plain JSON data, got {exc}") from exc
    return text.encode("ascii")


def sign_report(report: Mapping[str, Any], ed25519_private: Ed25519PrivateKey) -> dict[str, Any]:
    """Sign ``report`` (a JSON object); returns the envelope to publish."""
    if not isinstance(report, Mapping):
        raise ReportError(f"report: expected a JSON object, got {type(report).__name__}")
    payload = canonical_json(report)
    if len(payload) > MAX_REPORT_BYTES:
        raise ReportError(f"report: expected at most {MAX_REPORT_BYTES} bytes, got {len(payload)}")
    signature = ed25519_private.sign(payload)
    return {
        "report": json.loads(payload),
        "signature": base64.b64encode(signature).decode("ascii"),
        "alg": REPORT_ALG,
    }


def verify_report(envelope: Any, ed25519_public: Ed25519PublicKey) -> dict[str, Any]:
    """Check the envelope's signature; returns the report. Raises :class:`ReportError`."""
    if not isinstance(envelope, Mapping):
        raise ReportError(f"report envelope: expected a JSON object, got {type(envelope).__name__}")
    keys = set(envelope)
    if keys != _ENVELOPE_KEYS:
        extra = sorted(keys - _ENVELOPE_KEYS) or sorted(_ENVELOPE_KEYS - keys)
        raise ReportError(
            f"report envelope: expected keys {sorted(_ENVELOPE_KEYS)}, got a difference in {extra}"
        )
    if envelope["alg"] != REPORT_ALG:
        raise ReportError(f"report envelope.alg: expected {REPORT_ALG!r}, got {envelope['alg']!r}")
    report = envelope["report"]
    if not isinstance(report, Mapping):
        raise ReportError(f"report: expected a JSON object, got {type(report).__name__}")
    signature_text = envelope["signature"]
    if not isinstance(signature_text, str):
        raise ReportError("report envelope.signature: expected a base64 string")
    try:
        signature = base64.b64decode(signature_text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ReportError("report envelope.signature: expected base64") from exc
    if len(signature) != 64:
        raise ReportError(f"report envelope.signature: expected 64 bytes, got {len(signature)}")
    payload = canonical_json(report)
    if len(payload) > MAX_REPORT_BYTES:
        raise ReportError(f"report: expected at most {MAX_REPORT_BYTES} bytes, got {len(payload)}")
    try:
        ed25519_public.verify(signature, payload)
    except InvalidSignature:
        raise ReportError(
            "report: signature does not verify; expected a report signed by this device's key"
        ) from None
    verified: dict[str, Any] = json.loads(payload)
    return verified
