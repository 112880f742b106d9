"""QEMU handovers left in doubt (T11) are settled by the agents' resolvers, never by hand.

After the source has written its commit decision and sent Commit, a failure
leaves each side unsure of the other: the source's guest waits paused in
"postmigrate", the destination's paused after the stream. The resolvers ask
the peer (OutcomeQuery) and act on the source's durable decision: the guest
ends running on host-b, exactly once, continuing its counter, and the source
releases its copy.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest

from sealift.agent.client import AgentClient, AgentRequestFailed
from sealift.cluster import LocalCluster
from sealift.lab.relay import Relay
from test_qemu_agent import VM, info, migrate, names, start_guest, stop_guests, wait_counter, wait_probe

pytestmark = pytest.mark.timeout(300)

SETTLE_BUDGET_S = 45.0


def make_cluster(relay: Relay, destination_config: str) -> LocalCluster:
    cluster = LocalCluster(
        extra_config="step_timeout_s = 15\nresolve_interval_s = 0.5\nhandshake_timeout_s = 5",
        peer_routes={("host-a", "host-b"): relay.address},
        host_config={"host-b": destination_config},
    )
    relay.target = cluster.addresses["host-b"]
    cluster.start()
    return cluster


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout:.0f} s")
        time.sleep(0.25)


def phase(client: AgentClient) -> str:
    return str(client.request("migrations")["migrations"][0]["phase"])


def held_at(cluster: LocalCluster, point: str) -> bool:
    return f"paused at {point}" in cluster.agents["host-b"].log_path.read_text(errors="replace")


def settled_on_destination(cluster: LocalCluster) -> bool:
    src, dst = cluster.client("host-a"), cluster.client("host-b")
    return VM not in names(src) and VM in names(dst) and info(dst)["status"] == "running" and not info(dst)["migrating"]


def paused_counter(client: AgentClient) -> int:
    """The last counter the paused source guest printed: the destination must go on from there."""
    return int(info(client)["counter"] or 0)


def resolved_entries(client: AgentClient) -> list[dict]:
    return client.request("audit.show", kind="migration.resolved", limit=10)["entries"]


def assert_one_copy_on_destination(cluster: LocalCluster, counter_at_pause: int) -> None:
    src, dst = cluster.client("host-a"), cluster.client("host-b")
    assert VM not in names(src)
    assert not list((cluster.vm_root / "host-a" / "qemu").glob("*.pid")), "the source QEMU must be gone"
    after = info(dst)
    assert after["status"] == "running"
    assert wait_counter(dst, counter_at_pause, 30) > counter_at_pause  # continues where it stopped
    assert (wait_probe(after, 20) or 0) >= counter_at_pause
    wait_for(lambda: phase(src) == "completed", 15, "the source's record completed")
    assert phase(dst) == "running"


def test_destination_agent_killed_after_commit_the_resolvers_finish_the_handover(
    relay: Relay, guest_image: object
) -> None:
    """Destination agent SIGKILLed holding Commit: both sides are in doubt until it restarts.

    The destination's restarted agent adopts its paused QEMU, asks host-a (committed) and starts it;
    host-a's resolver then hears "committed" and quits its postmigrate copy.
    """
    cluster = make_cluster(relay, 'lab_pause_at = "commit-received"\nlab_pause_s = 60')
    try:
        src = cluster.client("host-a")
        start_guest(src)
        failure: list[str] = []

        def kill_when_held() -> None:
            wait_for(lambda: held_at(cluster, "commit-received"), 120, "host-b holding after Commit")
            cluster.kill("host-b", signal.SIGKILL)

        killer = threading.Thread(target=kill_when_held)
        killer.start()
        try:
            migrate(cluster)
        except AgentRequestFailed as exc:
            failure.append(str(exc))
        killer.join(130)
        assert failure and "stays paused on host-a" in failure[0], failure
        assert info(src)["status"] == "postmigrate"  # never two copies: paused, not resumed
        assert phase(src) == "in-doubt"
        counter_at_pause = paused_counter(src)

        config = cluster.agents["host-b"].config_path  # restart without the hold
        config.write_text(config.read_text().replace('lab_pause_at = "commit-received"', ""))
        cluster.start("host-b")
        wait_for(lambda: settled_on_destination(cluster), SETTLE_BUDGET_S, "the guest running on host-b alone")
        assert_one_copy_on_destination(cluster, counter_at_pause)
        assert [e["fields"]["outcome"] for e in resolved_entries(src)] == ["committed"]
        assert [e["fields"]["action"] for e in resolved_entries(cluster.client("host-b"))] == [
            "started the received guest"
        ]
    finally:
        stop_guests(cluster)
        cluster.cleanup()


def test_link_cut_after_commit_the_source_settles_when_the_link_returns(relay: Relay, guest_image: object) -> None:
    """The link dies while the destination holds Commit: it starts the guest, the receipt is lost.

    host-a stays paused in doubt while host-b is unreachable, then releases its copy once
    the link is back and host-b answers "committed".
    """
    cluster = make_cluster(relay, 'lab_pause_at = "commit-received"\nlab_pause_s = 3')
    try:
        src, dst = cluster.client("host-a"), cluster.client("host-b")
        start_guest(src)

        def cut_when_held() -> None:
            wait_for(lambda: held_at(cluster, "commit-received"), 120, "host-b holding after Commit")
            relay.cut()

        cutter = threading.Thread(target=cut_when_held)
        cutter.start()
        with pytest.raises(AgentRequestFailed, match="stays paused on host-a"):
            migrate(cluster)
        cutter.join(130)
        wait_for(lambda: VM in names(dst) and info(dst)["status"] == "running", 30, "host-b running the guest")
        time.sleep(2)  # several resolver passes with the link down: nothing may change on host-a
        assert VM in names(src) and info(src)["status"] == "postmigrate"
        assert phase(src) == "in-doubt"
        counter_at_pause = paused_counter(src)

        relay.restore()
        wait_for(lambda: settled_on_destination(cluster), SETTLE_BUDGET_S, "host-a releasing its copy")
        assert_one_copy_on_destination(cluster, counter_at_pause)
        assert [e["fields"]["action"] for e in resolved_entries(src)] == ["released the paused source copy"]
    finally:
        stop_guests(cluster)
        cluster.cleanup()
