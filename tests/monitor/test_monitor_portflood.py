"""A flood on the migration port from many addresses (issue 23): noticed once per episode, audited, exported."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from sealift.monitor.portwatch import EVENT_WEIGHTS, FloodConfig, FloodWatch, PortWatch, PortWatchConfig
from sealift.monitor.service import MonitorConfig, MonitorService, _Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def slow_clients(watch: FloodWatch, clock: Clock, addresses: int, seconds: float, kind: str = "slow_handshake") -> list:
    """Each address: one connection per 2 s that ends unfinished (the hello deadline), as in issue 23."""
    reports = []
    for _ in range(int(seconds / 2)):
        for n in range(addresses):
            clock.now += 2 / addresses
            reports.append(watch.record(f"198.51.100.{n}", kind))
    return [r for r in reports if r is not None]


def test_a_flood_from_many_addresses_is_reported_once_and_its_end_too() -> None:
    clock = Clock()
    watch = FloodWatch(FloodConfig(window_s=10, min_unfinished=32, min_addresses=16, min_share=0.5), clock)
    for _ in range(5):  # an honest migration now and then
        watch.record("192.0.2.1", "established")
    reports = slow_clients(watch, clock, addresses=128, seconds=30)
    assert len(reports) == 1 and reports[0].started
    start = reports[0]
    assert start.addresses >= 16 and start.unfinished >= 32 and start.share >= 0.5
    assert "addresses ended without finishing a handshake" in start.reason and "slow_handshake" in start.reason
    assert watch.active and watch.episodes == 1
    clock.now += 5
    assert watch.tick() is None, "the window still holds the flood"
    clock.now += 6  # the window is empty now, but the flood was seen 6 s ago: not a whole quiet window yet
    assert watch.tick() is None
    clock.now += 4
    end = watch.tick()
    assert end is not None and not end.started and end.duration_s > 30
    assert not watch.active and watch.tick() is None


def test_one_busy_address_is_not_a_port_flood() -> None:
    """A single address is the per-address watch's business (it blocks it), not a many-address flood."""
    clock = Clock()
    watch = FloodWatch(FloodConfig(), clock)
    assert slow_clients(watch, clock, addresses=1, seconds=200, kind="silent") == []
    for _ in range(500):
        clock.now += 0.01
        assert watch.record("198.51.100.1", "refused_connection") is None


def test_many_addresses_that_mostly_finish_their_handshakes_are_not_a_flood() -> None:
    clock = Clock()
    watch = FloodWatch(FloodConfig(), clock)
    for round_ in range(40):
        for n in range(40):  # a big cluster: 40 hosts, each migrating; one in ten handshakes fails
            clock.now += 0.01
            kind = "handshake_failed" if (round_ + n) % 10 == 0 else "established"
            assert watch.record(f"10.0.{n}.1", kind) is None
    assert watch.snapshot()["share"] < 0.5


def test_the_per_address_watch_knows_the_new_events() -> None:
    watch = PortWatch(PortWatchConfig(threshold=60), Clock())
    assert all(watch.record("10.0.0.1", kind) is None for kind in ("evicted", "established") * 100)
    blocks = [watch.record("10.0.0.2", "slow_handshake") for _ in range(30)]
    assert blocks[-1] is not None and all(b is None for b in blocks[:-1])  # 30 x 2 = 60
    assert EVENT_WEIGHTS["evicted"] == 0, "being evicted is the guard's choice, not the peer's fault"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.sampled_from(sorted(EVENT_WEIGHTS)), st.floats(0, 1)), max_size=400))
def test_the_window_stays_bounded_and_consistent(events: list[tuple[int, str, float]]) -> None:
    clock = Clock()
    watch = FloodWatch(FloodConfig(window_s=3, max_events=64, min_unfinished=4, min_addresses=2), clock)
    for peer, kind, dt in events:
        clock.now += dt
        watch.record(f"10.9.{peer // 256}.{peer % 256}", kind)
        snap = watch.snapshot()
        assert int(snap["unfinished"]) + int(snap["finished"]) <= 64  # type: ignore[call-overload]
        assert 0.0 <= float(snap["share"]) <= 1.0  # type: ignore[arg-type]
        assert int(snap["addresses"]) <= int(snap["unfinished"])  # type: ignore[call-overload]


def test_the_service_audits_each_episode_once_and_exports_it() -> None:
    clock = Clock()
    audit: list[tuple[str, dict]] = []
    service = MonitorService(
        "flood-host",
        MonitorConfig(enabled=False),
        [],
        lambda kind, **fields: audit.append((kind, fields)),
        clock=clock,
    )
    metrics = _Metrics(CollectorRegistry())
    service._metrics = metrics  # what the agent's registry gives it, without a listening endpoint
    for _ in range(15):
        for n in range(128):
            clock.now += 2 / 128
            service.port_event(f"127.0.1.{n}", "connection")
            service.port_event(f"127.0.1.{n}", "slow_handshake" if n % 2 else "evicted")
    floods = [fields for kind, fields in audit if kind == "monitor.port_flood"]
    assert len(floods) == 1 and floods[0]["code"] == "port_flood" and floods[0]["addresses"] >= 16
    assert not [kind for kind, _ in audit if kind == "monitor.peer_blocked"], "each address stays under its threshold"
    service.port_tick()  # each monitor round refreshes the gauges
    registry = metrics.registry
    assert registry.get_sample_value("sealift_port_flood") == 1
    assert registry.get_sample_value("sealift_port_floods_total") == 1
    assert registry.get_sample_value("sealift_port_unfinished_share") == 1.0
    assert registry.get_sample_value("sealift_port_unfinished_addresses") == 128
    assert service.snapshot()["port_flood"]["active"] is True  # type: ignore[index]
    clock.now += 21  # a whole window without the flood after the window emptied
    service.port_tick()
    service.port_tick()
    ended = [fields for kind, fields in audit if kind == "monitor.port_flood_ended"]
    assert len(ended) == 1 and ended[0]["duration_s"] > 20
    assert registry.get_sample_value("sealift_port_flood") == 0
