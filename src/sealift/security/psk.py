"""Dynamic pre-shared key: an optional second factor per pair of hosts (seed 002, done safely).

Two hosts that share a PSK prove to each other, inside their mutual-TLS
control channel, that they hold the current key of the pair; after a
successful session the key is replaced by a new one derived from it with
HKDF (a one-way ratchet), so an old key that leaks or is cracked is worthless.

Everything here is sans-IO except `PskStore`, which keeps the keys of each
peer in SQLite, encrypted with AES-GCM under a key derived from the host's
private key. See docs/security.md, "Dynamic pre-shared key", for why this
differs from the paper's XOR construction and for the state machine.

The pieces:

    psk_proof(...)         HMAC-SHA256 over a labelled transcript: key epoch,
                           role, ratchet flag, TLS exporter value, nonces
    ratchet_key(...)       next key = HKDF(current, salt = nonces || exporter,
                           info = "sealift psk ratchet" || epoch)
    PskStore               per peer: epoch n, key n, key n-1 (until the peer
                           proves n), key n+1 (derived, not yet committed),
                           and a counter of ratchet "tickets"
    PskSession             one migration's use of the PSK, for either role

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

import os
import sqlite3
import struct
import threading
import time
from collections.abc import Callable
import dataclasses
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Literal, Protocol, TypeVar

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealift.security.errors import SecurityError
from sealift.security.identity import validate_hostname
from sealift.security.keys import NONCE_SIZE

PskRole = Literal["source", "destination"]

PSK_SIZE = 32  # bytes of every PSK (HMAC-SHA256 and HKDF-SHA256 key size)
BINDING_SIZE = 32  # bytes of the TLS exporter value the proofs are bound to
MAC_SIZE = 32  # HMAC-SHA256
WRAP_KEY_SIZE = 32  # AES-256-GCM key that encrypts the PSKs at rest
MAX_EPOCH = (1 << 63) - 2  # fits SQLite's signed 64-bit INTEGER with room for epoch + 1
MAX_TICKET = (1 << 63) - 1

# A distinct exporter label: the PSK binding must never equal the data-key secret.
PSK_EXPORTER_LABEL = b"EXPORTER-sealift-psk-v1"

PROOF_VERSION = 1
# Wire form of a proof (hex in Hello.psk_proof / Accept.psk_proof, which allow
# up to 128 hex digits): version u8, flags u8, epoch u64, ticket u64, mac[32]
# = 100 hex digits.
_PROOF_STRUCT = struct.Struct("!BBQQ")
PROOF_BYTES = _PROOF_STRUCT.size + MAC_SIZE
_FLAG_RATCHET = 0x01

_PROOF_LABEL = b"sealift psk proof v1"
_RATCHET_LABEL = b"sealift psk ratchet"
_WRAP_LABEL = b"sealift psk wrap key v1"
_FINGERPRINT_LABEL = b"sealift psk fingerprint v1"
_AT_REST_LABEL = b"sealift psk at rest v1"
_GCM_NONCE_SIZE = 12


class PskError(SecurityError):
    """A PSK proof was refused, or the PSK state of a peer does not allow this step."""

    code = "psk_error"


# ---------------------------------------------------------------------------
# Keys: generation, hex form, wrap key


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
# Proofs (sans-IO)


@dataclass(frozen=True)
class PskProof:
    """What travels in Hello.psk_proof / Accept.psk_proof.

    epoch:   the epoch of the key the MAC is made with
    ratchet: source: "I offer to ratchet"; destination: "agreed"
    ticket:  the prover's ratchet ticket for this session when `ratchet`
             (a per-peer number that only grows, see PskSession), else 0
    """

    epoch: int
    ratchet: bool
    ticket: int
    mac: bytes

    def __post_init__(self) -> None:
        _check_epoch(self.epoch)
        if not isinstance(self.ratchet, bool):
            raise TypeError("ratchet must be a bool")
        _check_ticket(self.ticket)
        if self.ratchet != (self.ticket > 0):
            raise PskError("malformed PSK proof: a ratchet flag goes with a ticket, and only then")
        if not isinstance(self.mac, bytes) or len(self.mac) != MAC_SIZE:
            raise ValueError(f"mac must be {MAC_SIZE} bytes")

    def to_hex(self) -> str:
        flags = _FLAG_RATCHET if self.ratchet else 0
        return (_PROOF_STRUCT.pack(PROOF_VERSION, flags, self.epoch, self.ticket) + self.mac).hex()

    @classmethod
    def from_hex(cls, text: str | None) -> PskProof:
        """Parse a proof from the wire; PskError says what is wrong with it."""
        if text is None:
            raise PskError("the peer sent no PSK proof, but a PSK is provisioned for this pair")
        if not isinstance(text, str) or len(text) != 2 * PROOF_BYTES:
            raise PskError(f"malformed PSK proof: expected {2 * PROOF_BYTES} hex digits")
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise PskError("malformed PSK proof: not hex") from None
        version, flags, epoch, ticket = _PROOF_STRUCT.unpack_from(raw)
        if version != PROOF_VERSION:
            raise PskError(f"PSK proof version {version} is not supported (expected {PROOF_VERSION})")
        if flags & ~_FLAG_RATCHET:
            raise PskError(f"malformed PSK proof: unknown flags {flags:#04x}")
        if epoch > MAX_EPOCH or ticket > MAX_TICKET:
            raise PskError("malformed PSK proof: epoch or ticket out of range")
        return cls(epoch=epoch, ratchet=bool(flags & _FLAG_RATCHET), ticket=ticket, mac=raw[_PROOF_STRUCT.size :])


def psk_proof(
    key: bytes,
    epoch: int,
    role: PskRole,
    channel_binding: bytes,
    nonce_source: bytes,
    nonce_dest: bytes | None = None,
    *,
    ratchet: bool = False,
    ticket: int = 0,
) -> bytes:
    """HMAC-SHA256 proving knowledge of `key` (epoch `epoch`) in one TLS session.

    The transcript carries the prover's role, so the source's proof cannot be
    reflected back as the destination's; the TLS exporter value, so it cannot
    be replayed into another connection; the nonces, the ratchet flag and the
    ticket, so they cannot be altered. The source proves before the destination's nonce
    exists (it travels in Hello), so its proof has `nonce_dest=None`; the
    exporter already makes it unique to the connection.
    """
    _check_key(key)
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(_proof_transcript(epoch, role, channel_binding, nonce_source, nonce_dest, ratchet, ticket))
    return mac.finalize()


def verify_psk_proof(
    mac_value: bytes,
    key: bytes,
    epoch: int,
    role: PskRole,
    channel_binding: bytes,
    nonce_source: bytes,
    nonce_dest: bytes | None = None,
    *,
    ratchet: bool = False,
    ticket: int = 0,
) -> bool:
    """True if `mac_value` is the proof for these inputs (constant-time comparison)."""
    _check_key(key)
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(_proof_transcript(epoch, role, channel_binding, nonce_source, nonce_dest, ratchet, ticket))
    try:
        mac.verify(mac_value)
    except InvalidSignature:
        return False
    return True


def ratchet_key(
    key: bytes, epoch: int, nonce_source: bytes, nonce_dest: bytes, channel_binding: bytes
) -> bytes:
    """The key of epoch `epoch + 1`, derived from the key of `epoch` in one session.

    HKDF is one-way, so the new key does not reveal the old one. The salt
    holds both sides' nonces (as the paper intends) and the TLS exporter value:
    the exporter is secret to the two endpoints of that TLS session, so even
    someone who knows the old key and recorded the session cannot compute the
    new one without breaking the TLS key exchange.
    """
    _check_key(key)
    _check_epoch(epoch)
    if epoch + 1 > MAX_EPOCH:
        raise PskError("the PSK epoch counter is exhausted; provision a new PSK")
    _check_nonce("nonce_source", nonce_source)
    _check_nonce("nonce_dest", nonce_dest)
    _check_binding(channel_binding)
    salt = nonce_source + nonce_dest + channel_binding
    info = _RATCHET_LABEL + epoch.to_bytes(8, "big")
    return HKDF(algorithm=hashes.SHA256(), length=PSK_SIZE, salt=salt, info=info).derive(key)


def _proof_transcript(
    epoch: int,
    role: PskRole,
    channel_binding: bytes,
    nonce_source: bytes,
    nonce_dest: bytes | None,
    ratchet: bool,
    ticket: int,
) -> bytes:
    _check_epoch(epoch)
    _check_ticket(ticket)
    if role not in ("source", "destination"):
        raise ValueError(f"role must be 'source' or 'destination', not {role!r}")
    _check_binding(channel_binding)
    _check_nonce("nonce_source", nonce_source)
    if nonce_dest is not None:
        _check_nonce("nonce_dest", nonce_dest)
    # Length-prefixed fields: no two different inputs give the same bytes.
    fields = (
        _PROOF_LABEL,
        role.encode("ascii"),
        epoch.to_bytes(8, "big"),
        bytes([_FLAG_RATCHET if ratchet else 0]),
        ticket.to_bytes(8, "big"),
        channel_binding,
        nonce_source,
        nonce_dest or b"",
    )
    return b"".join(len(field).to_bytes(2, "big") + field for field in fields)


# ---------------------------------------------------------------------------
# Durable state per peer


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


@dataclass(frozen=True)
class PskStatus:
    """What an operator may see about a peer's PSK (never the key itself)."""

    peer: str
    epoch: int
    fingerprint: str  # psk_fingerprint of the current key: equal on both hosts when in step
    has_previous: bool
    has_pending: bool
    updated_at: float


_SCHEMA = """
CREATE TABLE IF NOT EXISTS psk_peers (
    peer TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL CHECK (epoch >= 0),
    current_key BLOB NOT NULL,
    previous_key BLOB,
    pending_key BLOB,
    pending_ticket INTEGER,
    tickets INTEGER NOT NULL CHECK (tickets >= 0),
    updated_at REAL NOT NULL
);
"""

_T = TypeVar("_T")

# Ratchet slots: at most one ratcheting session per peer at a time (see
# PskSession). Process-wide and keyed by database file, so two PskStore objects
# on one file (a careless integration) still share them. Not durable: a
# restart ends every session, and with it every slot.
_SLOTS: set[tuple[str, str]] = set()
_SLOTS_LOCK = threading.Lock()


class PskStore:
    """The PSKs of this host, one chain per peer host, encrypted at rest in SQLite.

    `db_path` may be the agent's own database file (the table is separate).
    Every change is one transaction with synchronous=FULL, so a crash leaves
    either the old or the new state of a peer, never a mix.
    """

    def __init__(self, db_path: Path | str, wrap_key: bytes) -> None:
        if not isinstance(wrap_key, bytes) or len(wrap_key) != WRAP_KEY_SIZE:
            raise ValueError(f"wrap_key must be {WRAP_KEY_SIZE} bytes (see wrap_key_from_private_key)")
        path = Path(db_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._aead = AESGCM(wrap_key)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a ratchet step must survive a crash
        self._db.executescript(_SCHEMA)
        self._slot_scope = str(path.resolve())

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- operator API -------------------------------------------------------

    def provision(self, peer: str, initial_key: bytes, *, replace: bool = False) -> None:
        """Install the first PSK (epoch 0) for `peer`; the same key goes on both hosts.

        Refuses to overwrite an existing chain unless `replace` is true (the way
        out if a pair ever gets out of step: provision a new key on both hosts).
        """
        validate_hostname(peer)
        _check_key(initial_key)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT tickets FROM psk_peers WHERE peer=?", (peer,)).fetchone()
                if row is not None and not replace:
                    raise PskError(
                        f"a PSK is already provisioned for {peer}; pass replace=True "
                        "(and provision the same new key on the other host)"
                    )
                # Tickets keep growing across a re-provisioning: the peer
                # compares them with tickets it may still hold.
                tickets = 0 if row is None else row[0]
                keys = _PeerKeys(epoch=0, current=initial_key, previous=None, pending=None, tickets=tickets)
                self._write_locked(peer, keys)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def forget(self, peer: str) -> None:
        """Delete every key of `peer` (the pair then runs without the second factor)."""
        with self._lock:
            self._db.execute("DELETE FROM psk_peers WHERE peer=?", (peer,))

    def has_peer(self, peer: str) -> bool:
        """Is a PSK provisioned for `peer`? If so, a session without a proof must be refused."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM psk_peers WHERE peer=?", (peer,)).fetchone() is not None

    def peers(self) -> list[str]:
        with self._lock:
            return [row[0] for row in self._db.execute("SELECT peer FROM psk_peers ORDER BY peer")]

    def status(self, peer: str) -> PskStatus:
        with self._lock:
            keys = self._read_locked(peer)
            updated_at = self._db.execute("SELECT updated_at FROM psk_peers WHERE peer=?", (peer,)).fetchone()[0]
        return PskStatus(
            peer=peer,
            epoch=keys.epoch,
            fingerprint=psk_fingerprint(keys.current),
            has_previous=keys.previous is not None,
            has_pending=keys.pending is not None,
            updated_at=updated_at,
        )

    # -- for PskSession -----------------------------------------------------

    def _read(self, peer: str) -> _PeerKeys:
        with self._lock:
            return self._read_locked(peer)

    def _transition(self, peer: str, step: Callable[[_PeerKeys], tuple[_PeerKeys | None, _T]]) -> _T:
        """Read the peer's keys, apply `step`, write its result (None = unchanged), atomically."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                keys = self._read_locked(peer)
                new_keys, result = step(keys)
                if new_keys is not None:
                    self._write_locked(peer, new_keys)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    def _try_acquire_slot(self, peer: str) -> bool:
        with _SLOTS_LOCK:
            if (self._slot_scope, peer) in _SLOTS:
                return False
            _SLOTS.add((self._slot_scope, peer))
            return True

    def _release_slot(self, peer: str) -> None:
        with _SLOTS_LOCK:
            _SLOTS.discard((self._slot_scope, peer))

    # -- encryption at rest -------------------------------------------------

    def _read_locked(self, peer: str) -> _PeerKeys:
        row = self._db.execute(
            "SELECT epoch, current_key, previous_key, pending_key, pending_ticket, tickets "
            "FROM psk_peers WHERE peer=?",
            (peer,),
        ).fetchone()
        if row is None:
            raise PskError(f"no PSK is provisioned for {peer}: provision one on both hosts first")
        epoch, current, previous, pending, pending_ticket, tickets = row
        return _PeerKeys(
            epoch=epoch,
            current=self._unwrap(peer, "current", epoch, current),
            previous=None if previous is None else self._unwrap(peer, "previous", epoch - 1, previous),
            pending=None if pending is None else self._unwrap(peer, "pending", epoch + 1, pending),
            pending_ticket=pending_ticket,
            tickets=tickets,
        )

    def _write_locked(self, peer: str, keys: _PeerKeys) -> None:
        _check_epoch(keys.epoch)
        if keys.previous is not None and keys.epoch == 0:
            raise PskError("internal error: a previous key at epoch 0")
        if (keys.pending is None) != (keys.pending_ticket is None):
            raise PskError("internal error: a pending key goes with the peer's ticket, and only then")
        self._db.execute(
            "INSERT INTO psk_peers (peer, epoch, current_key, previous_key, pending_key, pending_ticket, "
            "tickets, updated_at) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(peer) DO UPDATE SET "
            "epoch=excluded.epoch, current_key=excluded.current_key, previous_key=excluded.previous_key, "
            "pending_key=excluded.pending_key, pending_ticket=excluded.pending_ticket, "
            "tickets=excluded.tickets, updated_at=excluded.updated_at",
            (
                peer,
                keys.epoch,
                self._wrap(peer, "current", keys.epoch, keys.current),
                None if keys.previous is None else self._wrap(peer, "previous", keys.epoch - 1, keys.previous),
                None if keys.pending is None else self._wrap(peer, "pending", keys.epoch + 1, keys.pending),
                keys.pending_ticket,
                keys.tickets,
                time.time(),
            ),
        )

    def _wrap(self, peer: str, slot: str, epoch: int, key: bytes) -> bytes:
        _check_key(key)
        nonce = os.urandom(_GCM_NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, key, _at_rest_aad(peer, slot, epoch))

    def _unwrap(self, peer: str, slot: str, epoch: int, blob: bytes) -> bytes:
        try:
            key = self._aead.decrypt(blob[:_GCM_NONCE_SIZE], blob[_GCM_NONCE_SIZE:], _at_rest_aad(peer, slot, epoch))
        except InvalidTag:
            raise PskError(
                f"the stored {slot} PSK for {peer} cannot be decrypted: the host key changed "
                "(re-provision the PSK) or the database was altered"
            ) from None
        _check_key(key)
        return key


def _at_rest_aad(peer: str, slot: str, epoch: int) -> bytes:
    # Binds each ciphertext to its peer, slot and epoch: rows or slots swapped in
    # the file (say, an old key put back as the current one) fail to decrypt.
    return b"|".join((_AT_REST_LABEL, peer.encode("utf-8"), slot.encode("ascii"), str(epoch).encode("ascii")))


# ---------------------------------------------------------------------------
# One session's use of the PSK


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
            self._peer, lambda keys: _accept_proof(keys, proof, self._peer, "source", channel_binding, nonce_source, None)
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
            self._ticket = self._store._transition(self._peer, lambda keys: _agree(keys, epoch, key, next_key, peer_ticket))
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
                lambda keys: _accept_proof(keys, proof, self._peer, "destination", channel_binding, nonce_source, nonce_dest),
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


# ---------------------------------------------------------------------------
# State transitions (pure: old keys in, new keys out)


@dataclass(frozen=True, repr=False)
class _Accepted:
    verified: tuple[int, bytes]  # the (epoch, key) the peer's proof verified with
    current: tuple[int, bytes]  # this host's current (epoch, key) after the step


def _take_ticket(keys: _PeerKeys) -> tuple[_PeerKeys, tuple[_PeerKeys, int]]:
    """The source numbers its ratchet offer."""
    if keys.tickets >= MAX_TICKET:
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
        proof.mac, key, proof.epoch, peer_role, channel_binding, nonce_source, nonce_dest,
        ratchet=proof.ratchet, ticket=proof.ticket,
    ):
        raise _bad_proof(peer, proof.epoch)
    verified = (proof.epoch, key)
    if proof.epoch == keys.epoch + 1:
        # The peer committed the pending key: adopt it. The peer will never
        # prove the old key again, so neither it nor older keys are kept.
        new = dataclasses.replace(keys, epoch=proof.epoch, current=key, previous=None, pending=None, pending_ticket=None)
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
    if keys.tickets >= MAX_TICKET:
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
