"""libvirt domains migrated between two real libvirtds through two real sealift agents (issue 19).

Each simulated host has its own libvirtd in its own mount namespace
(backends/libvirt/lab.py); the agents run on loopback with a relay in the
path that records every byte between them. libvirt's three connections
(its RPC, QEMU's memory stream, the disk's NBD copy) go only through the
agents: the destination libvirtd listens on no network.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from sealift.agent.client import AgentClient, AgentRequestFailed, AgentUnavailable
from sealift.backends.libvirt.lab import IMAGES_DIR, LibvirtLabHost, define_test_domain
from sealift.cluster import LocalCluster
from sealift.lab.relay import Relay, Tamper

SECRET_PREFIX = b"The bank amount transferred"  # in the guest's memory (backends/qemu/image.py)
DISK_SECRET = b"slv-disk-secret: the payroll file of 2026 lives in this block" * 8
VM = "lvm"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LibvirtLabHost]]:
    root = Path("/tmp") / f"slv-lv-{time.monotonic_ns() % 10**8}"  # short: unix socket paths are limited
    lab = {name: LibvirtLabHost(name, root / name[-1]) for name in ("host-a", "host-b")}
    try:
        for host in lab.values():
            host.start()
        yield lab
    finally:
        for host in lab.values():
            host.stop()
        root.rmdir() if root.exists() and not any(root.iterdir()) else None


@pytest.fixture
def cluster(hosts: dict[str, LibvirtLabHost], relay: Relay) -> Iterator[LocalCluster]:
    yield from agents(hosts, relay)


@pytest.fixture
def direct_cluster(hosts: dict[str, LibvirtLabHost]) -> Iterator[LocalCluster]:
    """host-a reaches host-b without a relay in between."""
    yield from agents(hosts, None)


def agents(hosts: dict[str, LibvirtLabHost], relay: Relay | None) -> Iterator[LocalCluster]:
    config = {  # dotted keys: the [libvirt] table without a header, so the top-level keys after it stay top-level
        name: "".join(f'libvirt.{key} = "{value}"\n' for key, value in host.agent_settings().items())
        for name, host in hosts.items()
    }
    cluster = LocalCluster(
        extra_config="step_timeout_s = 15\nresolve_interval_s = 0.5",
        host_config=config,
        peer_routes={("host-a", "host-b"): relay.address} if relay is not None else {},
    )
    if relay is not None:
        relay.target = cluster.addresses["host-b"]
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        for host in hosts.values():
            host.kill_domains()
            for leftover in [*host.images.iterdir(), *host.local_path("/var/log/libvirt").glob("*.console")]:
                leftover.unlink()  # disks and consoles: the next test's domain starts afresh
        cluster.cleanup()


def conn(host: LibvirtLabHost) -> libvirt.virConnect:
    return libvirt.open(host.uri)


def domain_state(host: LibvirtLabHost, name: str = VM) -> str | None:
    c = conn(host)
    try:
        state = c.lookupByName(name).state()[0]
    except libvirt.libvirtError:
        return None
    finally:
        c.close()
    return {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused"}.get(state, str(state))


def wait_counter(client: AgentClient, above: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    value = -1
    while time.monotonic() < deadline:
        vms = {vm["name"]: vm for vm in client.request("vm.list")["vms"]}
        value = (vms.get(VM) or {}).get("counter") or -1
        if value > above:
            return int(value)
        time.sleep(0.25)
    raise AssertionError(f"{VM}'s counter did not pass {above} within {timeout:.0f} s (last {value})")


def start_domain(hosts: dict[str, LibvirtLabHost], client: AgentClient) -> str:
    uuid = define_test_domain(hosts["host-a"], VM, memory_mib=96, disk_seed=DISK_SECRET)
    wait_counter(client, 0, 60)
    return uuid


def audit(client: AgentClient, kind: str) -> list[dict]:
    return client.request("audit.show", kind=kind, limit=20)["entries"]


def test_no_valid_order_moves_nothing_then_a_signed_one_migrates_the_domain_live(
    hosts: dict[str, LibvirtLabHost], cluster: LocalCluster, relay: Relay
) -> None:
    """One booted domain for both (a boot under TCG costs ~15 s of the test budget)."""
    a, b = cluster.client("host-a"), cluster.client("host-b")
    uuid = start_domain(hosts, a)
    listed = {vm["name"]: vm for vm in a.request("vm.list")["vms"]}
    assert listed[VM]["backend"] == "libvirt" and listed[VM]["status"] == "running"
    first = wait_counter(a, 0, 30)

    # Without a valid order: refused before the source even calls the destination; nothing moves.
    wrong = cluster.order("another-vm", "host-a", "host-b")  # signed, but for another VM
    with pytest.raises(AgentRequestFailed) as refused:
        a.request("migrate", vm=VM, to="host-b", options={}, order=wrong)
    assert "order" in str(refused.value)
    assert domain_state(hosts["host-a"]) == "running" and domain_state(hosts["host-b"]) is None
    assert not (hosts["host-b"].images / f"{VM}.qcow2").exists()
    assert relay.connections == 0
    before = wait_counter(a, first, 30)  # and it kept running

    report = cluster.migrate(VM, "host-a", "host-b")

    assert report["status"] == "completed", report
    assert domain_state(hosts["host-b"]) == "running"
    assert domain_state(hosts["host-a"]) is None  # undefined at the source
    assert wait_counter(b, before, 30) > before  # the guest's counter goes on at the destination
    assert "libvirt: total" in report["stop_reason"] and "control 1" in report["stop_reason"]
    # The disk: libvirt's NBD copy, through the agents, is the source's disk block for block.
    source_disk = hosts["host-a"].local_path(f"{IMAGES_DIR}/{VM}.qcow2")
    dest_disk = hosts["host-b"].local_path(f"{IMAGES_DIR}/{VM}.qcow2")
    compare = subprocess.run(
        ["qemu-img", "compare", "-U", str(source_disk), str(dest_disk)], capture_output=True, text=True
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr
    # The destination's signed running receipt names the domain's UUID; both sides audit libvirt's job.
    handover = [e for e in audit(b, "migration.handover") if e["fields"]["migration_id"] == report["migration_id"]]
    receipt = json.loads(handover[0]["fields"]["receipt"])
    assert receipt["payload"]["stage"] == "running" and receipt["payload"]["domain_uuid"] == uuid
    assert receipt["signer"] == "host-b" and receipt["signature"]
    job = audit(a, "libvirt.job_stats")[0]["fields"]
    assert job["memory_processed"] > 0 and job["disk_total"] == 32 << 20
    # The capture between the hosts: megabytes of guest memory and disk, none of it readable.
    captured = relay.captured()
    assert len(captured) > 8 << 20
    assert SECRET_PREFIX not in captured and DISK_SECRET[:40] not in captured
    print(
        f"\nlibvirt 96 MiB + 32 MiB disk via sealift: total {report['total_time_s']} s, "
        f"downtime {report['downtime_ms']} ms, {len(captured) >> 20} MiB between the agents; {report['stop_reason']}"
    )


def test_destination_agent_killed_mid_migration_leaves_the_domain_on_the_source(
    hosts: dict[str, LibvirtLabHost], direct_cluster: LocalCluster
) -> None:
    cluster = direct_cluster
    a = cluster.client("host-a")
    start_domain(hosts, a)
    before = wait_counter(a, 0, 30)
    killed: list[float] = []

    def on_event(event: dict) -> None:
        # libvirt is copying (disk or memory) at 1 MiB/s: kill the destination's agent there.
        if event.get("event") == "transfer" and not killed:
            killed.append(time.monotonic())
            cluster.kill("host-b")

    with pytest.raises(AgentRequestFailed) as failed:
        cluster.migrate(VM, "host-a", "host-b", options={"bandwidth_limit_bps": 1 << 20}, on_event=on_event)
    logs = {host: agent.log_path.read_text()[-3000:] for host, agent in cluster.agents.items()}
    assert killed, f"the migration never reported progress: {failed.value}; {logs}"
    assert domain_state(hosts["host-a"]) == "running"
    assert wait_counter(a, before, 30) > before
    # libvirt drops its half-received domain when the source's connection goes: no second copy.
    deadline = time.monotonic() + 30
    while domain_state(hosts["host-b"]) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert domain_state(hosts["host-b"]) is None
    records = a.request("migrations")["migrations"]
    assert records[0]["phase"] == "aborted"


def test_a_flipped_bit_in_a_carried_stream_aborts_and_keeps_the_domain_on_the_source(
    hosts: dict[str, LibvirtLabHost], cluster: LocalCluster, relay: Relay
) -> None:
    a = cluster.client("host-a")
    start_domain(hosts, a)
    before = wait_counter(a, 0, 30)
    relay.tamper = Tamper(flip_offset=2 << 20)  # inside the disk copy and the memory stream, whichever comes first

    with pytest.raises(AgentRequestFailed) as failed:
        cluster.migrate(VM, "host-a", "host-b")

    assert relay.tamper.done.is_set()  # the bit was flipped on its way
    # The destination's carrier refused the record (AEAD); which error reaches the source first varies.
    assert "(record_auth_failed)" in cluster.agents["host-b"].log_path.read_text(), failed.value
    assert domain_state(hosts["host-a"]) == "running"
    assert wait_counter(a, before, 30) > before
    deadline = time.monotonic() + 30
    while domain_state(hosts["host-b"]) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert domain_state(hosts["host-b"]) is None  # libvirt dropped the half-received domain: one copy


def test_a_called_off_migration_never_destroys_a_domain_libvirt_handed_over(
    hosts: dict[str, LibvirtLabHost],
) -> None:
    """The keeper's discard (what the resolver and the restart recovery call when the source says the
    migration was called off) on the destination: a domain libvirt finished handing over (persistent,
    PERSIST_DEST) may be the only copy, so it stays, paused and busy; an incoming one libvirt never
    finished (transient) is destroyed. Without the guard the lab's T11 switchover rows lost the guest."""
    from sealift.backends.libvirt.keeper import LibvirtKeeper
    from sealift.backends.libvirt.registry import LibvirtRegistry
    from sealift.host.config import LibvirtConfig
    from sealift.host.store import MigrationRecord

    host = hosts["host-b"]
    name = "lvkeep"
    define_test_domain(host, name, memory_mib=64, disk_mib=8)
    registry = LibvirtRegistry(LibvirtConfig(uri=host.uri), "host-b")
    keeper = LibvirtKeeper(registry)
    record = MigrationRecord(
        id="m-keep",
        vm=name,
        role="destination",
        peer="host-a",
        phase="aborted",
        backend="libvirt",
        decision=None,
        memory_bytes=64 << 20,
        created_at=0.0,
        updated_at=0.0,
        error=None,
        report=None,
    )
    c = conn(host)
    try:
        dom = c.lookupByName(name)
        dom.suspend()  # as an incoming domain waits for Commit (VIR_MIGRATE_PAUSED)
        registry.claim(name)
        keeper.discard_destination(record)
        assert domain_state(host, name) == "paused" and dom.isPersistent()
        assert registry.is_busy(name)  # held for the operator, not offered for another migration
        dom.undefine()  # now transient: like libvirt's own incoming domain before its Finish
        keeper.discard_destination(record)
        assert domain_state(host, name) is None  # destroyed: the source still runs the guest
        assert not registry.is_busy(name)
    finally:
        try:
            leftover = c.lookupByName(name)
            if leftover.isActive():
                leftover.destroy()
            if leftover.isPersistent():
                leftover.undefine()
        except libvirt.libvirtError:
            pass
        c.close()
        registry.close()


# -- failures right after libvirt's switchover (T11): the source's copy has quit; the guest must run at host-b --

SWITCHED_OVER = ("handed-over", "stop-and-copy")  # the phase the source enters once migrateToURI3 returned


def migrate_and_strike(cluster: LocalCluster, strike: Callable[[], None]) -> Exception:
    """Migrate lvm to host-b and run `strike` the moment the source says libvirt's switchover is done."""
    struck: list[str] = []

    def on_event(event: dict) -> None:
        if event.get("event") == "phase" and event.get("phase") in SWITCHED_OVER and not struck:
            struck.append(str(event["phase"]))
            strike()

    with pytest.raises((AgentRequestFailed, AgentUnavailable)) as failed:  # unavailable: the source was killed
        cluster.migrate(VM, "host-a", "host-b", on_event=on_event)
    assert struck, f"the switchover was never reported: {failed.value}"
    return failed.value


def assert_runs_once_at_host_b(hosts: dict[str, LibvirtLabHost], cluster: LocalCluster, before: int) -> None:
    """Exactly one running copy, at host-b, its counter going on; host-a's stopped definition released."""
    b = cluster.client("host-b")
    logs = lambda: {h: agent.log_path.read_text()[-2500:] for h, agent in cluster.agents.items()}  # noqa: E731
    deadline = time.monotonic() + 60
    while domain_state(hosts["host-b"]) != "running" and time.monotonic() < deadline:
        time.sleep(0.25)
    assert domain_state(hosts["host-b"]) == "running", logs()
    assert wait_counter(b, before, 30) > before  # the guest's memory came through: its counter goes on
    deadline = time.monotonic() + 30
    while domain_state(hosts["host-a"]) is not None and time.monotonic() < deadline:
        time.sleep(0.25)
    assert domain_state(hosts["host-a"]) is None, logs()  # the source's resolver released (undefined) its copy
    source = cluster.client("host-a").request("migrations")["migrations"][0]
    assert (source["phase"], source["decision"]) == ("completed", "committed"), source


def test_a_link_cut_right_after_libvirts_switchover_completes_the_migration_at_the_destination(
    hosts: dict[str, LibvirtLabHost], cluster: LocalCluster, relay: Relay
) -> None:
    """Before the fix the source recorded "aborted" and the destination discarded the only copy."""
    a = cluster.client("host-a")
    start_domain(hosts, a)
    before = wait_counter(a, 0, 30)

    failed = migrate_and_strike(cluster, relay.cut)

    assert "libvirt had already handed" in str(failed), failed
    time.sleep(1.0)
    relay.restore()  # host-a's resolver reaches host-b again (host-b reaches host-a without the relay)
    assert_runs_once_at_host_b(hosts, cluster, before)
    held = audit(cluster.client("host-b"), "libvirt.handed_over")[0]["fields"]
    assert any("memory" in c and "authenticated END" in c for c in held["checked"]), held


def test_the_source_agent_killed_right_after_libvirts_switchover_and_restarted_leaves_the_domain_at_the_destination(
    hosts: dict[str, LibvirtLabHost], direct_cluster: LocalCluster
) -> None:
    """The restarted source reads libvirt's word (shut off, reason migrated) or its own handed-over record."""
    cluster = direct_cluster
    start_domain(hosts, cluster.client("host-a"))
    before = wait_counter(cluster.client("host-a"), 0, 30)

    migrate_and_strike(cluster, lambda: cluster.kill("host-a"))
    cluster.start("host-a")

    assert_runs_once_at_host_b(hosts, cluster, before)


def test_the_destination_agent_killed_right_after_libvirts_switchover_and_restarted_runs_the_domain(
    hosts: dict[str, LibvirtLabHost], direct_cluster: LocalCluster
) -> None:
    """The restarted destination finds the paused domain libvirt handed over and asks the source."""
    cluster = direct_cluster
    start_domain(hosts, cluster.client("host-a"))
    before = wait_counter(cluster.client("host-a"), 0, 30)

    migrate_and_strike(cluster, lambda: cluster.kill("host-b"))
    cluster.start("host-b")

    assert_runs_once_at_host_b(hosts, cluster, before)
