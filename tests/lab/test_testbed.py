"""The lab's network namespaces: routing through the attacker, the VM network, captures, tear-down."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from sealift.lab.capture import Capture, dropped_packets, find_in_capture, ip_protocols
from sealift.lab.netns import enter_netns, netns_exists
from sealift.lab.relay import Relay
from sealift.lab.testbed import NETNS_DIR, LinkShape, Testbed, remove_stale

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.timeout(120),
]

SECRET = b"The bank amount transferred is 1000000 EUR"


@pytest.fixture
def testbed():
    with Testbed() as bed:
        yield bed


def serve_once(bed: Testbed, host: str, address: tuple[str, int], received: list[bytes]) -> threading.Thread:
    with enter_netns(bed.ns(host)):
        server = socket.create_server(address)

    def run() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                data = bytearray()
                while chunk := conn.recv(65536):
                    data += chunk
                received.append(bytes(data))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def send(bed: Testbed, host: str, address: tuple[str, int], payload: bytes) -> None:
    with enter_netns(bed.ns(host)):
        conn = socket.create_connection(address, timeout=10)
    with conn:
        conn.sendall(payload)


def test_migration_traffic_is_routed_through_the_attacker_and_captured(testbed: Testbed, tmp_path: Path) -> None:
    assert testbed.ping("source", testbed.destination_ip)
    received: list[bytes] = []
    # The secret straddles a segment boundary: only reassembly finds it whole.
    payload = b"x" * (1448 - 10) + SECRET + b"y" * 200_000
    with Capture(testbed.ns("attacker"), "to-src", tmp_path / "a.pcap") as capture:
        server = serve_once(testbed, "destination", (testbed.destination_ip, 7000), received)
        send(testbed, "source", (testbed.destination_ip, 7000), payload)
        server.join(10)
    assert received == [payload]
    finding = find_in_capture(capture.path, SECRET)
    assert len(finding.flows) == 1
    assert finding.flows[0].startswith(f"{testbed.source_ip}:") and finding.flows[0].endswith(
        f"{testbed.destination_ip}:7000"
    )
    assert ip_protocols(capture.path).get(6, 0) >= 3  # TCP crossed the attacker's link (GSO: few, large frames)
    assert capture.dropped == 0  # tshark said how many it lost when it stopped: none


def test_tsharks_drop_report_is_read() -> None:
    assert dropped_packets("Capturing on 'to-src'\n1918 packets captured\n") == 0
    assert dropped_packets("1918 packets captured\n16 packets dropped from to-src\n") == 16
    assert dropped_packets("1 packet dropped from a\n2 packets dropped from b\n") == 3


def test_the_vm_network_is_one_segment_across_hosts(testbed: Testbed) -> None:
    assert testbed.ping("client", "10.78.0.1")
    assert testbed.ping("client", "10.78.0.2")
    assert testbed.ping("source", "10.78.0.2")
    # ... and it is not the migration network: the client cannot reach the agents' addresses.
    assert not testbed.ping("client", testbed.source_ip, timeout_s=1)


def test_a_relay_in_the_attackers_namespace_sits_in_the_path(testbed: Testbed) -> None:
    relay = Relay((testbed.attacker_ip, 0), netns=testbed.ns("attacker"))
    relay.target = (testbed.destination_ip, 7001)
    try:
        received: list[bytes] = []
        server = serve_once(testbed, "destination", (testbed.destination_ip, 7001), received)
        send(testbed, "source", relay.address, SECRET)
        server.join(10)
        assert received == [SECRET]
        assert SECRET in relay.captured()
    finally:
        relay.close()


def test_link_shape_sets_mtu_and_rate(testbed: Testbed) -> None:
    testbed.shape(LinkShape(mtu=9000, rate="200mbit"))
    link = testbed.run("source", ["ip", "link", "show", "mig0"]).stdout
    assert "mtu 9000" in link
    assert "tbf" in testbed.run("attacker", ["tc", "qdisc", "show", "dev", "to-dst"]).stdout
    assert testbed.ping("source", testbed.destination_ip)


def test_down_removes_every_namespace_and_stale_runs_are_cleaned() -> None:
    bed = Testbed().up()
    names = [bed.ns(h) for h in ("source", "destination", "attacker", "client", "switch")]
    assert all(netns_exists(n) for n in names)
    bed.down()
    assert not any(netns_exists(n) for n in names)
    # A run killed outright leaves namespaces named after a dead pid: remove_stale() finds them.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"slab-{dead.pid:x}-t1-source"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    assert stale in remove_stale()
    assert not (NETNS_DIR / stale).exists()


def test_agents_in_the_lab_migrate_a_vm_across_the_attackers_link(testbed: Testbed, tmp_path: Path) -> None:
    from sealift.cluster import LocalCluster

    cluster = LocalCluster(
        netns={"host-a": testbed.ns("source"), "host-b": testbed.ns("destination")},
        listen={"host-a": (testbed.source_ip, 7100), "host-b": (testbed.destination_ip, 7100)},
    )
    with cluster, Capture(testbed.ns("attacker"), "to-src", tmp_path / "m.pcap") as capture:
        cluster.client("host-a").request("vm.start", name="vm1", memory="32M", workload="db")
        report = cluster.migrate("vm1", "host-a", "host-b")
        assert report["status"] == "completed"
        assert [v["name"] for v in cluster.client("host-b").request("vm.list")["vms"]] == ["vm1"]
    flows = find_in_capture(capture.path, b"SLD1").flows  # the data stream's opening crossed the attacker
    assert any(flow.endswith(f"{testbed.destination_ip}:7100") for flow in flows)
