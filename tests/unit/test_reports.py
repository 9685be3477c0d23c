"""Signed device reports: canonical JSON, tamper detection, strict envelopes."""

from __future__ import annotations

import copy
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.supplychain.errors import ReportError
from agent.supplychain.reports import canonical_json, sign_report, verify_report

REPORT = {"device_id": "pi-01", "installed": {"version": "2", "sha256": "ab" * 32}, "seq": 7}


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_round_trip_survives_reserialization(key: Ed25519PrivateKey) -> None:
    envelope = sign_report(REPORT, key)
    # A transport may reorder keys and change whitespace; the signature is over canonical bytes.
    wire = json.loads(json.dumps(envelope, indent=3, sort_keys=False))
    assert verify_report(wire, key.public_key()) == REPORT


def test_canonical_json_is_sorted_and_compact() -> None:
    assert canonical_json({"b": 1, "a": [1, "é"]}) == b'{"a":[1,"\\u00e9"],"b":1}'
    with pytest.raises(ReportError, match="plain JSON"):
        canonical_json({"x": float("nan")})


def test_tampered_report_is_rejected(key: Ed25519PrivateKey) -> None:
    envelope = sign_report(REPORT, key)
    tampered = copy.deepcopy(envelope)
    tampered["report"]["installed"]["version"] = "3"
    with pytest.raises(ReportError, match="signature does not verify"):
        verify_report(tampered, key.public_key())


def test_other_devices_key_is_rejected(key: Ed25519PrivateKey) -> None:
    envelope = sign_report(REPORT, key)
    with pytest.raises(ReportError, match="signature does not verify"):
        verify_report(envelope, Ed25519PrivateKey.generate().public_key())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: e.pop("alg"), "expected keys"),
        (lambda e: e.update(extra=1), "expected keys"),
        (lambda e: e.update(alg="rsa"), "expected 'ed25519'"),
        (lambda e: e.update(signature="!!"), "expected base64"),
        (lambda e: e.update(signature="AAAA"), "expected 64 bytes, got 3"),
        (lambda e: e.update(report=[1]), "expected a JSON object"),
    ],
)
def test_malformed_envelopes(key: Ed25519PrivateKey, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    envelope = sign_report(REPORT, key)
    mutate(envelope)
    with pytest.raises(ReportError, match=message):
        verify_report(envelope, key.public_key())


def test_not_an_object() -> None:
    with pytest.raises(ReportError, match="expected a JSON object"):
        verify_report("x", Ed25519PrivateKey.generate().public_key())
