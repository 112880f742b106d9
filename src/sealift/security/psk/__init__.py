"""Dynamic pre-shared key: an optional second factor per pair of hosts (seed 002, done safely).

Two hosts that share a PSK prove to each other, inside their mutual-TLS
control channel, that they hold the current key of the pair; after a
successful session the key is replaced by a new one derived from it with
HKDF (a one-way ratchet), so an old key that leaks or is cracked is worthless.

Everything here is sans-IO except `PskStore`, which keeps the keys of each
peer in SQLite, encrypted with AES-GCM under a key derived from the host's
private key. See docs/security.md, "Dynamic pre-shared key", for why this
differs from the paper's XOR construction and for the state machine.

The pieces, one module each (every arrow points down the list):

    material.py   the key itself: sizes, PskError, new_psk, hex form,
                  fingerprint, wrap key, psk_channel_binding (TLS exporter)
    proof.py      psk_proof(...): HMAC-SHA256 over a labelled transcript (key
                  epoch, role, ratchet flag, TLS exporter value, nonces), and
                  PskProof, its wire form in Hello/Accept
    ratchet.py    ratchet_key(...): next key = HKDF(current, salt = nonces ||
                  exporter, info = "sealift psk ratchet" || epoch), and the
                  pure transitions of the keys a host holds per peer
    store.py      PskStore: per peer epoch n, key n, key n-1 (until the peer
                  proves n), key n+1 (derived, not yet committed), and a
                  counter of ratchet "tickets", on disk
    session.py    PskSession: one migration's use of the PSK, for either role

How the agent uses a session (nonces and the binding are the Hello/Accept
nonces and `psk_channel_binding(stream)` on each side):

    source                                          destination
    s = PskSession(store, peer, "source")
    hello.psk_proof = s.make_proof(binding, n_s)
                                                    d = PskSession(store, peer, "destination")
                                                    d.check_peer_proof(hello.psk_proof, binding, n_s)
                                                    accept.psk_proof = d.make_proof(binding, n_s, n_d)
    s.check_peer_proof(accept.psk_proof, binding, n_s, n_d)
    ... migration ...                               ... Commit received ...
    s.commit()  (running receipt received)          d.commit()
    s.close() in a finally                          d.close() in a finally

Each commit point matters: the destination must not commit before it has
heard from the source after Accept (see `PskSession.commit`).
"""

from __future__ import annotations

from sealift.security.psk.material import (
    BINDING_SIZE,
    MAX_EPOCH,
    MAX_TICKET,
    PSK_EXPORTER_LABEL,
    PSK_SIZE,
    WRAP_KEY_SIZE,
    PskError,
    PskRole,
    new_psk,
    psk_channel_binding,
    psk_fingerprint,
    psk_from_hex,
    psk_to_hex,
    wrap_key_from_private_key,
)
from sealift.security.psk.proof import (
    MAC_SIZE,
    PROOF_BYTES,
    PROOF_VERSION,
    PskProof,
    psk_proof,
    verify_psk_proof,
)
from sealift.security.psk.ratchet import ratchet_key
from sealift.security.psk.session import PskSession
from sealift.security.psk.store import PskStatus, PskStore

__all__ = [
    "BINDING_SIZE",
    "MAC_SIZE",
    "MAX_EPOCH",
    "MAX_TICKET",
    "PROOF_BYTES",
    "PROOF_VERSION",
    "PSK_EXPORTER_LABEL",
    "PSK_SIZE",
    "PskError",
    "PskProof",
    "PskRole",
    "PskSession",
    "PskStatus",
    "PskStore",
    "WRAP_KEY_SIZE",
    "new_psk",
    "psk_channel_binding",
    "psk_fingerprint",
    "psk_from_hex",
    "psk_proof",
    "psk_to_hex",
    "ratchet_key",
    "verify_psk_proof",
    "wrap_key_from_private_key",
]
