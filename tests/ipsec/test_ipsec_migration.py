"""A real QEMU guest migrated by two agents over the `ipsec` transport, across the lab's attacker.

host-a and host-b are the lab's source and destination namespaces; every
migration packet crosses the attacker's namespace, where tshark records the
link. Each agent runs its own charon (kernel-libipsec here: no kernel ESP);
the PSK of each migration is derived from the agents' TLS channel, so it
differs every time. After every migration, successful or not, neither
charon holds an SA, a connection or a PSK, and a failed migration leaves
the guest running on its source.
"""

from __future__ import annotations

import json
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealift.agent.client import AgentClient, AgentRequestFailed
from sealift.backends.qemu.host import QEMU_BINARY
from sealift.backends.qemu.transports import check_ipsec_addresses
from sealift.backends.qemu.vm import probe_udp
from sealift.cluster import OPERATOR, LocalCluster
from sealift.ipsec.tunnel import IpsecError
from sealift.ipsec.vici_client import ViciClient
from sealift.lab.capture import Capture, find_in_capture, read_packets, tcp_streams
from sealift.lab.netns import enter_netns
from sealift.lab.testbed import Testbed

from .conftest import needs_namespaces

pytestmark = [
    needs_namespaces,
    pytest.mark.skipif(shutil.which(QEMU_BINARY) is None, reason=f"{QEMU_BINARY} is not installed"),
]

VM = "qvm"
SECRET_PREFIX = b"The bank amount transferred"
QEMU_STREAM_MAGIC = b"QEVM"  # the first bytes of QEMU's migration stream
AGENT_PORT = 7100
IKE_NATT_PORT = 4500


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Testbed, LocalCluster]]:
    from sealift.backends.qemu.image import build_image, default_cache_dir

    build_image(default_cache_dir())  # cached after the first build
    bed = Testbed(tag="ipsq").up()
    try:
        cluster = LocalCluster(
            netns={"host-a": bed.ns("source"), "host-b": bed.ns("destination")},
            listen={"host-a": (bed.source_ip, AGENT_PORT), "host-b": (bed.destination_ip, AGENT_PORT)},
            extra_config="step_timeout_s = 15\nresolve_interval_s = 0.5\nhandshake_timeout_s = 5",
        )
    except BaseException:
        bed.down()
        raise
    try:
        cluster.start()
        vm = cluster.client("host-a").request(
            "vm.start", name=VM, backend="qemu", memory="128M", cmdline="sealift.mem_mib=16 sealift.rate_mib=1"
        )["vm"]
        assert wait_counter(cluster.client("host-a"), 0, 90) > 0, vm
        yield bed, cluster
    finally:
        cluster.stop_guests()
        cluster.cleanup()  # SIGTERM: each agent stops its charon
        bed.down()


# -- helpers ------------------------------------------------------------------------------


def info(client: AgentClient) -> dict:
    return client.request("vm.info", name=VM)["vm"]


def wait_counter(client: AgentClient, above: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counter = info(client).get("counter")
        if counter is not None and counter > above:
            return int(counter)
        time.sleep(0.2)
    raise AssertionError(f"{VM}: no counter above {above} within {timeout} s: {info(client)}")


def probe(bed: Testbed, lab_host: str, vm: dict) -> int | None:
    """The guest's UDP probe answer, asked from inside its host's namespace (user networking forwards it)."""
    address = (vm["probe"][0], int(vm["probe"][1]))
    with enter_netns(bed.ns(lab_host)):
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            answer = probe_udp(address, 0.5)
            if answer is not None:
                return answer
    return None


def names(client: AgentClient) -> list[str]:
    return [vm["name"] for vm in client.request("vm.list")["vms"]]


def where(cluster: LocalCluster) -> str:
    running = [host for host in cluster.hosts if VM in names(cluster.client(host))]
    assert len(running) == 1, f"{VM} is on {running}"
    return running[0]


def migrate(cluster: LocalCluster, source: str, destination: str) -> dict:
    return cluster.client(source).request(
        "migrate",
        vm=VM,
        to=destination,
        options={"transport": "ipsec"},
        order=cluster.order(VM, source, destination),
    )["report"]


def migrate_with_cli(cluster: LocalCluster, source: str, destination: str) -> dict:
    """`sealift migrate VM --to B --transport ipsec`, as an operator types it (the order is signed on the spot)."""
    argv = [
        sys.executable,
        "-m",
        "sealift",
        "migrate",
        VM,
        "--to",
        destination,
        "--transport",
        "ipsec",
        "--json",
        "--socket",
        str(cluster.agents[source].socket_path),
        "--operator",
        OPERATOR,
        "--operator-dir",
        str(cluster.operators),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def audit(cluster: LocalCluster, host: str, kind: str, migration_id: str) -> list[dict]:
    entries = cluster.client(host).request("audit.show", kind=kind, limit=200)["entries"]
    return [entry["fields"] for entry in entries if entry["fields"].get("migration_id") == migration_id]


def assert_no_ipsec_state(cluster: LocalCluster) -> None:
    """Neither agent's charon holds an SA, a connection or a PSK (asked over its VICI socket)."""
    for host in cluster.hosts:
        socket_path = cluster.root / host / "ipsec" / "charon.vici"
        if not socket_path.exists():
            continue  # this agent never started its charon
        with ViciClient(str(socket_path)) as vici:
            assert vici.list_sas() == [], host
            assert vici.shared_key_ids() == [], host
            assert vici.conn_names() == [], host


def udp_ports(path: Path) -> dict[int, int]:
    """Packets per UDP destination port in an Ethernet/IPv4 capture."""
    counts: dict[int, int] = {}
    for packet in read_packets(path):
        frame = packet.data
        if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
            continue
        header = (frame[14] & 0x0F) * 4
        dport = struct.unpack("!H", frame[14 + header + 2 : 14 + header + 4])[0]
        counts[dport] = counts.get(dport, 0) + 1
    return counts


def assert_moved(bed: Testbed, cluster: LocalCluster, report: dict, source: str, destination: str) -> None:
    assert report["status"] == "completed", report
    assert report["transport"] == "ipsec"
    assert "ipsec backend libipsec" in report["stop_reason"] or "ipsec backend kernel" in report["stop_reason"]
    assert where(cluster) == destination
    paused = report["counter_at_pause"]
    assert wait_counter(cluster.client(destination), paused, 30) > paused
    after = info(cluster.client(destination))
    assert after["status"] == "running"
    assert (probe(bed, "destination" if destination == "host-b" else "source", after) or 0) >= paused


def sa_audit(cluster: LocalCluster, report: dict) -> tuple[dict, dict]:
    """The SA record of one migration on each side (exactly one ipsec.sa_up and one clean ipsec.sa_down each)."""
    ups = []
    for host in (report["source"], report["destination"]):
        up = audit(cluster, host, "ipsec.sa_up", report["migration_id"])
        down = audit(cluster, host, "ipsec.sa_down", report["migration_id"])
        assert len(up) == 1 and len(down) == 1, (host, up, down)
        assert down[0]["clean"] is True and down[0]["psk_fingerprint"] == up[0]["psk_fingerprint"]
        assert not any("psk" == key or "secret" in key for key in up[0])  # the key itself is never logged
        ups.append(up[0])
    source, destination = ups
    assert (source["spi_out"], source["spi_in"]) == (destination["spi_in"], destination["spi_out"])
    assert source["psk_fingerprint"] == destination["psk_fingerprint"]
    assert source["backend"] in ("libipsec", "kernel") and "GCM" in source["encryption"].upper()
    return source, destination


# -- tests --------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_guest_migrates_over_ipsec_esp_only_and_a_fresh_psk_each_time(
    lab: tuple[Testbed, LocalCluster], tmp_path: Path
) -> None:
    bed, cluster = lab
    assert where(cluster) == "host-a"
    pcap = tmp_path / "attacker.pcap"
    with Capture(bed.ns("attacker"), "to-src", pcap):
        first = migrate(cluster, "host-a", "host-b")
    assert_moved(bed, cluster, first, "host-a", "host-b")
    assert_no_ipsec_state(cluster)

    # The attacker's link: ESP in UDP 4500 carried the guest; no secret and no QEMU stream in clear.
    assert udp_ports(pcap).get(IKE_NATT_PORT, 0) > 1000, udp_ports(pcap)
    assert not find_in_capture(pcap, SECRET_PREFIX).found
    assert not find_in_capture(pcap, QEMU_STREAM_MAGIC).flows
    tcp_ports = {port for (_, sport, _, dport) in tcp_streams(pcap) for port in (sport, dport)}
    assert AGENT_PORT in tcp_ports  # the agents' own TLS channel is there, in the clear of IPsec but TLS
    flows_off_agent_port = [key for key in tcp_streams(pcap) if AGENT_PORT not in (key[1], key[3])]
    assert flows_off_agent_port == [], "a TCP flow other than the agents' own crossed the link outside ESP"

    second = migrate(cluster, "host-b", "host-a")
    assert_moved(bed, cluster, second, "host-b", "host-a")
    assert_no_ipsec_state(cluster)

    sa_one, _ = sa_audit(cluster, first)
    sa_two, _ = sa_audit(cluster, second)
    assert sa_one["psk_fingerprint"] != sa_two["psk_fingerprint"]
    assert sa_one["key_id"] != sa_two["key_id"] and sa_one["spi_out"] != sa_two["spi_out"]
    print(
        f"\nQEMU 128M over ipsec ({sa_one['backend']}, {sa_one['encryption']}): "
        f"{first['total_time_s']} s / {second['total_time_s']} s, downtime {first['downtime_ms']} / "
        f"{second['downtime_ms']} ms"
    )


def _attacker_drops_ike(bed: Testbed) -> None:
    rules = (
        "table inet sliqdrop {\n"
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy accept;\n"
        "    udp dport { 500, 4500 } counter drop\n"
        "  }\n"
        "}\n"
    )
    subprocess.run(bed.argv("attacker", ["nft", "-f", "-"]), input=rules, text=True, check=True, timeout=10)


def _attacker_lets_ike_through(bed: Testbed) -> None:
    bed.run("attacker", ["nft", "delete", "table", "inet", "sliqdrop"], check=False)


def _provision(cluster: LocalCluster, key_a: bytes, key_b: bytes) -> None:
    from sealift.security.psk import psk_to_hex

    cluster.client("host-a").request("psk.provision", peer="host-b", key=psk_to_hex(key_a))
    cluster.client("host-b").request("psk.provision", peer="host-a", key=psk_to_hex(key_b))


@pytest.mark.timeout(300)
def test_with_a_pair_psk_a_failed_ipsec_migration_keeps_the_guest_and_the_next_ones_ratchet(
    lab: tuple[Testbed, LocalCluster],
) -> None:
    """The pair's dynamic PSK is the second factor and keys the SA with the TLS exporter.

    A mismatched pair key is refused before anything moves; with matching
    keys, a migration whose SA cannot come up leaves the guest on its source
    with nothing loaded in either charon, and the next two migrations work,
    each at the next ratchet epoch with a new IKE PSK.
    """
    from sealift.security.psk import new_psk

    bed, cluster = lab
    source = where(cluster)
    destination = "host-b" if source == "host-a" else "host-a"
    _provision(cluster, new_psk(), new_psk())  # the hosts disagree: no migration, whatever the transport
    with pytest.raises(AgentRequestFailed, match=f"{destination} refused the migration: .*PSK") as refused:
        migrate(cluster, source, destination)
    print(f"\nmismatched pair PSK: {refused.value}")
    assert where(cluster) == source
    key = new_psk()
    _provision(cluster, key, key)

    before = wait_counter(cluster.client(source), 0, 10)
    _attacker_drops_ike(bed)  # the SA cannot come up: the source gives up before QEMU sends a byte
    try:
        with pytest.raises(
            AgentRequestFailed, match=f"IPsec SA .* did not come up.*keeps running on {source}"
        ) as failed_up:
            migrate(cluster, source, destination)
        print(f"IKE dropped: {failed_up.value}")
    finally:
        _attacker_lets_ike_through(bed)
    assert where(cluster) == source
    vm = info(cluster.client(source))
    assert vm["status"] == "running" and not vm["migrating"], vm
    assert wait_counter(cluster.client(source), before, 20) > before
    failed = cluster.client(source).request("migrations", limit=1)["migrations"][0]
    for host in (source, destination):
        downs = audit(cluster, host, "ipsec.sa_down", failed["id"])
        assert [down["clean"] for down in downs] == [True], (host, downs)  # torn down on both sides
    assert audit(cluster, source, "ipsec.sa_up", failed["id"]) == []
    assert_no_ipsec_state(cluster)

    there = migrate(cluster, source, destination)  # no desynchronised key: the next one just works
    assert_moved(bed, cluster, there, source, destination)
    assert_no_ipsec_state(cluster)
    back = migrate_with_cli(cluster, destination, source)
    assert_moved(bed, cluster, back, destination, source)
    assert_no_ipsec_state(cluster)

    sa_there, _ = sa_audit(cluster, there)
    sa_back, _ = sa_audit(cluster, back)
    epoch_there = int(sa_there["psk_generation"].removeprefix("epoch "))
    assert sa_back["psk_generation"] == f"epoch {epoch_there + 1}"  # the pair's key ratcheted in between
    assert sa_there["psk_fingerprint"] != sa_back["psk_fingerprint"]
    ratchets = [e for e in audit(cluster, source, "key.changed", there["migration_id"]) if e["what"] == "psk ratcheted"]
    assert len(ratchets) == 1


def _charon_pids(bed: Testbed, lab_host: str) -> list[int]:
    pids = bed.run(lab_host, ["ip", "netns", "pids", bed.ns(lab_host)], check=False).stdout.split()
    alive = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "charon":
                alive.append(int(pid))
        except OSError:
            pass
    return alive


@pytest.mark.timeout(240)
def test_agent_shutdown_stops_charon_and_a_destination_without_charon_refuses_ipsec(
    lab: tuple[Testbed, LocalCluster],
) -> None:
    """Runs after the migrations above (module order): both agents have started their charon by now."""
    bed, cluster = lab
    source = where(cluster)
    destination = "host-b" if source == "host-a" else "host-a"
    lab_host = "destination" if destination == "host-b" else "source"
    assert _charon_pids(bed, lab_host), "the earlier ipsec migrations left no running charon to stop"
    cluster.kill(destination, signal.SIGTERM)
    assert _charon_pids(bed, lab_host) == []  # the agent stopped its charon on the way out

    # charon cannot start there now (its run directory is a file): the destination refuses, clearly.
    run_dir = cluster.root / destination / "ipsec"
    shutil.rmtree(run_dir)
    run_dir.write_text("not a directory\n")
    cluster.start(destination)
    try:
        with pytest.raises(AgentRequestFailed, match=f"'ipsec' transport is not available on {destination}") as refused:
            migrate(cluster, source, destination)
        print(f"\nno charon: {refused.value}")
        assert where(cluster) == source and info(cluster.client(source))["status"] == "running"
    finally:
        cluster.kill(destination, signal.SIGTERM)
        run_dir.unlink()
        cluster.start(destination)
    report = migrate(cluster, source, destination)  # charon starts again on first use
    assert_moved(bed, cluster, report, source, destination)
    assert_no_ipsec_state(cluster)


def test_the_ipsec_transport_needs_two_hosts_on_distinct_non_loopback_addresses() -> None:
    for local, peer in ((None, "127.0.0.1"), ("10.77.1.1", "10.77.1.1"), (None, "::1")):
        with pytest.raises(IpsecError, match="distinct, non-loopback"):
            check_ipsec_addresses(local, peer)
    check_ipsec_addresses("10.77.2.1", "10.77.1.1")  # the lab's two hosts
