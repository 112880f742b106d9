"""Live revocation with real agents: a host or operator revoked while a migration runs stops it at once.

The guest is large and busy and the migration bandwidth-limited, so that it
would run for about ten seconds; a few seconds in, the CA revokes a
certificate the migration relies on and the agents pick the new CRL up by
themselves (the file changed) or on SIGHUP. The migration must fail with
`certificate_revoked` long before it would have finished, the guest keep
running on the source, the destination keep nothing, and a new migration be
refused at once.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from sealift.agent.client import AgentRequestFailed
from sealift.cluster import LocalCluster
from sealift.security.identity import HostIdentity
from sealift.security.operators import OperatorIdentity
from sealift.security.orders import create_order

VM = "vm1"
# ~64 MiB of hot pages rewritten at ~80 MB/s against a 24 MiB/s link: pre-copy never
# converges, so the migration runs its five rounds (~10 s) unless something stops it.
SLOW = {"bandwidth_limit_bps": 24 << 20, "max_rounds": 4}
RUNNING_BEFORE_REVOKE_S = 2.5


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    """Both agents read the CA's own CRL file (pki/ca.crl.pem), as after copying it to every host."""
    cluster = LocalCluster(extra_config="step_timeout_s = 8\nresolve_interval_s = 0.5")
    yield cluster
    cluster.cleanup()


@pytest.fixture
def cluster_without_crl_at_source() -> Iterator[LocalCluster]:
    """The source's crl names a file nobody writes: only the destination learns of a revocation."""
    cluster = LocalCluster(
        extra_config="step_timeout_s = 8\nresolve_interval_s = 0.5", host_config={"host-a": 'crl = "no-crl-here.pem"'}
    )
    yield cluster
    cluster.cleanup()


@dataclass
class Run:
    """A migration running in a thread, timed."""

    started: float = 0.0
    first_transfer: float = 0.0
    ended: float = 0.0
    error: AgentRequestFailed | None = None
    report: dict | None = None
    events: list[dict] = field(default_factory=list)


def start_migration(cluster: LocalCluster, order: str) -> tuple[Run, threading.Thread]:
    run = Run()

    def on_event(event: dict) -> None:
        if event.get("event") == "transfer" and not run.first_transfer:
            run.first_transfer = time.monotonic()
        run.events.append(event)

    def migrate() -> None:
        run.started = time.monotonic()
        try:
            run.report = cluster.client("host-a").request(
                "migrate", on_event=on_event, vm=VM, to="host-b", options=SLOW, order=order
            )["report"]
        except AgentRequestFailed as exc:
            run.error = exc
        run.ended = time.monotonic()

    thread = threading.Thread(target=migrate)
    thread.start()
    deadline = time.monotonic() + 30
    while not run.first_transfer:
        assert time.monotonic() < deadline and thread.is_alive(), "the migration never started sending"
        time.sleep(0.02)
    time.sleep(RUNNING_BEFORE_REVOKE_S)
    assert thread.is_alive(), f"the migration ended before the revocation: {run.report or run.error}"
    return run, thread


def assert_guest_runs_on_source_only(cluster: LocalCluster) -> None:
    client = cluster.client("host-a")
    before = client.request("vm.info", name=VM)["vm"]
    time.sleep(0.5)
    after = client.request("vm.info", name=VM)["vm"]
    assert after["alive"] and not after["paused"]
    assert after["counter"] > before["counter"], "the guest does not run on the source"
    assert not cluster.client("host-b").request("vm.list")["vms"]
    assert not list((cluster.vm_root / "host-b").glob("*.img")), "the destination kept an image"


def audit(cluster: LocalCluster, host: str, kind: str) -> list[dict]:
    return [e["fields"] for e in cluster.client(host).request("audit.show", kind=kind, limit=50)["entries"]]


def test_revoking_the_destination_stops_the_running_migration_at_the_source(cluster: LocalCluster) -> None:
    cluster.start()
    cluster.client("host-a").request("vm.start", name=VM, memory="256M", workload="db")
    run, thread = start_migration(cluster, cluster.order(VM, "host-a", "host-b"))

    revoked_at = time.monotonic()
    cluster.ca.revoke(HostIdentity.load(cluster.pki, "host-b").certificate(), "key_compromise")  # the agents' CRL
    thread.join(30)
    assert not thread.is_alive()
    running_s, stopped_after_s = revoked_at - run.started, run.ended - revoked_at
    print(f"\nmigration ran {running_s:.1f} s, revoked, failed {stopped_after_s:.2f} s later: {run.error}")

    assert run.error is not None, f"the migration completed: {run.report}"
    assert run.error.code == "certificate_revoked", run.error
    assert "host-b" in str(run.error) and "revoked" in str(run.error)
    assert stopped_after_s < 6.0  # about a second to notice the file, then at once (it would run ~8 s more)
    assert_guest_runs_on_source_only(cluster)

    # The audit: the reload, what it stopped, and the abort with its code.
    reloaded = audit(cluster, "host-a", "crl.reloaded")
    assert reloaded and reloaded[-1]["entries"] == 1 and reloaded[-1]["trigger"] == "file changed"
    (stopped,) = audit(cluster, "host-a", "migration.revoked")
    aborted = audit(cluster, "host-a", "migration.aborted")[-1]
    assert aborted["migration_id"] == stopped["migration_id"] and aborted["code"] == "certificate_revoked"
    assert aborted["resumed"] is True
    assert not audit(cluster, "host-a", "migration.handover")
    # The destination's record names the same cause (the source's Abort), not the broken stream it saw.
    assert audit(cluster, "host-b", "migration.aborted")[-1]["code"] == "certificate_revoked"

    # A new migration to the revoked host is refused at once, after the handshake.
    started = time.monotonic()
    with pytest.raises(AgentRequestFailed, match="revoked") as refused:
        cluster.migrate(VM, "host-a", "host-b")
    assert refused.value.code == "certificate_revoked" and time.monotonic() - started < 5
    assert "revoked" in audit(cluster, "host-a", "peer.refused")[-1]["reason"]
    assert_guest_runs_on_source_only(cluster)


def test_revoking_the_operator_stops_the_migration_at_the_destination_too(
    cluster_without_crl_at_source: LocalCluster,
) -> None:
    """Only the destination gets the new CRL (on SIGHUP); it stops receiving, and the source learns why."""
    cluster = cluster_without_crl_at_source
    cluster.start()
    cluster.client("host-a").request("vm.start", name=VM, memory="256M", workload="db")
    mallory: OperatorIdentity = cluster.ca.issue_operator("mallory", "admin", cluster.operators)
    run, thread = start_migration(cluster, create_order(mallory, VM, "host-a", "host-b"))

    revoked_at = time.monotonic()
    cluster.ca.revoke(mallory.certificate(), "key_compromise")
    process = cluster.agents["host-b"].process
    assert process is not None
    process.send_signal(signal.SIGHUP)  # reload now rather than at the next poll
    thread.join(30)
    assert not thread.is_alive()
    running_s, stopped_after_s = revoked_at - run.started, run.ended - revoked_at
    print(f"\nmigration ran {running_s:.1f} s, operator revoked, failed {stopped_after_s:.2f} s later: {run.error}")

    assert run.error is not None, f"the migration completed: {run.report}"
    assert run.error.code == "certificate_revoked", run.error
    assert "mallory" in str(run.error)
    assert stopped_after_s < 6.0
    assert_guest_runs_on_source_only(cluster)

    assert "sighup" in [entry["trigger"] for entry in audit(cluster, "host-b", "crl.reloaded")]
    (stopped,) = audit(cluster, "host-b", "migration.revoked")
    aborted = audit(cluster, "host-b", "migration.aborted")[-1]
    assert aborted["migration_id"] == stopped["migration_id"] and aborted["code"] == "certificate_revoked"
    assert not audit(cluster, "host-a", "crl.reloaded")  # the source had no CRL: the destination stopped it

    # Mallory's next order is refused by the destination at once.
    with pytest.raises(AgentRequestFailed, match="revoked"):
        cluster.client("host-a").request(
            "migrate", vm=VM, to="host-b", options={}, order=create_order(mallory, VM, "host-a", "host-b")
        )
    assert_guest_runs_on_source_only(cluster)
