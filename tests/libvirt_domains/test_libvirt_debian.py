"""Issue 19 with a real guest: the Debian domain, serving a client, migrates through sealift between two libvirtds.

Two libvirtds, each in its lab host's network namespace and a mount
namespace of its own; two agents in those namespaces on the lab's migration
network, host-a reaching host-b through a relay in the attacker's namespace
that records every byte between the hosts. The Debian guest (nginx, redis
with `appendfsync always`, the secret on its disk and in redis) is a domain
of host-a's libvirtd, defined by sealift's tooling (backends/libvirt/debian.py),
its qcow2 disk its own and not shared, its NIC on host-a's br0. It boots
cold, once for the module (24-60 s under TCG: libvirt cannot load the QEMU
saved state the QEMU Debian tests restore from). The outage client writes
to redis and reads nginx every 10 ms, from the lab's client namespace,
before, during and after the migration.

The disk check is the QEMU Debian tests' (lab/debian_migration.py): a byte
comparison (`qemu-img compare`) of the two images cannot hold once the
destination runs (redis fsyncs every write it acknowledges after the
resume), so both images are read through their file systems: every write
on the source's image (frozen when libvirt's source QEMU quit at the
switchover) is on the destination's, and so is every acknowledged write.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest

from sealift.backends.qemu.debian_image import build_debian_image
from sealift.backends.qemu.image import DEFAULT_SECRET
from sealift.demo import libvirt_debian_result
from sealift.lab.debian_migration import DESTINATION, SOURCE, StartedGuest
from sealift.lab.libvirt_debian import LibvirtDebianLab, libvirt_debian_lab, migrate_domain, start_debian_domain

SECRET = DEFAULT_SECRET.encode()  # on the guest's disk (/var/lib/sealift/secret.txt) and in redis


@pytest.fixture(scope="module")
def booted() -> Iterator[tuple[LibvirtDebianLab, StartedGuest]]:
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, network namespaces, libvirtd)")
    build_debian_image()  # cached once per machine (shared with the QEMU Debian tests)
    with libvirt_debian_lab(with_relay=True) as env:
        yield env, start_debian_domain(env, memory_mib=256)


def test_debian_domain_migrates_with_its_disk_while_the_client_writes(
    booted: tuple[LibvirtDebianLab, StartedGuest], check_json: Callable[[str, object], None]
) -> None:
    env, guest = booted
    started = time.monotonic()
    assert env.relay is not None
    captured_before = len(env.relay.captured())

    result = migrate_domain(env, guest)
    run = result.run
    report, outage, disk = run.report, run.outage, run.disk

    assert report["status"] == "completed", report
    assert report["disks"] == 1 and report["disks_copied"] == 1 and report["disk_bytes_sent"] > 0, report
    # libvirt's view: the domain runs on the destination's libvirtd, the source's has no definition left.
    assert result.domstate == {SOURCE: None, DESTINATION: "running"}, result.domstate
    # The client: served before and after, and not one acknowledged write lost.
    assert outage.writes_acked > 0 and outage.http_ok > 0, outage.to_dict()
    assert outage.writes_lost == 0 and outage.writes_found == outage.writes_acked, outage.to_dict()
    assert run.serving_at_destination and run.secret_intact
    # The disks: the source's image (frozen at the switchover) is what the destination went on from, and
    # every acknowledged write is on the destination's image, as is the secret file.
    assert disk.writes_on_source_disk > 0, disk
    assert disk.source_writes_missing_at_destination == 0, disk
    assert disk.acked_writes_missing_on_disk == 0, disk
    assert disk.writes_on_destination_disk >= disk.writes_on_source_disk, disk
    assert disk.secret_on_disk, disk
    # The capture between the hosts: the whole disk and memory went through it (the destination's disk,
    # a standalone copy, holds the secret file), and none of it is readable.
    captured = env.relay.captured()[captured_before:]
    assert len(captured) > report["disk_bytes_sent"] > 100 << 20, (len(captured), report["disk_bytes_sent"])
    assert SECRET not in captured and SECRET[:27] not in captured
    # What `sealift demo --backend libvirt --json` prints of this run, against its schema.
    demo = libvirt_debian_result(env, result, started)
    check_json("demo", demo)
    assert demo["backend"] == "libvirt" and demo["copies_running"] == {"source": False, "destination": True}
    assert demo["writes_lost"] == 0 and demo["disk_check"]["ok"] is True
    print(
        f"\nDebian libvirt domain (256 MiB) migrated in {report['total_time_s']} s (sealift's downtime "
        f"{report['downtime_ms']} ms, disk {report['disk_bytes_sent'] >> 20} MiB sealed, capture "
        f"{len(captured) >> 20} MiB); client outage {outage.longest_gap_ms} ms, "
        f"{outage.http_failed + outage.redis_failed} failed requests, {outage.writes_acked} writes acknowledged, "
        f"none lost; boot {guest.start_s} s"
    )
