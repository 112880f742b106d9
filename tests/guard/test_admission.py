"""Admission under a flood from many addresses (issue 23): reserved places, eviction, expected peers (sans-IO)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealift.agent.expected import ExpectedPeers, resolve_peer_keys
from sealift.agent.guard import (
    BLOCKED,
    CLOSED,
    ESTABLISHED,
    EVICTED,
    PEER_LIMIT,
    PENDING,
    RATE_LIMITED,
    TABLE_FULL,
    PeerGuard,
    Slot,
    peer_key,
)
from sealift.host.config import ConfigError, config_from_dict

PEER = "192.0.2.1"  # in [peers]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_guard(clock: FakeClock, *, total: int = 8, reserved: int = 2, **overrides: object) -> PeerGuard:
    limits: dict[str, object] = dict(
        per_peer_rate=100.0,
        per_peer_burst=100,
        max_concurrent_per_peer=4,
        max_concurrent_total=total,
        max_incoming_migrations_per_peer=2,
        clock=clock,
        expected=ExpectedPeers([PEER], remember_s=60, max_remembered=4),
        reserved_for_expected=reserved,
        min_tenure_s=0.5,
    )
    limits.update(overrides)
    return PeerGuard(**limits)  # type: ignore[arg-type]


def attacker(n: int) -> str:
    return f"198.51.100.{n}"


def fill_with_attackers(guard: PeerGuard, clock: FakeClock, count: int) -> list[Slot]:
    slots = []
    for n in range(count):
        clock.now += 0.01
        admission = guard.open_slot(attacker(n))
        assert admission.allowed and admission.slot is not None and admission.evicted == ()
        slots.append(admission.slot)
    return slots


def test_unexpected_addresses_cannot_take_the_reserved_places() -> None:
    clock = FakeClock()
    guard = make_guard(clock)
    fill_with_attackers(guard, clock, 6)  # 8 - 2 reserved
    refused = guard.open_slot(attacker(99))  # every pending one is younger than min_tenure_s
    assert not refused.allowed and refused.code == TABLE_FULL and "unexpected" in refused.reason
    for _ in range(2):  # the reserved places are there for the expected peer, without evicting anyone
        admission = guard.open_slot(PEER)
        assert admission.allowed and admission.evicted == () and admission.slot is not None
        assert admission.slot.expected
    stats = guard.stats()
    assert stats.open_connections == 8 and stats.pending_unexpected == 6 and stats.unexpected_limit == 6


def test_an_expected_peer_evicts_the_oldest_unauthenticated_connection_when_the_port_is_full() -> None:
    clock = FakeClock()
    guard = make_guard(clock, reserved=0)
    slots = fill_with_attackers(guard, clock, 8)
    admission = guard.open_slot(PEER)  # at once: an expected peer does not wait for min_tenure_s
    assert admission.allowed and admission.evicted == (slots[0],)
    assert slots[0].state == EVICTED and slots[0].evicted
    assert guard.stats().open_connections == 8 and guard.stats().evicted_connections == 1
    assert guard.release_slot(slots[0]) is False, "the guard freed it when it evicted it"
    assert guard.stats().open_connections == 8


def test_an_unexpected_newcomer_evicts_only_a_connection_that_had_its_tenure() -> None:
    clock = FakeClock()
    guard = make_guard(clock)
    slots = fill_with_attackers(guard, clock, 6)
    assert not guard.open_slot(attacker(50)).allowed
    clock.now = slots[0].opened + 0.5
    admission = guard.open_slot(attacker(50))
    assert admission.allowed and admission.evicted == (slots[0],)
    assert not guard.open_slot(attacker(51)).allowed  # the next oldest is 10 ms younger
    clock.now += 0.01
    assert guard.open_slot(attacker(51)).evicted == (slots[1],)


def test_authenticated_and_expected_connections_are_never_evicted() -> None:
    clock = FakeClock()
    guard = make_guard(clock, total=4, reserved=0)
    host = guard.open_slot("203.0.113.7").slot  # a cluster host not in [peers]
    assert host is not None and not host.expected
    assert guard.mark_established(host, authenticated=True) and host.state == ESTABLISHED
    peer = guard.open_slot(PEER).slot
    assert peer is not None
    fill_with_attackers(guard, clock, 2)
    clock.now += 10
    # Full: two attackers pending, the host and the peer not evictable. The peer takes both their places.
    assert len(guard.open_slot(PEER).evicted) == 1
    assert len(guard.open_slot(PEER).evicted) == 1
    full = [guard.open_slot(PEER), guard.open_slot(attacker(61))]
    assert [a.allowed for a in full] == [False, False] and all(a.code == TABLE_FULL for a in full)
    assert "expected or authenticated" in full[0].reason
    assert host.state == ESTABLISHED and peer.state == PENDING


def test_an_address_that_authenticated_is_expected_for_a_while() -> None:
    clock = FakeClock()
    guard = make_guard(clock)
    slot = guard.open_slot("203.0.113.7").slot
    assert slot is not None and not guard.is_expected("203.0.113.7")
    guard.mark_established(slot, authenticated=True)
    assert guard.is_expected("203.0.113.7")
    later = guard.open_slot("203.0.113.7").slot
    assert later is not None and later.expected
    clock.now += 61  # remember_s = 60
    assert not guard.is_expected("203.0.113.7")


def test_a_data_stream_is_established_but_does_not_make_its_address_expected() -> None:
    clock = FakeClock()
    guard = make_guard(clock)
    slot = guard.open_slot("203.0.113.8").slot
    assert slot is not None and guard.mark_established(slot, authenticated=False)
    assert not guard.is_expected("203.0.113.8") and guard.stats().pending_unexpected == 0


def test_every_slot_is_freed_exactly_once() -> None:
    clock = FakeClock()
    guard = make_guard(clock, reserved=0)
    slots = fill_with_attackers(guard, clock, 8)
    evictor = guard.open_slot(PEER)
    assert evictor.slot is not None
    victim = evictor.evicted[0]
    # The victim's thread notices late: marking it established fails, releasing it is a no-op.
    assert guard.mark_established(victim, authenticated=True) is False
    assert guard.release_slot(victim) is False
    for slot in slots[1:] + [evictor.slot]:
        assert guard.release_slot(slot) is True
        assert guard.release_slot(slot) is False
        assert slot.state == CLOSED
    stats = guard.stats()
    assert stats.open_connections == 0 and stats.pending_unexpected == 0
    assert not guard.is_expected(attacker(0)), "an evicted connection never authenticated"


def test_the_per_peer_cap_rate_and_blocks_still_hold_for_slots() -> None:
    clock = FakeClock()
    guard = make_guard(clock, total=64, reserved=16, per_peer_rate=1.0, per_peer_burst=2)
    assert [guard.open_slot(attacker(1)).allowed for _ in range(3)] == [True, True, False]
    assert guard.open_slot(attacker(1)).code == RATE_LIMITED
    capped = make_guard(clock, total=64, reserved=16)
    codes = [capped.open_slot(PEER).code for _ in range(5)]
    assert codes == ["admitted"] * 4 + [PEER_LIMIT], "an expected peer keeps its per-peer cap"
    guard.block(PEER, 30, "misbehaved")
    assert guard.open_slot(PEER).code == BLOCKED, "an expected peer the port watch blocked stays blocked"


def test_the_reservation_is_checked() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError, match="reserved_for_expected"):
        make_guard(clock, total=8, reserved=8)
    with pytest.raises(ValueError, match="min_tenure_s"):
        make_guard(clock, min_tenure_s=-1)
    base = {"name": "h", "listen": "127.0.0.1:1", "control_socket": "c", "state_dir": "s", "identity_dir": "i"}
    with pytest.raises(ConfigError, match="reserved_connections"):
        config_from_dict({**base, "guard": {"max_connections": 8, "reserved_connections": 8}})
    with pytest.raises(ConfigError, match="hello_timeout_s"):
        config_from_dict({**base, "hello_timeout_s": 0})
    config = config_from_dict(base)
    assert config.guard.reserved_connections == 16 and config.hello_timeout_s == 2.0


def test_expected_peers_stay_bounded_and_expire() -> None:
    peers = ExpectedPeers(["10.0.0.1"], remember_s=10, max_remembered=3)
    for n in range(10):
        peers.remember(f"10.0.1.{n}", now=float(n))
    assert peers.remembered(now=9.0) == 3  # the three most recent
    assert peers.is_expected("10.0.1.9", 9.0) and not peers.is_expected("10.0.1.0", 9.0)
    assert peers.is_expected("10.0.0.1", 1e9), "[peers] never expire"
    assert not peers.is_expected("10.0.1.9", 19.0)
    assert peers.remembered(now=19.0) == 0


def test_peer_addresses_are_resolved_to_guard_keys() -> None:
    names = {"host-b": ["2001:db8:1:2::5"], "host-c": ["192.0.2.9"]}

    def resolve(host: str) -> list[str]:
        if host not in names:
            raise OSError("no such host")
        return names[host]

    keys = resolve_peer_keys([("host-b", 1), ("host-c", 2), ("gone", 3)], peer_key, resolve)
    assert keys == {"2001:db8:1:2::/64", "192.0.2.9"}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["open", "establish", "release"]), st.integers(0, 40), st.floats(0, 0.3)),
        max_size=300,
    )
)
def test_the_counts_always_match_the_slots(steps: list[tuple[str, int, float]]) -> None:
    """Whatever the order of opens, evictions, establishments and releases: counts equal live slots."""
    clock = FakeClock()
    guard = make_guard(clock, total=8, reserved=3, max_tracked_peers=64)
    live: list[Slot] = []
    for action, n, dt in steps:
        clock.now += dt
        address = PEER if n == 0 else attacker(n)
        if action == "open":
            admission = guard.open_slot(address)
            if admission.slot is not None:
                live.append(admission.slot)
        elif live:
            slot = live[n % len(live)]
            if action == "establish":
                guard.mark_established(slot, authenticated=False)
            else:
                guard.release_slot(slot)
        live = [s for s in live if s.state in (PENDING, ESTABLISHED)]
        stats = guard.stats()
        assert stats.open_connections == len(live) <= 8
        pending_unexpected = [s for s in live if s.state == PENDING and not s.expected]
        assert stats.pending_unexpected == len(pending_unexpected) <= 5
