"""Real QEMU guests (TCG) migrated between two sealift agents, through a relay in the path.

The relay records every byte between the agents (to look for the guest's
secret), flips a bit of the data stream, or is bypassed while the
destination agent is killed. After any failure the guest must keep running
on host-a, and only there.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealift.agent.client import AgentClient, AgentRequestFailed, AgentUnavailable
from sealift.backends.qemu.vm import probe_udp
from sealift.cluster import LocalCluster
from sealift.lab.relay import Relay, Tamper

SECRET_PREFIX = b"The bank amount transferred"
VM = "qvm"
MEMORY = "128M"
CMDLINE = "sealift.mem_mib=32 sealift.rate_mib=8"


def make_cluster(relay: Relay, allow_insecure: bool = False) -> LocalCluster:
    cluster = LocalCluster(
        allow_insecure=allow_insecure,
        extra_config="step_timeout_s = 15\nresolve_interval_s = 0.5\nhandshake_timeout_s = 5",
        peer_routes={("host-a", "host-b"): relay.address},
    )
    relay.target = cluster.addresses["host-b"]
    cluster.start()
    return cluster


@pytest.fixture
def cluster(relay: Relay, guest_image: object) -> Iterator[LocalCluster]:
    cluster = make_cluster(relay)
    try:
        yield cluster
    finally:
        stop_guests(cluster)
        cluster.cleanup()


@pytest.fixture
def insecure_cluster(relay: Relay, guest_image: object) -> Iterator[LocalCluster]:
    cluster = make_cluster(relay, allow_insecure=True)
    try:
        yield cluster
    finally:
        stop_guests(cluster)
        cluster.cleanup()


def stop_guests(cluster: LocalCluster) -> None:
    """QEMU outlives its agent by design: stop every guest before the agents go."""
    cluster.stop_guests()


def start_guest(client: AgentClient) -> dict:
    vm = client.request("vm.start", name=VM, backend="qemu", memory=MEMORY, cmdline=CMDLINE)["vm"]
    assert wait_counter(client, 0, 90) > 0
    assert wait_probe(vm, 20) is not None
    return vm


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


def wait_probe(vm: dict, timeout: float) -> int | None:
    address = (vm["probe"][0], int(vm["probe"][1]))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = probe_udp(address, 0.5)
        if answer is not None:
            return answer
    return None


def migrate(cluster: LocalCluster, on_event=None, **options: object) -> dict:
    order = cluster.order(VM, "host-a", "host-b")
    return cluster.client("host-a").request(
        "migrate", vm=VM, to="host-b", options=options, order=order, on_event=on_event
    )["report"]


def names(client: AgentClient) -> list[str]:
    return [vm["name"] for vm in client.request("vm.list")["vms"]]


def assert_runs_on_source_only(cluster: LocalCluster) -> None:
    src, dst = cluster.client("host-a"), cluster.client("host-b")
    first = info(src)
    assert first["status"] == "running" and not first["migrating"], first
    assert wait_counter(src, first["counter"] or 0, 20) > (first["counter"] or 0)
    assert wait_probe(first, 10) is not None
    try:
        assert VM not in names(dst)
    except AgentUnavailable:
        pass  # the destination agent is down: checked through its processes below
    leftovers = [p for p in (cluster.vm_root / "host-b" / "qemu").glob("*.pid")]
    deadline = time.monotonic() + 15
    while leftovers and time.monotonic() < deadline:  # a killed agent's QEMU exits on its broken stream
        time.sleep(0.2)
        leftovers = [p for p in leftovers if p.exists() and _alive(p)]
    assert not leftovers, f"a destination QEMU is still there: {leftovers}"


def _alive(pid_file) -> bool:
    import os

    try:
        os.kill(int(pid_file.read_text().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


# -- tests ----------------------------------------------------------------------------


def test_qemu_guest_moves_through_the_sealift_channel(cluster: LocalCluster, relay: Relay) -> None:
    src, dst = cluster.client("host-a"), cluster.client("host-b")
    start_guest(src)
    events: list[dict] = []
    report = migrate(cluster, on_event=events.append)

    assert report["status"] == "completed", report
    assert report["transport"] == "sealift"
    assert report["image_digest"].startswith("blake3-tags:")  # AEAD: BLAKE3 over the records' GCM tags
    assert VM not in names(src)  # the source quit its copy after the running receipt
    after = info(dst)
    assert after["status"] == "running"
    last_on_source = report["counter_at_pause"]
    assert last_on_source is not None
    assert wait_counter(dst, last_on_source, 30) >= last_on_source
    assert (wait_probe(after, 20) or 0) >= last_on_source  # host-b's own port forward
    assert {e["event"] for e in events} >= {"phase", "transfer"}
    # Where the downtime went, in the order it happened, ending with the reported figure.
    steps = report["downtime_breakdown_ms"]
    assert list(steps) == [
        "switchover_check",
        "stream_sent",
        "manifest_sent",
        "prepared_receipt_in",
        "prepared_receipt",
        "commit_decided",
        "commit_sent",
        "running_receipt_in",
        "running_receipt",
    ]
    assert list(steps.values()) == sorted(steps.values())
    assert steps["running_receipt"] == report["downtime_ms"]

    captured = relay.captured()
    assert len(captured) > 16 << 20  # the relay did carry the guest's memory
    assert SECRET_PREFIX not in captured
    print(
        f"\nQEMU {MEMORY} via sealift: total {report['total_time_s']} s, downtime {report['downtime_ms']} ms, "
        f"{report['bytes_sent'] / 2**20:.0f} MiB, {report['stop_reason']}"
    )


def test_sealift_plain_transport_exposes_the_secret(insecure_cluster: LocalCluster, relay: Relay) -> None:
    """The positive control: the same capture finds the secret in clear."""
    start_guest(insecure_cluster.client("host-a"))
    report = migrate(insecure_cluster, secure=False, transport="sealift-plain")
    assert report["status"] == "completed" and report["transport"] == "sealift-plain"
    assert SECRET_PREFIX in relay.captured()
    after = info(insecure_cluster.client("host-b"))
    log = insecure_cluster.vm_root / "host-b" / "qemu" / f"{VM}.log"
    console = log.with_suffix(".console")
    assert after["status"] == "running", (
        after,
        log.read_text()[-1500:] if log.exists() else "no log",
        console.read_text()[-3000:] if console.exists() else "",
    )
    assert wait_counter(insecure_cluster.client("host-b"), report["counter_at_pause"] or 0, 30) > 0


def test_flipped_bit_aborts_and_guest_keeps_running_on_source(cluster: LocalCluster, relay: Relay) -> None:
    start_guest(cluster.client("host-a"))
    relay.tamper = Tamper(flip_offset=8 << 20)
    with pytest.raises(AgentRequestFailed, match="keeps running on host-a"):
        migrate(cluster)
    assert relay.tamper.done.is_set()
    assert_runs_on_source_only(cluster)


def test_destination_agent_killed_mid_migration(cluster: LocalCluster) -> None:
    start_guest(cluster.client("host-a"))
    killed = threading.Event()

    def on_event(event: dict) -> None:
        if event.get("event") == "transfer" and int(event.get("wire_bytes", 0)) > (8 << 20) and not killed.is_set():
            killed.set()
            cluster.kill("host-b")

    with pytest.raises(AgentRequestFailed, match="keeps running on host-a"):
        migrate(cluster, on_event=on_event, bandwidth_limit_bps=16 << 20)
    assert killed.is_set()
    assert_runs_on_source_only(cluster)


def test_a_pre_copy_past_its_completion_timeout_is_cancelled_and_the_guest_stays(cluster: LocalCluster) -> None:
    """At 4 MiB/s the first pass alone takes longer than the 3 s allowed: the source gives up before
    the switchover, the guest never stopped, and the destination keeps nothing."""
    start_guest(cluster.client("host-a"))
    with pytest.raises(AgentRequestFailed, match=r"completion timeout of 3 s \(\d+ passes; the guest dirties"):
        migrate(cluster, bandwidth_limit_bps=4 << 20, completion_timeout_s=3)
    assert_runs_on_source_only(cluster)


def test_qemu_migrations_prove_the_pairs_psk(cluster: LocalCluster) -> None:
    """The dynamic PSK is a second factor for QEMU guests too: a pair whose keys differ is refused."""
    from sealift.security.psk import new_psk, psk_to_hex

    cluster.client("host-a").request("psk.provision", peer="host-b", key=psk_to_hex(new_psk()))
    cluster.client("host-b").request("psk.provision", peer="host-a", key=psk_to_hex(new_psk()))
    src = cluster.client("host-a")
    start_guest(src)
    with pytest.raises(AgentRequestFailed, match="PSK"):
        migrate(cluster)
    assert info(src)["status"] == "running"
    assert VM not in names(cluster.client("host-b"))
    # With the same key on both hosts the migration goes, and the pair ratchets.
    key = psk_to_hex(new_psk())
    cluster.client("host-a").request("psk.provision", peer="host-b", key=key)
    cluster.client("host-b").request("psk.provision", peer="host-a", key=key)
    assert migrate(cluster)["status"] == "completed"
    assert VM in names(cluster.client("host-b"))


# -- direct transports (qemu-tls, plain) ------------------------------------------------


def assert_moved(cluster: LocalCluster, report: dict) -> None:
    """The guest runs on host-b, continuing from where it paused, and only there."""
    src, dst = cluster.client("host-a"), cluster.client("host-b")
    assert report["status"] == "completed", report
    assert VM not in names(src)
    after = info(dst)
    assert after["status"] == "running"
    paused = report["counter_at_pause"]
    assert paused is not None
    assert wait_counter(dst, paused, 30) > paused
    assert (wait_probe(after, 20) or 0) >= paused
    time.sleep(3)
    assert info(dst)["status"] == "running"  # ...and keeps running
    assert not list((cluster.vm_root / "host-a" / "qemu").glob("*.pid")), "a source QEMU is still there"


@pytest.mark.timeout(300)
def test_qemu_tls_transport_moves_the_guest(cluster: LocalCluster, relay: Relay) -> None:
    start_guest(cluster.client("host-a"))
    report = migrate(cluster, transport="qemu-tls")
    assert report["transport"] == "qemu-tls"
    assert_moved(cluster, report)
    assert report["bytes_sent"] > 16 << 20  # QEMU's own figure: the guest's memory went, by QEMU's connection
    assert len(relay.captured()) < 1 << 20  # ...not through the agents' channel (only the handover did)
    assert SECRET_PREFIX not in relay.captured()
    print(
        f"\nQEMU {MEMORY} via qemu-tls: total {report['total_time_s']} s, downtime {report['downtime_ms']} ms, "
        f"{report['bytes_sent'] / 2**20:.0f} MiB, {report['stop_reason']}"
    )


@pytest.mark.timeout(300)
def test_qemu_tls_with_a_certificate_from_another_ca_fails_and_the_guest_stays(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """host-b's QEMU credentials come from another CA: host-a's QEMU refuses them; nothing moves."""
    from sealift.security.identity import ClusterCA

    start_guest(cluster.client("host-a"))
    rogue = ClusterCA.init(tmp_path / "rogue-ca").issue_host("host-b", tmp_path / "rogue-pki")
    # The agent keeps its control-channel identity in memory; QEMU's credentials are read per migration.
    for name in ("host-b.pem", "host-b.key"):
        (cluster.pki / name).unlink()
    shutil.copy(rogue.cert_path, cluster.pki / "host-b.pem")
    shutil.copy(rogue.key_path, cluster.pki / "host-b.key")
    with pytest.raises(AgentRequestFailed, match="keeps running on host-a"):
        migrate(cluster, transport="qemu-tls")
    assert_runs_on_source_only(cluster)


def test_plain_transport_is_refused_without_allow_insecure(cluster: LocalCluster) -> None:
    start_guest(cluster.client("host-a"))
    with pytest.raises(AgentRequestFailed, match="allow_insecure"):
        migrate(cluster, secure=False, transport="plain")
    with pytest.raises(AgentRequestFailed, match="needs --insecure"):
        migrate(cluster, transport="plain")
    assert_runs_on_source_only(cluster)


@pytest.mark.timeout(300)
def test_plain_transport_is_refused_by_a_destination_without_allow_insecure(relay: Relay, guest_image: object) -> None:
    cluster = LocalCluster(
        allow_insecure=True,
        extra_config="step_timeout_s = 15\nhandshake_timeout_s = 5",
        peer_routes={("host-a", "host-b"): relay.address},
    )
    relay.target = cluster.addresses["host-b"]
    config = cluster.agents["host-b"].config_path
    config.write_text(config.read_text().replace("allow_insecure = true", "allow_insecure = false"))
    try:
        cluster.start()
        start_guest(cluster.client("host-a"))
        with pytest.raises(AgentRequestFailed, match="keeps running on host-a"):
            migrate(cluster, secure=False, transport="plain")
        assert_runs_on_source_only(cluster)
    finally:
        stop_guests(cluster)
        cluster.cleanup()


@pytest.mark.timeout(300)
def test_plain_transport_with_multifd_moves_the_guest(insecure_cluster: LocalCluster, relay: Relay) -> None:
    start_guest(insecure_cluster.client("host-a"))
    report = migrate(insecure_cluster, secure=False, transport="plain", multifd_channels=2)
    assert report["transport"] == "plain"
    assert "multifd 2 channels" in report["stop_reason"]
    assert_moved(insecure_cluster, report)
    assert len(relay.captured()) < 1 << 20  # QEMU went direct, not through the agents' channel


@pytest.mark.timeout(300)
def test_sealift_transport_with_multifd_moves_the_guest(cluster: LocalCluster, relay: Relay) -> None:
    """multifd through the channel: each QEMU channel on a data stream of its own, each keyed on its own."""
    start_guest(cluster.client("host-a"))
    report = migrate(cluster, multifd_channels=2)
    assert report["transport"] == "sealift"
    assert "multifd 2 channels" in report["stop_reason"]
    assert report["image_digest"].startswith("blake3-tags-x3:")  # main stream + 2 multifd streams, verified
    assert_moved(cluster, report)
    bulk = [len(session) for session in relay.sessions if len(session) > 1 << 20]
    assert len(bulk) >= 2, f"multifd's pages must cross in several streams: {[len(s) for s in relay.sessions]}"
    captured = relay.captured()
    assert len(captured) > 16 << 20 and SECRET_PREFIX not in captured
