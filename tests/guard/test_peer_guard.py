"""The migration port guard: rate limits, concurrency caps, bounded memory (fake clock)."""

from __future__ import annotations

import socket

import pytest

from sealift.agent.guard import PeerGuard, TokenBucket, accept_admitted, peer_key


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_guard(clock: FakeClock, **overrides: object) -> PeerGuard:
    limits: dict[str, object] = dict(
        per_peer_rate=2.0,
        per_peer_burst=4,
        max_concurrent_per_peer=100,
        max_concurrent_total=1000,
        max_incoming_migrations_per_peer=2,
        clock=clock,
        max_tracked_peers=5000,
    )
    limits.update(overrides)
    return PeerGuard(**limits)  # type: ignore[arg-type]


def test_token_bucket_refuses_beyond_the_burst_then_refills() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.try_take() for _ in range(4)] == [True, True, True, False]
    assert bucket.seconds_until() == pytest.approx(0.5)
    clock.advance(0.5)
    assert bucket.try_take() and not bucket.try_take()
    clock.advance(3600)  # a long idle period refills to the burst, not beyond
    assert bucket.tokens == 3 and bucket.is_full()
    clock.advance(-10)  # a clock going backwards must not drain or overfill
    assert bucket.tokens == 3


def test_connection_burst_beyond_the_rate_is_refused_then_allowed_after_refill() -> None:
    clock = FakeClock()
    guard = make_guard(clock)
    results = [guard.admit_connection("10.0.0.9") for _ in range(6)]
    assert [r.allowed for r in results] == [True] * 4 + [False] * 2
    assert "faster than 2/s" in results[-1].reason and "retry in 0.5 s" in results[-1].reason
    # Another peer is not affected by this one's flood.
    assert guard.admit_connection("10.0.0.10").allowed
    clock.advance(0.5)
    assert guard.admit_connection("10.0.0.9").allowed
    assert not guard.admit_connection("10.0.0.9").allowed
    assert guard.stats().refused_connections == 3


def test_handshakes_have_their_own_smaller_budget() -> None:
    clock = FakeClock()
    guard = make_guard(clock, handshake_rate=1.0, handshake_burst=1)
    for _ in range(2):
        assert guard.admit_connection("10.0.0.9").allowed
    assert guard.admit_handshake("10.0.0.9").allowed
    refused = guard.admit_handshake("10.0.0.9")
    assert not refused.allowed and "TLS handshakes faster than 1/s" in refused.reason
    clock.advance(1.0)
    assert guard.admit_handshake("10.0.0.9").allowed
    with pytest.raises(RuntimeError, match="without an admitted connection"):
        guard.admit_handshake("10.0.0.77")


def test_per_peer_and_total_concurrency_caps() -> None:
    clock = FakeClock()
    guard = make_guard(
        clock, per_peer_rate=100.0, per_peer_burst=100, max_concurrent_per_peer=2, max_concurrent_total=3
    )
    assert guard.admit_connection("10.0.0.1").allowed
    assert guard.admit_connection("10.0.0.1").allowed
    refused = guard.admit_connection("10.0.0.1")
    assert not refused.allowed and "2 connections open (limit 2 per peer)" in refused.reason
    assert guard.admit_connection("10.0.0.2").allowed
    refused = guard.admit_connection("10.0.0.3")
    assert not refused.allowed and "3 connections already open" in refused.reason
    guard.release("10.0.0.1")
    assert guard.admit_connection("10.0.0.3").allowed
    assert guard.stats().open_connections == 3
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        guard.release(ip)
    with pytest.raises(RuntimeError, match="without an admitted connection"):
        guard.release("10.0.0.2")


def test_per_peer_and_total_migration_caps() -> None:
    guard = make_guard(FakeClock(), max_incoming_migrations_total=3)
    assert guard.admit_migration("host-a").allowed
    assert guard.admit_migration("host-a").allowed
    refused = guard.admit_migration("host-a")
    assert not refused.allowed and "host-a already has 2 migrations" in refused.reason
    assert guard.admit_migration("host-b").allowed
    refused = guard.admit_migration("host-c")
    assert not refused.allowed and "already receives 3 migrations (limit 3)" in refused.reason
    guard.release_migration("host-a")
    assert guard.admit_migration("host-c").allowed
    assert guard.stats().incoming_migrations == 3 and guard.stats().refused_migrations == 2
    with pytest.raises(RuntimeError):
        guard.release_migration("host-d")


def test_ipv6_peers_count_by_prefix_and_mapped_ipv4_as_ipv4() -> None:
    assert peer_key("2001:db8::1") == peer_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert peer_key("2001:db8:0:1::1") != peer_key("2001:db8::1")
    assert peer_key("::ffff:10.0.0.1") == peer_key("10.0.0.1") == "10.0.0.1"
    with pytest.raises(ValueError, match="not an IP address"):
        peer_key("host-a")
    clock = FakeClock()
    guard = make_guard(clock, per_peer_burst=2)
    assert guard.admit_connection("2001:db8::1").allowed
    assert guard.admit_connection("2001:db8::2").allowed
    assert not guard.admit_connection("2001:db8::3").allowed  # same /64, same budget


def test_memory_stays_bounded_under_100k_distinct_peers() -> None:
    clock = FakeClock()
    guard = make_guard(clock, max_concurrent_total=64, max_concurrent_per_peer=4, max_tracked_peers=1024)
    # A legitimate peer holds connections open throughout the scan.
    for _ in range(2):
        assert guard.admit_connection("192.168.1.1").allowed
    for i in range(100_000):
        ip = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        if guard.admit_connection(ip).allowed:
            guard.release(ip)  # scanners connect and go
        clock.advance(0.0001)
    assert guard.tracked_peers <= 1024
    # The legitimate peer's open connections were never forgotten.
    guard.release("192.168.1.1")
    guard.release("192.168.1.1")
    assert guard.stats().open_connections == 0


def test_a_flooding_peer_stays_tracked_and_limited_while_others_are_evicted() -> None:
    clock = FakeClock()
    guard = make_guard(clock, max_concurrent_total=8, max_tracked_peers=16)
    for _ in range(4):
        assert guard.admit_connection("10.9.9.9").allowed
        guard.release("10.9.9.9")
    for i in range(100):
        assert not guard.admit_connection("10.9.9.9").allowed  # keeps hammering: most recently seen
        ip = f"10.0.0.{i}"
        assert guard.admit_connection(ip).allowed
        guard.release(ip)
    assert guard.tracked_peers == 16


def test_guard_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="max_tracked_peers"):
        make_guard(FakeClock(), max_concurrent_total=10, max_tracked_peers=10)
    with pytest.raises(ValueError, match="rate"):
        make_guard(FakeClock(), per_peer_rate=0.0)
    with pytest.raises(ValueError, match="max_concurrent_per_peer"):
        make_guard(FakeClock(), max_concurrent_per_peer=0)


def test_accept_admitted_closes_refused_connections_on_a_real_socket() -> None:
    guard = make_guard(FakeClock(), max_concurrent_per_peer=1)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        address = listener.getsockname()
        first = socket.create_connection(address, timeout=10)
        second = socket.create_connection(address, timeout=10)
        admitted = accept_admitted(listener, guard)
        assert admitted is not None and admitted.peer_ip == "127.0.0.1"
        assert accept_admitted(listener, guard) is None  # 127.0.0.1 already holds its one slot
        try:
            assert second.recv(1) == b""  # closed by the guard without a byte read or sent
        except ConnectionResetError:
            pass
        admitted.sock.sendall(b"ok")
        assert first.recv(2) == b"ok"
        admitted.close()
        admitted.release()  # idempotent
        third = socket.create_connection(address, timeout=10)
        again = accept_admitted(listener, guard)
        assert again is not None
        again.close()
        for sock in (first, second, third):
            sock.close()
    assert guard.stats().open_connections == 0
