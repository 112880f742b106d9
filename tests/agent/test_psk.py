"""The dynamic PSK between two real agents: required once provisioned, ratcheted, never locked out."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import pytest

from sealift.agent.client import AgentRequestFailed
from sealift.cluster import LocalCluster
from sealift.security.psk import new_psk, psk_to_hex

VM = "vm1"


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster(extra_config="step_timeout_s = 6")
    cluster.start()
    yield cluster
    cluster.cleanup()


def provision(cluster: LocalCluster, key: bytes, hosts: tuple[str, ...] = ("host-a", "host-b")) -> None:
    for host in hosts:
        peer = "host-b" if host == "host-a" else "host-a"
        cluster.client(host).request("psk.provision", peer=peer, key=psk_to_hex(key))


def fingerprints(cluster: LocalCluster) -> tuple[str, str]:
    a = cluster.client("host-a").request("psk.status")["peers"][0]
    b = cluster.client("host-b").request("psk.status")["peers"][0]
    return a["fingerprint"], b["fingerprint"]


def there_and_back(cluster: LocalCluster) -> None:
    assert cluster.migrate(VM, "host-a", "host-b")["status"] == "completed"
    assert cluster.migrate(VM, "host-b", "host-a")["status"] == "completed"


def test_matching_psk_authenticates_and_ratchets_on_both_hosts(cluster: LocalCluster) -> None:
    cluster.client("host-a").request("vm.start", name=VM, memory="32M", workload="web")
    provision(cluster, new_psk())
    start = fingerprints(cluster)
    assert start[0] == start[1]
    there_and_back(cluster)
    after = fingerprints(cluster)
    assert after[0] == after[1] != start[0]  # replaced, and in step
    ratchets = cluster.client("host-a").request("audit.show", kind="key.changed")["entries"]
    assert any(e["fields"].get("what") == "psk ratcheted" for e in ratchets)


def test_a_wrong_psk_is_refused_and_the_vm_stays(cluster: LocalCluster) -> None:
    cluster.client("host-a").request("vm.start", name=VM, memory="32M", workload="web")
    cluster.client("host-a").request("psk.provision", peer="host-b", key=psk_to_hex(new_psk()))
    cluster.client("host-b").request("psk.provision", peer="host-a", key=psk_to_hex(new_psk()))
    with pytest.raises(AgentRequestFailed, match="(?i)psk|pre-shared"):
        cluster.migrate(VM, "host-a", "host-b")
    info = cluster.client("host-a").request("vm.info", name=VM)["vm"]
    assert info["alive"] and not info["paused"]
    refused = cluster.client("host-b").request("audit.show", kind="migration.refused")["entries"]
    assert refused and "psk" in refused[0]["fields"]["reason"].lower()


def test_a_destination_with_a_psk_refuses_a_source_without_one(cluster: LocalCluster) -> None:
    cluster.client("host-a").request("vm.start", name=VM, memory="32M", workload="web")
    cluster.client("host-b").request("psk.provision", peer="host-a", key=psk_to_hex(new_psk()))
    with pytest.raises(AgentRequestFailed, match="(?i)psk|pre-shared|proof"):
        cluster.migrate(VM, "host-a", "host-b")


def test_a_ratchet_interrupted_half_way_does_not_lock_the_pair_out(cluster: LocalCluster) -> None:
    """Kill the destination in the middle of a PSK session; the next migration still works."""
    cluster.client("host-a").request("vm.start", name=VM, memory="64M", workload="db")
    provision(cluster, new_psk())
    events: list[dict] = []
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["report"] = cluster.migrate(
                VM, "host-a", "host-b", options={"bandwidth_limit_bps": 16 << 20}, on_event=events.append
            )
        except AgentRequestFailed as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 20
    while not any(e["event"] == "transfer" for e in events):  # Accept (and its proof) has been exchanged
        assert time.monotonic() < deadline
        time.sleep(0.02)
    cluster.kill("host-b", signal.SIGKILL)
    thread.join(30)
    assert "error" in outcome
    cluster.start("host-b")
    there_and_back(cluster)  # authenticates again, and ratchets
    a, b = fingerprints(cluster)
    assert a == b
