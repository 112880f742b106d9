"""Signed manifests and receipts: the record of a migration neither side can deny.

On the secure path every document is signed with the host key and verified
with the key of the certificate the peer proved in the TLS handshake. On the
`--insecure` baseline there are no keys, so documents travel unsigned and are
only parsed (that is what "insecure" means; the baseline exists to be measured
and attacked in the lab).
"""

from __future__ import annotations

import json

from sealift.errors import SealiftError
from sealift.host.transport import ControlChannel
from sealift.security.identity import HostIdentity
from sealift.security.signing import canonical_json, sign_document, verify_document
from sealift.wire.messages import Abort, Receipt

MAX_UNSIGNED_DOCUMENT = 32 * 1024
BINDING_LABEL = b"EXPORTER-sealift-document-binding-v1"
_MAX_CPU_S = 1e9  # far above any migration's CPU time


def channel_binding(channel: ControlChannel, nonce_source: bytes, nonce_dest: bytes, migration_id: str) -> str | None:
    """A value only the two ends of this very TLS session can compute.

    Manifests and receipts carry it, signed, so a document recorded from one
    session is worthless in another, even to a peer with a valid certificate.
    """
    if not channel.secure:
        return None
    context = nonce_source + nonce_dest + migration_id.encode()
    return channel.tls.export_keying_material(BINDING_LABEL, 32, context).hex()


class DocumentError(SealiftError):
    """A manifest or receipt is missing, forged or does not match."""

    code = "document_error"


class PeerAborted(SealiftError):
    """The peer ended the migration with an Abort and a reason."""

    code = "peer_aborted"


class DocumentSigner:
    def __init__(self, host: str, identity: HostIdentity | None) -> None:
        self._host = host
        self._identity = identity
        self._key = identity.private_key() if identity is not None else None

    def sign(self, payload: dict, kind: str) -> str:
        if self._key is None:
            return canonical_json({"alg": "none", "kind": kind, "signer": self._host, "payload": payload}).decode()
        return sign_document(payload, self._key, self._host, kind)

    def verify(self, envelope: str, kind: str, signer: str, channel: ControlChannel) -> dict:
        """Check a peer's document; on the secure path with the key it proved in TLS."""
        if not channel.secure:
            return _parse_unsigned(envelope, kind)
        certificate = channel.tls.peer_certificate
        return verify_document(envelope, certificate.public_key(), expected_kind=kind, expected_signer=signer)


def _parse_unsigned(envelope: str, kind: str) -> dict:
    if len(envelope) > MAX_UNSIGNED_DOCUMENT:
        raise DocumentError("unsigned document is too large")
    try:
        document = json.loads(envelope)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise DocumentError(f"unsigned {kind} is not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("kind") != kind or not isinstance(document.get("payload"), dict):
        raise DocumentError(f"document is not a {kind}")
    return document["payload"]


def receipt_matches(receipt: dict, manifest: dict, stage: str) -> None:
    """The destination's receipt must acknowledge exactly what the source sent."""
    for key in ("migration_id", "vm", "image_digest", "state_digest", "channel_binding"):
        if receipt.get(key) != manifest.get(key):
            raise DocumentError(
                f"receipt {key} {receipt.get(key)!r} does not match the manifest's {manifest.get(key)!r}"
            )
    if receipt.get("stage") != stage:
        raise DocumentError(f"expected a {stage!r} receipt, got {receipt.get('stage')!r}")


def await_receipt(
    channel: ControlChannel,
    signer: DocumentSigner,
    *,
    peer: str,
    stage: str,
    migration_id: str,
    binding: str | None,
    manifest: dict | None,
    timeout: float,
) -> tuple[dict, str]:
    """The destination's signed receipt for `stage`, checked; returns (payload, envelope).

    A "prepared" receipt must acknowledge exactly the manifest; a "running"
    receipt must name this migration. Both must carry this session's binding.
    """
    reply = channel.recv(timeout)
    if isinstance(reply, Abort):
        after = " after commit" if stage == "running" else ""
        raise PeerAborted(f"{peer} aborted{after}: {reply.reason}")
    assert isinstance(reply, Receipt) and reply.stage == stage  # the sans-IO state machine allows nothing else
    receipt = signer.verify(reply.envelope, "receipt", peer, channel)
    if manifest is not None:
        receipt_matches(receipt, manifest, stage)
    elif receipt.get("migration_id") != migration_id or receipt.get("stage") != stage:
        raise DocumentError(f"the destination's {stage} receipt does not name this migration")
    if receipt.get("channel_binding") != binding:
        raise DocumentError(f"the {stage} receipt was not made for this session")
    _check_receipt_numbers(receipt, stage)
    return receipt, reply.envelope


def _check_receipt_numbers(receipt: dict, stage: str) -> None:
    """The numbers the source computes with (its report), checked here: a peer's odd value is no crash later."""
    cpu_s = receipt.get("cpu_s", 0.0)
    if type(cpu_s) not in (int, float) or not 0 <= cpu_s <= _MAX_CPU_S:  # also refuses NaN
        raise DocumentError(f"the {stage} receipt's cpu_s is not a number of seconds from 0 to {_MAX_CPU_S:g}")
