"""The migration-port watch (sans-IO) and the guard's blocks it drives; the [monitor] config."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealift.agent.guard import PeerGuard
from sealift.host.config import ConfigError, config_from_dict
from sealift.monitor.portwatch import EVENT_WEIGHTS, PortWatch, PortWatchConfig


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_scan_is_blocked_and_the_block_expires() -> None:
    clock = Clock()
    watch = PortWatch(PortWatchConfig(threshold=60, window_s=10, block_s=30), clock)
    block = None
    for _ in range(50):  # connect, say nothing, close: 2 points each
        clock.now += 0.1
        watch.record("10.0.0.9", "connection")
        block = block or watch.record("10.0.0.9", "silent")
    assert block is not None and block.peer == "10.0.0.9" and block.seconds == 30
    assert block.counts["silent"] == 30 and block.counts["connection"] == 30 and "threshold 60" in block.reason
    assert block.until - 30 < clock.now, "blocked while the scan went on"
    assert 0 < watch.blocked_for("10.0.0.9") <= 30
    assert watch.blocked_for("10.0.0.1") == 0
    clock.now = block.until + 0.1
    assert watch.blocked_for("10.0.0.9") == 0


def test_an_honest_peer_migrating_often_is_never_blocked() -> None:
    clock = Clock()
    watch = PortWatch(PortWatchConfig(), clock)
    for _ in range(1000):  # a migration every 2 s: control + 4 data streams
        clock.now += 2
        for _ in range(5):
            assert watch.record("10.0.0.2", "connection") is None
    assert watch.blocks == 0


def test_failed_handshakes_weigh_more_than_connections() -> None:
    watch = PortWatch(PortWatchConfig(threshold=60), Clock())
    blocks = [watch.record("10.0.0.7", "handshake_failed") for _ in range(15)]
    assert blocks[-1] is not None and all(b is None for b in blocks[:-1])  # 15 x 4 = 60


def test_unknown_event_kinds_are_refused() -> None:
    with pytest.raises(ValueError):
        PortWatch().record("10.0.0.1", "knock-knock")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.sampled_from(sorted(EVENT_WEIGHTS)), st.floats(0, 5)), max_size=300))
def test_memory_stays_bounded(events: list[tuple[int, str, float]]) -> None:
    clock = Clock()
    watch = PortWatch(PortWatchConfig(max_peers=16, max_events=8), clock)
    for peer, kind, dt in events:
        clock.now += dt
        watch.record(f"10.1.{peer // 256}.{peer % 256}", kind)
        assert len(watch.snapshot()) <= 16


def test_guard_refuses_a_blocked_peer_before_anything_else() -> None:
    clock = Clock()
    guard = PeerGuard(20, 40, 16, 64, 2, clock)
    guard.block("192.0.2.5", 10, "scanned the port")
    refused = guard.admit_connection("192.0.2.5")
    assert not refused.allowed and "blocked" in refused.reason and "scanned the port" in refused.reason
    assert guard.admit_connection("192.0.2.6").allowed
    clock.now += 11
    assert guard.admit_connection("192.0.2.5").allowed


def test_monitor_config_is_read_and_checked(tmp_path: Path) -> None:
    base = {"name": "h", "listen": "127.0.0.1:1", "control_socket": "c", "state_dir": "s", "identity_dir": "i"}
    config = config_from_dict(
        {**base, "monitor": {"metrics_listen": "127.0.0.1:9464", "period_s": 0.5, "evacuate_victims_to": "host-x"}},
        tmp_path,
    )
    assert config.monitor.metrics_listen == ("127.0.0.1", 9464) and config.monitor.period_s == 0.5
    assert config.monitor.evacuate_victims_to == "host-x"
    assert config_from_dict(base, tmp_path).monitor.metrics_listen is None
    with pytest.raises(ConfigError, match="unknown keys"):
        config_from_dict({**base, "monitor": {"sample_hz": 3}}, tmp_path)
    with pytest.raises(ConfigError, match="period_s"):
        config_from_dict({**base, "monitor": {"period_s": 0}}, tmp_path)
