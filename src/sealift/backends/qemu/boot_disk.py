"""A bootable disk for firmware boot: sealift's test guest on a raw FAT disk that SYSLINUX boots.

Firmware boot (``--boot disk``) gives QEMU no -kernel: SeaBIOS boots the
first disk. To test it with a real disk, this builds a raw FAT
"superfloppy" (no partition table: SeaBIOS runs SYSLINUX's boot sector at
sector 0 directly) holding SYSLINUX, the test guest's kernel and initramfs
and a ``syslinux.cfg`` with the guest's command line, so the guest runs
sealift's counter workload like a kernel-booted one. The same disk also
boots under UEFI (OVMF): SYSLINUX's EFI build sits at the removable-media
path ``EFI/BOOT/BOOTX64.EFI`` with its own copy of the configuration.

SYSLINUX loads a bzImage, not the ELF vmlinux the test image keeps for PVH
boot, so the very kernel package the image was built from is downloaded
again for its ``vmlinuz``. Everything is done on the image file through
mtools (``mformat``, ``mcopy``) and ``syslinux --install`` (its mtools
installer): no loop device, no mount, no root needed. Built once per test
image into ``<image cache>/boot-disk/<key>/`` (image_cache.cached_build).
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from pathlib import Path

from sealift.backends.qemu import debian
from sealift.backends.qemu.image import GuestImagePaths, ImageBuildError
from sealift.backends.qemu.image_cache import MANIFEST, cached_build

__all__ = ["BOOT_CMDLINE", "BootDisk", "build_boot_disk"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: also bootable by UEFI (EFI/BOOT/BOOTX64.EFI)
DISK_FILE = "disk.raw"
DISK_MIB = 32  # the bzImage (~8 MiB) and initramfs (~3 MiB), with room to spare
# The guest's command line, as vm.py gives a kernel-booted test guest (the network is init.sh's
# default, QEMU's user network): only what the firmware boot cannot get from QEMU is fixed here.
BOOT_CMDLINE = "console=ttyS0 quiet panic=-1"
_TOOL_TIMEOUT_S = 60.0
# SYSLINUX for UEFI (Debian's syslinux-efi): the removable-media path UEFI firmware (OVMF) looks for.
_EFI_LOADER = Path("/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi")
_EFI_LDLINUX = Path("/usr/lib/syslinux/modules/efi64/ldlinux.e64")


def _syslinux_cfg(cmdline: str) -> str:
    return (
        f"DEFAULT sealift\nPROMPT 0\nTIMEOUT 0\nLABEL sealift\n  LINUX /vmlinuz\n  INITRD /initrd\n  APPEND {cmdline}\n"
    )


class BootDisk:
    """A built boot disk: the raw image (copy it before use: a VM writes to its disk) and its key."""

    def __init__(self, path: Path, key: str) -> None:
        self.path = path
        self.key = key


def _run(argv: list[str], what: str) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S, check=False)
    except FileNotFoundError as exc:
        raise ImageBuildError(
            f"{argv[0]} is not installed (Debian packages mtools, syslinux, syslinux-common): {what}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"{what}: {argv[0]} took longer than {_TOOL_TIMEOUT_S:.0f} s") from exc
    if done.returncode != 0:
        raise ImageBuildError(f"{what} failed: {(done.stderr or done.stdout).strip()}")


def _syslinux_version() -> str:
    done = subprocess.run(["syslinux", "--version"], capture_output=True, text=True, timeout=10, check=False)
    return (done.stderr or done.stdout).strip() or "unknown"


def _key(image: GuestImagePaths, cmdline: str) -> str:
    material = json.dumps(
        {"format": FORMAT_VERSION, "image": image.key, "syslinux": _syslinux_version(), "cmdline": cmdline},
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _load(disk_dir: Path) -> BootDisk | None:
    try:
        info = json.loads((disk_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    disk = disk_dir / DISK_FILE
    return BootDisk(disk, str(info.get("key"))) if disk.is_file() else None


def _bzimage(image: GuestImagePaths, scratch: Path) -> Path:
    """The test image's kernel as a bzImage: from the same Debian package version it was built from."""
    package = debian.DebianPackage(image.kernel_package, image.kernel_version)
    debs = debian.download([package], scratch)
    root = debian.extract(debs[package.name], scratch / "kernel")
    vmlinuz = root / "boot" / f"vmlinuz-{image.kernel_release}"
    if not vmlinuz.is_file():
        raise ImageBuildError(f"{package} has no boot/vmlinuz-{image.kernel_release}")
    return vmlinuz


def _build(image: GuestImagePaths, cmdline: str, key: str, scratch: Path) -> Path:
    started = time.monotonic()
    vmlinuz = _bzimage(image, scratch)
    out = scratch / "out"
    out.mkdir()
    disk = out / DISK_FILE
    with open(disk, "wb") as f:
        f.truncate(DISK_MIB << 20)
    cfg = scratch / "syslinux.cfg"
    cfg.write_text(_syslinux_cfg(cmdline))
    target = str(disk)
    _run(["mformat", "-i", target, "-v", "SEALIFT", "::"], "formatting the boot disk (FAT)")
    for source, name in ((vmlinuz, "vmlinuz"), (image.initramfs, "initrd"), (cfg, "syslinux.cfg")):
        _run(["mcopy", "-i", target, str(source), f"::/{name}"], f"copying {name} onto the boot disk")
    _run(["syslinux", "--install", target], "installing SYSLINUX on the boot disk")
    for needed in (_EFI_LOADER, _EFI_LDLINUX):
        if not needed.is_file():
            raise ImageBuildError(f"{needed} is missing: install the Debian package syslinux-efi")
    _run(["mmd", "-i", target, "::/EFI", "::/EFI/BOOT"], "making EFI/BOOT on the boot disk")
    for source, name in ((_EFI_LOADER, "BOOTX64.EFI"), (_EFI_LDLINUX, "ldlinux.e64"), (cfg, "syslinux.cfg")):
        _run(["mcopy", "-i", target, str(source), f"::/EFI/BOOT/{name}"], f"copying EFI/BOOT/{name}")
    manifest = {
        "format": FORMAT_VERSION,
        "key": key,
        "guest_image": image.key,
        "kernel_package": f"{image.kernel_package}={image.kernel_version}",
        "cmdline": cmdline,
        "syslinux": _syslinux_version(),
        "disk_sha256": hashlib.sha256(disk.read_bytes()).hexdigest(),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def build_boot_disk(cache_dir: Path, image: GuestImagePaths, cmdline: str = BOOT_CMDLINE) -> BootDisk:
    """The boot disk for test image ``image``: from ``cache_dir/boot-disk``, or built now."""
    disk_cache = cache_dir / "boot-disk"
    try:
        disk_cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageBuildError(f"cannot create the boot disk cache {disk_cache}: {exc}") from exc
    key = _key(image, cmdline)

    def build(scratch: Path) -> Path:
        try:
            return _build(image, cmdline, key, scratch)
        except (debian.DebianError, OSError) as exc:
            raise ImageBuildError(f"building boot disk {key} failed: {exc}") from exc

    try:
        disk, built = cached_build(disk_cache, key, _load, build)
    except OSError as exc:
        raise ImageBuildError(str(exc)) from exc
    if built:
        log.info("built boot disk %s in %s", key, disk_cache / key)
    return disk
