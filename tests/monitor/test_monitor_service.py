"""The monitor service's policy and audit on synthetic samples, and the collectors' readers on real files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from sealift.migration import gate
from sealift.migration.gate import MonitorRefusal
from sealift.monitor.collectors import DirtyCounter, guest_view_of_tap, read_netdev, read_proc_cpu
from sealift.monitor.service import MonitorConfig, MonitorService
from sealift.monitor.signals import VmSample
from synthetic import quiet_web_server, samples, with_burst


class Replay:
    """A collector that hands out prepared samples, one per round."""

    def __init__(self, series: list[VmSample]) -> None:
        self._series = iter(series)

    def collect(self) -> list[VmSample]:
        return [next(self._series)]


class Blocks:
    def __init__(self) -> None:
        self.blocked: list[tuple[str, float, str]] = []

    def block(self, peer_ip: str, seconds: float, reason: str) -> None:
        self.blocked.append((peer_ip, seconds, reason))


def make_service(
    series: list[VmSample], host: str, **config: object
) -> tuple[MonitorService, list[tuple[str, dict]], Blocks]:
    audit: list[tuple[str, dict]] = []
    blocks = Blocks()
    service = MonitorService(
        host,
        MonitorConfig(enabled=False, **config),
        [Replay(series)],  # type: ignore[arg-type]
        lambda kind, **fields: audit.append((kind, fields)),
        blocker=blocks,
    )
    service.start()  # installs the gate; enabled=False: no thread, the test drives the rounds
    return service, audit, blocks


def test_an_attacker_is_held_both_ways_and_everything_is_audited() -> None:
    storm = with_burst(quiet_web_server(seed=11, step_every=10**9), 100, 200, {"dirty_bps": 30.0, "cpu": 6.0})
    service, audit, _ = make_service(list(samples(storm, 200, vm="evil", network=False)), "unit-host-1")
    try:
        gate.check_outgoing("unit-host-1", "evil", "host-b")  # nothing known yet: allowed
        for _ in range(110):
            service.sample_once()
        with pytest.raises(MonitorRefusal, match="^vm_flagged_attacker: evil is flagged") as refused:
            gate.check_outgoing("unit-host-1", "evil", "host-b")
        assert refused.value.code == "vm_flagged_attacker"
        with pytest.raises(MonitorRefusal):
            gate.check_incoming("unit-host-1", "evil", "host-c")
        gate.check_outgoing("unit-host-1", "other-vm", "host-b")  # only the flagged VM is held
        gate.check_outgoing("another-host", "evil", "host-b")  # gates are per host
    finally:
        service.stop()
    gate.check_outgoing("unit-host-1", "evil", "host-b")  # stopped: gate uninstalled
    kinds = [kind for kind, _ in audit]
    assert kinds.count("monitor.verdict") == 1 and kinds.count("monitor.migration_refused") == 2
    verdict = dict(audit)["monitor.verdict"]
    assert verdict["verdict"] == "attacker" and verdict["vm"] == "evil" and verdict["deviations"]
    assert (
        "monitor.action",
        {"vm": "evil", "action": "hold_migrations", "reason": "a VM flagged attacker is not moved to other hosts"},
    ) in audit


def test_a_victim_is_recommended_for_evacuation_to_the_configured_host() -> None:
    flood = with_burst(quiet_web_server(seed=12, step_every=10**9), 100, 200, {"rx_bps": 60.0, "rx_pps": 60.0})
    service, audit, _ = make_service(
        list(samples(flood, 120, vm="target")), "unit-host-2", evacuate_victims_to="host-x"
    )
    try:
        for _ in range(110):
            service.sample_once()
        row = service.snapshot()["vms"][0]  # type: ignore[index]
        assert row["verdict"]["kind"] == "victim" and "host-x" in row["recommendation"]
        gate.check_outgoing("unit-host-2", "target", "host-x")  # a victim may (should) move
    finally:
        service.stop()
    actions = [fields for kind, fields in audit if kind == "monitor.action"]
    assert (
        actions == [actions[0]] and actions[0]["action"] == "evacuate_recommended" and actions[0]["target"] == "host-x"
    )


def test_port_events_block_a_peer_through_the_guard_and_the_audit() -> None:
    service, audit, blocks = make_service([], "unit-host-3", ids_threshold=10, ids_block_s=5)
    try:
        for _ in range(3):
            service.port_event("198.51.100.7", "handshake_failed")
        assert blocks.blocked == [("198.51.100.7", 5, blocks.blocked[0][2])]
        assert "handshake_failed" in blocks.blocked[0][2]
        assert [kind for kind, _ in audit] == ["monitor.peer_blocked"]
    finally:
        service.stop()


def test_proc_cpu_of_a_busy_process_grows() -> None:
    before = read_proc_cpu(os.getpid())
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    after = read_proc_cpu(os.getpid())
    assert before is not None and after is not None and after - before >= 0.1
    assert read_proc_cpu(2**22 + 12345) is None


def test_netdev_counters_and_the_tap_swap(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.write_text(
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n"
        "    lo:  100 2 0 0 0 0 0 0 100 2 0 0 0 0 0 0\n"
        "slt0: 5000 50 0 0 0 0 0 0 700000 900 0 0 0 0 0 0\n"
    )
    host = read_netdev("slt0", dev)
    assert host == {"rx_bytes": 5000, "rx_packets": 50, "tx_bytes": 700000, "tx_packets": 900}
    guest = guest_view_of_tap(host)
    assert guest["rx_bytes"] == 700000 and guest["tx_packets"] == 50
    assert read_netdev("nope", dev) is None and guest_view_of_tap(None)["rx_bytes"] is None


def test_dirty_counter_counts_pages_whose_generation_moved() -> None:
    counter = DirtyCounter()
    gens = np.zeros(16, dtype="<u4")
    assert counter.update(gens.copy()) == 0
    gens[[1, 2, 3]] += 2
    assert counter.update(gens.copy()) == 3
    gens[[3, 9]] += 2
    assert counter.update(gens.copy()) == 5
