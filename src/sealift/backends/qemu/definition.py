"""An operator's QEMU VM beyond memory and network: its disks (and vCPUs), on this host.

`probe_disk` reads an image with ``qemu-img info --output=json`` (format,
virtual size, backing file); `blockdev_args` attaches each disk as a
``-blockdev`` pair (a file node, then a format node named ``disk<i>``, the
name QMP addresses it by) and a virtio-blk device. The definition itself
(wire/vm_definition.py) is what travels with a migration.

Shared disks: both hosts must open the very same image. Before a migration
the source writes a random token into a check file beside the image
(`write_share_token`); the destination must read the same token there
(`check_shared`), else the migration is refused (`shared_disk_not_shared`):
a copy of the image, or another file system mounted at the same path, would
otherwise leave two diverging disks behind one guest.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
from dataclasses import replace
from pathlib import Path

from sealift.backends.qemu.image import GuestImagePaths
from sealift.errors import SealiftError
from sealift.wire.vm_definition import DISK_FORMATS, MAX_DISKS, BootSpec, DiskSpec, FirmwareBoot, VmDefinition

QEMU_IMG = "qemu-img"
# Debian's seabios package (a dependency of qemu-system-x86): the BIOS QEMU itself loads by default.
DEFAULT_FIRMWARE = "/usr/share/seabios/bios-256k.bin"
_QEMU_IMG_TIMEOUT_S = 30.0


class DiskError(SealiftError):
    """A disk cannot be used as asked (missing, unknown format, bad option)."""

    code = "disk_error"


class SharedDiskError(SealiftError):
    """The destination does not see the shared disk the source uses: it would not be the same disk."""

    code = "shared_disk_not_shared"


def node_name(index: int) -> str:
    """The format node of disk `index` (QMP's name for it: mirror source, NBD export)."""
    return f"disk{index}"


def qemu_img(*args: str) -> str:
    """Run qemu-img; its stdout, or a DiskError with its message."""
    try:
        done = subprocess.run(
            [QEMU_IMG, *args], capture_output=True, text=True, timeout=_QEMU_IMG_TIMEOUT_S, check=False
        )
    except FileNotFoundError as exc:
        raise DiskError("qemu-img is not installed (Debian package qemu-utils)") from exc
    except subprocess.TimeoutExpired as exc:
        raise DiskError(f"`qemu-img {' '.join(args)}` took longer than {_QEMU_IMG_TIMEOUT_S:.0f} s") from exc
    if done.returncode != 0:
        raise DiskError(f"`qemu-img {' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout


def probe_disk(path: str, shared: bool) -> DiskSpec:
    """A disk image as qemu-img sees it (``-U``: it may be open in a running QEMU)."""
    absolute = os.path.abspath(path)
    if not os.path.isfile(absolute):
        raise DiskError(f"disk image {absolute} does not exist (or is not a regular file)")
    info = json.loads(qemu_img("info", "-U", "--output=json", absolute))
    fmt = info.get("format")
    if fmt not in DISK_FORMATS:
        raise DiskError(f"disk image {absolute} is {fmt!r}: sealift attaches {' or '.join(DISK_FORMATS)} images")
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if backing is not None and not os.path.isabs(backing):
        backing = os.path.join(os.path.dirname(absolute), backing)
    disk = DiskSpec(absolute, fmt, int(info["virtual-size"]), shared, backing)
    # The same checks as on arrival: a path QEMU's syntax cannot carry is refused here, not at the peer.
    try:
        return DiskSpec.from_json(disk.to_json(), 0)
    except SealiftError as exc:
        raise DiskError(str(exc)) from None


def parse_disk_option(text: str) -> DiskSpec:
    """``PATH`` or ``PATH,shared`` (the CLI's --disk), probed."""
    path, _, option = text.partition(",")
    if option not in ("", "shared"):
        raise DiskError(f"unknown disk option {option!r} in {text!r}: use PATH or PATH,shared")
    return probe_disk(path, option == "shared")


def definition_for(cpus: int, disks: list[DiskSpec], boot: BootSpec | FirmwareBoot | None = None) -> VmDefinition:
    if len(disks) > MAX_DISKS:
        raise DiskError(f"{len(disks)} disks: a VM has at most {MAX_DISKS}")
    if isinstance(boot, FirmwareBoot):
        if not disks:
            raise DiskError("a firmware boot (--boot disk) boots the first disk: give at least one --disk")
        boot = FirmwareBoot(os.path.abspath(boot.firmware))
    elif boot is not None:
        boot = BootSpec(os.path.abspath(boot.kernel), os.path.abspath(boot.initrd))
    if boot is not None:
        boot_image(boot)  # the files there and readable, now rather than at QEMU's start
    definition = VmDefinition(cpus, tuple(disks), boot)
    try:
        return VmDefinition.from_json(definition.to_json())
    except SealiftError as exc:
        raise DiskError(str(exc)) from None


def blockdev_args(definition: VmDefinition, first_pci_slot: int | None = None) -> list[str]:
    """QEMU arguments attaching every disk (JSON syntax: a path needs no escaping).

    ``first_pci_slot``: disk i at that slot + i (a machine that must match a saved one), else QEMU picks.
    """
    args: list[str] = []
    for index, disk in enumerate(definition.disks):
        node = node_name(index)
        blockdev = {
            "driver": disk.format,
            "node-name": node,
            "file": {"driver": "file", "filename": disk.path, "node-name": f"{node}-file"},
        }
        args += ["-blockdev", json.dumps(blockdev, sort_keys=True)]
        device = f"virtio-blk-pci,drive={node},id=vd{index}"
        if first_pci_slot is not None:
            device += f",bus=pcie.0,addr={first_pci_slot + index:#x}"
        args += ["-device", device]
    return args


# -- the operator's own kernel -------------------------------------------------------------


def boot_image(boot: BootSpec | FirmwareBoot) -> GuestImagePaths:
    """The operator's kernel and initramfs (or firmware) as an image QEMU boots; its key is their SHA-256.

    A migration carries the key, and the destination boots only the very
    same files (same paths, same digest): its QEMU must run the kernel whose
    memory arrives (or, firmware boot, the very BIOS whose code and tables
    are in that memory: another SeaBIOS build would be called by a guest
    that resumes into addresses of the old one).
    """
    if isinstance(boot, FirmwareBoot):
        return _firmware_image(boot)
    digest = hashlib.sha256()
    for label, path in (("kernel", boot.kernel), ("initrd", boot.initrd)):
        try:
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
        except OSError as exc:
            raise DiskError(f"the guest's {label} {path} cannot be read: {exc.strerror}") from None
    kernel = Path(boot.kernel)
    return GuestImagePaths(
        kernel=kernel,
        initramfs=Path(boot.initrd),
        manifest=kernel,  # no manifest: the operator's files
        key=digest.hexdigest(),
        kernel_package="(the operator's kernel)",
        kernel_version="",
        kernel_release="",
        busybox_version="",
        modules=(),
    )


def _firmware_image(boot: FirmwareBoot) -> GuestImagePaths:
    """The firmware file as the "image": kernel and initramfs name it only so that nothing else is booted."""
    try:
        with open(boot.firmware, "rb") as f:
            key = hashlib.sha256(f.read()).hexdigest()
    except OSError as exc:
        raise DiskError(f"the firmware {boot.firmware} cannot be read: {exc.strerror}") from None
    firmware = Path(boot.firmware)
    return GuestImagePaths(
        kernel=firmware,
        initramfs=firmware,
        manifest=firmware,
        key=key,
        kernel_package="(firmware boot from the first disk)",
        kernel_version="",
        kernel_release="",
        busybox_version="",
        modules=(),
    )


def check_boot(boot: BootSpec | FirmwareBoot, key: str) -> GuestImagePaths:
    """The destination: the operator's kernel and initrd (or firmware) here, the very files the source booted."""
    image = boot_image(boot)
    if isinstance(boot, FirmwareBoot) and image.key != key:
        raise DiskError(
            f"the firmware {boot.firmware} differs here from the source's (SHA-256 {image.key[:16]}, the "
            f"source's {key[:16]}): the guest would resume into another BIOS; install the same firmware "
            "(Debian package seabios, same version) on both hosts"
        )
    if isinstance(boot, BootSpec) and image.key != key:
        raise DiskError(
            f"the kernel {boot.kernel} and initrd {boot.initrd} differ here from the source's "
            f"(SHA-256 {image.key[:16]}, the source's {key[:16]}): install the same files on both hosts"
        )
    return image


# -- shared disks ---------------------------------------------------------------------------


def share_token_path(disk: DiskSpec, migration_id: str) -> Path:
    image = Path(disk.path)
    return image.with_name(f".{image.name}.sealift-share-{migration_id[:16]}")


def write_share_token(disk: DiskSpec, migration_id: str) -> DiskSpec:
    """Write a fresh token beside a shared image; the disk as it travels, carrying the token."""
    token = secrets.token_hex(16)
    path = share_token_path(disk, migration_id)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
            f.flush()
            os.fsync(f.fileno())  # a shared file system shows the peer what reached its server
    except OSError as exc:
        raise DiskError(f"cannot write the shared-disk check file {path}: {exc}") from exc
    return replace(disk, token=token)


def remove_share_token(disk: DiskSpec, migration_id: str) -> None:
    share_token_path(disk, migration_id).unlink(missing_ok=True)


def check_shared(disk: DiskSpec, migration_id: str) -> None:
    """The destination: do we see the source's shared image? (its token, and the same format and size)"""
    path = share_token_path(disk, migration_id)
    try:
        seen = path.read_text().strip()
    except OSError as exc:
        raise SharedDiskError(
            f"shared disk {disk.path}: this host does not see the source's check file {path.name} beside it "
            f"({exc.strerror}): the path is not the same shared storage here"
        ) from None
    if disk.token is None or not secrets.compare_digest(seen, disk.token):
        raise SharedDiskError(f"shared disk {disk.path}: the check file beside it holds another token here")
    try:
        here = probe_disk(disk.path, True)
    except DiskError as exc:
        raise SharedDiskError(f"shared disk {disk.path}: {exc}") from None
    if (here.format, here.virtual_size) != (disk.format, disk.virtual_size):
        raise SharedDiskError(
            f"shared disk {disk.path} is {here.format} of {here.virtual_size} bytes here, "
            f"{disk.format} of {disk.virtual_size} at the source"
        )


# -- copied disks: the destination's targets ------------------------------------------------


def create_target(disk: DiskSpec, target: Path) -> DiskSpec:
    """An empty image for a copied disk: same format and virtual size, over the same backing file if any.

    The backing file must exist here at the same path (then only the top
    layer travels, sync=top); a target that already exists is refused
    (never overwrite an operator's file).
    """
    if target.exists():
        raise DiskError(f"the target image {target} already exists here: refusing to overwrite it")
    args = ["create", "-q", "-f", disk.format]
    if disk.backing is not None:
        backing = probe_backing(disk.backing)
        args += ["-b", disk.backing, "-F", backing]
    qemu_img(*args, str(target), str(disk.virtual_size))
    return replace(disk, path=str(target), shared=False, token=None)


def probe_backing(path: str) -> str:
    if not os.path.isfile(path):
        raise DiskError(f"the backing file {path} of a copied disk is not on this host (it must be, at the same path)")
    fmt = json.loads(qemu_img("info", "-U", "--output=json", path)).get("format")
    if not isinstance(fmt, str):
        raise DiskError(f"qemu-img cannot tell the format of the backing file {path}")
    return fmt
