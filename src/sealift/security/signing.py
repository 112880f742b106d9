"""Signed documents: the migration manifest and receipts (later orders, audit entries).

An envelope is canonical JSON:

    {"alg": "ecdsa-p256-sha256", "kind": ..., "payload": {...},
     "signature": base64(DER ECDSA), "signer": ...}

The signature covers canonical_json({"kind", "signer", "payload"}), so a
signature made for one kind of document or by one signer cannot be passed off
as another.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from sealift.security.errors import SignatureError

ALG = "ecdsa-p256-sha256"
MAX_ENVELOPE_BYTES = 64 * 1024
_ENVELOPE_FIELDS = frozenset({"alg", "kind", "signer", "payload", "signature"})


def canonical_json(obj: Any) -> bytes:
    """UTF-8 JSON with sorted keys and no whitespace: one byte string per value.

    Raises ValueError for values JSON cannot carry exactly (NaN, infinities,
    non-JSON types, unpaired surrogates).
    """
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"value cannot be encoded as canonical JSON: {exc}") from None


def sign_document(payload: dict[str, Any], private_key: ec.EllipticCurvePrivateKey, signer: str, kind: str) -> str:
    """Sign `payload` as a document of `kind` by `signer`; returns the JSON envelope."""
    if not isinstance(payload, dict):
        raise TypeError("payload must be a dict")
    _require_name("signer", signer)
    _require_name("kind", kind)
    if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(private_key.curve, ec.SECP256R1):
        raise TypeError("private_key must be an ECC P-256 private key")
    signed = canonical_json({"kind": kind, "signer": signer, "payload": payload})
    signature = private_key.sign(signed, ec.ECDSA(hashes.SHA256()))
    envelope = canonical_json(
        {
            "alg": ALG,
            "kind": kind,
            "signer": signer,
            "payload": payload,
            "signature": base64.b64encode(signature).decode("ascii"),
        }
    )
    if len(envelope) > MAX_ENVELOPE_BYTES:
        raise ValueError(f"signed {kind} would be {len(envelope)} bytes, over the {MAX_ENVELOPE_BYTES}-byte limit")
    return envelope.decode("utf-8")


def verify_document(
    envelope: str | bytes,
    public_key: CertificatePublicKeyTypes,  # a certificate's key; only P-256 passes the check below
    expected_kind: str,
    expected_signer: str | None = None,
) -> dict[str, Any]:
    """Check an envelope and return its payload; SignatureError says why it is refused."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
        raise TypeError("public_key must be an ECC P-256 public key")
    doc = _parse_envelope(envelope)
    if doc["alg"] != ALG:
        raise SignatureError(f"unsupported signature algorithm {doc['alg']!r}, expected {ALG!r}")
    kind, signer, payload = doc["kind"], doc["signer"], doc["payload"]
    if not isinstance(kind, str) or not isinstance(signer, str) or not isinstance(payload, dict):
        raise SignatureError("malformed signed document: kind, signer or payload has the wrong type")
    if kind != expected_kind:
        raise SignatureError(f"document is a {kind!r}, expected a {expected_kind!r}")
    if expected_signer is not None and signer != expected_signer:
        raise SignatureError(f"{kind} is signed by {signer!r}, expected {expected_signer!r}")
    signature = _decode_signature(doc["signature"])
    try:
        signed = canonical_json({"kind": kind, "signer": signer, "payload": payload})
    except ValueError as exc:
        raise SignatureError(f"malformed signed document: {exc}") from None
    try:
        public_key.verify(signature, signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureError(
            f"signature on {kind} from {signer!r} does not verify: the document was altered or signed with another key"
        ) from None
    return payload


def _parse_envelope(envelope: str | bytes) -> dict[str, Any]:
    # Cheap size check first (a str has at least as many UTF-8 bytes as characters).
    if len(envelope) > MAX_ENVELOPE_BYTES:
        raise SignatureError(f"signed document larger than {MAX_ENVELOPE_BYTES} bytes")
    raw = envelope.encode("utf-8", "surrogatepass") if isinstance(envelope, str) else envelope
    if len(raw) > MAX_ENVELOPE_BYTES:
        raise SignatureError(f"signed document larger than {MAX_ENVELOPE_BYTES} bytes")
    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise SignatureError(f"signed document is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise SignatureError("signed document is not a JSON object")
    if doc.keys() != _ENVELOPE_FIELDS:
        missing = sorted(_ENVELOPE_FIELDS - doc.keys())
        extra = sorted(doc.keys() - _ENVELOPE_FIELDS)
        raise SignatureError(f"malformed signed document: missing {missing}, unexpected {extra}")
    return doc


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers picking different duplicates is a classic signature bypass.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _decode_signature(value: Any) -> bytes:
    if not isinstance(value, str):
        raise SignatureError("malformed signed document: signature is not a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("malformed signed document: signature is not valid base64") from None


def _require_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
