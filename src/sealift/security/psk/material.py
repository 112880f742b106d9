"""The PSK itself: its sizes and limits, its errors, a new key, its hex form, fingerprint and wrap key.

Also the TLS channel binding the proofs and the ratchet are bound to, and
the argument checks every step of the package makes (underscored: shared by
the modules of sealift.security.psk only).
"""

from __future__ import annotations

import os
from typing import Literal, Protocol

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealift.security.errors import SecurityError
from sealift.security.keys import NONCE_SIZE

PskRole = Literal["source", "destination"]

PSK_SIZE = 32  # bytes of every PSK (HMAC-SHA256 and HKDF-SHA256 key size)
BINDING_SIZE = 32  # bytes of the TLS exporter value the proofs are bound to
WRAP_KEY_SIZE = 32  # AES-256-GCM key that encrypts the PSKs at rest
MAX_EPOCH = (1 << 63) - 2  # fits SQLite's signed 64-bit INTEGER with room for epoch + 1
MAX_TICKET = (1 << 63) - 1

# A distinct exporter label: the PSK binding must never equal the data-key secret.
PSK_EXPORTER_LABEL = b"EXPORTER-sealift-psk-v1"

_WRAP_LABEL = b"sealift psk wrap key v1"
_FINGERPRINT_LABEL = b"sealift psk fingerprint v1"


class PskError(SecurityError):
    """A PSK proof was refused, or the PSK state of a peer does not allow this step."""

    code = "psk_error"


def new_psk() -> bytes:
    """A fresh random 32-byte PSK for `PskStore.provision` (the operator's first key)."""
    return os.urandom(PSK_SIZE)


def psk_to_hex(key: bytes) -> str:
    """The hex form an operator copies to the other host (e.g. `sealift psk new`)."""
    _check_key(key)
    return key.hex()


def psk_from_hex(text: str) -> bytes:
    """Parse a PSK typed or pasted by an operator: exactly 64 hex digits."""
    cleaned = text.strip().lower()
    if len(cleaned) != 2 * PSK_SIZE:
        raise ValueError(f"a PSK is {2 * PSK_SIZE} hex digits, got {len(cleaned)} characters")
    try:
        return bytes.fromhex(cleaned)
    except ValueError:
        raise ValueError("a PSK is hex digits only (0-9, a-f)") from None


def wrap_key_from_private_key(private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key that encrypts this host's PSKs at rest, derived from its private key.

    Whoever reads the PSK database but not the host key learns nothing; a host
    whose key is replaced (re-issued certificate) must re-provision its PSKs.
    """
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise TypeError("private_key must be an elliptic-curve private key")
    size = (private_key.curve.key_size + 7) // 8
    scalar = private_key.private_numbers().private_value.to_bytes(size, "big")
    return HKDF(algorithm=hashes.SHA256(), length=WRAP_KEY_SIZE, salt=None, info=_WRAP_LABEL).derive(scalar)


def psk_fingerprint(key: bytes) -> str:
    """16 hex digits that identify a key without revealing it (compare both hosts' status)."""
    _check_key(key)
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(_FINGERPRINT_LABEL)
    return mac.finalize()[:8].hex()


class _Exporter(Protocol):
    def export_keying_material(self, label: bytes, length: int, context: bytes) -> bytes: ...


def psk_channel_binding(stream: _Exporter) -> bytes:
    """The TLS 1.3 exporter value the PSK proofs of one control connection are bound to.

    Both ends of one TLS connection get the same 32 bytes, and no other
    connection does (the exporter depends on the handshake's ECDHE secret and
    both TLS randoms), so a proof recorded on one connection is useless on
    another, and a key ratcheted with it cannot be computed by someone who
    only knows the old key.
    """
    return stream.export_keying_material(PSK_EXPORTER_LABEL, BINDING_SIZE, b"")


# ---------------------------------------------------------------------------
# Argument checks


def _check_key(key: object) -> None:
    if not isinstance(key, bytes) or len(key) != PSK_SIZE:
        raise ValueError(f"a PSK must be {PSK_SIZE} bytes")


def _check_ticket(ticket: object) -> None:
    if type(ticket) is not int or not 0 <= ticket <= MAX_TICKET:
        raise ValueError(f"ticket must be an int in 0..{MAX_TICKET}")


def _check_epoch(epoch: object) -> None:
    if type(epoch) is not int or not 0 <= epoch <= MAX_EPOCH:
        raise ValueError(f"epoch must be an int in 0..{MAX_EPOCH}")


def _check_nonce(name: str, nonce: object) -> None:
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
        raise ValueError(f"{name} must be {NONCE_SIZE} bytes")


def _check_binding(binding: object) -> None:
    if not isinstance(binding, bytes) or len(binding) != BINDING_SIZE:
        raise ValueError(f"channel_binding must be {BINDING_SIZE} bytes (see psk_channel_binding)")
