"""Session keys for the data stream, bound to one authenticated TLS channel.

The secret comes from the TLS 1.3 exporter of the control connection, with
both sides' fresh nonces and the migration id as exporter context. So keys
exist only for the two endpoints of that handshake, differ for every
migration and every connection, and a replayed Hello (old nonces) on a new
connection yields different keys. HKDF-SHA256 then splits the secret into a
key and IV per direction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealift.security.tls import TlsStream

EXPORTER_LABEL = b"EXPORTER-sealift-migration-v1"

NONCE_SIZE = 32  # bytes; fixed, so nonce_source || nonce_dest || id splits one way only
SECRET_SIZE = 32
KEY_SIZE = 32  # AES-256-GCM
IV_SIZE = 12  # GCM nonce
MAX_MIGRATION_ID_BYTES = 256

# One HKDF info label per output, so no two outputs can ever be equal.
_INFO_S2D_KEY = b"sealift-v1 source->dest key"
_INFO_S2D_IV = b"sealift-v1 source->dest iv"
_INFO_D2S_KEY = b"sealift-v1 dest->source key"
_INFO_D2S_IV = b"sealift-v1 dest->source iv"


@dataclass(frozen=True)
class SessionKeys:
    """AES-256-GCM key and IV per direction of one migration's data stream."""

    source_to_dest_key: bytes
    source_to_dest_iv: bytes
    dest_to_source_key: bytes
    dest_to_source_iv: bytes

    def __post_init__(self) -> None:
        for name, value, size in (
            ("source_to_dest_key", self.source_to_dest_key, KEY_SIZE),
            ("source_to_dest_iv", self.source_to_dest_iv, IV_SIZE),
            ("dest_to_source_key", self.dest_to_source_key, KEY_SIZE),
            ("dest_to_source_iv", self.dest_to_source_iv, IV_SIZE),
        ):
            if not isinstance(value, bytes) or len(value) != size:
                raise ValueError(f"{name} must be {size} bytes")

    def __repr__(self) -> str:
        # Never print key material (logs, tracebacks, pytest output).
        return "SessionKeys(<redacted>)"


def new_nonce() -> bytes:
    """A fresh random nonce for Hello (source) or Accept (destination)."""
    return os.urandom(NONCE_SIZE)


def channel_secret(stream: TlsStream, nonce_source: bytes, nonce_dest: bytes, migration_id: str) -> bytes:
    """32 bytes from the TLS exporter of `stream`, bound to both nonces and the migration."""
    context = _binding(nonce_source, nonce_dest, migration_id)
    return stream.export_keying_material(EXPORTER_LABEL, SECRET_SIZE, context)


def derive_session_keys(secret: bytes, nonce_source: bytes, nonce_dest: bytes, migration_id: str) -> SessionKeys:
    """Split `secret` (from channel_secret) into per-direction keys and IVs with HKDF-SHA256."""
    if not isinstance(secret, bytes) or len(secret) != SECRET_SIZE:
        raise ValueError(f"secret must be {SECRET_SIZE} bytes")
    # The binding goes in again as the salt, so the keys stay tied to this
    # migration even if a caller passes a secret obtained some other way.
    salt = _binding(nonce_source, nonce_dest, migration_id)

    def expand(info: bytes, length: int) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)

    return SessionKeys(
        source_to_dest_key=expand(_INFO_S2D_KEY, KEY_SIZE),
        source_to_dest_iv=expand(_INFO_S2D_IV, IV_SIZE),
        dest_to_source_key=expand(_INFO_D2S_KEY, KEY_SIZE),
        dest_to_source_iv=expand(_INFO_D2S_IV, IV_SIZE),
    )


def _binding(nonce_source: bytes, nonce_dest: bytes, migration_id: str) -> bytes:
    """nonce_source || nonce_dest || migration_id (UTF-8), after checking each part."""
    for name, nonce in (("nonce_source", nonce_source), ("nonce_dest", nonce_dest)):
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
            raise ValueError(f"{name} must be {NONCE_SIZE} bytes")
    encoded_id = migration_id.encode("utf-8")
    if not 1 <= len(encoded_id) <= MAX_MIGRATION_ID_BYTES:
        raise ValueError(f"migration_id must be 1..{MAX_MIGRATION_ID_BYTES} bytes of UTF-8")
    return nonce_source + nonce_dest + encoded_id
