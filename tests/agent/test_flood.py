"""Issue 23: slow clients from many addresses do not lock a legitimate migration out (default configuration).

128 attacker addresses (127.0.0.2-129: Linux routes all of 127/8 to lo), each
holding ONE connection that sends the first byte of a TLS record and then
nothing, and reconnecting when the agent drops it. Before the fix, 64 such
addresses filled `max_connections = 64` and every migration failed within
milliseconds; no address ever crossed the port watch's per-address threshold.

The attack is one thread with a selector: at most 128 sockets at once, and it
stops by itself (ATTACK_LIMIT_S) if the test does not stop it first.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from sealift.agent.client import AgentRequestFailed
from sealift.cluster import LocalCluster

ATTACKERS = [f"127.0.0.{n}" for n in range(2, 130)]
RECONNECT_S = 0.5  # a patient attacker: each address stays under the port watch's per-address threshold
ATTACK_LIMIT_S = 90.0
MIGRATIONS = 3
VM_MEMORY = "64M"


@dataclass
class AttackReport:
    connected: int = 0  # connections that got to send their byte
    closed_by_agent: int = 0
    lifetimes: list[float] = field(default_factory=list)  # seconds from connect to the agent's close
    most_open: int = 0


class SlowClients:
    """One slow client per address: connect, send b"\\x16", hold; reconnect RECONNECT_S after the agent drops it."""

    def __init__(self, target: tuple[str, int], addresses: list[str]) -> None:
        self.target = target
        self.addresses = addresses
        self.report = AttackReport()
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-clients", daemon=True)

    def __enter__(self) -> SlowClients:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self._thread.join(20)
        assert not self._thread.is_alive(), "the attack thread did not stop"

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        due = dict.fromkeys(self.addresses, 0.0)  # address -> when to (re)connect; absent while connected
        give_up = time.monotonic() + ATTACK_LIMIT_S
        try:
            while not self.stop.is_set() and time.monotonic() < give_up:
                now = time.monotonic()
                for address in [a for a, at in due.items() if at <= now]:
                    del due[address]
                    self._connect(selector, address)
                for key, _mask in selector.select(timeout=0.05):
                    self._on_event(selector, key, due)
                self.report.most_open = max(self.report.most_open, len(selector.get_map()))
        finally:
            for key in list(selector.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            selector.close()

    def _connect(self, selector: selectors.BaseSelector, address: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((address, 0))
        sock.connect_ex(self.target)
        selector.register(sock, selectors.EVENT_WRITE, (address, "connecting", 0.0))

    def _on_event(self, selector: selectors.BaseSelector, key: selectors.SelectorKey, due: dict[str, float]) -> None:
        sock: socket.socket = key.fileobj  # type: ignore[assignment]
        address, phase, since = key.data
        now = time.monotonic()
        if phase == "connecting" and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            try:
                sock.send(b"\x16")  # the first byte of a TLS handshake record, and nothing more
                selector.modify(sock, selectors.EVENT_READ, (address, "holding", now))
                self.report.connected += 1
                return
            except OSError:
                pass
        elif phase == "holding":
            self.report.closed_by_agent += 1
            self.report.lifetimes.append(now - since)
        selector.unregister(sock)
        sock.close()
        due[address] = now + RECONNECT_S


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster()  # the default configuration, as in the report
    cluster.start()
    yield cluster
    cluster.cleanup()


def guard_status(cluster: LocalCluster) -> dict:
    return cluster.client("host-b").request("status")["status"]["guard"]


def audit(cluster: LocalCluster, kind: str) -> list[dict]:
    entries = cluster.client("host-b").request("audit.show", limit=500, kind=kind)["entries"]
    return [e["fields"] for e in entries]


def wait_for(probe: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.25)
    return probe()


def migrate(cluster: LocalCluster, vm: str) -> tuple[str, float, str]:
    """(status, seconds, error) of one migration host-a -> host-b."""
    started = time.monotonic()
    try:
        report = cluster.migrate(vm, "host-a", "host-b")
    except AgentRequestFailed as exc:
        return "failed", time.monotonic() - started, str(exc)
    return str(report["status"]), time.monotonic() - started, str(report.get("error") or "")


def test_a_migration_completes_every_time_under_slow_clients_from_128_addresses(cluster: LocalCluster) -> None:
    a = cluster.client("host-a")
    for n in range(MIGRATIONS + 1):
        a.request("vm.start", name=f"vm{n}", memory=VM_MEMORY, workload="db")
    quiet = migrate(cluster, "vm0")
    assert quiet[0] == "completed", quiet

    outcomes = []
    guard_samples = []
    with SlowClients(cluster.addresses["host-b"], ATTACKERS) as attack:
        # The attack is under way: the unexpected addresses hold their whole share of the port.
        full = wait_for(lambda: (g := guard_status(cluster))["pending_unexpected"] >= g["unexpected_limit"], 15)
        assert full, guard_status(cluster)
        for n in range(1, MIGRATIONS + 1):
            guard_samples.append(guard_status(cluster))
            outcomes.append(migrate(cluster, f"vm{n}"))
            time.sleep(0.5)
        guard_during = guard_status(cluster)
        floods = wait_for(lambda: audit(cluster, "monitor.port_flood"), 15)

    print(f"\nquiet migration: {quiet[0]} in {quiet[1]:.2f} s")
    for n, (status, seconds, error) in enumerate(outcomes, 1):
        print(f"migration {n} under attack: {status} in {seconds:.2f} s {error}")
    lifetimes = sorted(attack.report.lifetimes)
    print(
        f"attack: {attack.report.connected} connections from {len(ATTACKERS)} addresses, "
        f"{attack.report.closed_by_agent} closed by the agent, lifetimes "
        f"{lifetimes[0]:.2f}/{lifetimes[len(lifetimes) // 2]:.2f}/{lifetimes[-1]:.2f} s (min/median/max); "
        f"guard while migrating: {guard_samples}; after: {guard_during}"
    )
    print(f"audit monitor.port_flood: {floods}")

    assert [o[0] for o in outcomes] == ["completed"] * MIGRATIONS, outcomes
    assert attack.report.connected >= len(ATTACKERS), "every attacker address got in at least once"
    assert guard_during["evicted_connections"] > 0
    assert all(s["pending_unexpected"] <= s["unexpected_limit"] for s in guard_samples)
    assert lifetimes[-1] < 4.0, "no slow client kept its slot near the 10 s handshake deadline"
    assert floods and floods[0]["code"] == "port_flood" and floods[0]["addresses"] >= 16
    # Every slot is given back exactly once: when the attack stops, the port empties.
    emptied = wait_for(lambda: guard_status(cluster)["open_connections"] == 0, 15)
    assert emptied, guard_status(cluster)
    assert guard_status(cluster)["pending_unexpected"] == 0
    info = cluster.client("host-b").request("vm.info", name=f"vm{MIGRATIONS}")["vm"]
    assert info["alive"]
