from __future__ import annotations

import pytest

from sealift.security.keys import (
    EXPORTER_LABEL,
    NONCE_SIZE,
    SessionKeys,
    channel_secret,
    derive_session_keys,
    new_nonce,
)
from sealift.security.tls import TlsStream

NONCE_S = bytes(range(NONCE_SIZE))
NONCE_D = bytes(range(100, 100 + NONCE_SIZE))
SECRET = b"\x42" * 32


def test_exporter_label() -> None:
    assert EXPORTER_LABEL == b"EXPORTER-sealift-migration-v1"


def test_session_keys_are_equal_on_both_sides(connected: tuple[TlsStream, TlsStream]) -> None:
    client, server = connected
    nonce_s, nonce_d = new_nonce(), new_nonce()
    source_secret = channel_secret(client, nonce_s, nonce_d, "mig-1")
    dest_secret = channel_secret(server, nonce_s, nonce_d, "mig-1")
    assert len(source_secret) == 32
    assert source_secret == dest_secret
    assert source_secret == client.export_keying_material(EXPORTER_LABEL, 32, nonce_s + nonce_d + b"mig-1")
    assert derive_session_keys(source_secret, nonce_s, nonce_d, "mig-1") == derive_session_keys(
        dest_secret, nonce_s, nonce_d, "mig-1"
    )
    # Another migration or other nonces on the same channel: another secret.
    assert channel_secret(client, nonce_s, nonce_d, "mig-2") != source_secret
    assert channel_secret(client, new_nonce(), nonce_d, "mig-1") != source_secret


def test_derivation_is_deterministic_with_distinct_outputs() -> None:
    keys = derive_session_keys(SECRET, NONCE_S, NONCE_D, "mig-1")
    assert keys == derive_session_keys(SECRET, NONCE_S, NONCE_D, "mig-1")
    assert len(keys.source_to_dest_key) == len(keys.dest_to_source_key) == 32
    assert len(keys.source_to_dest_iv) == len(keys.dest_to_source_iv) == 12
    assert keys.source_to_dest_key != keys.dest_to_source_key
    assert keys.source_to_dest_iv != keys.dest_to_source_iv
    assert keys.source_to_dest_key[:12] != keys.source_to_dest_iv


@pytest.mark.parametrize(
    "args",
    [
        (b"\x43" * 32, NONCE_S, NONCE_D, "mig-1"),
        (SECRET, NONCE_D, NONCE_S, "mig-1"),  # nonces swapped
        (SECRET, NONCE_S, NONCE_D, "mig-2"),
    ],
)
def test_every_input_changes_the_keys(args: tuple[bytes, bytes, bytes, str]) -> None:
    base = derive_session_keys(SECRET, NONCE_S, NONCE_D, "mig-1")
    other = derive_session_keys(*args)
    assert other.source_to_dest_key != base.source_to_dest_key
    assert other.dest_to_source_iv != base.dest_to_source_iv


def test_repr_hides_key_material() -> None:
    keys = derive_session_keys(SECRET, NONCE_S, NONCE_D, "mig-1")
    text = repr(keys) + str(keys)
    for value in (keys.source_to_dest_key, keys.dest_to_source_key, keys.source_to_dest_iv):
        assert value.hex() not in text
        assert repr(value) not in text


@pytest.mark.parametrize(
    "secret, nonce_s, nonce_d, migration_id",
    [
        (b"short", NONCE_S, NONCE_D, "m"),
        (SECRET, b"short", NONCE_D, "m"),
        (SECRET, NONCE_S, NONCE_D + b"x", "m"),
        (SECRET, NONCE_S, NONCE_D, ""),
        (SECRET, NONCE_S, NONCE_D, "x" * 257),
    ],
)
def test_bad_inputs_are_refused(secret: bytes, nonce_s: bytes, nonce_d: bytes, migration_id: str) -> None:
    with pytest.raises(ValueError):
        derive_session_keys(secret, nonce_s, nonce_d, migration_id)


def test_session_keys_check_sizes() -> None:
    with pytest.raises(ValueError, match="source_to_dest_key"):
        SessionKeys(b"k", b"i" * 12, b"k" * 32, b"i" * 12)


def test_nonces_are_fresh() -> None:
    assert len(new_nonce()) == NONCE_SIZE
    assert new_nonce() != new_nonce()
