"""Operators' VMs with disks: storage migration through the sealift channel, between two real agents.

The guest (busybox test image, `sealift.disk=write`) writes numbered 4 KiB
records to /dev/vda without pause, each with fsync: record n at block
8192 + n. The first 32 MiB of the disk are random data written before boot.
After a migration the source's QEMU has quit, so its image holds exactly
what the guest wrote before the switchover; the destination's image must
hold all of it (byte for byte, random data and records up to the source's
last), and the guest on the destination must go on with the next record.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealift.agent.client import AgentClient, AgentRequestFailed
from sealift.backends.qemu.definition import DiskError, boot_image, check_boot, create_target, probe_disk
from sealift.backends.qemu.image import GuestImagePaths
from sealift.backends.qemu.keeper import QemuKeeper
from sealift.backends.qemu.net import NetConfig
from sealift.backends.qemu.registry import QemuVmRegistry
from sealift.backends.qemu.storage import DISK_STREAM_INDEX
from sealift.cluster import LocalCluster
from sealift.host.config import AgentConfig
from sealift.host.store import MigrationRecord
from sealift.lab.attacks.storage import disk_records, image_content
from sealift.lab.relay import Relay, Tamper
from sealift.wire.vm_definition import BootSpec, VmDefinition

VM = "dvm"
BLOCK = 4096
RECORDS_AT = 8192  # blocks: the writer's first record (32 MiB)
RANDOM_BYTES = 32 << 20
DISK_BYTES = 64 << 20
CMDLINE = "sealift.mem_mib=16 sealift.rate_mib=4 sealift.disk=write"


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sls-disk-", dir="/var/tmp"))  # a disk file system, not tmpfs
    yield path
    shutil.rmtree(path, ignore_errors=True)


DISK_SECRET = b"sealift disk-resident secret: account 9911-2288 PIN 4471"


def make_disk(path: Path, fmt: str = "qcow2") -> bytes:
    """A 64 MiB image whose first 32 MiB are random, with a secret line in them; returns those bytes."""
    data = bytearray(os.urandom(RANDOM_BYTES))
    data[5 << 20 : (5 << 20) + len(DISK_SECRET)] = DISK_SECRET
    data = bytes(data)
    raw = path.with_suffix(".src.raw")
    with open(raw, "wb") as f:
        f.write(data)
        f.truncate(DISK_BYTES)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, str(raw), str(path)], check=True)
    raw.unlink()
    return data


def small_disks(workdir: Path) -> tuple[Path, Path]:
    """Two more disks the migration copies: a raw image, and a qcow2 overlay over a base image.

    The base is there "on both hosts" (one machine), so only the overlay's
    own clusters travel (sync=top) and the destination's target sits over
    the same base.
    """
    raw = workdir / "data.raw"
    raw.write_bytes(os.urandom(8 << 20))
    base, overlay = workdir / "base.qcow2", workdir / "overlay.qcow2"
    base_raw = workdir / "base.raw"
    base_raw.write_bytes(os.urandom(8 << 20))
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(base_raw), str(base)], check=True)
    base_raw.unlink()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay)], check=True
    )
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", str(overlay)], check=True, capture_output=True
    )
    return raw, overlay


def raw_content(image: Path) -> bytes:
    """The guest-visible bytes of an image (-U: its QEMU may still run)."""
    return image_content(image)


def records(content: bytes) -> list[int]:
    """The record numbers found in their blocks, in block order (each checked at its own place)."""
    found = disk_records(content)
    assert not isinstance(found, str), found
    return found


def disk_counter(client: AgentClient) -> int:
    """The last record number the guest reported on its console (every 10th)."""
    lines = client.request("vm.console", name=VM, lines=200)["lines"]
    numbers = [int(m.group(1)) for line in lines if (m := re.match(r"sealift-disk (\d+)", line))]
    return numbers[-1] if numbers else -1


def wait_disk_counter(client: AgentClient, above: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := disk_counter(client)) > above:
            return value
        time.sleep(0.3)
    raise AssertionError(f"the guest wrote no disk record above {above} in {timeout} s")


def start_vm(client: AgentClient, *disks: str, **fields: object) -> dict:
    vm = client.request(
        "vm.start", name=VM, backend="qemu", memory="128M", cmdline=CMDLINE, disks=list(disks), **fields
    )["vm"]
    wait_disk_counter(client, 10)
    return vm


def migrate(cluster: LocalCluster, **options: object) -> dict:
    return cluster.migrate(VM, "host-a", "host-b", options=options)


def make_cluster(**kwargs: object) -> LocalCluster:
    cluster = LocalCluster(extra_config="step_timeout_s = 15\nhandshake_timeout_s = 5", **kwargs)  # type: ignore[arg-type]
    return cluster


@pytest.fixture
def cluster(relay: Relay, guest_image: object) -> Iterator[LocalCluster]:
    cluster = make_cluster(peer_routes={("host-a", "host-b"): relay.address})
    relay.target = cluster.addresses["host-b"]
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop_guests()
        cluster.cleanup()


def runs_on_source_only(cluster: LocalCluster) -> None:
    src, dst = cluster.client("host-a"), cluster.client("host-b")
    vm = src.request("vm.info", name=VM)["vm"]
    assert vm["status"] == "running" and not vm["migrating"], vm
    assert VM not in [v["name"] for v in dst.request("vm.list")["vms"]]
    assert not list((cluster.vm_root / "host-b" / "qemu").glob("*.pid"))


# -- unit: what an operator may attach -----------------------------------------------------


def test_disks_are_probed_and_bad_ones_refused(workdir: Path) -> None:
    qcow2 = workdir / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "64M"], check=True)
    disk = probe_disk(str(qcow2), False)
    assert (disk.format, disk.virtual_size, disk.backing) == ("qcow2", 64 << 20, None)
    vmdk = workdir / "b.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "1M"], check=True)
    with pytest.raises(DiskError, match="is 'vmdk'"):
        probe_disk(str(vmdk), False)
    with pytest.raises(DiskError, match="does not exist"):
        probe_disk(str(workdir / "missing.qcow2"), False)
    comma = workdir / "c,d.qcow2"
    shutil.copy(qcow2, comma)
    with pytest.raises(DiskError, match="without commas"):
        probe_disk(str(comma), False)
    # The destination never overwrites an existing file with a target.
    with pytest.raises(DiskError, match="already exists"):
        create_target(disk, qcow2)
    overlay = workdir / "top.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(qcow2), "-F", "qcow2", str(overlay)], check=True
    )
    top = probe_disk(str(overlay), False)
    assert top.backing == str(qcow2)
    target = create_target(top, workdir / "target.qcow2")
    assert probe_disk(target.path, False).backing == str(qcow2)  # sync=top needs the same backing chain


def own_kernel(image: GuestImagePaths, where: Path) -> BootSpec:
    """The test image's kernel and initramfs, copied: a kernel of the operator's own, at its own paths."""
    kernel, initrd = where / "vmlinux", where / "initrd.cpio"
    shutil.copy(image.kernel, kernel)
    shutil.copy(image.initramfs, initrd)
    return BootSpec(str(kernel), str(initrd))


def test_an_own_kernel_boots_only_where_the_very_same_files_are(guest_image: GuestImagePaths, workdir: Path) -> None:
    boot = own_kernel(guest_image, workdir)
    key = boot_image(boot).key
    assert check_boot(boot, key).kernel == Path(boot.kernel)
    with open(boot.initrd, "ab") as f:
        f.write(b"\0")  # one byte more: another initramfs at the same path
    with pytest.raises(DiskError, match="differ here from the source's"):
        check_boot(boot, key)
    os.unlink(boot.kernel)
    with pytest.raises(DiskError, match="cannot be read"):
        check_boot(boot, key)


# -- end to end ---------------------------------------------------------------------------


def test_a_copied_disk_moves_with_everything_written_before_the_switchover(
    cluster: LocalCluster, relay: Relay, workdir: Path
) -> None:
    image = workdir / "disk.qcow2"
    random_part = make_disk(image)
    raw, overlay = small_disks(workdir)
    others = {path: raw_content(path) for path in (raw, overlay)}
    src, dst = cluster.client("host-a"), cluster.client("host-b")
    vm = start_vm(src, str(image), str(raw), str(overlay))
    assert vm["disks"][0] == {"path": str(image), "format": "qcow2", "virtual_size": DISK_BYTES, "shared": False}
    assert [d["format"] for d in vm["disks"]] == ["qcow2", "raw", "qcow2"]
    # Disks travel only through the agents' channel: a direct transport is refused up front.
    with pytest.raises(AgentRequestFailed, match="only on the sealift transports") as refused:
        migrate(cluster, transport="qemu-tls")
    assert refused.value.code == "disk_needs_sealift_transport"
    assert src.request("vm.info", name=VM)["vm"]["status"] == "running"
    before = disk_counter(src)
    events: list[dict] = []
    report = cluster.migrate(VM, "host-a", "host-b", on_event=events.append)

    assert report["status"] == "completed", report
    assert (report["disks"], report["disks_copied"]) == (3, 3)
    assert report["disk_bytes_sent"] > RANDOM_BYTES  # the random half crossed, sealed
    assert report["mirror_time_s"] is not None
    assert report["image_digest"].startswith("blake3-tags-x7:")  # memory + both directions of each disk stream
    disk_events = [e for e in events if e.get("event") == "disk"]
    assert disk_events and disk_events[-1]["ready"] == 3
    moved = dst.request("vm.info", name=VM)["vm"]["disks"]
    target = Path(moved[0]["path"])
    assert target.parent == cluster.vm_root / "host-b" / "qemu" / "disks"

    # The source QEMU has quit: its image is the disk as the guest left it at the pause.
    source = raw_content(image)
    written = records(source)
    assert written == list(range(len(written))), "the source's own records are not contiguous"
    last = written[-1]
    assert last > before, "the guest wrote nothing during the migration"
    wait_disk_counter(dst, last + 10)  # the guest goes on writing on host-b
    destination = raw_content(target)
    end = (RECORDS_AT + last + 1) * BLOCK
    assert destination[:RANDOM_BYTES] == random_part
    assert destination[:end] == source[:end], "a write made before the switchover is missing on host-b"
    assert records(destination)[last + 1] == last + 1  # ... and continued with the very next record
    # The disk crossed the relay sealed: its secret line is nowhere in the capture (T1 for disks).
    captured = relay.captured()
    assert len(captured) > RANDOM_BYTES
    assert DISK_SECRET not in captured
    # The raw disk and the overlay (its own clusters over the same base) arrived whole.
    for moved_disk, path in zip(moved[1:], (raw, overlay), strict=True):
        assert raw_content(Path(moved_disk["path"])) == others[path], path.name
    target_overlay = probe_disk(moved[2]["path"], False)
    assert target_overlay.backing == str(workdir / "base.qcow2")  # sync=top: the target sits on the same base
    print(
        f"\ndisk migration: {report['disk_bytes_sent'] / 2**20:.1f} MiB disk stream, mirror "
        f"{report['mirror_time_s']} s, total {report['total_time_s']} s, downtime {report['downtime_ms']} ms, "
        f"{last - before} records written during it"
    )


def test_a_flipped_byte_in_the_disk_stream_aborts_and_the_disk_stays_whole(
    cluster: LocalCluster, relay: Relay, workdir: Path
) -> None:
    image = workdir / "disk.qcow2"
    random_part = make_disk(image)
    src = cluster.client("host-a")
    start_vm(src, str(image))
    relay.tamper = Tamper(flip_offset=4 << 20, stream_index=DISK_STREAM_INDEX)  # mid-mirror
    with pytest.raises(AgentRequestFailed, match="keeps running on host-a") as failed:
        migrate(cluster)
    assert relay.tamper.done.is_set()
    assert "disk" in str(failed.value), failed.value  # the disk stream's failure, not the memory stream's
    runs_on_source_only(cluster)
    assert not list((cluster.vm_root / "host-b" / "qemu" / "disks").glob("*")), "the target image was left"
    # The guest writes on at the source, on a disk the failed mirror never touched.
    after = wait_disk_counter(src, disk_counter(src) + 10)
    content = raw_content(image)
    assert content[:RANDOM_BYTES] == random_part
    written = records(content)
    assert written[: after + 1] == list(range(after + 1))


def test_a_shared_disk_is_checked_and_not_copied(
    cluster: LocalCluster, workdir: Path, guest_image: GuestImagePaths
) -> None:
    """... on a two-vCPU guest booted from a kernel of the operator's own (the test image's, copied elsewhere)."""
    image = workdir / "shared.qcow2"
    make_disk(image)
    boot = own_kernel(guest_image, workdir)
    src, dst = cluster.client("host-a"), cluster.client("host-b")
    start_vm(src, f"{image},shared", kernel=boot.kernel, initrd=boot.initrd, cpus=2)
    report = migrate(cluster)
    assert report["status"] == "completed", report
    assert (report["disks"], report["disks_copied"], report["disk_bytes_sent"]) == (1, 0, 0)
    assert report["mirror_time_s"] is None
    after = dst.request("vm.info", name=VM)["vm"]
    assert after["disks"] == [{"path": str(image), "format": "qcow2", "virtual_size": DISK_BYTES, "shared": True}]
    assert after["cpus"] == 2  # host-b recreated the same machine
    assert not list(workdir.glob(".*sealift-share-*")), "the check file was left beside the image"
    spec = json.loads((cluster.vm_root / "host-b" / "qemu" / f"{VM}.json").read_text())
    assert (spec["kernel"], spec["initramfs"]) == (boot.kernel, boot.initrd)  # host-b booted the same files
    last = records(raw_content(image))[-1]
    wait_disk_counter(dst, last + 10)  # host-b's QEMU writes the same image
    assert records(raw_content(image))[-1] > last


def test_a_destination_that_does_not_see_the_shared_image_refuses(guest_image: object, workdir: Path) -> None:
    """host-b's agent runs in a mount namespace where the image's directory holds a copy of it."""
    shared, elsewhere = workdir / "shared", workdir / "elsewhere"
    shared.mkdir()
    elsewhere.mkdir()
    image = shared / "disk.qcow2"
    make_disk(image)
    shutil.copy(image, elsewhere / "disk.qcow2")  # the same path, format and size, but not the same disk
    script = 'mount --bind "$0" "$1" && shift && exec "$@"'
    wrap = ["unshare", "-m", "--propagation", "private", "--", "sh", "-c", script, str(elsewhere), str(shared)]
    cluster = make_cluster(command_prefix={"host-b": wrap})
    cluster.start()
    try:
        src = cluster.client("host-a")
        start_vm(src, f"{image},shared")
        with pytest.raises(AgentRequestFailed, match="does not see the source's check file") as refused:
            migrate(cluster)
        assert refused.value.code == "shared_disk_not_shared"
        runs_on_source_only(cluster)
        assert not list(shared.glob(".*sealift-share-*"))
    finally:
        cluster.stop_guests()
        cluster.cleanup()


def test_a_discarded_in_doubt_guest_takes_its_copied_disk_images_along(guest_image: object, workdir: Path) -> None:
    """The resolver's discard of a received guest (keeper): QEMU gone, the targets the migration created
    removed, a shared image (not in this host's disk directory) left alone."""
    vm_dir = Path(tempfile.mkdtemp(prefix="sls-vms-", dir="/tmp"))
    try:
        config = AgentConfig("host-b", ("127.0.0.1", 0), vm_dir / "c.sock", vm_dir, vm_dir, vm_dir)
        registry = QemuVmRegistry(config)
        registry.disk_dir().mkdir(parents=True)
        shared = workdir / "shared.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(shared), "16M"], check=True)
        copied = create_target(probe_disk(str(shared), False), registry.disk_dir() / f"{VM}-disk0.qcow2")
        definition = VmDefinition(1, (copied, probe_disk(str(shared), True)))
        vm = registry.start_incoming(VM, 128, "", NetConfig.none(), definition)  # paused, waiting for a stream
        registry.hold_in_doubt(vm)
        record = MigrationRecord(
            "m1", VM, "destination", "host-a", "in-doubt", "qemu", None, 128 << 20, 0.0, 0.0, None, None
        )
        QemuKeeper(registry).discard_destination(record)
        assert not vm.alive()
        assert not Path(copied.path).exists()
        assert shared.exists()
    finally:
        shutil.rmtree(vm_dir, ignore_errors=True)


def test_a_destination_agent_killed_during_the_mirror_leaves_one_guest_and_no_orphan_image(
    cluster: LocalCluster, workdir: Path
) -> None:
    """T11 for disks: host-b's agent is SIGKILLed while the disk mirrors (its first progress event, no disk
    ready). The guest runs on at host-a on its whole disk; once host-b's agent restarts, its recovery
    removes the target image the half-received migration created (named by the migration's id), also
    when the destination QEMU died with the agent."""
    image = workdir / "disk.qcow2"
    random_part = make_disk(image)
    src = cluster.client("host-a")
    start_vm(src, str(image))
    disk_dir = cluster.vm_root / "host-b" / "qemu" / "disks"
    at_kill: list[Path] = []

    def strike(event: dict) -> None:
        if event.get("event") == "disk" and event.get("ready") == 0 and not at_kill:
            at_kill.extend(disk_dir.glob("*"))  # the target exists while its mirror runs
            cluster.kill("host-b", signal.SIGKILL)

    with pytest.raises(AgentRequestFailed, match="keeps running on host-a"):
        cluster.migrate(VM, "host-a", "host-b", on_event=strike)
    assert len(at_kill) == 1, "the migration was not struck during the mirror"
    migration_id = at_kill[0].stem.rsplit("-", 1)[1]
    assert at_kill[0].name == f"{VM}-disk0-{migration_id}.qcow2"
    vm = src.request("vm.info", name=VM)["vm"]
    assert vm["status"] == "running" and not vm["migrating"], vm

    cluster.start("host-b")  # the recovery settles what the kill left
    runs_on_source_only(cluster)
    assert not at_kill[0].exists(), "the half-received migration's target image was left on host-b"
    record = next(m for m in cluster.client("host-b").request("migrations")["migrations"] if m["id"] == migration_id)
    assert record["phase"] == "aborted", record
    # The guest writes on at host-a, its records without a gap, over the random data the mirror never touched.
    after = wait_disk_counter(src, disk_counter(src) + 10)
    content = raw_content(image)
    assert content[:RANDOM_BYTES] == random_part
    assert records(content)[: after + 1] == list(range(after + 1))
    # ... and the disk still migrates afterwards (no leftover of the first attempt in the way).
    report = migrate(cluster)
    assert report["status"] == "completed", report
    last = records(raw_content(image))[-1]
    wait_disk_counter(cluster.client("host-b"), last + 5)
