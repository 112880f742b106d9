"""Attacks on a QEMU guest's disk stream (storage migration): snooping (T1), tampering (T2), agent kills (T11).

The guest has a qcow2 disk the migration copies, holding a secret line in
data written before boot. T1 captures the migration on the attacker's link
and searches it for the disk's secret: the baseline carries the disk through
the agents in clear (`sealift-plain`), sealift seals it. T2 flips one bit of
the disk stream in flight (only that stream: the relay picks it by its
stream index): sealift must abort, keep the guest on host-a and remove the
destination's target image. T11 SIGKILLs either agent during the mirror and
at the switchover (before and after the decision) on a guest writing numbered
records to its disk: one running copy, its records without a gap, no orphan
target image, and the disk migrates again. Run with `sealift lab run --only
storage` (`--quick`, as in CI, leaves these rows to tests/qemu/test_qemu_storage.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Callable
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


# -- T11 for disks: agents killed during the mirror and at the switchover -----------------------------------

BLOCK = 4096
RECORDS_AT = 8192  # the guest's disk writer puts record n at block 8192 + n (32 MiB on)
_RECORD = re.compile(rb"sealift-disk-record (\d{10})\n")
# (who is killed, when): during the mirror (the first disk progress event, no disk ready), at the switchover
# before the decision (stop-and-copy: QEMU paused at pre-switchover) and after it (committed; the destination
# holds 3 s after reading Commit, so the strike lands before the running receipt).
DISK_SCENARIOS = (
    ("destination", "mirror"),
    ("source", "mirror"),
    ("destination", "switchover, before the decision"),
    ("source", "switchover, before the decision"),
    ("destination", "switchover, after the decision"),
    ("source", "switchover, after the decision"),
)
AFTER_COMMIT_HOLD = 'lab_pause_at = "commit-received"\nlab_pause_s = 3'


def _writer_disk(lab: LabSession, name: str) -> tuple[Path, bytes]:
    """A 128 MiB qcow2 image whose first 24 MiB are random (the mirror's bulk), records after 32 MiB."""
    raw = lab.results_dir / f"{name}.raw"
    data = os.urandom(24 * MiB)
    with open(raw, "wb") as f:
        f.write(data)
        f.truncate(128 * MiB)
    image = lab.results_dir / f"{name}.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
    raw.unlink()
    return image, data


def image_content(image: Path) -> bytes:
    """The guest-visible bytes of an image (-U: its QEMU may run)."""
    out = image.with_name(image.name + ".read.raw")
    subprocess.run(["qemu-img", "convert", "-U", "-q", "-O", "raw", str(image), str(out)], check=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def disk_records(content: bytes) -> list[int] | str:
    """The record numbers in block order, or why they are wrong (a record at another's place)."""
    found = []
    for block in range(RECORDS_AT, len(content) // BLOCK):
        match = _RECORD.match(content[block * BLOCK : (block + 1) * BLOCK])
        if match is None:
            continue
        if int(match.group(1)) != block - RECORDS_AT:
            return f"record {int(match.group(1))} in block {block}"
        found.append(block - RECORDS_AT)
    return found


def _disk_counter(cluster: LocalCluster, host: str) -> int:
    """The last record number the guest reported on host's console (every 10th), -1 if none."""
    try:
        lines = cluster.client(host).request("vm.console", name=VM, lines=200)["lines"]
    except Exception:
        return -1
    numbers = [int(m.group(1)) for line in lines if (m := re.match(r"sealift-disk (\d+)", line))]
    return numbers[-1] if numbers else -1


def _struck_at(when: str) -> Callable[[dict], bool]:
    if when == "mirror":
        return lambda e: e.get("event") == "disk" and e.get("ready") == 0
    if when.endswith("before the decision"):
        return lambda e: e.get("event") == "phase" and e.get("phase") == "stop-and-copy"
    return lambda e: e.get("event") == "phase" and e.get("phase") == "committed"


@attack("T11", "kill an agent during the disk mirror and at the switchover", backends=("qemu",))
def disk_agent_kills(lab: LabSession, backend: Backend) -> list[AttackResult]:
    scenarios = DISK_SCENARIOS[:2] if lab.quick else DISK_SCENARIOS
    return [_disk_kill(lab, backend, who, when) for who, when in scenarios]


def _disk_kill(lab: LabSession, backend: Backend, who: str, when: str) -> AttackResult:
    """One scenario on fresh agents: migrate a disk-writing guest, SIGKILL one agent at `when`, restart it,
    let the recovery and the resolver settle; then one running copy, its disk whole and continuing."""
    lab.say(f"T11 [storage]: kill the {who} agent during the {when}")
    title = f"kill the {who} agent during the {when} (copied disk)"
    cluster = lab.cluster(backend, extra_config=AFTER_COMMIT_HOLD if "after" in when else "")
    victim = "host-a" if who == "source" else "host-b"
    image, random_part = _writer_disk(lab, f"T11-disk-{who}-{when.split(',')[0]}")
    lab.start_vm(cluster, "host-a", VM, backend, workload="disk", disks=[str(image)])
    lab.wait_for(lambda: _disk_counter(cluster, "host-a") > 10, 60, "the guest writing disk records")
    disk_dir = cluster.vm_root / "host-b" / "qemu" / "disks"
    seen = _struck_at(when)
    struck: list[str] = []  # the target images at the strike

    def on_event(event: dict) -> None:
        if not struck and seen(event):
            if disk_dir.is_dir():
                struck.extend(p.name for p in disk_dir.glob("*"))
            struck.append("<struck>")
            cluster.kill(victim, signal.SIGKILL)

    outcome = "completed"
    try:
        lab.migrate(cluster, VM, {"secure": True}, transport="sealift", on_event=on_event)
    except MigrationFailed as exc:
        outcome = f"failed: {' '.join(str(exc).split())[:120]}"
    restart = ""
    if struck:
        try:
            cluster.start(victim)
        except (RuntimeError, TimeoutError) as exc:
            restart = f"{victim}'s agent did not restart: {str(exc).strip().splitlines()[-1:]}"
    try:
        lab.wait_for(lambda: lab.running_copies(cluster, VM) == 1, 40, "exactly one running copy")
        lab.wait_for(lambda: list(lab.copies(cluster, VM).values()) == ["running"], 15, "no stopped copy left")
    except TimeoutError:
        pass
    copies = lab.copies(cluster, VM)
    count = lab.running_copies(cluster, VM)
    where = next((h for h, s in copies.items() if s == "running"), None)
    disk_ok, disk_note = _disk_whole(lab, cluster, where, image, random_part)
    orphans = sorted(p.name for p in disk_dir.glob("*")) if where == "host-a" and disk_dir.is_dir() else []
    again = ""
    if where == "host-a" and count == 1:  # nothing the failed attempt left (NBD nodes, jobs, images) is in the way
        try:
            lab.migrate(cluster, VM, {"secure": True}, transport="sealift")
            again = "completed"
        except MigrationFailed as exc:
            again = f"failed: {' '.join(str(exc).split())[:120]}"
    blocked = bool(struck) and count == 1 and disk_ok and not orphans and not restart and again in ("", "completed")
    evidence = (
        (f"struck ({len(struck) - 1} target image(s) on host-b at the strike)" if struck else "NOT struck")
        + f"; migration {outcome}; afterwards: "
        + (", ".join(f"{h}: {s}" for h, s in sorted(copies.items())) or "no copy")
        + f"; {disk_note}"
        + (f"; orphan target images on host-b: {', '.join(orphans)}" if orphans else "; no orphan target image")
        + (f"; {restart}" if restart else "")
        + (f"; then migrated again with its disk: {again}" if again else "")
    )
    lab.finish(cluster)
    return AttackResult(
        "T11",
        title,
        backend,
        "n/a",
        "blocked" if blocked else "succeeded",
        evidence,
        count,
        details={"outcome": outcome, "copies": copies, "orphans": orphans, "where": where, "migrated_again": again},
    )


def _disk_whole(
    lab: LabSession, cluster: LocalCluster, where: str | None, image: Path, random_part: bytes
) -> tuple[bool, str]:
    """Whether the running copy's disk holds every record the guest wrote, without a gap, and goes on."""
    if where is None:
        return False, "no running copy to check"
    try:
        before = _disk_counter(cluster, where)
        lab.wait_for(lambda: _disk_counter(cluster, where) > before + 10, 30, f"the guest writing on {where}")
    except TimeoutError:
        return False, f"the guest on {where} writes no more disk records"
    path = Path(cluster.client(where).request("vm.info", name=VM)["vm"]["disks"][0]["path"])
    content = image_content(path)
    found = disk_records(content)
    if isinstance(found, str):
        return False, f"{where}'s disk is wrong: {found}"
    if found != list(range(len(found))) or not found:
        gap = next((i for i, n in enumerate(found) if i != n), len(found))
        return False, f"{where}'s disk records have a gap at {gap} ({len(found)} records)"
    if content[: len(random_part)] != random_part:
        return False, f"{where}'s disk lost the data written before boot"
    note = f"{where}'s disk: records 0-{found[-1]} without a gap, pre-boot data intact"
    if where != "host-a":  # moved: the source's image (frozen at the pause) must be a prefix of it
        source = image_content(image)
        written = disk_records(source)
        if isinstance(written, str) or not written:
            return False, f"host-a's image is unreadable: {written}"
        end = (RECORDS_AT + written[-1] + 1) * BLOCK
        if content[:end] != source[:end]:
            return False, f"{where}'s disk differs from host-a's image up to its record {written[-1]}"
        note += f", equal to host-a's image up to its last record {written[-1]}"
    return True, note
