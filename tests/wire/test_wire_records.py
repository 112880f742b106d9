"""Record protection: AES-256-GCM construction, tampering, rekeying, baseline."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from hypothesis import given, settings
from hypothesis import strategies as st

from sealift.wire import AeadProtection, NoProtection, ProtocolError, RecordAuthError
from sealift.wire.records import MAX_RECORDS
from wire_samples import IV, KEY

HEADER = b"\x01\x00\x00\x00\x00\x00\x00\x20"


def seal(p: AeadProtection, plaintext: bytes, header: bytes = HEADER) -> bytes:
    out = bytearray(len(plaintext) + p.overhead)
    n = p.seal_into(header, memoryview(plaintext), memoryview(out))
    assert n == len(out)
    return bytes(out)


def open_(p: AeadProtection, sealed: bytes, header: bytes = HEADER) -> bytes:
    out = bytearray(len(sealed) - p.overhead)
    n = p.open_into(header, memoryview(sealed), memoryview(out))
    return bytes(out[:n])


def nonce(iv: bytes, sequence: int) -> bytes:
    return (int.from_bytes(iv, "big") ^ sequence).to_bytes(12, "big")


def test_construction_matches_aes_gcm_with_counter_nonce() -> None:
    p = AeadProtection(KEY, IV)
    for seq in range(3):
        expected = AESGCM(KEY).encrypt(nonce(IV, seq), b"page data %d" % seq, HEADER)
        assert seal(p, b"page data %d" % seq) == expected
    assert p.sequence == 3


def test_round_trip_and_same_plaintext_never_same_ciphertext() -> None:
    sender, receiver = AeadProtection(KEY, IV), AeadProtection(KEY, IV)
    sealed = [seal(sender, b"same") for _ in range(5)]
    assert len(set(sealed)) == 5
    assert [open_(receiver, s) for s in sealed] == [b"same"] * 5


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=0, max_size=300), st.data())
def test_any_single_bit_flip_fails_authentication(plaintext: bytes, data: st.DataObject) -> None:
    sealed = bytearray(seal(AeadProtection(KEY, IV), plaintext))
    header = bytearray(HEADER)
    target = data.draw(st.sampled_from(["ciphertext", "header"]))
    buf = sealed if target == "ciphertext" else header
    bit = data.draw(st.integers(0, len(buf) * 8 - 1))
    buf[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(RecordAuthError, match="tampered or wrong key"):
        open_(AeadProtection(KEY, IV), bytes(sealed), bytes(header))


def test_reorder_replay_drop_and_wrong_key_fail() -> None:
    sender = AeadProtection(KEY, IV)
    a, b, c = (seal(sender, x) for x in (b"a", b"b", b"c"))
    for order in ([b, a], [a, a], [a, c]):  # reorder, replay, drop
        receiver = AeadProtection(KEY, IV)
        with pytest.raises(RecordAuthError):
            for record in order:
                open_(receiver, record)
    with pytest.raises(RecordAuthError):
        open_(AeadProtection(bytes(32), IV), a)
    with pytest.raises(RecordAuthError):
        open_(AeadProtection(KEY, bytes(12)), a)


def test_failed_protection_stays_failed() -> None:
    sender, receiver = AeadProtection(KEY, IV), AeadProtection(KEY, IV)
    good = seal(sender, b"x")
    with pytest.raises(RecordAuthError):
        open_(receiver, bytes([good[0] ^ 1]) + good[1:])
    with pytest.raises(RecordAuthError, match="already failed"):
        open_(receiver, good)


def test_short_ciphertext_is_an_auth_error() -> None:
    with pytest.raises(RecordAuthError):
        AeadProtection(KEY, IV).open_into(HEADER, memoryview(b"short"), memoryview(bytearray(0)))


def test_rekey_every_interval_in_step_and_as_specified() -> None:
    sender, receiver = AeadProtection(KEY, IV, 3), AeadProtection(KEY, IV, 3)
    records = [seal(sender, b"record %d" % i) for i in range(10)]
    assert sender.epoch == 3
    assert [open_(receiver, r) for r in records] == [b"record %d" % i for i in range(10)]
    assert receiver.epoch == 3
    # Record 3 is sealed under HKDF-Expand(SHA-256) of the first key, nonce from sequence 3.
    key1 = HKDFExpand(SHA256(), 32, b"sealift rekey key").derive(KEY)
    iv1 = HKDFExpand(SHA256(), 12, b"sealift rekey iv").derive(KEY)
    assert records[3] == AESGCM(key1).encrypt(nonce(iv1, 3), b"record 3", HEADER)
    # A receiver that does not rekey cannot read past the interval.
    lagging = AeadProtection(KEY, IV, 100)
    with pytest.raises(RecordAuthError):
        for r in records:
            open_(lagging, r)


def test_rekey_by_bytes() -> None:
    sender = AeadProtection(KEY, IV, rekey_interval=1000, rekey_bytes=100)
    receiver = AeadProtection(KEY, IV, rekey_interval=1000, rekey_bytes=100)
    records = [seal(sender, bytes(60)) for _ in range(5)]
    assert sender.epoch == 2
    assert all(open_(receiver, r) == bytes(60) for r in records)


def test_sequence_exhaustion_is_refused() -> None:
    p = AeadProtection(KEY, IV)
    p._sequence = MAX_RECORDS - 1  # white-box: 2**63 records cannot be sent in a test
    seal(p, b"last")
    with pytest.raises(ProtocolError, match="sequence exhausted"):
        seal(p, b"one too many")


def test_bad_key_material_is_refused() -> None:
    with pytest.raises(ValueError):
        AeadProtection(bytes(16), IV)
    with pytest.raises(ValueError):
        AeadProtection(KEY, bytes(8))
    with pytest.raises(ValueError):
        AeadProtection(KEY, IV, rekey_interval=0)


def test_no_protection_copies() -> None:
    p = NoProtection()
    out = bytearray(10)
    assert p.overhead == 0
    assert p.seal_into(HEADER, memoryview(b"abc"), memoryview(out)) == 3
    assert out[:3] == b"abc"
    assert p.open_into(HEADER, memoryview(b"xyz"), memoryview(out)) == 3
    assert out[:3] == b"xyz"
    with pytest.raises(ProtocolError):
        p.open_into(HEADER, memoryview(bytes(11)), memoryview(out))
