"""The QEMU test guest's image: a Debian kernel and a busybox initramfs running sealift's workload.

``build_image(cache_dir)`` produces two files QEMU boots directly with
``-kernel``/``-initrd``:

- the kernel: taken from the concrete ``linux-image-<abi>-amd64`` package
  that Debian's ``linux-image-amd64`` metapackage depends on (downloaded
  with ``apt-get download`` and unpacked with ``dpkg-deb -x``; nothing is
  installed into the host's /boot). When the kernel supports PVH boot (Debian's
  does), its compressed payload is unpacked here once into ``vmlinux``, an
  ELF that QEMU starts directly: under TCG the kernel's own decompressor
  would take about 5 s of every boot. Otherwise ``vmlinuz`` is used as is;
- ``initramfs.cpio``: busybox (from ``busybox-static``), ``/init``
  (``guest/init.sh``), the workload (``guest/workload.c``, compiled here
  with the machine's gcc, static), and the kernel modules the Debian kernel
  builds as modules but the guest needs (virtio PCI, network and block), with
  their dependencies, in load order.

Images are cached in ``cache_dir/<key>/``, where the key is a hash of every
input (package versions, gcc version, the sources, the builder's format).
A build happens in a scratch directory under ``cache_dir`` and is renamed
into place, under an exclusive lock, so concurrent builders neither race
nor leave a half-written image. A new build keeps the image it replaces
(the ``current`` one until then) and removes older ones: QEMU reads the
files only when it starts, so running VMs do not need them.

Command line (the lead wires it as ``sealift image build``)::

    python -m sealift.backends.qemu.image [--cache-dir DIR] [--force] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import lzma
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lz4.block

from sealift.backends.qemu import debian, kmod
from sealift.backends.qemu.cpio import CpioEntry, write_cpio
from sealift.backends.qemu.image_cache import MANIFEST, cached_build, last_built

__all__ = [
    "DEFAULT_SECRET",
    "SERVICE_PORT",
    "GuestImagePaths",
    "ImageBuildError",
    "add_build_arguments",
    "build_image",
    "cli_build",
    "default_cache_dir",
    "main",
    "pvh_vmlinux",
]

log = logging.getLogger(__name__)

GUEST_DIR = Path(__file__).resolve().parent / "guest"
WORKLOAD_SOURCE = GUEST_DIR / "workload.c"
INIT_SCRIPT = GUEST_DIR / "init.sh"
KERNEL_METAPACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# Modules the guest needs, with the config symbol that says whether the
# Debian kernel builds them in (y: nothing to load) or as modules (m).
GUEST_MODULES: tuple[tuple[str, str], ...] = (
    ("virtio_pci", "CONFIG_VIRTIO_PCI"),
    ("virtio_net", "CONFIG_VIRTIO_NET"),
    ("virtio_blk", "CONFIG_VIRTIO_BLK"),  # the operator's disks (definition.py)
)
# Bump when the builder changes what it puts into an image for the same inputs.
FORMAT_VERSION = 2
# Defaults the workload uses when the command line does not say (see workload.c).
SERVICE_PORT = 7777
DEFAULT_SECRET = "The bank amount transferred to account 4471-0093-2210 is USD 1,250,000.00 (sealift test secret)"

_MANIFEST = MANIFEST
_BZIMAGE = "vmlinuz"
_VMLINUX = "vmlinux"
_INITRAMFS = "initramfs.cpio"
_GCC_TIMEOUT_S = 120.0


class ImageBuildError(Exception):
    """The guest image could not be built (a missing tool or package, a failed compile)."""


@dataclass(frozen=True)
class GuestImagePaths:
    """A built guest image: what to hand QEMU, and what it was built from."""

    kernel: Path  # vmlinux (ELF, PVH entry) or vmlinuz (bzImage): QEMU's -kernel takes either
    initramfs: Path
    manifest: Path
    key: str
    kernel_package: str  # e.g. "linux-image-6.1.0-56-amd64"
    kernel_version: str  # the package version, e.g. "6.1.192-2"
    kernel_release: str  # uname -r inside the guest, e.g. "6.1.0-56-amd64"
    busybox_version: str
    modules: tuple[str, ...]  # module names in load order

    def describe(self) -> str:
        return (
            f"guest image {self.key}\n"
            f"  kernel     {self.kernel} ({self.kernel_package} {self.kernel_version})\n"
            f"  initramfs  {self.initramfs} (busybox {self.busybox_version}; modules {', '.join(self.modules)})\n"
            f"  manifest   {self.manifest}"
        )

    def to_json(self) -> dict[str, Any]:
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}


@dataclass(frozen=True)
class _Inputs:
    kernel: debian.DebianPackage
    busybox: debian.DebianPackage
    gcc_version: str
    workload_sha256: str
    init_sha256: str

    def key(self) -> str:
        material = json.dumps(
            {
                "format": FORMAT_VERSION,
                "kernel": str(self.kernel),
                "busybox": str(self.busybox),
                "gcc": self.gcc_version,
                "workload": self.workload_sha256,
                "init": self.init_sha256,
                "modules": GUEST_MODULES,
            },
            sort_keys=True,
        )
        return hashlib.sha256(material.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$SEALIFT_IMAGE_CACHE``, else /var/cache/sealift/qemu-guest (root) or ~/.cache/sealift/qemu-guest."""
    configured = os.environ.get("SEALIFT_IMAGE_CACHE")
    if configured:
        return Path(configured)
    if os.geteuid() == 0:
        return Path("/var/cache/sealift/qemu-guest")
    return Path.home() / ".cache" / "sealift" / "qemu-guest"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _gcc_version() -> str:
    try:
        done = subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True, timeout=30, check=True)
    except FileNotFoundError as exc:
        raise ImageBuildError("gcc is not installed: install the Debian packages gcc and libc6-dev") from exc
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise ImageBuildError(f"`gcc -dumpfullversion` failed: {exc}") from exc
    return done.stdout.strip()


def _resolve_inputs() -> _Inputs:
    fields = debian.show([KERNEL_METAPACKAGE, BUSYBOX_PACKAGE])
    return _Inputs(
        kernel=debian.kernel_from_depends(KERNEL_METAPACKAGE, fields[KERNEL_METAPACKAGE]),
        busybox=debian.DebianPackage(BUSYBOX_PACKAGE, fields[BUSYBOX_PACKAGE]["Version"]),
        gcc_version=_gcc_version(),
        workload_sha256=_sha256(WORKLOAD_SOURCE),
        init_sha256=_sha256(INIT_SCRIPT),
    )


def _load(image_dir: Path) -> GuestImagePaths | None:
    """The image in ``image_dir``, or None if it is absent or incomplete."""
    manifest = image_dir / _MANIFEST
    try:
        info = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    kernel, initramfs = image_dir / str(info.get("kernel_file", "")), image_dir / _INITRAMFS
    if not (kernel.is_file() and initramfs.is_file()):
        return None
    try:
        return GuestImagePaths(
            kernel=kernel,
            initramfs=initramfs,
            manifest=manifest,
            key=str(info["key"]),
            kernel_package=str(info["kernel_package"]),
            kernel_version=str(info["kernel_version"]),
            kernel_release=str(info["kernel_release"]),
            busybox_version=str(info["busybox_version"]),
            modules=tuple(info["modules"]),
        )
    except (KeyError, TypeError):
        return None  # a manifest from another builder version: rebuild


def _compile_workload(out: Path) -> None:
    argv = ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-o", str(out), str(WORKLOAD_SOURCE)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_GCC_TIMEOUT_S, check=False)
    except FileNotFoundError as exc:
        raise ImageBuildError("gcc is not installed: install the Debian packages gcc and libc6-dev") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"compiling the workload took over {_GCC_TIMEOUT_S:.0f} s") from exc
    if done.returncode != 0:
        hint = " (is libc6-dev installed? -static needs libc.a)" if "-lc" in done.stderr else ""
        raise ImageBuildError(f"compiling {WORKLOAD_SOURCE.name} failed{hint}:\n{done.stderr.strip()}")


def _single(paths: list[Path], what: str) -> Path:
    if len(paths) != 1:
        raise ImageBuildError(f"expected exactly one {what}, found {[p.name for p in paths]}")
    return paths[0]


def _kernel_modules(kernel_root: Path, release: str) -> list[kmod.KernelModule]:
    """The modules the guest must load, dependencies first; built-in drivers need none."""
    config = kernel_root / "boot" / f"config-{release}"
    wanted: list[str] = []
    for module, symbol in GUEST_MODULES:
        value = kmod.config_value(config, symbol)
        if value == "m":
            wanted.append(module)
        elif value != "y":
            raise ImageBuildError(f"the guest kernel {release} lacks {symbol} ({module}): it cannot drive virtio")
    if not wanted:
        return []
    index = kmod.module_index(kernel_root / "lib" / "modules" / release / "kernel")
    return kmod.modules_to_load(wanted, index)


_LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
_LZ4_LEGACY_BLOCK = 8 << 20  # the legacy format's fixed uncompressed block size


def _lz4_legacy(payload: bytes) -> bytes:
    """Unpack LZ4's legacy frame format (``lz4 -l``, what the kernel's build uses).

    Magic, then blocks of (little-endian u32 compressed size, LZ4 block) that
    each unpack to at most 8 MiB; the kernel's build appends the unpacked
    size as a u32, which must match. Raises ValueError on anything else.
    """
    pos, blocks = len(_LZ4_LEGACY_MAGIC), []
    while pos + 4 < len(payload):
        size = int.from_bytes(payload[pos : pos + 4], "little")
        if payload[pos : pos + 4] == _LZ4_LEGACY_MAGIC:  # frames may be concatenated
            pos += 4
            continue
        if pos + 4 + size > len(payload):
            break  # the trailing size field
        try:
            blocks.append(lz4.block.decompress(payload[pos + 4 : pos + 4 + size], uncompressed_size=_LZ4_LEGACY_BLOCK))
        except lz4.block.LZ4BlockError as exc:
            raise ValueError(f"bad LZ4 block at {pos}: {exc}") from exc
        pos += 4 + size
    out = b"".join(blocks)
    if len(payload) - pos != 4 or int.from_bytes(payload[pos:], "little") != len(out):
        raise ValueError("the LZ4 payload's trailing size does not match what it unpacked to")
    return out


def pvh_vmlinux(bzimage: Path, config: Path) -> bytes | None:
    """The uncompressed kernel ELF inside a bzImage, if the kernel can be booted that way (PVH).

    The x86 boot header says where the compressed payload is (boot protocol
    2.08+: ``payload_offset`` at 0x248, ``payload_length`` at 0x24c, relative to
    the protected-mode code after the setup sectors).
    """
    if kmod.config_value(config, "CONFIG_PVH") != "y":
        return None
    data = bzimage.read_bytes()
    if data[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", data, 0x206)[0] < 0x208:
        return None
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start : start + payload_length]
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        elif payload.startswith(b"\x1f\x8b"):
            elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)  # gzip framing
        elif payload.startswith(_LZ4_LEGACY_MAGIC):
            elf = _lz4_legacy(payload)  # Debian's cloud kernel (CONFIG_KERNEL_LZ4)
        else:
            return None  # another compression: boot the bzImage, slower but correct
    except (lzma.LZMAError, zlib.error, ValueError):
        return None
    return elf if elf.startswith(b"\x7fELF") else None


def _initramfs_entries(busybox: Path, workload: Path, modules: list[kmod.KernelModule]) -> list[CpioEntry]:
    dirs = [
        "bin",
        "dev",
        "etc",
        "etc/sealift",
        "lib",
        "lib/modules",
        "proc",
        "root",
        "sbin",
        "sys",
        "tmp",
        "usr",
        "usr/bin",
        "usr/sbin",
    ]
    entries = [CpioEntry.directory(d) for d in dirs]
    # The kernel opens /dev/console for init before init can mount devtmpfs.
    entries.append(CpioEntry.char_device("dev/console", 5, 1))
    entries.append(CpioEntry.file("init", INIT_SCRIPT.read_bytes(), 0o755))
    entries.append(CpioEntry.file("bin/busybox", busybox.read_bytes(), 0o755))
    entries.append(CpioEntry.file("bin/workload", workload.read_bytes(), 0o755))
    for module in modules:
        entries.append(CpioEntry.file(f"lib/modules/{module.name}.ko", kmod.module_bytes(module.path)))
    load_order = "".join(f"{module.name}.ko\n" for module in modules)
    entries.append(CpioEntry.file("etc/sealift/modules", load_order.encode()))
    return entries


def _build(inputs: _Inputs, key: str, scratch: Path) -> Path:
    """Build the image's files into ``scratch/out`` and return that directory."""
    started = time.monotonic()
    log.info("downloading %s and %s", inputs.kernel, inputs.busybox)
    debs = debian.download([inputs.kernel, inputs.busybox], scratch)
    kernel_root = debian.extract(debs[inputs.kernel.name], scratch / "kernel")
    busybox_root = debian.extract(debs[inputs.busybox.name], scratch / "busybox")

    vmlinuz = _single(sorted((kernel_root / "boot").glob("vmlinuz-*")), "boot/vmlinuz-* in the kernel package")
    release = vmlinuz.name.removeprefix("vmlinuz-")
    modules = _kernel_modules(kernel_root, release)
    busybox = busybox_root / "bin" / "busybox"
    if not busybox.is_file():
        raise ImageBuildError(f"{inputs.busybox} has no bin/busybox")

    log.info("compiling the workload")
    workload = scratch / "workload"
    _compile_workload(workload)

    out = scratch / "out"
    out.mkdir()
    vmlinux = pvh_vmlinux(vmlinuz, kernel_root / "boot" / f"config-{release}")
    if vmlinux is not None:
        kernel_file = _VMLINUX
        (out / kernel_file).write_bytes(vmlinux)
    else:
        log.warning("the kernel cannot be unpacked for PVH boot: using the bzImage (slower boots under TCG)")
        kernel_file = _BZIMAGE
        shutil.copyfile(vmlinuz, out / kernel_file)
    with open(out / _INITRAMFS, "wb") as f:
        write_cpio(f, _initramfs_entries(busybox, workload, modules))
    manifest = {
        "format": FORMAT_VERSION,
        "key": key,
        "kernel_package": inputs.kernel.name,
        "kernel_version": inputs.kernel.version,
        "kernel_release": release,
        "kernel_file": kernel_file,
        "busybox_version": inputs.busybox.version,
        "gcc_version": inputs.gcc_version,
        "workload_sha256": inputs.workload_sha256,
        "init_sha256": inputs.init_sha256,
        "modules": [module.name for module in modules],
        "kernel_sha256": _sha256(out / kernel_file),
        "initramfs_sha256": _sha256(out / _INITRAMFS),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (out / _MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for name in (kernel_file, _INITRAMFS, _MANIFEST):
        os.chmod(out / name, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
    return out


def build_image(cache_dir: Path, force: bool = False) -> GuestImagePaths:
    """The guest image for the current inputs: from the cache, or built now (``force``: always built).

    If apt cannot resolve the packages (no package lists, offline) and an
    image was built before, that image is used, with a warning.
    """
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageBuildError(f"cannot create the image cache {cache_dir}: {exc}") from exc
    try:
        inputs = _resolve_inputs()
    except debian.DebianError as exc:
        previous = None if force else last_built(cache_dir, _load)
        if previous is None:
            raise ImageBuildError(f"cannot resolve the guest image's packages: {exc}") from exc
        log.warning("using the last built guest image %s: %s", previous.key, exc)
        return previous
    key = inputs.key()

    def build(scratch: Path) -> Path:
        try:
            return _build(inputs, key, scratch)
        except (debian.DebianError, kmod.ModuleError, OSError) as exc:
            raise ImageBuildError(f"building guest image {key} failed: {exc}") from exc

    try:
        image, built = cached_build(cache_dir, key, _load, build, force=force)
    except OSError as exc:
        raise ImageBuildError(str(exc)) from exc
    if built:
        log.info("built guest image %s in %s", key, cache_dir / key)
    return image


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"image cache (default: $SEALIFT_IMAGE_CACHE or {default_cache_dir()})",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached image matches")
    parser.add_argument("--json", action="store_true", help="print the image as one JSON object")


def cli_build(args: argparse.Namespace) -> int:
    """``sealift image build``: build (or find) the guest image and print where it is."""
    cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    started = time.monotonic()
    try:
        image = build_image(cache_dir, force=args.force)
    except ImageBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    if args.json:
        print(json.dumps({**image.to_json(), "seconds": round(elapsed, 2)}, sort_keys=True))
    else:
        print(image.describe())
        print(f"  ({elapsed:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sealift image build", description="build the QEMU test guest image")
    add_build_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return cli_build(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
