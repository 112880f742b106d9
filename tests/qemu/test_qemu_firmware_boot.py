"""Firmware boot (``--boot disk``): SeaBIOS or OVMF (UEFI) boots a real disk with SYSLINUX, and the VM migrates.

The disk is boot_disk.py's raw FAT image (SYSLINUX, the test guest's bzImage
and initramfs), built once into the image cache; each test boots its own
copy. No -kernel reaches QEMU: the counter the guest prints proves the
firmware found and ran the disk's boot loader.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealift.agent.client import AgentClient, AgentRequestFailed
from sealift.backends.qemu.boot_disk import BootDisk, build_boot_disk
from sealift.backends.qemu.definition import DEFAULT_FIRMWARE, DiskError, boot_image, check_boot
from sealift.backends.qemu.image import GuestImagePaths, default_cache_dir
from sealift.cluster import LocalCluster
from sealift.wire.vm_definition import FirmwareBoot

VM = "fwvm"
OVMF = "/usr/share/ovmf/OVMF.fd"  # Debian's ovmf: UEFI, booting the disk's EFI/BOOT/BOOTX64.EFI


@pytest.fixture(scope="module")
def boot_disk(guest_image: GuestImagePaths) -> BootDisk:
    return build_boot_disk(default_cache_dir(), guest_image)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sls-fw-", dir="/var/tmp"))  # a disk file system, not tmpfs
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cluster(guest_image: GuestImagePaths) -> Iterator[LocalCluster]:
    cluster = LocalCluster(extra_config="step_timeout_s = 15\nhandshake_timeout_s = 5")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop_guests()
        cluster.cleanup()


def counter(client: AgentClient) -> int | None:
    value = client.request("vm.info", name=VM)["vm"]["counter"]
    return value if isinstance(value, int) else None


def start_firmware_vm(client: AgentClient, disk: Path, memory: str = "128M", **fields: object) -> dict:
    request = {"name": VM, "backend": "qemu", "memory": memory, "disks": [str(disk)], "boot": "disk", **fields}
    return client.request("vm.start", **request)["vm"]


def sealift(*argv: str) -> subprocess.CompletedProcess[str]:
    """The `sealift` command as an operator runs it (the source tree on PYTHONPATH, as the test run's)."""
    wide = {**os.environ, "COLUMNS": "300"}  # the table is not cut to a terminal's width
    return subprocess.run(
        [sys.executable, "-m", "sealift", *argv], capture_output=True, text=True, timeout=120, env=wide
    )


def wait_counter(client: AgentClient, above: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = counter(client)
        if value is not None and value > above:
            return value
        time.sleep(0.3)
    raise AssertionError(f"the guest's counter did not pass {above} in {timeout} s")


def test_the_firmware_digest_must_match_at_the_destination(workdir: Path) -> None:
    firmware = workdir / "bios.bin"
    shutil.copy(DEFAULT_FIRMWARE, firmware)
    boot = FirmwareBoot(str(firmware))
    key = boot_image(boot).key
    assert check_boot(boot, key).kernel == firmware
    with open(firmware, "ab") as f:
        f.write(b"\0")  # another SeaBIOS build at the same path
    with pytest.raises(DiskError, match="the firmware .* differs here from the source's"):
        check_boot(boot, key)
    firmware.unlink()
    with pytest.raises(DiskError, match="cannot be read"):
        check_boot(boot, key)


@pytest.mark.parametrize("firmware", [DEFAULT_FIRMWARE, OVMF], ids=["seabios", "ovmf-uefi"])
def test_a_firmware_booted_guest_migrates_with_its_copied_disk(
    cluster: LocalCluster, boot_disk: BootDisk, workdir: Path, firmware: str
) -> None:
    disk = workdir / "boot.raw"
    shutil.copy(boot_disk.path, disk)
    src, dst = cluster.client("host-a"), cluster.client("host-b")
    # SYSLINUX's EFI build fails to load the kernel and initramfs in 128 MiB under OVMF ("Failed"): 256.
    vm = start_firmware_vm(src, disk, memory="256M" if firmware == OVMF else "128M", firmware=firmware)
    assert vm["boot"] == {"from": "disk", "firmware": firmware}
    assert vm["disks"][0]["path"] == str(disk) and not vm["disks"][0]["shared"]
    pid = vm["pid"]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"-kernel" not in cmdline and b"-bios" in cmdline  # the firmware, not QEMU, loaded the kernel
    before = wait_counter(src, 20, timeout=90)  # firmware -> SYSLINUX -> Linux -> the counter workload

    report = cluster.migrate(VM, "host-a", "host-b")

    assert report["status"] == "completed", report
    assert (report["disks"], report["disks_copied"]) == (1, 1)
    moved = dst.request("vm.info", name=VM)["vm"]
    assert moved["boot"] == {"from": "disk", "firmware": firmware}
    target = Path(moved["disks"][0]["path"])
    assert target != disk and target.parent == cluster.vm_root / "host-b" / "qemu" / "disks"
    after = wait_counter(dst, before)  # the same guest goes on counting on host-b, from its copy
    assert after > before
    assert VM not in [v["name"] for v in src.request("vm.list")["vms"]]  # exactly one running copy
    # The copy is the boot disk the guest booted from: the same boot loader, kernel and initramfs.
    assert target.read_bytes()[: 1 << 20] == disk.read_bytes()[: 1 << 20]


def test_a_destination_with_another_firmware_refuses_before_creating_anything(
    cluster: LocalCluster, boot_disk: BootDisk, workdir: Path
) -> None:
    disk = workdir / "boot.raw"
    shutil.copy(boot_disk.path, disk)
    firmware = workdir / "bios.bin"
    shutil.copy(DEFAULT_FIRMWARE, firmware)
    src, dst = cluster.client("host-a"), cluster.client("host-b")
    socket = str(cluster.agents["host-a"].socket_path)
    # Defined as an operator does, with the CLI.
    start = ["vm", "start", VM, "--backend", "qemu", "--memory", "128M", "--disk", str(disk), "--boot", "disk"]
    done = sealift(*start, "--firmware", str(firmware), "--json", "--socket", socket)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["boot"] == {"from": "disk", "firmware": str(firmware)}
    shown = sealift("vm", "info", VM, "--socket", socket)
    assert f"disk (firmware {firmware})" in shown.stdout, shown.stdout
    refused = sealift(*start, "--kernel", "/boot/vmlinuz", "--socket", socket)
    assert refused.returncode != 0 and "leave out --kernel" in refused.stderr
    before = wait_counter(src, 10)
    # Both agents share this machine's files: change the firmware at that path after the source
    # loaded it, as a destination with another SeaBIOS build would have it.
    with open(firmware, "ab") as f:
        f.write(b"\0")

    with pytest.raises(AgentRequestFailed, match="the firmware .* differs here from the source's"):
        cluster.migrate(VM, "host-a", "host-b")

    assert VM not in [v["name"] for v in dst.request("vm.list")["vms"]]
    disks_b = cluster.vm_root / "host-b" / "qemu" / "disks"
    assert not disks_b.exists() or not any(disks_b.iterdir()), "the refused destination created a disk"
    assert src.request("vm.info", name=VM)["vm"]["status"] == "running"
    assert wait_counter(src, before) > before  # the guest never stopped
