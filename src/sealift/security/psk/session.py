"""One migration session's use of the pair's PSK, for either role: prove, check the peer's proof, ratchet, commit.

`PskSession` drives the exchange of proofs in Hello and Accept and, when both
hosts agree, the ratchet of the pair's key, applying each step to the
`PskStore` as one of the pure transitions of sealift.security.psk.ratchet.
"""

from __future__ import annotations

from enum import Enum

from sealift.security.identity import validate_hostname
from sealift.security.psk.material import PskError, PskRole, _check_binding, _check_nonce
from sealift.security.psk.proof import PskProof, psk_proof, verify_psk_proof
from sealift.security.psk.ratchet import (
    _accept_proof,
    _agree,
    _bad_proof,
    _committed,
    _own_pending,
    _peer_proved,
    _take_ticket,
    ratchet_key,
)
from sealift.security.psk.store import PskStore


class _Step(Enum):
    NEW = "new"
    PROVED = "proved"  # this side's proof is made
    CHECKED = "checked"  # the peer's proof is checked
    COMMITTED = "committed"
    CLOSED = "closed"


class PskSession:
    """The PSK part of one migration session, for one role. Not thread-safe; one per session.

    Proofs: each side proves with its own current key and accepts the peer's
    proof for its current, previous or pending epoch. When the peer proves
    the pending key, the peer has committed it, so this host adopts it too.

    Ratchet: a session ratchets only if both hosts agree: the source offers
    (proof flag), the destination agrees (its proof's flag). Each host takes
    part in at most one ratcheting session per peer at a time (its in-memory
    "slot", held from its offer or agreement until commit or close; only a
    session that holds it can commit), and numbers each offer or agreement
    with a durable per-peer "ticket" that only grows. Tickets order a host's
    ratcheting sessions, so the other host can tell whether an offer or an
    agreement is newer than the session that made its pending key: if not,
    that session may still be alive on the peer and commit, so the pending
    key is kept and the session at hand does not ratchet.
    Concurrent migrations between the same pair still authenticate; they
    just do not always ratchet. See docs/security.md for the state machine.
    """

    def __init__(self, store: PskStore, peer: str, role: PskRole) -> None:
        if role not in ("source", "destination"):
            raise ValueError(f"role must be 'source' or 'destination', not {role!r}")
        validate_hostname(peer)
        self._store = store
        self._peer = peer
        self._role: PskRole = role
        self._step = _Step.NEW
        self._slot_held = False
        self._binding: bytes | None = None
        self._nonce_source: bytes | None = None
        self._ticket = 0  # this host's ticket for this session (0: not ratcheting from our side)
        self._peer_ticket = 0  # the peer's ticket (0: it did not offer or agree)
        # The (epoch, key) this session authenticates with, once known.
        self._base: tuple[int, bytes] | None = None
        # The key of base epoch + 1 if this session ratchets.
        self._next_key: bytes | None = None

    def __enter__(self) -> PskSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def epoch(self) -> int | None:
        """The epoch this session authenticated at (None until known)."""
        return None if self._base is None else self._base[0]

    @property
    def agreed_key(self) -> tuple[int, bytes] | None:
        """(epoch, key) both hosts proved they hold, once the peer's proof checked out (None before).

        Other keys are derived from it per migration (the ipsec transport's PSK).
        """
        return self._base

    @property
    def ratcheting(self) -> bool:
        """True once both hosts agreed that this session replaces the key on commit."""
        return self._next_key is not None

    # source: make_proof, then check_peer_proof; destination: the other way round.

    def make_proof(self, channel_binding: bytes, nonce_source: bytes, nonce_dest: bytes | None = None) -> str:
        """The proof (hex) for Hello.psk_proof (source) or Accept.psk_proof (destination).

        The source passes no `nonce_dest` (it does not exist yet). The
        destination passes its own nonce; if the session ratchets, the new key
        is durably stored as pending *before* this returns, i.e. before Accept
        is sent, because the source may commit it as soon as it has Accept.
        """
        self._remember(channel_binding, nonce_source)
        if self._role == "source":
            return self._make_source_proof(channel_binding, nonce_source, nonce_dest)
        return self._make_destination_proof(channel_binding, nonce_source, nonce_dest)

    def check_peer_proof(
        self, proof_hex: str | None, channel_binding: bytes, nonce_source: bytes, nonce_dest: bytes | None = None
    ) -> None:
        """Check the peer's proof; PskError (refuse the session) if it does not verify.

        The destination checks Hello.psk_proof (no `nonce_dest`); the source
        checks Accept.psk_proof (with `nonce_dest`). A proof of this host's
        pending key moves this host to it (the peer has committed it).
        """
        self._remember(channel_binding, nonce_source)
        proof = PskProof.from_hex(proof_hex)
        if self._role == "destination":
            self._check_source_proof(proof, channel_binding, nonce_source, nonce_dest)
        else:
            self._check_destination_proof(proof, channel_binding, nonce_source, nonce_dest)

    def commit(self) -> bool:
        """The session succeeded: make the ratcheted key current. True if the key changed.

        Call it at the session's success point and not before:
          - source: after the destination's "running" receipt (any point after
            check_peer_proof would be safe: the destination stored the new key
            before it sent Accept);
          - destination: after the source's Commit, and never before some
            message the source sends after Accept, because only then does the
            destination know the source checked Accept and holds the new key.
        A session that is not ratcheting commits nothing and returns False.
        """
        self._expect(_Step.CHECKED if self._role == "source" else _Step.PROVED, "commit")
        self._step = _Step.COMMITTED
        try:
            if self._next_key is None:
                return False
            assert self._base is not None
            epoch, key = self._base
            next_key = self._next_key
            self._store._transition(self._peer, lambda keys: (_committed(keys, epoch, key, next_key, self._peer), None))
            return True
        finally:
            self._release()

    def close(self) -> None:
        """End the session (always, in a finally); an uncommitted ratchet stays pending."""
        self._release()
        self._step = _Step.CLOSED

    # -- the four steps ---------------------------------------------------------

    def _make_source_proof(self, channel_binding: bytes, nonce_source: bytes, nonce_dest: bytes | None) -> str:
        self._expect(_Step.NEW, "make_proof")
        if nonce_dest is not None:
            raise ValueError("the source's proof is made before the destination's nonce exists; pass nonce_dest=None")
        keys = self._store._read(self._peer)  # refuses an unprovisioned peer before taking the slot
        if self._store._try_acquire_slot(self._peer):
            self._slot_held = True
            # Durable before the Hello leaves: tickets never repeat, even across restarts.
            keys, self._ticket = self._store._transition(self._peer, _take_ticket)
        self._base = (keys.epoch, keys.current)
        offer = self._ticket > 0
        mac = psk_proof(
            keys.current, keys.epoch, "source", channel_binding, nonce_source, None, ratchet=offer, ticket=self._ticket
        )
        self._step = _Step.PROVED
        return PskProof(keys.epoch, offer, self._ticket, mac).to_hex()

    def _check_source_proof(
        self, proof: PskProof, channel_binding: bytes, nonce_source: bytes, nonce_dest: bytes | None
    ) -> None:
        self._expect(_Step.NEW, "check_peer_proof")
        if nonce_dest is not None:
            raise ValueError("the source's proof does not cover the destination's nonce; pass nonce_dest=None")
        accepted = self._store._transition(
            self._peer,
            lambda keys: _accept_proof(keys, proof, self._peer, "source", channel_binding, nonce_source, None),
        )
        # We answer with our current key (the peer holds it, or holds it as pending).
        self._base = accepted.current
        self._peer_ticket = proof.ticket
        self._step = _Step.CHECKED

    def _make_destination_proof(self, channel_binding: bytes, nonce_source: bytes, nonce_dest: bytes | None) -> str:
        self._expect(_Step.CHECKED, "make_proof")
        if nonce_dest is None:
            raise ValueError("the destination's proof covers its own nonce; pass nonce_dest")
        _check_nonce("nonce_dest", nonce_dest)
        assert self._base is not None
        epoch, key = self._base
        if self._peer_ticket and self._store._try_acquire_slot(self._peer):
            self._slot_held = True
            next_key = ratchet_key(key, epoch, nonce_source, nonce_dest, channel_binding)
            peer_ticket = self._peer_ticket
            self._ticket = self._store._transition(
                self._peer, lambda keys: _agree(keys, epoch, key, next_key, peer_ticket)
            )
            if self._ticket:
                self._next_key = next_key
            else:
                self._release()
        agreed = self._ticket > 0
        mac = psk_proof(
            key, epoch, "destination", channel_binding, nonce_source, nonce_dest, ratchet=agreed, ticket=self._ticket
        )
        self._step = _Step.PROVED
        return PskProof(epoch, agreed, self._ticket, mac).to_hex()

    def _check_destination_proof(
        self, proof: PskProof, channel_binding: bytes, nonce_source: bytes, nonce_dest: bytes | None
    ) -> None:
        self._expect(_Step.PROVED, "check_peer_proof")
        if nonce_dest is None:
            raise ValueError("the destination's proof covers its nonce; pass nonce_dest")
        _check_nonce("nonce_dest", nonce_dest)
        assert self._base is not None
        if proof.ratchet and not self._slot_held:
            raise PskError(f"{self._peer} answered with a ratchet this host did not offer: refusing the session")
        proved_epoch, proved_key = self._base
        if proof.epoch == proved_epoch:
            # The peer is at the epoch we proved: verify with the very key we
            # used, even if a concurrent session moved our state on meanwhile.
            args = (channel_binding, nonce_source, nonce_dest)
            if not verify_psk_proof(
                proof.mac, proved_key, proof.epoch, "destination", *args, ratchet=proof.ratchet, ticket=proof.ticket
            ):
                raise _bad_proof(self._peer, proof.epoch)
            self._store._transition(self._peer, lambda keys: (_peer_proved(keys, proof.epoch, proved_key), None))
        elif proof.epoch == proved_epoch + 1:
            # The peer is one step ahead: it committed the key we hold as pending.
            accepted = self._store._transition(
                self._peer,
                lambda keys: _accept_proof(
                    keys, proof, self._peer, "destination", channel_binding, nonce_source, nonce_dest
                ),
            )
            # The session's key is the one both proofs agree on: the peer's.
            self._base = accepted.verified
        else:
            raise PskError(
                f"{self._peer} proved PSK epoch {proof.epoch}, but this host proved epoch {proved_epoch} "
                f"(an honest peer answers with {proved_epoch} or {proved_epoch + 1}): refusing the session"
            )
        if proof.ratchet:
            epoch, key = self._base
            next_key = ratchet_key(key, epoch, nonce_source, nonce_dest, channel_binding)
            ticket = proof.ticket
            self._store._transition(
                self._peer, lambda keys: (_own_pending(keys, epoch, key, next_key, ticket, self._peer), None)
            )
            self._next_key = next_key
        else:
            self._release()  # this session will not ratchet: let another one
        self._step = _Step.CHECKED

    # -- helpers --------------------------------------------------------------

    def _release(self) -> None:
        if self._slot_held:
            self._slot_held = False
            self._store._release_slot(self._peer)

    def _expect(self, step: _Step, call: str) -> None:
        if self._step is not step:
            raise RuntimeError(
                f"PskSession({self._role}).{call}() called in step {self._step.value!r}, expected {step.value!r}"
            )

    def _remember(self, channel_binding: bytes, nonce_source: bytes) -> None:
        _check_binding(channel_binding)
        _check_nonce("nonce_source", nonce_source)
        if self._binding is None:
            self._binding, self._nonce_source = channel_binding, nonce_source
        elif (self._binding, self._nonce_source) != (channel_binding, nonce_source):
            raise ValueError("a PskSession must use one channel binding and one source nonce throughout")
