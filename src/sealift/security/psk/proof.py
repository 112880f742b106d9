"""The proof of possession of the pair's PSK that travels in Hello.psk_proof and Accept.psk_proof (sans-IO).

`PskProof` is its wire form (version, flags, epoch, ticket, MAC); `psk_proof`
makes the MAC, an HMAC-SHA256 over a labelled transcript (key epoch, role,
ratchet flag, ticket, TLS exporter value, nonces), and `verify_psk_proof`
checks it.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac

from sealift.security.psk.material import (
    MAX_EPOCH,
    MAX_TICKET,
    PskError,
    PskRole,
    _check_binding,
    _check_epoch,
    _check_key,
    _check_nonce,
    _check_ticket,
)

MAC_SIZE = 32  # HMAC-SHA256

PROOF_VERSION = 1
# Wire form of a proof (hex in Hello.psk_proof / Accept.psk_proof, which allow
# up to 128 hex digits): version u8, flags u8, epoch u64, ticket u64, mac[32]
# = 100 hex digits.
_PROOF_STRUCT = struct.Struct("!BBQQ")
PROOF_BYTES = _PROOF_STRUCT.size + MAC_SIZE
_FLAG_RATCHET = 0x01

_PROOF_LABEL = b"sealift psk proof v1"
_HEX = re.compile(r"[0-9a-fA-F]*")


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
        # bytes.fromhex would skip whitespace and return fewer bytes: only hex digits, then.
        if not _HEX.fullmatch(text):
            raise PskError("malformed PSK proof: not hex")
        raw = bytes.fromhex(text)
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
