from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sealift.security.errors import SignatureError
from sealift.security.signing import (
    MAX_ENVELOPE_BYTES,
    canonical_json,
    sign_document,
    verify_document,
)

from .conftest import Pki

PAYLOAD = {"migration_id": "mig-1", "pages": 4096, "digest": "ab" * 32, "note": "gr\u00fc\u00df"}


@pytest.fixture
def key(pki: Pki) -> ec.EllipticCurvePrivateKey:
    return pki.host_a.private_key()


def _edit(envelope: str, **changes: object) -> str:
    doc = json.loads(envelope)
    doc.update(changes)
    return json.dumps(doc)


def test_canonical_json() -> None:
    expected = '{"a":[true,null,"\u00e9"],"b":1}'.encode()
    assert canonical_json({"b": 1, "a": [True, None, "\u00e9"]}) == expected
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})
    with pytest.raises(ValueError):
        canonical_json({"x": b"bytes"})


def test_round_trip(pki: Pki, key: ec.EllipticCurvePrivateKey) -> None:
    envelope = sign_document(PAYLOAD, key, signer="host-a", kind="manifest")
    doc = json.loads(envelope)
    assert doc["alg"] == "ecdsa-p256-sha256"
    assert (doc["kind"], doc["signer"], doc["payload"]) == ("manifest", "host-a", PAYLOAD)
    assert envelope.encode() == canonical_json(doc)
    public = pki.host_a.certificate().public_key()
    assert verify_document(envelope, public, "manifest") == PAYLOAD
    assert verify_document(envelope.encode(), public, "manifest", expected_signer="host-a") == PAYLOAD


def test_tampered_payload_is_refused(pki: Pki, key: ec.EllipticCurvePrivateKey) -> None:
    envelope = sign_document(PAYLOAD, key, signer="host-a", kind="manifest")
    forged = _edit(envelope, payload={**PAYLOAD, "pages": 4097})
    with pytest.raises(SignatureError, match="does not verify"):
        verify_document(forged, pki.host_a.certificate().public_key(), "manifest")


def test_signer_is_covered_by_the_signature(pki: Pki, key: ec.EllipticCurvePrivateKey) -> None:
    envelope = sign_document(PAYLOAD, key, signer="host-a", kind="receipt")
    public = pki.host_a.certificate().public_key()
    with pytest.raises(SignatureError, match="signed by 'host-a', expected 'host-b'"):
        verify_document(envelope, public, "receipt", expected_signer="host-b")
    with pytest.raises(SignatureError, match="does not verify"):
        verify_document(_edit(envelope, signer="host-b"), public, "receipt", expected_signer="host-b")


def test_kind_is_covered_by_the_signature(pki: Pki, key: ec.EllipticCurvePrivateKey) -> None:
    envelope = sign_document(PAYLOAD, key, signer="host-a", kind="receipt")
    public = pki.host_a.certificate().public_key()
    with pytest.raises(SignatureError, match="is a 'receipt', expected a 'manifest'"):
        verify_document(envelope, public, "manifest")
    with pytest.raises(SignatureError, match="does not verify"):
        verify_document(_edit(envelope, kind="manifest"), public, "manifest")


def test_wrong_key_is_refused(pki: Pki, key: ec.EllipticCurvePrivateKey) -> None:
    envelope = sign_document(PAYLOAD, key, signer="host-a", kind="manifest")
    with pytest.raises(SignatureError, match="does not verify"):
        verify_document(envelope, pki.host_b.certificate().public_key(), "manifest")


@pytest.mark.parametrize(
    "envelope, reason",
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"alg": "x"}', "missing"),
        ("[" * 100_000, "larger than"),
        ('{"a": 1, "a": 2}', "duplicate key"),
        ('{"a": NaN}', "NaN is not allowed"),
        ("[" * 10_000, "not valid JSON"),
    ],
)
def test_malformed_envelopes_are_refused(pki: Pki, envelope: str, reason: str) -> None:
    with pytest.raises(SignatureError, match=reason):
        verify_document(envelope, pki.host_a.certificate().public_key(), "manifest")


def test_envelope_field_checks(pki: Pki, key: ec.EllipticCurvePrivateKey) -> None:
    envelope = sign_document(PAYLOAD, key, signer="host-a", kind="manifest")
    public = pki.host_a.certificate().public_key()
    cases = {
        "unsupported signature algorithm": _edit(envelope, alg="none"),
        "unexpected \\['extra'\\]": _edit(envelope, extra=1),
        "not valid base64": _edit(envelope, signature="***"),
        "not a string": _edit(envelope, signature=5),
        "wrong type": _edit(envelope, payload=[1]),
    }
    for reason, bad in cases.items():
        with pytest.raises(SignatureError, match=reason):
            verify_document(bad, public, "manifest")
    empty_sig = _edit(envelope, signature=base64.b64encode(b"").decode())
    with pytest.raises(SignatureError, match="does not verify"):
        verify_document(empty_sig, public, "manifest")


def test_oversized_documents(pki: Pki, key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(ValueError, match="over the"):
        sign_document({"blob": "x" * MAX_ENVELOPE_BYTES}, key, signer="host-a", kind="manifest")
    with pytest.raises(SignatureError, match="larger than"):
        verify_document(" " * (MAX_ENVELOPE_BYTES + 1), pki.host_a.certificate().public_key(), "m")
    # Characters count as their UTF-8 bytes.
    with pytest.raises(SignatureError, match="larger than"):
        verify_document("\u00e9" * (MAX_ENVELOPE_BYTES // 2 + 1), pki.host_a.certificate().public_key(), "m")


def test_argument_checks(key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(ValueError):
        sign_document(PAYLOAD, key, signer="", kind="manifest")
    with pytest.raises(TypeError):
        sign_document([1], key, signer="host-a", kind="manifest")
    with pytest.raises(TypeError):
        sign_document(PAYLOAD, ec.generate_private_key(ec.SECP384R1()), signer="a", kind="m")
