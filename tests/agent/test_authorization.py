"""Control-plane attacks on real agents: each is refused, audited, and the VM stays put.

host-c has a perfectly valid host certificate from the cluster CA; it plays
the insider host of THREATS.md T5/T6. Orders come from the cluster's admin
unless a test signs one with another operator.
"""

from __future__ import annotations

import datetime
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator

import pytest

from sealift.agent.client import AgentRequestFailed
from sealift.cluster import LocalCluster
from sealift.host.transport import ControlChannel
from sealift.security.identity import HostIdentity
from sealift.security.orders import create_order
from sealift.security.tls import TlsStream, server_context
from sealift.wire.messages import Hello, Refuse

VM = "vm1"


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster(hosts=("host-a", "host-b", "host-c"), extra_config="step_timeout_s = 8\nmax_incoming = 2")
    cluster.start()
    cluster.client("host-a").request("vm.start", name=VM, memory="32M", workload="web")
    yield cluster
    cluster.cleanup()


def refusals(cluster: LocalCluster, host: str) -> list[dict]:
    return cluster.client(host).request("audit.show", kind="order.refused", limit=50)["entries"]


def assert_vm_runs_on_source(cluster: LocalCluster) -> None:
    info = cluster.client("host-a").request("vm.info", name=VM)["vm"]
    assert info["alive"] and not info["paused"] and not info["migrating"]
    for other in ("host-b", "host-c"):
        assert VM not in [v["name"] for v in cluster.client(other).request("vm.list")["vms"]]


def migrate(cluster: LocalCluster, order: str | None, to: str = "host-b") -> dict:
    return cluster.client("host-a").request("migrate", vm=VM, to=to, options={}, order=order)["report"]


def hello_as(cluster: LocalCluster, attacker: str, target: str, order: str | None, vm: str = VM) -> object:
    """A host with a valid certificate speaks the protocol directly, bypassing its own agent."""
    identity = HostIdentity.load(cluster.pki, attacker)
    channel = ControlChannel.connect(cluster.addresses[target], identity, target, secure=True, timeout=5)
    try:
        channel.send(
            Hello(
                migration_id=secrets.token_hex(16),
                vm_name=vm,
                source_host=attacker,
                destination_host=target,
                nonce=secrets.token_bytes(32),
                memory_bytes=32 << 20,
                page_size=4096,
                secure=True,
                compression=None,
                streams=1,
                backend="builtin",
                order=order,
                psk_proof=None,
            )
        )
        return channel.recv(5)
    finally:
        channel.close()


# -- T5: pulling a VM to a host that has no order for it ------------------------------


def test_a_migration_without_an_order_is_refused(cluster: LocalCluster) -> None:
    with pytest.raises(AgentRequestFailed, match="no migration order"):
        migrate(cluster, order=None)
    assert refusals(cluster, "host-a")[0]["fields"]["code"] == "malformed"
    assert_vm_runs_on_source(cluster)


def test_an_order_for_another_destination_cannot_pull_the_vm_elsewhere(cluster: LocalCluster) -> None:
    order_for_b = cluster.order(VM, "host-a", "host-b")
    with pytest.raises(AgentRequestFailed, match="host-b"):
        migrate(cluster, order_for_b, to="host-c")
    assert refusals(cluster, "host-a")[0]["fields"]["code"] == "wrong_destination"
    assert_vm_runs_on_source(cluster)


def test_a_host_answering_for_the_destination_is_not_accepted() -> None:
    """Route hijack (T3/T5): host-a's route to host-b leads to host-c, whose certificate is valid."""
    impostor = socket.create_server(("127.0.0.1", 0))
    cluster = LocalCluster(hosts=("host-a", "host-b"), peer_routes={("host-a", "host-b"): impostor.getsockname()[:2]})
    host_c = cluster.ca.issue_host("host-c", cluster.pki)

    def serve() -> None:
        conn, _ = impostor.accept()
        try:
            TlsStream.accept(conn, server_context(host_c), timeout=5)
        except Exception:  # the victim hangs up once it sees the name
            pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        cluster.start()
        cluster.client("host-a").request("vm.start", name=VM, memory="32M", workload="web")
        with pytest.raises(AgentRequestFailed, match="host-c"):
            migrate(cluster, cluster.order(VM, "host-a", "host-b"))
        info = cluster.client("host-a").request("vm.info", name=VM)["vm"]
        assert info["alive"] and not info["paused"]
    finally:
        impostor.close()
        cluster.cleanup()


# -- T6: pushing VMs to a victim host ----------------------------------------------


def test_a_host_with_a_valid_certificate_cannot_push_without_an_order(cluster: LocalCluster) -> None:
    reply = hello_as(cluster, "host-c", "host-b", order=None)
    assert isinstance(reply, Refuse) and "no migration order" in reply.reason
    assert refusals(cluster, "host-b")[0]["fields"]["side"] == "destination"
    assert not cluster.client("host-b").request("vm.list")["vms"]


def test_an_order_cannot_be_lent_to_another_source(cluster: LocalCluster) -> None:
    """host-c replays host-a's order as if it were the source: the TLS identity must match."""
    order = cluster.order(VM, "host-a", "host-b")
    reply = hello_as(cluster, "host-c", "host-b", order=order)
    assert isinstance(reply, Refuse) and "host-a" in reply.reason
    assert refusals(cluster, "host-b")[0]["fields"]["code"] == "wrong_source"


def test_a_push_flood_is_capped(cluster: LocalCluster) -> None:
    """Even with valid orders, a host takes at most max_incoming at once (2 here)."""
    names = [f"flood{i}" for i in range(4)]
    identity = HostIdentity.load(cluster.pki, "host-c")
    held, outcomes = [], []
    try:
        for name in names:
            channel = ControlChannel.connect(cluster.addresses["host-b"], identity, "host-b", secure=True, timeout=5)
            held.append(channel)
            channel.send(
                Hello(
                    migration_id=secrets.token_hex(16),
                    vm_name=name + "x",
                    source_host="host-c",
                    destination_host="host-b",
                    nonce=secrets.token_bytes(32),
                    memory_bytes=32 << 20,
                    page_size=4096,
                    secure=True,
                    compression=None,
                    streams=1,
                    backend="builtin",
                    order=cluster.order(name + "x", "host-c", "host-b"),
                    psk_proof=None,
                )
            )
            outcomes.append(channel.recv(5))
    finally:
        for channel in held:
            channel.close()
    kinds = [type(o).__name__ for o in outcomes]
    assert kinds[:2] == ["Accept", "Accept"] and set(kinds[2:]) == {"Refuse"}
    assert all("limit 2" in o.reason for o in outcomes[2:]), [getattr(o, "reason", o) for o in outcomes]
    time.sleep(0.5)
    assert cluster.client("host-b").request("status")["status"]["host"] == "host-b"  # still serving


# -- T4: replay -----------------------------------------------------------------


def test_a_used_order_is_refused_also_after_an_agent_restart(cluster: LocalCluster) -> None:
    order = cluster.order(VM, "host-a", "host-b")
    assert migrate(cluster, order)["status"] == "completed"
    # The VM is on host-b now; an order to bring it back, used once...
    back = cluster.order(VM, "host-b", "host-a")
    assert (
        cluster.client("host-b").request("migrate", vm=VM, to="host-a", options={}, order=back)["report"]["status"]
        == "completed"
    )
    # ...the first order cannot be replayed, neither now nor after restarting the agent.
    with pytest.raises(AgentRequestFailed, match="already used"):
        migrate(cluster, order)
    cluster.kill("host-a")
    cluster.start("host-a")
    with pytest.raises(AgentRequestFailed, match="already used"):
        migrate(cluster, order)
    assert refusals(cluster, "host-a")[0]["fields"]["code"] == "replayed"
    assert_vm_runs_on_source(cluster)


def test_the_destination_keeps_its_own_replay_cache(cluster: LocalCluster) -> None:
    """A source that replays an order straight to the destination is refused there."""
    order = cluster.order(VM, "host-a", "host-b")
    assert migrate(cluster, order)["status"] == "completed"
    reply = hello_as(cluster, "host-a", "host-b", order=order, vm=VM)
    assert isinstance(reply, Refuse)
    assert "already used" in reply.reason or "already exists" in reply.reason


def test_an_expired_order_is_refused(cluster: LocalCluster) -> None:
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=10)
    order = create_order(cluster.operator, VM, "host-a", "host-b", ttl_s=60, not_before=past)
    with pytest.raises(AgentRequestFailed, match="expired"):
        migrate(cluster, order)
    assert refusals(cluster, "host-a")[0]["fields"]["code"] == "expired"
    assert_vm_runs_on_source(cluster)


# -- T10: operators and audit -----------------------------------------------------


def test_an_operator_without_the_role_is_refused(cluster: LocalCluster) -> None:
    auditor = cluster.ca.issue_operator("eve", "auditor", cluster.operators)
    order = create_order(auditor, VM, "host-a", "host-b")
    with pytest.raises(AgentRequestFailed, match="auditor|not allowed|denied"):
        migrate(cluster, order)
    refusal = refusals(cluster, "host-a")[0]["fields"]
    assert refusal["code"] == "denied_by_policy"
    assert_vm_runs_on_source(cluster)


def test_a_forged_order_is_refused(cluster: LocalCluster) -> None:
    order = cluster.order(VM, "host-a", "host-b").replace('"host-b"', '"host-c"')
    with pytest.raises(AgentRequestFailed):
        migrate(cluster, order, to="host-c")
    assert refusals(cluster, "host-a")
    assert_vm_runs_on_source(cluster)


def test_editing_the_audit_log_is_detected_and_named(cluster: LocalCluster) -> None:
    assert migrate(cluster, cluster.order(VM, "host-a", "host-b"))["status"] == "completed"
    client = cluster.client("host-a")
    assert client.request("audit.verify")["verification"]["ok"]
    db = cluster.agents["host-a"].config_path.parent / "audit.sqlite3"
    with sqlite3.connect(db) as conn:
        triggers = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")]
        for trigger in triggers:  # an attacker with the file drops the guards first
            conn.execute(f"DROP TRIGGER {trigger}")
        seq = conn.execute("SELECT seq FROM audit_log WHERE kind='migration.completed'").fetchone()[0]
        conn.execute("UPDATE audit_log SET body = replace(body, 'host-b', 'host-x') WHERE seq = ?", (seq,))
    verification = client.request("audit.verify")["verification"]
    assert not verification["ok"]
    assert seq in [p["seq"] for p in verification["problems"]]


# -- T13: revocation ------------------------------------------------------------


def test_a_revoked_source_host_is_refused_by_the_destination(cluster: LocalCluster) -> None:
    host_a_cert = HostIdentity.load(cluster.pki, "host-a").certificate()
    cluster.ca.revoke(host_a_cert, "key_compromise")  # writes pki/ca.crl.pem, where agents look
    cluster.kill("host-b")
    cluster.start("host-b")  # loads the new CRL
    with pytest.raises(AgentRequestFailed):
        migrate(cluster, cluster.order(VM, "host-a", "host-b"))
    assert_vm_runs_on_source(cluster)
    refused = cluster.client("host-b").request("audit.show", kind="peer.refused")["entries"]
    assert refused and "revoked" in refused[0]["fields"]["reason"]


def test_a_host_without_free_vcpus_refuses_at_admission(tmp_path) -> None:
    cluster = LocalCluster(extra_config="vcpu_capacity = 1")
    try:
        cluster.start()
        cluster.client("host-a").request("vm.start", name=VM, memory="32M", workload="idle")
        cluster.client("host-b").request("vm.start", name="resident", memory="32M", workload="idle")
        with pytest.raises(AgentRequestFailed, match="vCPU"):
            migrate(cluster, cluster.order(VM, "host-a", "host-b"))
        info = cluster.client("host-a").request("vm.info", name=VM)["vm"]
        assert info["alive"] and not info["paused"]
    finally:
        cluster.cleanup()


def test_a_revoked_operator_is_refused(cluster: LocalCluster) -> None:
    mallory = cluster.ca.issue_operator("mallory", "admin", cluster.operators)
    order = create_order(mallory, VM, "host-a", "host-b")
    cluster.ca.revoke(mallory.certificate(), "key_compromise")
    cluster.kill("host-a")
    cluster.start("host-a")
    with pytest.raises(AgentRequestFailed, match="revoked"):
        migrate(cluster, order)
    assert refusals(cluster, "host-a")[0]["fields"]["code"] == "issuer_revoked"
    assert_vm_runs_on_source(cluster)
