"""The dynamic PSK: proofs, the ratchet, interrupted sessions, storage at rest."""

from __future__ import annotations

import os
import random
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from sealift.security.keys import new_nonce
from sealift.security.psk import (
    PROOF_BYTES,
    PskError,
    PskProof,
    PskSession,
    PskStore,
    new_psk,
    psk_channel_binding,
    psk_fingerprint,
    psk_from_hex,
    psk_proof,
    psk_to_hex,
    ratchet_key,
    verify_psk_proof,
    wrap_key_from_private_key,
)
from sealift.wire.messages import MAX_PSK_PROOF_HEX, Accept, Hello

from .conftest import Hosts, PskPair

NAMES = {"a": "host-a", "b": "host-b"}


@dataclass(frozen=True)
class Link:
    """The public values of one control connection: TLS exporter value and both nonces."""

    binding: bytes
    ns: bytes
    nd: bytes

    @classmethod
    def new(cls) -> Link:
        return cls(os.urandom(32), new_nonce(), new_nonce())


def stores(pair: PskPair, source: str) -> tuple[PskStore, str, PskStore, str]:
    """(source store, source name, destination store, destination name) for source 'a' or 'b'."""
    dest = "b" if source == "a" else "a"
    return getattr(pair, source), NAMES[source], getattr(pair, dest), NAMES[dest]


def session_steps(
    src: PskStore, src_name: str, dst: PskStore, dst_name: str, link: Link, source_commits_first: bool
) -> Iterator[str]:
    """One migration's PSK exchange, one yield per step, in the agent's order."""
    s = PskSession(src, dst_name, "source")
    d = PskSession(dst, src_name, "destination")
    try:
        hello = s.make_proof(link.binding, link.ns)
        yield "source proved (Hello sent)"
        d.check_peer_proof(hello, link.binding, link.ns)
        yield "destination checked Hello"
        accept = d.make_proof(link.binding, link.ns, link.nd)
        yield "destination proved (Accept sent)"
        s.check_peer_proof(accept, link.binding, link.ns, link.nd)
        yield "source checked Accept"
        first, second = (s, d) if source_commits_first else (d, s)
        first.commit()
        yield "first commit"
        second.commit()
        yield "second commit"
    finally:
        s.close()
        d.close()


FULL = 6  # steps in session_steps


def async_session_steps(
    src: PskStore,
    src_name: str,
    dst: PskStore,
    dst_name: str,
    link: Link,
    source_lives_for: int,
    dest_lives_for: int,
    source_commits_first: bool,
) -> Iterator[str]:
    """A session in which each side may die on its own after some of its own actions.

    Source actions: make_proof, check_peer_proof, send Commit, commit (4).
    Destination actions: check_peer_proof, make_proof, commit after Commit (3).
    A dead side's session is closed at once (its slot freed) while the other
    side goes on as far as the messages it received let it.
    """
    s = PskSession(src, dst_name, "source")
    d = PskSession(dst, src_name, "destination")
    done = {"s": 0, "d": 0}
    lives = {"s": source_lives_for, "d": dest_lives_for}
    sessions = {"s": s, "d": d}
    messages: dict[str, str] = {}

    def alive(side: str) -> bool:
        return done[side] < lives[side]

    def did(side: str) -> None:
        done[side] += 1
        if not alive(side):
            sessions[side].close()

    try:
        if not alive("s"):
            s.close()
        if not alive("d"):
            d.close()
        if alive("s"):
            messages["hello"] = s.make_proof(link.binding, link.ns)
            did("s")
            yield "source proved"
        if alive("d") and "hello" in messages:
            d.check_peer_proof(messages["hello"], link.binding, link.ns)
            did("d")
            yield "destination checked"
            if alive("d"):
                messages["accept"] = d.make_proof(link.binding, link.ns, link.nd)
                did("d")
                yield "destination proved"
        if alive("s") and "accept" in messages:
            s.check_peer_proof(messages["accept"], link.binding, link.ns, link.nd)
            did("s")
            yield "source checked"
            if alive("s"):
                messages["commit"] = "sent"
                did("s")
                yield "source sent Commit"
        commits = [("s", "accept"), ("d", "commit")]
        if not source_commits_first:
            commits.reverse()
        for side, needs in commits:
            if alive(side) and needs in messages and done[side] == (3 if side == "s" else 2):
                sessions[side].commit()
                did(side)
                yield f"{side} committed"
    finally:
        s.close()
        d.close()


def run_partial(
    pair: PskPair, source: str, stop_after: int, source_commits_first: bool, crash: bool, link: Link | None = None
) -> None:
    """Run a session and let it die after `stop_after` steps (by closing, or by an agent restart)."""
    steps = session_steps(*stores(pair, source), link or Link.new(), source_commits_first)
    for _ in range(stop_after):
        next(steps)
    if crash:
        pair.reopen()  # the in-memory ratchet slots die with the process
    steps.close()


def full_session(pair: PskPair, source: str, link: Link | None = None) -> tuple[bool, bool]:
    """A successful session; returns (source ratcheted, destination ratcheted)."""
    src, src_name, dst, dst_name = stores(pair, source)
    link = link or Link.new()
    with PskSession(src, dst_name, "source") as s, PskSession(dst, src_name, "destination") as d:
        hello = s.make_proof(link.binding, link.ns)
        d.check_peer_proof(hello, link.binding, link.ns)
        accept = d.make_proof(link.binding, link.ns, link.nd)
        s.check_peer_proof(accept, link.binding, link.ns, link.nd)
        return s.commit(), d.commit()


def assert_in_step(pair: PskPair) -> None:
    a, b = pair.a.status("host-b"), pair.b.status("host-a")
    assert (a.epoch, a.fingerprint) == (b.epoch, b.fingerprint)


# ---------------------------------------------------------------------------
# Proofs


def test_proof_verifies_only_with_the_same_inputs() -> None:
    key, link = new_psk(), Link.new()
    args = dict(channel_binding=link.binding, nonce_source=link.ns, nonce_dest=link.nd)
    mac = psk_proof(key, 3, "destination", **args)
    assert verify_psk_proof(mac, key, 3, "destination", **args)
    assert not verify_psk_proof(mac, new_psk(), 3, "destination", **args)  # wrong key
    assert not verify_psk_proof(mac, key, 4, "destination", **args)  # wrong epoch
    assert not verify_psk_proof(mac, key, 3, "source", **args)  # reflected into the other role
    assert not verify_psk_proof(mac, key, 3, "destination", **args, ratchet=True)  # flag altered
    assert not verify_psk_proof(mac, key, 3, "destination", **args, ticket=1)  # ticket altered
    other = Link.new()
    assert not verify_psk_proof(mac, key, 3, "destination", other.binding, link.ns, link.nd)  # other channel
    assert not verify_psk_proof(mac, key, 3, "destination", link.binding, other.ns, link.nd)
    assert not verify_psk_proof(mac, key, 3, "destination", link.binding, link.ns, None)
    assert not verify_psk_proof(mac[:-1] + bytes([mac[-1] ^ 1]), key, 3, "destination", **args)


def test_proof_wire_form_fits_hello_and_accept() -> None:
    link, key = Link.new(), new_psk()
    proof = PskProof(7, True, 3, psk_proof(key, 7, "source", link.binding, link.ns, ratchet=True, ticket=3))
    text = proof.to_hex()
    assert len(text) == 2 * PROOF_BYTES <= MAX_PSK_PROOF_HEX
    assert PskProof.from_hex(text) == proof
    mid = "0123456789abcdef" * 2
    hello = Hello(mid, "web1", "host-a", "host-b", link.ns, 4096, 4096, True, None, 1, "builtin", None, text)
    assert Hello.from_json(hello.to_json()).psk_proof == text
    accept = Accept(mid, link.nd, os.urandom(16), text)
    assert Accept.from_json(accept.to_json()).psk_proof == text


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "no PSK proof"),
        ("ab" * 10, "expected 100 hex digits"),
        ("zz" * PROOF_BYTES, "not hex"),
        ("02" + "00" * (PROOF_BYTES - 1), "version 2"),
        ("0180" + "00" * (PROOF_BYTES - 2), "unknown flags"),
        ("0101" + "00" * (PROOF_BYTES - 2), "a ratchet flag goes with a ticket"),
    ],
)
def test_malformed_proofs_are_refused(text: str | None, message: str) -> None:
    with pytest.raises(PskError, match=message):
        PskProof.from_hex(text)


def test_channel_binding_is_shared_by_one_tls_connection_only(tls_pair, hosts: Hosts) -> None:
    client, server = tls_pair
    assert psk_channel_binding(client) == psk_channel_binding(server)
    assert len(psk_channel_binding(client)) == 32
    # The PSK binding is not the data-key secret (different exporter label).
    assert psk_channel_binding(client) != client.export_keying_material(b"EXPORTER-sealift-migration-v1", 32, b"")


def test_session_over_real_tls_ratchets_to_equal_keys(tls_pair, psk_pair: PskPair) -> None:
    client, server = tls_pair  # client = host-a = source, server = host-b = destination
    ns, nd = new_nonce(), new_nonce()
    with PskSession(psk_pair.a, "host-b", "source") as s, PskSession(psk_pair.b, "host-a", "destination") as d:
        hello = s.make_proof(psk_channel_binding(client), ns)
        d.check_peer_proof(hello, psk_channel_binding(server), ns)
        accept = d.make_proof(psk_channel_binding(server), ns, nd)
        s.check_peer_proof(accept, psk_channel_binding(client), ns, nd)
        assert s.ratcheting and d.ratcheting and s.epoch == d.epoch == 0
        assert s.commit() and d.commit()
    assert_in_step(psk_pair)
    status = psk_pair.a.status("host-b")
    expected = ratchet_key(psk_pair.initial_key, 0, ns, nd, psk_channel_binding(client))
    assert status.epoch == 1 and status.fingerprint == psk_fingerprint(expected)
    assert status.fingerprint != psk_fingerprint(psk_pair.initial_key)


# ---------------------------------------------------------------------------
# Sessions: refusals


def test_wrong_key_is_refused(psk_pair: PskPair) -> None:
    psk_pair.b.provision("host-a", new_psk(), replace=True)
    link = Link.new()
    s = PskSession(psk_pair.a, "host-b", "source")
    d = PskSession(psk_pair.b, "host-a", "destination")
    hello = s.make_proof(link.binding, link.ns)
    with pytest.raises(PskError, match="does not verify"):
        d.check_peer_proof(hello, link.binding, link.ns)
    s.close()
    d.close()


def test_reflected_proof_is_refused(psk_pair: PskPair) -> None:
    # Someone answers host-a's Hello with host-a's own proof.
    link = Link.new()
    with PskSession(psk_pair.a, "host-b", "source") as s:
        hello = s.make_proof(link.binding, link.ns)
        with pytest.raises(PskError, match="does not verify"):
            s.check_peer_proof(hello, link.binding, link.ns, link.nd)


def test_proof_relayed_into_another_tls_connection_is_refused(psk_pair: PskPair) -> None:
    recorded, replayed = Link.new(), Link.new()
    with PskSession(psk_pair.a, "host-b", "source") as s:
        hello = s.make_proof(recorded.binding, recorded.ns)
    with PskSession(psk_pair.b, "host-a", "destination") as d:
        with pytest.raises(PskError, match="does not verify"):
            d.check_peer_proof(hello, replayed.binding, recorded.ns)


def test_missing_proof_is_refused_when_a_psk_is_provisioned(psk_pair: PskPair) -> None:
    assert psk_pair.b.has_peer("host-a")
    with PskSession(psk_pair.b, "host-a", "destination") as d:
        with pytest.raises(PskError, match="no PSK proof"):
            d.check_peer_proof(None, os.urandom(32), new_nonce())


def test_ratchet_the_source_did_not_offer_is_refused(psk_pair: PskPair) -> None:
    link = Link.new()
    busy = PskSession(psk_pair.a, "host-b", "source")
    busy.make_proof(Link.new().binding, new_nonce())  # holds host-a's ratchet slot for host-b
    with PskSession(psk_pair.a, "host-b", "source") as s:
        hello = s.make_proof(link.binding, link.ns)
        assert not PskProof.from_hex(hello).ratchet
        forged = psk_proof(
            psk_pair.initial_key, 0, "destination", link.binding, link.ns, link.nd, ratchet=True, ticket=5
        )
        with pytest.raises(PskError, match="did not offer"):
            s.check_peer_proof(PskProof(0, True, 5, forged).to_hex(), link.binding, link.ns, link.nd)
    busy.close()


def test_unprovisioned_peer_is_an_explicit_error(psk_pair: PskPair) -> None:
    with PskSession(psk_pair.a, "host-c", "source") as s:
        with pytest.raises(PskError, match="no PSK is provisioned for host-c"):
            s.make_proof(os.urandom(32), new_nonce())


def test_provision_does_not_overwrite_without_replace(psk_pair: PskPair) -> None:
    with pytest.raises(PskError, match="already provisioned"):
        psk_pair.a.provision("host-b", new_psk())
    psk_pair.a.provision("host-b", new_psk(), replace=True)
    assert psk_pair.a.status("host-b").epoch == 0


def test_calls_out_of_order_are_programming_errors(psk_pair: PskPair) -> None:
    with PskSession(psk_pair.a, "host-b", "source") as s:
        with pytest.raises(RuntimeError, match="called in step"):
            s.commit()


# ---------------------------------------------------------------------------
# The ratchet and old keys


def test_old_key_is_refused_after_two_successful_sessions(psk_pair: PskPair) -> None:
    assert full_session(psk_pair, "a") == (True, True)
    # After one session the old key is still accepted: the peer may not have committed.
    assert psk_pair.b.status("host-a").has_previous
    assert full_session(psk_pair, "b") == (True, True)
    assert_in_step(psk_pair)
    assert psk_pair.a.status("host-b").epoch == 2
    # Someone who cracked the first key (epoch 0) proves it on a fresh connection.
    for store, peer in ((psk_pair.b, "host-a"), (psk_pair.a, "host-b")):
        link = Link.new()
        stale = PskProof(0, False, 0, psk_proof(psk_pair.initial_key, 0, "source", link.binding, link.ns)).to_hex()
        with PskSession(store, peer, "destination") as d:
            with pytest.raises(PskError, match="accepts only"):
                d.check_peer_proof(stale, link.binding, link.ns)


def test_superseded_key_is_forgotten_once_the_peer_proves_the_new_one(psk_pair: PskPair) -> None:
    full_session(psk_pair, "a")
    assert psk_pair.a.status("host-b").has_previous and psk_pair.b.status("host-a").has_previous
    # A session that does not ratchet (another one holds the slot) still proves the new key.
    busy = PskSession(psk_pair.a, "host-b", "source")
    busy.make_proof(os.urandom(32), new_nonce())
    assert full_session(psk_pair, "a") == (False, False)
    busy.close()
    assert not psk_pair.a.status("host-b").has_previous
    assert not psk_pair.b.status("host-a").has_previous
    assert psk_pair.a.status("host-b").epoch == 1


# ---------------------------------------------------------------------------
# Interrupted sessions


def test_a_session_interrupted_at_any_step_never_locks_the_pair_out(psk_pair: PskPair) -> None:
    cases = 0
    for source in ("a", "b"):
        for source_commits_first in (True, False):
            for stop_after in range(FULL):
                for crash in (False, True):
                    for next_source in ("a", "b"):
                        key = new_psk()
                        psk_pair.a.provision("host-b", key, replace=True)
                        psk_pair.b.provision("host-a", key, replace=True)
                        run_partial(psk_pair, source, stop_after, source_commits_first, crash)
                        where = f"{source}->, stopped after {stop_after}, crash={crash}"
                        assert full_session(psk_pair, next_source) == (True, True), where
                        assert_in_step(psk_pair)
                        assert full_session(psk_pair, "b" if next_source == "a" else "a") == (True, True), where
                        assert_in_step(psk_pair)
                        cases += 1
    assert cases == 96


def test_sides_dying_separately_at_any_point_never_lock_the_pair_out(psk_pair: PskPair) -> None:
    cases = 0
    for source in ("a", "b"):
        for source_lives_for in range(5):
            for dest_lives_for in range(4):
                for source_commits_first in (True, False):
                    key = new_psk()
                    psk_pair.a.provision("host-b", key, replace=True)
                    psk_pair.b.provision("host-a", key, replace=True)
                    steps = async_session_steps(
                        *stores(psk_pair, source), Link.new(), source_lives_for, dest_lives_for, source_commits_first
                    )
                    for _ in steps:
                        pass
                    where = f"{source}->, source lives {source_lives_for}, destination lives {dest_lives_for}"
                    assert full_session(psk_pair, "b" if source == "a" else "a") == (True, True), where
                    assert_in_step(psk_pair)
                    cases += 1
    assert cases == 80


def test_random_walk_of_failures_and_concurrent_sessions(psk_pair: PskPair) -> None:
    """Seeded random mix of complete, interrupted, crashed and interleaved sessions."""
    rng = random.Random(int(os.environ.get("SEALIFT_PSK_WALK_SEED", "20240603")))
    full_runs = refused = 0
    for _ in range(400):
        plan = rng.random()
        if plan < 0.35:
            source = rng.choice("ab")
            assert full_session(psk_pair, source) == (True, True)
            assert_in_step(psk_pair)
            full_runs += 1
        elif plan < 0.7:
            run_partial(psk_pair, rng.choice("ab"), rng.randrange(FULL), rng.random() < 0.5, rng.random() < 0.2)
        else:
            # Two sessions between the same pair at once, steps interleaved at
            # random, each stopping at a random step (or completing). A Hello
            # overtaken by a whole newer session may be refused (retry); what
            # must never happen is a pair that cannot authenticate afterwards.
            runs = []
            for _ in range(2):
                pair_stores = stores(psk_pair, rng.choice("ab"))
                if rng.random() < 0.5:
                    steps = session_steps(*pair_stores, Link.new(), rng.random() < 0.5)
                else:  # each side dies on its own, or not at all
                    lives = rng.choice([4, 4, rng.randrange(5)]), rng.choice([3, 3, rng.randrange(4)])
                    steps = async_session_steps(*pair_stores, Link.new(), *lives, rng.random() < 0.5)
                runs.append([steps, rng.choice([FULL, FULL, rng.randrange(FULL)])])
            while any(left for _, left in runs):
                run = rng.choice([r for r in runs if r[1]])
                try:
                    more = next(run[0], None) is not None
                except PskError as exc:
                    assert "accepts only" in str(exc) or "changed during this session" in str(exc), exc
                    refused += 1
                    more = False
                run[1] = run[1] - 1 if more else 0
            for steps, _ in runs:
                steps.close()
    assert full_runs > 50
    assert refused < 20  # overtaken Hellos only: rare even with adversarial interleavings
    assert full_session(psk_pair, "a") == (True, True)
    assert_in_step(psk_pair)


# ---------------------------------------------------------------------------
# At rest


def test_keys_are_not_stored_in_clear(psk_pair: PskPair) -> None:
    key0 = psk_pair.initial_key
    first, second = Link.new(), Link.new()
    full_session(psk_pair, "a", first)
    full_session(psk_pair, "b", second)
    key1 = ratchet_key(key0, 0, first.ns, first.nd, first.binding)
    key2 = ratchet_key(key1, 1, second.ns, second.nd, second.binding)
    assert psk_pair.a.status("host-b").fingerprint == psk_fingerprint(key2)  # the keys the stores hold
    # A third session, interrupted after both proofs, leaves a pending key on both hosts.
    third = Link.new()
    run_partial(psk_pair, "b", 4, True, crash=False, link=third)
    assert psk_pair.b.status("host-a").has_pending and psk_pair.a.status("host-b").has_pending
    key3 = ratchet_key(key2, 2, third.ns, third.nd, third.binding)
    files = [p for p in psk_pair.dir.iterdir() if p.name.startswith(("a.db", "b.db"))]
    assert any(p.name.endswith("-wal") for p in files)  # recent writes live in the WAL: scan it too
    content = b"".join(p.read_bytes() for p in files)
    assert len(content) > 1000
    for key in (key0, key1, key2, key3):
        assert key not in content
        assert key.hex().encode() not in content


def test_stored_keys_need_the_host_key_and_their_own_slot(psk_pair: PskPair, hosts: Hosts) -> None:
    full_session(psk_pair, "a")
    path = psk_pair.dir / "a.db"
    wrong = PskStore(path, wrap_key_from_private_key(hosts.c.private_key()))
    with pytest.raises(PskError, match="cannot be decrypted"):
        wrong.status("host-b")
    wrong.close()
    # Putting the previous key's ciphertext back as the current one is detected.
    db = sqlite3.connect(str(path))
    db.execute("UPDATE psk_peers SET current_key = previous_key WHERE peer='host-b'")
    db.commit()
    db.close()
    with pytest.raises(PskError, match="current PSK for host-b cannot be decrypted"):
        psk_pair.a.status("host-b")


def test_key_helpers(hosts: Hosts) -> None:
    key = new_psk()
    assert len(key) == 32 and key != new_psk()
    assert psk_from_hex(" " + psk_to_hex(key).upper() + "\n") == key
    with pytest.raises(ValueError, match="64 hex digits"):
        psk_from_hex("abcd")
    wrap = wrap_key_from_private_key(hosts.a.private_key())
    assert wrap == wrap_key_from_private_key(hosts.a.private_key())
    assert wrap != wrap_key_from_private_key(hosts.b.private_key()) and len(wrap) == 32
    assert psk_to_hex(key) not in repr(PskProof(1, False, 0, b"\0" * 32))


def test_destination_whose_key_moves_during_the_session_answers_without_ratchet(psk_pair: PskPair) -> None:
    # R: host-a -> host-b. host-a sends Commit, host-b starts the guest and
    # commits the PSK, but host-a never hears back (no PSK commit) and ends R.
    r = Link.new()
    rs, rd = PskSession(psk_pair.a, "host-b", "source"), PskSession(psk_pair.b, "host-a", "destination")
    rd.check_peer_proof(rs.make_proof(r.binding, r.ns), r.binding, r.ns)
    rs.check_peer_proof(rd.make_proof(r.binding, r.ns, r.nd), r.binding, r.ns, r.nd)
    rs.close()
    # Q: host-a -> host-b starts while host-b is still finishing R.
    q = Link.new()
    qs, qd = PskSession(psk_pair.a, "host-b", "source"), PskSession(psk_pair.b, "host-a", "destination")
    qd.check_peer_proof(qs.make_proof(q.binding, q.ns), q.binding, q.ns)  # at epoch 0
    assert rd.commit()  # host-b moves to epoch 1 in between
    rd.close()
    accept = qd.make_proof(q.binding, q.ns, q.nd)
    assert not PskProof.from_hex(accept).ratchet and not qd.ratcheting
    qs.check_peer_proof(accept, q.binding, q.ns, q.nd)
    assert qs.commit() is False and qd.commit() is False
    qs.close()
    qd.close()
    # host-a holds epoch 1 as pending from R; the next session brings the pair in step.
    assert full_session(psk_pair, "a") == (True, True)
    assert_in_step(psk_pair)
    assert psk_pair.a.status("host-b").epoch == 2


def test_a_stale_ratchet_offer_cannot_replace_a_pending_key_that_may_still_be_committed(psk_pair: PskPair) -> None:
    # host-a sends Hello X (ticket 1, holding its ratchet slot), then its
    # session X dies; it sends Hello Y (ticket 2, slot taken again).
    x, y = Link.new(), Link.new()
    xs = PskSession(psk_pair.a, "host-b", "source")
    hello_x = xs.make_proof(x.binding, x.ns)
    xs.close()
    ys = PskSession(psk_pair.a, "host-b", "source")
    hello_y = ys.make_proof(y.binding, y.ns)
    assert (PskProof.from_hex(hello_x).ticket, PskProof.from_hex(hello_y).ticket) == (1, 2)
    # host-b handles Y first and agrees, then its side of Y dies.
    yd = PskSession(psk_pair.b, "host-a", "destination")
    yd.check_peer_proof(hello_y, y.binding, y.ns)
    accept_y = yd.make_proof(y.binding, y.ns, y.nd)
    yd.close()
    # The delayed Hello X arrives: host-b must not trade Y's pending key for X's.
    xd = PskSession(psk_pair.b, "host-a", "destination")
    xd.check_peer_proof(hello_x, x.binding, x.ns)
    assert not PskProof.from_hex(xd.make_proof(x.binding, x.ns, x.nd)).ratchet
    xd.close()
    # host-a's side of Y goes on and commits Y; the pair is still in step.
    ys.check_peer_proof(accept_y, y.binding, y.ns, y.nd)
    assert ys.commit()
    ys.close()
    assert full_session(psk_pair, "b") == (True, True)
    assert_in_step(psk_pair)
    assert psk_pair.a.status("host-b").epoch == 2


def test_tickets_only_grow_across_restarts_and_reprovisioning(psk_pair: PskPair) -> None:
    link = Link.new()
    for expected in (1, 2):
        with PskSession(psk_pair.a, "host-b", "source") as s:
            assert PskProof.from_hex(s.make_proof(link.binding, link.ns)).ticket == expected
        psk_pair.reopen()
    with PskSession(psk_pair.a, "host-b", "source") as s:
        assert PskProof.from_hex(s.make_proof(link.binding, link.ns)).ticket == 3
    psk_pair.a.provision("host-b", new_psk(), replace=True)  # and across re-provisioning
    with PskSession(psk_pair.a, "host-b", "source") as s:
        assert PskProof.from_hex(s.make_proof(link.binding, link.ns)).ticket == 4
