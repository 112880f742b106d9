"""Attacks on a QEMU guest's disk stream (storage migration): snooping (T1) and tampering (T2).

The guest has a qcow2 disk the migration copies, holding a secret line in
data written before boot. T1 captures the migration on the attacker's link
and searches it for the disk's secret: the baseline carries the disk through
the agents in clear (`sealift-plain`), sealift seals it. T2 flips one bit of
the disk stream in flight (only that stream: the relay picks it by its
stream index): sealift must abort, keep the guest on host-a and remove the
destination's target image. Run with `sealift lab run --only storage`
(`--quick`, as in CI, leaves these rows to tests/qemu/test_qemu_storage.py).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from sealift.backends.qemu.storage import DISK_STREAM_INDEX
from sealift.cluster import LocalCluster
from sealift.lab.attacks.base import AttackResult, attack
from sealift.lab.capture import dropped_note, find_in_capture
from sealift.lab.relay import Tamper
from sealift.lab.session import Backend, LabSession, MigrationFailed

VM = "vm1"
DISK_SECRET = b"sealift lab disk secret: vault combination 31-4-15-92"
MiB = 1 << 20


def _disk(lab: LabSession, name: str) -> Path:
    """A 64 MiB qcow2 image with 16 MiB of random data and the secret line in it."""
    raw = lab.results_dir / f"{name}.raw"
    data = bytearray(os.urandom(16 * MiB))
    data[3 * MiB : 3 * MiB + len(DISK_SECRET)] = DISK_SECRET
    with open(raw, "wb") as f:
        f.write(data)
        f.truncate(64 * MiB)
    image = lab.results_dir / f"{name}.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
    raw.unlink()
    return image


def _targets(cluster: LocalCluster) -> list[Path]:
    return list((cluster.vm_root / "host-b" / "qemu" / "disks").glob("*"))


@attack("T1", "passive snooping of a disk stream", backends=("qemu",))
def disk_snooping(lab: LabSession, backend: Backend) -> list[AttackResult]:
    plain = lab.cluster(backend, insecure=True)
    lab.start_vm(plain, "host-a", VM, backend, workload="idle", disks=[str(_disk(lab, "T1-disk-plain"))])
    capture = lab.capture("T1-disk-plain")
    lab.migrate(plain, VM, {"secure": False}, transport="sealift-plain")
    plain_pcap = capture.stop()
    plain_dropped = capture.dropped
    plain_hit = find_in_capture(plain_pcap, DISK_SECRET)
    lab.finish(plain)

    secure = lab.cluster(backend)
    lab.start_vm(secure, "host-a", VM, backend, workload="idle", disks=[str(_disk(lab, "T1-disk-sealift"))])
    capture = lab.capture("T1-disk-sealift")
    report = lab.migrate(secure, VM, {"secure": True}, transport="sealift")
    pcap = capture.stop()
    hit = find_in_capture(pcap, DISK_SECRET)
    size_mib = pcap.stat().st_size / MiB
    copied = int(report.get("disk_bytes_sent") or 0)
    # The capture must hold the disk's copy, or "not found" proves nothing.
    blocked = not hit.found and copied >= 16 * MiB and size_mib >= 16 and report["status"] == "completed"
    evidence = (
        f"baseline (sealift-plain): disk secret {'found' if plain_hit.found else 'not found'} "
        f"({len(plain_hit.file_offsets)} hits){dropped_note(plain_dropped)}; sealift: "
        f"{len(hit.file_offsets)} hits in {size_mib:.0f} MiB{dropped_note(capture.dropped)}, "
        f"disk stream {copied / MiB:.1f} MiB sealed"
    )
    return [
        AttackResult(
            "T1",
            "passive snooping: search the capture for a secret on the guest's disk",
            backend,
            "succeeded" if plain_hit.found else "blocked",
            "blocked" if blocked else "succeeded",
            evidence,
            lab.running_copies(secure, VM),
            details={"baseline_pcap": str(plain_pcap), "sealift_pcap": str(pcap), "disk_bytes_sent": copied},
        )
    ]


@attack("T2", "active manipulation of a disk stream", backends=("qemu",))
def disk_tampering(lab: LabSession, backend: Backend) -> list[AttackResult]:
    relay = lab.relay()
    cluster = lab.cluster(backend, via=relay)
    lab.start_vm(cluster, "host-a", VM, backend, workload="idle", disks=[str(_disk(lab, "T2-disk"))])
    relay.tamper = tamper = Tamper(flip_offset=4 * MiB, stream_index=DISK_STREAM_INDEX)
    error = ""
    try:
        lab.migrate(cluster, VM, {"secure": True}, transport="sealift")
    except MigrationFailed as exc:
        error = str(exc)
    lab.wait_for(lambda: not _targets(cluster), 20, "the destination removes its target image")
    copies = lab.copies(cluster, VM)
    blocked = bool(error) and tamper.done.is_set() and "disk" in error and copies == {"host-a": "running"}
    evidence = (
        f"one bit flipped at offset {tamper.flip_offset} of the disk stream "
        f'({"done" if tamper.done.is_set() else "not seen"}); aborted: "{error[:160]}"; '
        f"guest: {copies}; target images left on host-b: {len(_targets(cluster))}"
    )
    return [
        AttackResult(
            "T2",
            "active manipulation: flip a bit of the disk stream in flight",
            backend,
            "n/a",
            "blocked" if blocked else "succeeded",
            evidence,
            lab.running_copies(cluster, VM),
            details={"error": error, "copies": copies},
        )
    ]
