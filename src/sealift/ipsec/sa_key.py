"""The IKE pre-shared key of one migration, derived by both agents (seed 002, done safely).

Seed 002 renews the IPsec PSK before every security association. Here the
two agents, already mutually authenticated over TLS 1.3 with a valid order,
derive the migration's IKE PSK from two secrets they share and nobody else
does:

  - the TLS exporter of their control connection, with the migration id as
    context (fresh ECDHE per connection: the PSK is new for every migration
    even when nothing else changes, and a recorded old session is no help);
  - the dynamic PSK of the pair (security/psk/), at the epoch this
    session authenticated with, when one is provisioned: the second factor.
    It ratchets forward after every successful migration (HKDF, one-way).

    ipsec_psk = HKDF-SHA256(ikm  = ratchet_key || channel_secret,
                            salt = nonce_source || nonce_dest,
                            info = "sealift ipsec psk v1" || epoch || migration_id)

HKDF is one-way, so a leaked IPsec PSK (charon holds it in memory) reveals
neither the ratchet key nor any other migration's PSK, and a new ratchet key
does not reveal an old one. A failed migration cannot desynchronise the
hosts: the PSK depends only on values fixed once both proofs are checked
(the epoch both proved, this connection's exporter, this migration's
nonces), and the ratchet itself keeps the previous and pending keys until
the peer proves it moved on (see security/psk/ratchet.py), so the next migration
authenticates at a common epoch and derives a common key again.
"""

from __future__ import annotations

from typing import Protocol

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealift.security.psk import PSK_SIZE, PskSession

IPSEC_PSK_SIZE = 32
CHANNEL_SECRET_SIZE = 32
NONCE_SIZE = 32
MAX_MIGRATION_ID_BYTES = 256
IPSEC_EXPORTER_LABEL = b"EXPORTER-sealift-ipsec-psk-v1"  # distinct from every other exporter use

_DERIVE_LABEL = b"sealift ipsec psk v1"
_FINGERPRINT_LABEL = b"sealift ipsec psk fingerprint v1"


class _Exporter(Protocol):
    def export_keying_material(self, label: bytes, length: int, context: bytes) -> bytes: ...


def ipsec_channel_secret(stream: _Exporter, migration_id: str) -> bytes:
    """This migration's secret from the TLS exporter of the agents' control connection (same on both ends)."""
    return stream.export_keying_material(IPSEC_EXPORTER_LABEL, CHANNEL_SECRET_SIZE, _migration_id_bytes(migration_id))


def derive_ipsec_psk(
    *,
    channel_secret: bytes,
    ratchet_key: bytes | None,
    epoch: int,
    migration_id: str,
    nonce_source: bytes,
    nonce_dest: bytes,
) -> bytes:
    """The IKE PSK of one migration (pure). Both agents call it with the same values and get the same key.

    ratchet_key/epoch: the pair's dynamic PSK at the epoch this session
    authenticated with (`agreed_ratchet_key`), or None/0 for a pair without one.
    """
    if not isinstance(channel_secret, bytes) or len(channel_secret) != CHANNEL_SECRET_SIZE:
        raise ValueError(f"channel_secret must be {CHANNEL_SECRET_SIZE} bytes (see ipsec_channel_secret)")
    if ratchet_key is not None and (not isinstance(ratchet_key, bytes) or len(ratchet_key) != PSK_SIZE):
        raise ValueError(f"ratchet_key must be {PSK_SIZE} bytes or None")
    if type(epoch) is not int or epoch < 0 or (ratchet_key is None and epoch != 0):
        raise ValueError("epoch must be a non-negative int (0 without a ratchet key)")
    for name, nonce in (("nonce_source", nonce_source), ("nonce_dest", nonce_dest)):
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
            raise ValueError(f"{name} must be {NONCE_SIZE} bytes")
    ikm = (ratchet_key or b"") + channel_secret
    info = (
        _DERIVE_LABEL + bytes([ratchet_key is not None]) + epoch.to_bytes(8, "big") + _migration_id_bytes(migration_id)
    )
    return HKDF(algorithm=hashes.SHA256(), length=IPSEC_PSK_SIZE, salt=nonce_source + nonce_dest, info=info).derive(ikm)


def ipsec_psk_fingerprint(psk: bytes) -> str:
    """16 hex digits naming a PSK in logs and the audit log without revealing it."""
    mac = hmac.HMAC(psk, hashes.SHA256())
    mac.update(_FINGERPRINT_LABEL)
    return mac.finalize()[:8].hex()


def ipsec_key_id(migration_id: str, epoch: int) -> str:
    """The id the PSK is loaded under in charon (load-shared / unload-shared): one per migration."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in migration_id)[:40]
    return f"sealift-{safe}-e{epoch}"


def agreed_ratchet_key(session: PskSession) -> tuple[int, bytes]:
    """(epoch, key) of the pair's dynamic PSK that this session's two proofs agreed on.

    Valid on the source after check_peer_proof (Accept) and on the
    destination after check_peer_proof (Hello); both hosts then hold the same
    pair.
    """
    base = session.agreed_key
    if base is None:
        raise RuntimeError("the PSK session has not checked the peer's proof yet: no agreed key")
    epoch, key = base
    return epoch, key


def psk_for_migration(
    stream: _Exporter,
    migration_id: str,
    nonce_source: bytes,
    nonce_dest: bytes,
    psk_session: PskSession | None,
) -> tuple[bytes, int]:
    """What each agent calls for the `ipsec` transport: (this migration's IKE PSK, the ratchet epoch used).

    stream: the TLS stream of the migration's control connection; nonces:
    Hello.nonce and Accept.nonce; psk_session: the migration's PskSession
    after check_peer_proof, or None for a pair without a dynamic PSK.
    """
    epoch, key = agreed_ratchet_key(psk_session) if psk_session is not None else (0, None)
    psk = derive_ipsec_psk(
        channel_secret=ipsec_channel_secret(stream, migration_id),
        ratchet_key=key,
        epoch=epoch,
        migration_id=migration_id,
        nonce_source=nonce_source,
        nonce_dest=nonce_dest,
    )
    return psk, epoch


def _migration_id_bytes(migration_id: str) -> bytes:
    if not isinstance(migration_id, str) or not migration_id:
        raise ValueError("migration_id must be a non-empty string")
    raw = migration_id.encode("utf-8")
    if len(raw) > MAX_MIGRATION_ID_BYTES:
        raise ValueError(f"migration_id is longer than {MAX_MIGRATION_ID_BYTES} bytes")
    return len(raw).to_bytes(2, "big") + raw
