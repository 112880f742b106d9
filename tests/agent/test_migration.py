"""Two real agents in separate processes migrate a running built-in VM.

Every byte between the agents passes through a relay in the path, which
records it, and in the failure tests cuts or corrupts it.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from sealift.agent.client import AgentClient, AgentRequestFailed
from sealift.backends.builtin.image import DEFAULT_SECRET
from sealift.cluster import LocalCluster
from sealift.lab.relay import Relay, Tamper

SECRET = DEFAULT_SECRET.encode()
SECRET_PREFIX = b"The bank amount transferred"
VM = "vm1"
CLUSTERS: list[LocalCluster] = []  # the active cluster, for signing orders


def make_cluster(relay: Relay, allow_insecure: bool = False) -> LocalCluster:
    cluster = LocalCluster(
        allow_insecure=allow_insecure,
        extra_config="step_timeout_s = 8\nresolve_interval_s = 0.5\nhandshake_timeout_s = 5",
        peer_routes={("host-a", "host-b"): relay.address},
    )
    relay.target = cluster.addresses["host-b"]
    cluster.start()
    CLUSTERS.append(cluster)
    return cluster


@pytest.fixture
def cluster(relay: Relay) -> Iterator[LocalCluster]:
    cluster = make_cluster(relay)
    yield cluster
    cluster.cleanup()


@pytest.fixture
def insecure_cluster(relay: Relay) -> Iterator[LocalCluster]:
    cluster = make_cluster(relay, allow_insecure=True)
    yield cluster
    cluster.cleanup()


def start_vm(client: AgentClient, memory: str = "64M", workload: str = "db") -> dict:
    vm = client.request("vm.start", name=VM, memory=memory, workload=workload)["vm"]
    time.sleep(0.3)
    return vm


def vm_names(client: AgentClient) -> list[str]:
    return [vm["name"] for vm in client.request("vm.list")["vms"]]


def assert_runs_on_source_only(cluster: LocalCluster) -> None:
    """After a failed migration: one copy, on host-a, unpaused and making progress."""
    src, dst = cluster.client("host-a"), cluster.client("host-b")
    assert VM not in vm_names(dst)
    first = src.request("vm.info", name=VM)["vm"]
    assert first["alive"] and not first["paused"] and not first["migrating"]
    time.sleep(0.3)
    second = src.request("vm.info", name=VM)["vm"]
    assert second["counter"] > first["counter"], "the guest on the source must keep running"
    assert not any(p.suffix == ".img" for p in (cluster.vm_root / "host-b").glob("*")), (
        "destination image not discarded"
    )


def migrate(client: AgentClient, on_event=None, **options: object) -> dict:
    """Run a migration of VM from host-a to host-b under a freshly signed order."""
    assert CLUSTERS, "a cluster fixture must be active"
    order = CLUSTERS[-1].order(VM, "host-a", "host-b")
    return client.request("migrate", vm=VM, to="host-b", options=options, order=order, on_event=on_event)["report"]


# -- the happy path -------------------------------------------------------------


def test_secure_migration_moves_the_running_vm(cluster: LocalCluster, relay: Relay) -> None:
    src, dst = cluster.client("host-a"), cluster.client("host-b")
    start_vm(src)
    events: list[dict] = []
    report = migrate(src, on_event=events.append)

    assert report["status"] == "completed"
    assert report["transport"] == "tls"
    assert report["rounds"] >= 2  # at least round 0 and the stop-and-copy round
    assert report["counter_before"] <= report["counter_at_pause"]
    # The guest continues exactly where it stopped...
    assert report["counter_after"] == report["counter_at_pause"]
    time.sleep(0.3)
    after = dst.request("vm.info", name=VM)["vm"]
    assert after["alive"] and after["counter"] > report["counter_at_pause"]
    # ...with its memory intact, and exactly one copy exists.
    check = dst.request("vm.check", name=VM)["check"]
    assert check["bad_page_count"] == 0 and check["secret_intact"]
    assert VM not in vm_names(src)
    assert report["image_digest"].startswith("tags:")
    assert {e["event"] for e in events} >= {"round", "phase"}
    assert [r["round"] for r in report["round_reports"]] == list(range(report["rounds"]))

    # The guest's secret never crossed the network in clear.
    captured = relay.captured()
    assert len(captured) > 32 << 20  # the relay did see the migration
    assert SECRET_PREFIX not in captured

    records = {m["role"]: m for m in src.request("migrations")["migrations"]}
    assert records["source"]["phase"] == "completed"
    assert dst.request("migrations")["migrations"][0]["phase"] == "running"


def test_plaintext_baseline_exposes_the_secret(insecure_cluster: LocalCluster, relay: Relay) -> None:
    """The positive control: the same capture finds the secret without protection."""
    src = insecure_cluster.client("host-a")
    start_vm(src)
    report = migrate(src, secure=False)
    assert report["status"] == "completed" and report["transport"] == "plain"
    assert SECRET_PREFIX in relay.captured()


def test_plaintext_needs_the_hosts_consent(cluster: LocalCluster) -> None:
    src = cluster.client("host-a")
    start_vm(src)
    with pytest.raises(AgentRequestFailed, match="plaintext migration is disabled"):
        migrate(src, secure=False)
    assert_runs_on_source_only(cluster)


# -- failures: the VM keeps running on the source -----------------------------------


def run_migration_in_thread(
    client: AgentClient, events: list[dict], **options: object
) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["report"] = migrate(client, on_event=events.append, **options)
        except AgentRequestFailed as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def test_killing_the_destination_during_precopy_leaves_the_vm_on_the_source(cluster: LocalCluster) -> None:
    src = cluster.client("host-a")
    start_vm(src)
    events: list[dict] = []
    # 64 MiB at 16 MiB/s: round 0 takes seconds, plenty of time to kill in it.
    thread, outcome = run_migration_in_thread(src, events, bandwidth_limit_bps=16 << 20)
    wait_for(lambda: any(e["event"] == "transfer" and e["wire_bytes"] > 4 << 20 for e in events))
    cluster.kill("host-b", signal.SIGKILL)
    thread.join(30)
    assert "error" in outcome, outcome
    assert "host-a" in outcome["error"] and "keeps running" in outcome["error"]
    cluster.start("host-b")  # a restarted destination discards what it had
    assert_runs_on_source_only(cluster)


def test_killing_the_destination_during_stop_and_copy_resumes_the_source(cluster: LocalCluster) -> None:
    src = cluster.client("host-a")
    start_vm(src, workload="stress")
    events: list[dict] = []
    # One round only, then a long stop-and-copy: the guest is paused while we kill.
    thread, outcome = run_migration_in_thread(src, events, bandwidth_limit_bps=8 << 20, max_rounds=1)
    wait_for(lambda: any(e["event"] == "round" and e["decision"] == "stop-and-copy" for e in events))
    time.sleep(0.3)
    assert src.request("vm.info", name=VM)["vm"]["paused"], "the guest should be paused in stop-and-copy"
    cluster.kill("host-b", signal.SIGKILL)
    thread.join(30)
    assert "error" in outcome, outcome
    cluster.start("host-b")
    assert_runs_on_source_only(cluster)


def test_cutting_the_link_aborts_and_the_vm_keeps_running(cluster: LocalCluster, relay: Relay) -> None:
    src = cluster.client("host-a")
    start_vm(src)
    events: list[dict] = []
    thread, outcome = run_migration_in_thread(src, events, bandwidth_limit_bps=16 << 20)
    wait_for(lambda: any(e["event"] == "transfer" and e["wire_bytes"] > 4 << 20 for e in events))
    relay.cut()
    thread.join(30)
    assert "error" in outcome, outcome
    wait_for(lambda: cluster.client("host-b").request("migrations")["migrations"][0]["phase"] == "aborted")
    assert_runs_on_source_only(cluster)


def test_a_corrupted_record_aborts_before_any_byte_reaches_the_image(cluster: LocalCluster, relay: Relay) -> None:
    src = cluster.client("host-a")
    start_vm(src)
    relay.tamper = Tamper(flip_offset=3 << 20)  # a bit in page data, 3 MiB into the stream
    with pytest.raises(AgentRequestFailed, match="keeps running on host-a"):
        migrate(src)
    assert relay.tamper.done.is_set()
    dst = cluster.client("host-b")
    wait_for(lambda: dst.request("migrations")["migrations"][0]["phase"] == "aborted")
    dst_record = dst.request("migrations")["migrations"][0]
    assert "authentication" in (dst_record["error"] or "")
    assert_runs_on_source_only(cluster)


def test_plaintext_baseline_accepts_tampered_memory(insecure_cluster: LocalCluster, relay: Relay) -> None:
    """Positive control for the test above: without AEAD the change goes through."""
    src, dst = insecure_cluster.client("host-a"), insecure_cluster.client("host-b")
    start_vm(src)
    relay.tamper = Tamper(replace=(SECRET_PREFIX, b"The bank amount STOLEN!!!!!"))
    report = migrate(src, secure=False)
    assert report["status"] == "completed" and relay.tamper.done.is_set()
    assert dst.request("vm.check", name=VM)["check"]["secret_intact"] is False


def test_a_recorded_session_replayed_to_the_destination_moves_nothing(cluster: LocalCluster, relay: Relay) -> None:
    """T4: an attacker on the path records a whole migration and plays it back later."""
    src, dst = cluster.client("host-a"), cluster.client("host-b")
    start_vm(src)
    assert migrate(src)["status"] == "completed"
    dst.request("vm.stop", name=VM)  # make room, so only the replay's own merit decides
    recorded = [bytes(s) for s in relay.sessions if s]
    assert len(recorded) >= 2  # the TLS control connection and the data stream
    before = len(dst.request("audit.show", limit=500)["entries"])
    for session in recorded:
        with socket.create_connection(cluster.addresses["host-b"]) as sock:
            sock.settimeout(5)
            try:
                sock.sendall(session)
                while sock.recv(65536):
                    pass
            except OSError:
                pass  # reset by the agent: fine
    time.sleep(0.5)
    assert VM not in vm_names(dst)
    accepted = dst.request("audit.show", kind="migration.accepted", limit=500)["entries"]
    assert len(accepted) == 1  # only the genuine migration, never the replay
    assert len(dst.request("audit.show", limit=500)["entries"]) == before  # nothing even reached the protocol
