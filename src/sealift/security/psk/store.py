"""The on-disk PSK store: the keys of each peer in SQLite, encrypted at rest with AES-GCM.

The wrap key comes from the host's private key (`wrap_key_from_private_key`);
each ciphertext is bound to its peer, slot and epoch. The store also holds
the in-memory ratchet slots that keep a host to one ratcheting session per
peer at a time.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealift.security.identity import validate_hostname
from sealift.security.psk.material import WRAP_KEY_SIZE, PskError, _check_epoch, _check_key, psk_fingerprint
from sealift.security.psk.ratchet import _PeerKeys

_AT_REST_LABEL = b"sealift psk at rest v1"
_GCM_NONCE_SIZE = 12


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
            "SELECT epoch, current_key, previous_key, pending_key, pending_ticket, tickets FROM psk_peers WHERE peer=?",
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
