"""Agent crash recovery (T11): the destination agent is SIGKILLed at each named point of the
handover and restarted; afterwards exactly one copy of the VM runs, and a restarted host takes
the VM again. The destination is held at a point with the test-only `lab_pause_at` knob, so each
kill lands exactly where it is meant to."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from sealift.agent.client import AgentClient, AgentRequestFailed
from sealift.backends.builtin.image import GuestImage
from sealift.cluster import LocalCluster
from sealift.lab.relay import Relay

VM = "vm1"
MiB = 1 << 20
RESTART_BUDGET_S = 30.0  # after the destination agent restarts, one copy runs within this

pytestmark = pytest.mark.timeout(120)


def make_cluster(relay: Relay, destination_config: str = "") -> LocalCluster:
    cluster = LocalCluster(
        extra_config="step_timeout_s = 8\nresolve_interval_s = 0.5\nhandshake_timeout_s = 5",
        peer_routes={("host-a", "host-b"): relay.address},
        host_config={"host-b": destination_config},
    )
    relay.target = cluster.addresses["host-b"]
    return cluster


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached in {timeout:.0f} s")
        time.sleep(0.05)


def vm_states(client: AgentClient) -> dict[str, dict]:
    return {vm["name"]: vm for vm in client.request("vm.list")["vms"]}


def migrate_in_thread(cluster: LocalCluster, options: dict | None = None) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["report"] = cluster.migrate(VM, "host-a", "host-b", options or {})
        except AgentRequestFailed as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def paused_at(cluster: LocalCluster, host: str, point: str) -> bool:
    return f"paused at {point}" in cluster.agents[host].log_path.read_text(errors="replace")


def one_running_copy_on(cluster: LocalCluster, host: str) -> bool:
    """The VM runs on `host` only: listed, alive, not paused; no other agent lists it."""
    states = {h: vm_states(cluster.client(h)).get(VM) for h in cluster.agents}
    here = states.pop(host)
    return here is not None and here["alive"] and not here["paused"] and all(s is None for s in states.values())


def assert_progressing(client: AgentClient) -> None:
    first = client.request("vm.info", name=VM)["vm"]["counter"]
    time.sleep(0.5)
    assert client.request("vm.info", name=VM)["vm"]["counter"] > first, "the guest must make progress"


@pytest.mark.parametrize("point", ["commit-received", "committed", "launched", "adopted"])
def test_killing_the_destination_during_the_handover_ends_with_one_running_copy(relay: Relay, point: str) -> None:
    """Source committed; the destination dies at `point` and restarts: the VM runs there, once.

    "adopted" was finding 1 (the restart crashed with AdmissionError on its own adopted guest);
    "launched" was finding 2 (a guest started but not registered: never adopted, the source stayed
    paused and the VM ran nowhere the agents knew of).
    """
    cluster = make_cluster(relay, f'lab_pause_at = "{point}"')
    try:
        cluster.start()
        src, dst = cluster.client("host-a"), cluster.client("host-b")
        src.request("vm.start", name=VM, memory="64M", workload="db")
        counter_before = src.request("vm.info", name=VM)["vm"]["counter"]
        thread, outcome = migrate_in_thread(cluster)
        wait_for(lambda: paused_at(cluster, "host-b", point), 60, f"the destination holding at {point}")
        cluster.kill("host-b", signal.SIGKILL)
        thread.join(30)
        assert "error" in outcome and "stays paused on host-a" in outcome["error"], outcome  # in doubt, committed

        cluster.start("host-b")  # must come back (finding 1)
        restarted = time.monotonic()
        wait_for(lambda: one_running_copy_on(cluster, "host-b"), RESTART_BUDGET_S, "one running copy on host-b")
        assert time.monotonic() - restarted < RESTART_BUDGET_S
        assert_progressing(dst)
        assert dst.request("vm.info", name=VM)["vm"]["counter"] >= counter_before
        check = dst.request("vm.check", name=VM)["check"]
        assert check["bad_page_count"] == 0 and check["secret_intact"]
        wait_for(lambda: src.request("migrations")["migrations"][0]["phase"] == "completed", 10, "source completed")
        assert dst.request("migrations")["migrations"][0]["phase"] == "running"
        assert not (cluster.vm_root / "host-a" / f"{VM}.img").exists(), "the source's copy must be released"
    finally:
        cluster.cleanup()


def test_a_stale_image_is_refused_clearly_then_removed_at_restart(relay: Relay) -> None:
    """Finding 3: a leftover image from a failed incoming migration on the destination.

    The refusal reaches the operator with the destination's reason (not a bare AssertionError),
    the refusal deletes nothing it did not create, and the restarted agent removes the leftover
    (no guest runs from it, the store has no VM of that name), so the VM can move there.
    """
    cluster = make_cluster(relay)
    try:
        cluster.start()
        src = cluster.client("host-a")
        src.request("vm.start", name=VM, memory="64M", workload="db")
        stale = cluster.vm_root / "host-b" / f"{VM}.img"
        GuestImage.create_empty(stale, 64 * MiB).close()  # what a received, never started image looks like

        with pytest.raises(AgentRequestFailed, match=r"host-b refused the migration: stale image") as refused:
            cluster.migrate(VM, "host-a", "host-b")
        assert "keeps running on host-a" in str(refused.value)
        assert stale.exists(), "a refusal must not delete an image the migration did not create"
        assert one_running_copy_on(cluster, "host-a")

        cluster.kill("host-b", signal.SIGKILL)
        cluster.start("host-b")
        assert not stale.exists(), "recovery must remove the leftover image"
        removed = cluster.client("host-b").request("audit.show", kind="recovery.leftover_removed", limit=10)["entries"]
        assert len(removed) == 1
        report = cluster.migrate(VM, "host-a", "host-b")
        assert report["status"] == "completed"
        assert one_running_copy_on(cluster, "host-b")
        assert_progressing(cluster.client("host-b"))
    finally:
        cluster.cleanup()


def test_recovery_keeps_the_image_of_a_guest_that_runs(relay: Relay) -> None:
    """The clean-up must never touch a live copy: after a completed migration and a restart of the
    destination agent, the guest still runs from its image."""
    cluster = make_cluster(relay)
    try:
        cluster.start()
        cluster.client("host-a").request("vm.start", name=VM, memory="64M", workload="db")
        assert cluster.migrate(VM, "host-a", "host-b")["status"] == "completed"
        cluster.kill("host-b", signal.SIGKILL)
        cluster.start("host-b")
        assert (cluster.vm_root / "host-b" / f"{VM}.img").exists()
        assert one_running_copy_on(cluster, "host-b")
        assert_progressing(cluster.client("host-b"))
    finally:
        cluster.cleanup()
