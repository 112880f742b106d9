"""The epoch ratchet: the next key of a pair, the keys a host holds per peer, and their pure transitions.

`ratchet_key` derives the key of epoch n + 1 from the key of epoch n with
HKDF (one-way). `_PeerKeys` is what a host holds for one peer (current,
previous, pending key, tickets); the transitions take the old `_PeerKeys` and
return the new one, so `PskStore` can apply each of them in one transaction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealift.security.psk import material
from sealift.security.psk.material import PskError, PskRole
from sealift.security.psk.proof import PskProof, verify_psk_proof

_RATCHET_LABEL = b"sealift psk ratchet"


def ratchet_key(key: bytes, epoch: int, nonce_source: bytes, nonce_dest: bytes, channel_binding: bytes) -> bytes:
    """The key of epoch `epoch + 1`, derived from the key of `epoch` in one session.

    HKDF is one-way, so the new key does not reveal the old one. The salt
    holds both sides' nonces (as the paper intends) and the TLS exporter value:
    the exporter is secret to the two endpoints of that TLS session, so even
    someone who knows the old key and recorded the session cannot compute the
    new one without breaking the TLS key exchange.
    """
    material._check_key(key)
    material._check_epoch(epoch)
    if epoch + 1 > material.MAX_EPOCH:
        raise PskError("the PSK epoch counter is exhausted; provision a new PSK")
    material._check_nonce("nonce_source", nonce_source)
    material._check_nonce("nonce_dest", nonce_dest)
    material._check_binding(channel_binding)
    salt = nonce_source + nonce_dest + channel_binding
    info = _RATCHET_LABEL + epoch.to_bytes(8, "big")
    return HKDF(algorithm=hashes.SHA256(), length=material.PSK_SIZE, salt=salt, info=info).derive(key)


# ---------------------------------------------------------------------------
# The keys a host holds per peer (PskStore keeps them durably)


@dataclass(frozen=True, repr=False)
class _PeerKeys:
    """The keys this host holds for one peer.

    current:  key of `epoch`; what this host proves with.
    previous: key of `epoch - 1`, kept while the peer may not have the current
              key yet (it has not proven it since this host moved on).
    pending:  key of `epoch + 1`, derived in a ratcheting session this host has
              not committed; kept because the peer may have committed it.
    pending_ticket: the peer's ticket for the session that made the pending
              key (set exactly when `pending` is).
    tickets:  the last ratchet ticket this host gave out for this peer.
    """

    epoch: int
    current: bytes
    previous: bytes | None
    pending: bytes | None
    pending_ticket: int | None = None
    tickets: int = 0

    def __repr__(self) -> str:
        return f"_PeerKeys(epoch={self.epoch}, <redacted>)"


# ---------------------------------------------------------------------------
# State transitions (pure: old keys in, new keys out)


@dataclass(frozen=True, repr=False)
class _Accepted:
    verified: tuple[int, bytes]  # the (epoch, key) the peer's proof verified with
    current: tuple[int, bytes]  # this host's current (epoch, key) after the step


def _take_ticket(keys: _PeerKeys) -> tuple[_PeerKeys, tuple[_PeerKeys, int]]:
    """The source numbers its ratchet offer."""
    if keys.tickets >= material.MAX_TICKET:
        raise PskError("the PSK ticket counter is exhausted; provision a new PSK")
    new = dataclasses.replace(keys, tickets=keys.tickets + 1)
    return new, (new, new.tickets)


def _accept_proof(
    keys: _PeerKeys,
    proof: PskProof,
    peer: str,
    peer_role: PskRole,
    channel_binding: bytes,
    nonce_source: bytes,
    nonce_dest: bytes | None,
) -> tuple[_PeerKeys | None, _Accepted]:
    """Verify a peer's proof against our current, previous or pending key; returns (new keys, what verified)."""
    candidates = {keys.epoch: keys.current}
    if keys.previous is not None:
        candidates[keys.epoch - 1] = keys.previous
    if keys.pending is not None:
        candidates[keys.epoch + 1] = keys.pending
    key = candidates.get(proof.epoch)
    if key is None:
        raise PskError(
            f"{peer} proved PSK epoch {proof.epoch}, but this host is at epoch {keys.epoch} and accepts "
            f"only {sorted(candidates)}: if this repeats on new sessions, the pair is out of step; "
            "provision a new PSK on both hosts"
        )
    if not verify_psk_proof(
        proof.mac,
        key,
        proof.epoch,
        peer_role,
        channel_binding,
        nonce_source,
        nonce_dest,
        ratchet=proof.ratchet,
        ticket=proof.ticket,
    ):
        raise _bad_proof(peer, proof.epoch)
    verified = (proof.epoch, key)
    if proof.epoch == keys.epoch + 1:
        # The peer committed the pending key: adopt it. The peer will never
        # prove the old key again, so neither it nor older keys are kept.
        new = dataclasses.replace(
            keys, epoch=proof.epoch, current=key, previous=None, pending=None, pending_ticket=None
        )
        return new, _Accepted(verified, verified)
    current = (keys.epoch, keys.current)
    if proof.epoch == keys.epoch:
        # The peer holds our current key: the previous one is no longer needed.
        return _peer_proved(keys, keys.epoch, keys.current), _Accepted(verified, current)
    # The peer is one step behind (it did not commit the last ratchet): keep
    # the previous key; we prove the current one, which it holds as pending.
    return None, _Accepted(verified, current)


def _peer_proved(keys: _PeerKeys, epoch: int, key: bytes) -> _PeerKeys | None:
    """The peer proved `key` at `epoch`; if that is our current key, forget the previous one."""
    if keys.epoch == epoch and keys.current == key and keys.previous is not None:
        return dataclasses.replace(keys, previous=None)
    return None


def _agree(keys: _PeerKeys, epoch: int, key: bytes, next_key: bytes, peer_ticket: int) -> tuple[_PeerKeys | None, int]:
    """The destination's decision to ratchet: its ticket (`next_key` now pending), or 0 (no)."""
    if keys.epoch != epoch or keys.current != key:
        # Our key moved on since we checked the Hello (another session
        # committed or adopted a ratchet): answer without ratcheting, with the
        # key chosen then, which the source can still verify.
        return None, 0
    if keys.pending_ticket is not None and peer_ticket <= keys.pending_ticket:
        # Our pending key came from a session the peer ticketed later than
        # this offer: the peer's side of it took the peer's slot after this
        # offer did, so it may still be alive and commit. Keep its key.
        return None, 0
    if keys.tickets >= material.MAX_TICKET:
        raise PskError("the PSK ticket counter is exhausted; provision a new PSK")
    ticket = keys.tickets + 1
    return dataclasses.replace(keys, pending=next_key, pending_ticket=peer_ticket, tickets=ticket), ticket


def _own_pending(keys: _PeerKeys, epoch: int, key: bytes, next_key: bytes, peer_ticket: int, peer: str) -> _PeerKeys:
    """The source stores the key the destination agreed to; only valid while `key` is current."""
    if keys.epoch != epoch or keys.current != key:
        raise PskError(
            f"the PSK for {peer} changed during this session (epoch {epoch} -> {keys.epoch}); "
            "refusing the session, retry it"
        )
    if keys.pending_ticket is not None and peer_ticket <= keys.pending_ticket:
        # Cannot happen with an honest peer (our slot orders our sessions);
        # refusing is always safe: the destination commits only on our Commit.
        raise PskError(f"{peer} agreed with ticket {peer_ticket}, older than our pending key's; refusing the session")
    return dataclasses.replace(keys, pending=next_key, pending_ticket=peer_ticket)


def _committed(keys: _PeerKeys, epoch: int, key: bytes, next_key: bytes, peer: str) -> _PeerKeys | None:
    if keys.epoch == epoch + 1 and keys.current == next_key:
        return None  # already adopted: the peer proved it in a concurrent session
    if keys.epoch != epoch or keys.current != key:
        raise PskError(
            f"cannot commit the PSK ratchet for {peer}: this host moved from epoch {epoch} to "
            f"{keys.epoch} during the session"
        )
    # The peer may not have committed yet: keep our old key as previous
    # until it proves the new one.
    return dataclasses.replace(keys, epoch=epoch + 1, current=next_key, previous=key, pending=None, pending_ticket=None)


def _bad_proof(peer: str, epoch: int) -> PskError:
    return PskError(
        f"the PSK proof from {peer} for epoch {epoch} does not verify: it holds another key "
        "(were both hosts provisioned with the same PSK?) or the proof was made for another session"
    )
