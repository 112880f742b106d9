"""Issue 18 end to end: the Debian guest, serving a client, moves with its disk between two real agents.

Real QEMU under TCG, the real Debian 12 guest (nginx, redis with its
append-only file fsynced per write) started by the source agent with
`vm start --guest debian` (from the cached saved booted state), two agents
in the lab's host namespaces migrating over the lab's migration network,
and the outage client in the lab's client namespace writing to redis and
reading nginx every 10 ms throughout. The guest's disk is its own qcow2
overlay, not shared: the migration copies it through the agents' sealed
disk streams (sync=top). The disk check reads both images through their
file systems (lab/debian_migration.py says why a byte comparison cannot
hold once the destination runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from sealift.agent.client import AgentRequestFailed
from sealift.backends.qemu.debian_guest import ensure_saved_state
from sealift.backends.qemu.debian_image import build_debian_image
from sealift.backends.qemu.storage import DISK_STREAM_INDEX
from sealift.lab.client import OutageClient
from sealift.lab.debian_migration import DESTINATION, SOURCE, VM, debian_lab, run_debian_migration, start_debian_guest
from sealift.lab.relay import Tamper


@pytest.fixture(scope="module")
def debian_ready() -> None:
    # The image and its saved state are built once per machine (shared with test_debian_guest.py).
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, network namespaces, taps)")
    ensure_saved_state(build_debian_image())


def test_debian_guest_migrates_with_its_disk_while_the_client_writes(debian_ready: None) -> None:
    started = time.monotonic()
    run = run_debian_migration()
    report, outage, disk = run.report, run.outage, run.disk

    assert report["status"] == "completed", report
    assert report["transport"] == "sealift", report
    assert report["disks"] == 1 and report["disks_copied"] == 1, report
    assert report["disk_bytes_sent"] > 0, report
    # The client: served all along, and not one acknowledged write lost.
    assert outage.writes_acked > 0 and outage.http_ok > 0, outage.to_dict()
    assert outage.writes_lost == 0 and outage.writes_found == outage.writes_acked, outage.to_dict()
    # The guest at the destination (the source's QEMU quit at the switchover): serving, its secret in redis.
    assert run.serving_at_destination
    assert run.secret_intact
    # The disks: the source's image (frozen at the pause) is what the destination continued from, and
    # every acknowledged write is on the destination's image.
    assert disk.writes_on_source_disk > 0, disk
    assert disk.source_writes_missing_at_destination == 0, disk
    assert disk.acked_writes_missing_on_disk == 0, disk
    assert disk.writes_on_destination_disk >= disk.writes_on_source_disk, disk
    assert disk.secret_on_disk, disk
    assert disk.source_image != disk.destination_image
    print(
        f"\nDebian guest migrated in {report['total_time_s']} s (downtime {report['downtime_ms']} ms, "
        f"disk {report['disk_bytes_sent']} sealed bytes); client outage {outage.longest_gap_ms} ms, "
        f"{outage.http_failed + outage.redis_failed} failed requests, {outage.writes_acked} writes acknowledged, "
        f"none lost; whole test {time.monotonic() - started:.1f} s"
    )


def test_debian_demo_prints_what_its_schema_says(debian_ready: None, check_json: Callable[[str, object], None]) -> None:
    """`sealift demo --backend qemu --guest debian --json`: the same story through the command, as documented."""
    done = subprocess.run(
        [sys.executable, "-m", "sealift", "demo", "--backend", "qemu", "--guest", "debian", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    check_json("demo", result)
    assert result["status"] == "completed" and result["transport"] == "sealift"
    assert result["disk_bytes_sent"] > 0 and result["writes_lost"] == 0
    assert result["disk_check"]["ok"] is True
    assert result["copies_running"] == {"source": False, "destination": True}


def test_a_tampered_disk_record_aborts_and_the_guest_serves_on_at_the_source(debian_ready: None) -> None:
    """One bit flipped in the disk stream (mid-mirror, in the attacker's namespace): the record does not
    open, the migration aborts, and the client goes on being served by the source without losing a write."""
    with debian_lab(with_relay=True) as (lab, cluster, relay):
        assert relay is not None
        guest = start_debian_guest(cluster, lab)
        relay.tamper = Tamper(flip_offset=256 << 10, stream_index=DISK_STREAM_INDEX)
        client = OutageClient(guest.ip, netns=lab.ns("client"))
        client.start()
        try:
            time.sleep(1.0)
            with pytest.raises(AgentRequestFailed, match=f"keeps running on {SOURCE}") as failed:
                cluster.migrate(VM, SOURCE, DESTINATION, options={"secure": True})
            time.sleep(2.0)  # the client goes on, served by the source
        finally:
            outage = client.stop()
        assert relay.tamper.done.is_set()
        assert "disk" in str(failed.value), failed.value
        assert outage.writes_acked > 0 and outage.writes_lost == 0, outage.to_dict()
        src, dst = cluster.client(SOURCE), cluster.client(DESTINATION)
        assert src.request("vm.info", name=VM)["vm"]["status"] == "running"
        assert VM not in [v["name"] for v in dst.request("vm.list")["vms"]]
        assert not list((cluster.vm_root / DESTINATION / "qemu" / "disks").glob("*")), "the target image was left"
        OutageClient(guest.ip, netns=lab.ns("client")).wait_ready(10.0)  # still serving, at the source
