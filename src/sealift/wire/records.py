"""Record protection for data streams: AES-256-GCM, or nothing for the baseline.

One `AeadProtection` instance protects one direction of one stream: the
writer seals with it, the reader opens with its twin (same key and iv).
Each stream and direction needs its own key/iv; the caller derives them
(HKDF over the control session), this module never invents key material.

Nonces are `iv XOR sequence number`, so they never repeat under one key, and
a record that is reordered, replayed or dropped is opened with the wrong
nonce and fails authentication. The record header is the AAD, so the type
and length cannot be changed either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from .errors import ProtocolError, RecordAuthError

KEY_SIZE = 32
IV_SIZE = 12
TAG_SIZE = 16
MAX_RECORDS = 2**63
DEFAULT_REKEY_INTERVAL = 2**24
# TLS 1.3 (RFC 8446 §5.5) keeps AES-GCM to ~2^34.5 cipher blocks per key;
# with 1 MiB records 2^24 records would be far past that, so bytes count too.
DEFAULT_REKEY_BYTES = 2**38
REKEY_KEY_INFO = b"sealift rekey key"
REKEY_IV_INFO = b"sealift rekey iv"


@dataclass(frozen=True, repr=False)
class ProtectionState:
    """Where an AeadProtection stands, for the native relay core to carry on from (host/relaycore.py)."""

    key: bytes
    iv: bytes
    sequence: int
    epoch_records: int
    epoch_bytes: int
    rekey_interval: int
    rekey_bytes: int


class RecordProtection(Protocol):
    """Seals and opens record payloads in place into caller-provided buffers."""

    overhead: int

    def hand_over(self) -> ProtectionState | None:
        """Give the key state to the native relay (None: no key) and seal or open nothing more here."""
        ...

    def seal_into(self, header: bytes, plaintext: memoryview, out: memoryview) -> int:
        """Write protected(plaintext) into `out`, len(plaintext) + overhead bytes; return that."""
        ...

    def open_into(self, header: bytes, ciphertext: memoryview, out: memoryview) -> int:
        """Verify and write the plaintext into `out`; return its length. Raises RecordAuthError."""
        ...


class AeadProtection:
    """AES-256-GCM records with counter nonces and deterministic rekeying."""

    overhead = TAG_SIZE

    def __init__(
        self,
        key: bytes,
        iv: bytes,
        rekey_interval: int = DEFAULT_REKEY_INTERVAL,
        rekey_bytes: int = DEFAULT_REKEY_BYTES,
    ) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"AES-256-GCM key must be {KEY_SIZE} bytes, got {len(key)}")
        if len(iv) != IV_SIZE:
            raise ValueError(f"record iv must be {IV_SIZE} bytes, got {len(iv)}")
        if rekey_interval < 1 or rekey_bytes < 1:
            raise ValueError("rekey_interval and rekey_bytes must be positive")
        self._rekey_interval = rekey_interval
        self._rekey_bytes = rekey_bytes
        self._key = bytes(key)
        self._iv = int.from_bytes(iv, "big")
        self._aead = AESGCM(self._key)
        self._sequence = 0
        self._epoch = 0
        self._epoch_records = 0
        self._epoch_bytes = 0
        self._failed = False
        self._handed_over = False

    @property
    def sequence(self) -> int:
        """Records sealed or opened so far (the next record's sequence number)."""
        return self._sequence

    @property
    def epoch(self) -> int:
        """How many times the key has been replaced."""
        return self._epoch

    def hand_over(self) -> ProtectionState:
        """The key, iv and counters as they stand; this instance refuses every record from now on.

        The native relay carries on from this state: were this object still
        to seal, it would seal under sequence numbers the native core uses
        too, reusing AES-GCM nonces under one key.
        """
        self._check_not_handed_over()
        self._handed_over = True
        return ProtectionState(
            key=self._key,
            iv=self._iv.to_bytes(IV_SIZE, "big"),
            sequence=self._sequence,
            epoch_records=self._epoch_records,
            epoch_bytes=self._epoch_bytes,
            rekey_interval=self._rekey_interval,
            rekey_bytes=self._rekey_bytes,
        )

    def _check_not_handed_over(self) -> None:
        if self._handed_over:
            raise ProtocolError("this stream's keys were handed to the native relay: it seals and opens no more here")

    def seal_into(self, header: bytes, plaintext: memoryview, out: memoryview) -> int:
        self._check_not_handed_over()
        size = len(plaintext) + TAG_SIZE
        if len(out) < size:
            raise ValueError(f"output buffer of {len(out)} bytes is smaller than {size}")
        nonce = self._next_nonce()
        self._aead.encrypt_into(nonce, plaintext, header, out[:size])
        self._advance(len(plaintext))
        return size

    def open_into(self, header: bytes, ciphertext: memoryview, out: memoryview) -> int:
        self._check_not_handed_over()
        if self._failed:
            raise RecordAuthError("record stream already failed authentication")
        size = len(ciphertext) - TAG_SIZE
        if size < 0:
            self._failed = True
            raise RecordAuthError(f"record of {len(ciphertext)} bytes is shorter than its tag")
        if len(out) < size:
            raise ProtocolError(f"record plaintext of {size} bytes exceeds buffer {len(out)}")
        nonce = self._next_nonce()
        try:
            self._aead.decrypt_into(nonce, ciphertext, header, out[:size])
        except InvalidTag:
            # The stream is dead: a later record could never line up again.
            self._failed = True
            raise RecordAuthError() from None
        self._advance(size)
        return size

    def _next_nonce(self) -> bytes:
        if self._sequence >= MAX_RECORDS:
            raise ProtocolError("record sequence exhausted (2**63 records); open a new stream")
        return (self._iv ^ self._sequence).to_bytes(IV_SIZE, "big")

    def _advance(self, plaintext_bytes: int) -> None:
        self._sequence += 1
        self._epoch_records += 1
        self._epoch_bytes += plaintext_bytes
        # Both ends count the same records and bytes, so they rekey in step.
        if self._epoch_records >= self._rekey_interval or self._epoch_bytes >= self._rekey_bytes:
            self._rekey()

    def _rekey(self) -> None:
        key = HKDFExpand(SHA256(), KEY_SIZE, REKEY_KEY_INFO).derive(self._key)
        iv = HKDFExpand(SHA256(), IV_SIZE, REKEY_IV_INFO).derive(self._key)
        # The old key is dropped: earlier records stay safe if a later key leaks.
        self._key = key
        self._iv = int.from_bytes(iv, "big")
        self._aead = AESGCM(key)
        self._epoch += 1
        self._epoch_records = 0
        self._epoch_bytes = 0


class NoProtection:
    """No encryption, no authentication: the explicit `--insecure` baseline."""

    overhead = 0

    def hand_over(self) -> None:
        return None  # no key, no sequence: nothing to hand over or to reuse

    def seal_into(self, header: bytes, plaintext: memoryview, out: memoryview) -> int:
        return _copy(plaintext, out)

    def open_into(self, header: bytes, ciphertext: memoryview, out: memoryview) -> int:
        return _copy(ciphertext, out)


def _copy(source: memoryview, out: memoryview) -> int:
    size = len(source)
    if len(out) < size:
        raise ProtocolError(f"record of {size} bytes exceeds buffer {len(out)}")
    out[:size] = source
    return size
