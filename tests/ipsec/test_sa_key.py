"""The per-migration IKE PSK (seed 002): same on both hosts, new every migration, never out of step.

Real PskStore/PskSession objects on both sides (two SQLite files, one
provisioned key), the proofs exchanged as the agents exchange them; the TLS
exporter values and nonces are random bytes standing in for one connection.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from sealift.ipsec.sa_key import (
    CHANNEL_SECRET_SIZE,
    agreed_ratchet_key,
    derive_ipsec_psk,
    ipsec_key_id,
    ipsec_psk_fingerprint,
)
from sealift.security.psk import PskSession, PskStore, new_psk, ratchet_key

NONCE = 32


@dataclass
class Pair:
    source: PskStore  # host-a's store, holding the key for peer host-b
    destination: PskStore


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    key = new_psk()
    a = PskStore(tmp_path / "a.sqlite3", os.urandom(32))
    b = PskStore(tmp_path / "b.sqlite3", os.urandom(32))
    a.provision("host-b", key)
    b.provision("host-a", key)
    yield Pair(a, b)
    a.close()
    b.close()


@dataclass(frozen=True)
class Derived:
    source_psk: bytes
    destination_psk: bytes
    epoch: int


def migrate(pair: Pair, migration_id: str, *, commit_source: bool = True, commit_destination: bool = True) -> Derived:
    """One PSK session as the agents run it, each side deriving the IKE PSK once the proofs are checked.

    commit_*=False is a migration that failed before that side's commit point.
    """
    binding = os.urandom(32)  # psk_channel_binding(stream): the same on both ends of one TLS connection
    channel_secret = os.urandom(CHANNEL_SECRET_SIZE)  # ipsec_channel_secret(stream, migration_id), likewise
    nonce_s, nonce_d = os.urandom(NONCE), os.urandom(NONCE)
    source = PskSession(pair.source, "host-b", "source")
    destination = PskSession(pair.destination, "host-a", "destination")
    try:
        hello_proof = source.make_proof(binding, nonce_s)
        destination.check_peer_proof(hello_proof, binding, nonce_s)
        accept_proof = destination.make_proof(binding, nonce_s, nonce_d)
        source.check_peer_proof(accept_proof, binding, nonce_s, nonce_d)

        def derive(session: PskSession) -> tuple[bytes, int]:
            epoch, key = agreed_ratchet_key(session)
            psk = derive_ipsec_psk(
                channel_secret=channel_secret,
                ratchet_key=key,
                epoch=epoch,
                migration_id=migration_id,
                nonce_source=nonce_s,
                nonce_dest=nonce_d,
            )
            return psk, epoch

        source_psk, source_epoch = derive(source)
        destination_psk, destination_epoch = derive(destination)
        assert source_epoch == destination_epoch
        # The destination commits on Commit, the source on the running receipt.
        if commit_destination:
            destination.commit()
        if commit_source:
            source.commit()
        return Derived(source_psk, destination_psk, source_epoch)
    finally:
        source.close()
        destination.close()


def test_both_hosts_derive_the_same_psk_and_it_changes_every_migration(pair: Pair) -> None:
    results = [migrate(pair, f"m-{i}") for i in range(5)]
    for result in results:
        assert result.source_psk == result.destination_psk
        assert len(result.source_psk) == 32
    assert len({r.source_psk for r in results}) == 5
    # The generation (ratchet epoch) advances per successful migration.
    assert [r.epoch for r in results] == [0, 1, 2, 3, 4]
    assert pair.source.status("host-b").fingerprint == pair.destination.status("host-a").fingerprint


@pytest.mark.parametrize(
    "failure",
    [
        {"commit_source": False, "commit_destination": False},  # failed before the commit
        {"commit_source": False, "commit_destination": True},  # running receipt lost
    ],
    ids=["nobody-committed", "only-destination-committed"],
)
def test_a_failed_migration_does_not_desynchronise_the_hosts(pair: Pair, failure: dict[str, bool]) -> None:
    first = migrate(pair, "m-1")
    failed = migrate(pair, "m-2", **failure)
    assert failed.source_psk == failed.destination_psk  # the SA could come up; the migration failed later
    after = [migrate(pair, f"m-{i}") for i in (3, 4)]
    for result in after:
        assert result.source_psk == result.destination_psk
    keys = [first.source_psk, failed.source_psk, *(r.source_psk for r in after)]
    assert len(set(keys)) == len(keys)  # never reused, not even after the failure
    assert pair.source.status("host-b").fingerprint == pair.destination.status("host-a").fingerprint


def test_the_same_migration_retried_on_a_new_connection_gets_a_new_psk(pair: Pair) -> None:
    assert (
        migrate(pair, "m-1", commit_source=False, commit_destination=False).source_psk
        != migrate(pair, "m-1").source_psk
    )


def _inputs(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "channel_secret": b"\x01" * 32,
        "ratchet_key": b"\x02" * 32,
        "epoch": 7,
        "migration_id": "m-42",
        "nonce_source": b"\x03" * 32,
        "nonce_dest": b"\x04" * 32,
    }
    base.update(changes)
    return base


def test_every_input_changes_the_psk_and_the_derivation_is_deterministic() -> None:
    reference = derive_ipsec_psk(**_inputs())  # type: ignore[arg-type]
    assert reference == derive_ipsec_psk(**_inputs())  # type: ignore[arg-type]
    variants = [
        _inputs(channel_secret=b"\x11" * 32),
        _inputs(ratchet_key=b"\x12" * 32),
        _inputs(ratchet_key=None, epoch=0),
        _inputs(epoch=8),
        _inputs(migration_id="m-43"),
        _inputs(nonce_source=b"\x13" * 32),
        _inputs(nonce_dest=b"\x14" * 32),
        # swapping the nonces is another migration, not the same one
        _inputs(nonce_source=b"\x04" * 32, nonce_dest=b"\x03" * 32),
    ]
    outputs = {derive_ipsec_psk(**v) for v in variants}  # type: ignore[arg-type]
    assert reference not in outputs and len(outputs) == len(variants)


def test_the_psk_reveals_neither_the_ratchet_key_nor_another_generation() -> None:
    """Unlike the paper's XOR construction, no public value links two generations' keys."""
    channel_secret, nonce_s, nonce_d = b"\x05" * 32, b"\x06" * 32, b"\x07" * 32
    chain = [new_psk()]
    for epoch in range(3):
        chain.append(ratchet_key(chain[-1], epoch, nonce_s, nonce_d, b"\x08" * 32))
    psks = [
        derive_ipsec_psk(
            channel_secret=channel_secret,
            ratchet_key=key,
            epoch=epoch,
            migration_id="m",
            nonce_source=nonce_s,
            nonce_dest=nonce_d,
        )
        for epoch, key in enumerate(chain)
    ]
    public = {channel_secret, nonce_s, nonce_d, b"\x08" * 32}
    for i, psk in enumerate(psks):
        assert psk not in chain  # loading it into charon exposes no ratchet key
        if i:
            difference = bytes(x ^ y for x, y in zip(psk, psks[i - 1]))
            assert difference not in public and difference not in chain


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="channel_secret"):
        derive_ipsec_psk(**_inputs(channel_secret=b"short"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ratchet_key"):
        derive_ipsec_psk(**_inputs(ratchet_key=b"short"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epoch"):
        derive_ipsec_psk(**_inputs(ratchet_key=None, epoch=3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nonce_dest"):
        derive_ipsec_psk(**_inputs(nonce_dest=b"\x00" * 31))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="migration_id"):
        derive_ipsec_psk(**_inputs(migration_id=""))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="not checked"):
        agreed_ratchet_key(SimpleNamespace(agreed_key=None))  # type: ignore[arg-type]  # a session before the proofs


def test_key_id_and_fingerprint_name_a_key_without_revealing_it() -> None:
    psk = derive_ipsec_psk(**_inputs())  # type: ignore[arg-type]
    fingerprint = ipsec_psk_fingerprint(psk)
    assert len(fingerprint) == 16 and fingerprint not in psk.hex()
    assert ipsec_key_id("m/42 x", 3) == "sealift-m_42_x-e3"


def test_both_ends_of_a_real_tls_connection_derive_the_same_psk(tmp_path: Path, pair: Pair) -> None:
    """psk_for_migration as the agents call it: the TLS exporter of their channel and the agreed ratchet key."""
    import socket
    import threading

    from sealift.ipsec.sa_key import psk_for_migration
    from sealift.security.identity import ClusterCA
    from sealift.security.tls import TlsStream, client_context, server_context

    ca = ClusterCA.init(tmp_path / "ca")
    host_a, host_b = ca.issue_host("host-a", tmp_path / "a"), ca.issue_host("host-b", tmp_path / "b")

    def connection() -> tuple[TlsStream, TlsStream]:
        listener = socket.create_server(("127.0.0.1", 0))
        accepted: list[TlsStream] = []
        thread = threading.Thread(
            target=lambda: accepted.append(TlsStream.accept(listener.accept()[0], server_context(host_b), timeout=10))
        )
        thread.start()
        client = TlsStream.connect(
            socket.create_connection(listener.getsockname(), timeout=10), client_context(host_a), "host-b", timeout=10
        )
        thread.join(20)
        listener.close()
        return client, accepted[0]

    nonce_s, nonce_d = os.urandom(32), os.urandom(32)
    results = []
    for _ in range(2):
        source_stream, destination_stream = connection()
        try:
            binding = os.urandom(32)
            source = PskSession(pair.source, "host-b", "source")
            destination = PskSession(pair.destination, "host-a", "destination")
            destination.check_peer_proof(source.make_proof(binding, nonce_s), binding, nonce_s)
            source.check_peer_proof(destination.make_proof(binding, nonce_s, nonce_d), binding, nonce_s, nonce_d)
            on_source = psk_for_migration(source_stream, "m-1", nonce_s, nonce_d, source)
            on_destination = psk_for_migration(destination_stream, "m-1", nonce_s, nonce_d, destination)
            without_ratchet = psk_for_migration(source_stream, "m-1", nonce_s, nonce_d, None)
            assert without_ratchet == psk_for_migration(destination_stream, "m-1", nonce_s, nonce_d, None)
            source.close()
            destination.close()
        finally:
            source_stream.close()
            destination_stream.close()
        assert on_source == on_destination and on_source[1] == 0
        assert without_ratchet[0] != on_source[0]  # the ratchet key is a real second input
        results.append(on_source[0])
    # Same migration id, same nonces, same epoch, but another TLS connection: another PSK.
    assert results[0] != results[1]
