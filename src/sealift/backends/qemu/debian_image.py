"""The Debian guest's image: a real Debian 12 (systemd, nginx, redis) on a qcow2 disk.

``build_debian_image(cache_dir)`` produces, in ``cache_dir/debian/<key>/``:

- ``disk.qcow2``: an ext4 root file system (4 GiB virtual, a few hundred
  MiB used, so a guest has room to write a GiB of its own) made by ``debootstrap --variant=minbase`` with systemd, udev,
  Debian's cloud kernel, nginx-light and redis-server, then configured
  here (``guest/debian/``): a static address from the kernel command line
  (``sealift.ip=``/``sealift.gw=``, as the busybox guest reads them), nginx
  serving a page, redis with its append-only file (``appendfsync always``:
  an acknowledged write is on the disk), the known secret in
  ``/var/lib/sealift/secret.txt`` and loaded into redis at boot
  (``sealift:secret``), and a unit that prints ``sealift-guest-ready`` on
  the serial console once nginx and redis answer. Timers and services that
  only slow a TCG boot are masked; docs, man pages and locales removed.
  ``mkfs.ext4 -d`` fills the file system from the directory, so no loop
  device or mount is needed;
- ``kernel`` and ``initrd.img``: the kernel (unpacked for PVH boot, as the
  busybox guest's) and Debian's initramfs, made with just the virtio
  drivers (the cloud kernel builds them as modules), for a direct kernel
  boot with ``root=/dev/vda``.

The key hashes every input: the candidate versions of the packages (from
the host's apt, which follows the same archive), debootstrap's version,
the suite, the mirror, the files under ``guest/debian/`` and this builder's
format. The cache scheme is the busybox guest's (``image_cache.py``); the
``debian/`` subdirectory keeps the two images' pruning apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sealift.backends.qemu import debian
from sealift.backends.qemu.image import DEFAULT_SECRET, GUEST_DIR, default_cache_dir, pvh_vmlinux
from sealift.backends.qemu.image_cache import MANIFEST, cached_build, last_built
from sealift.errors import SealiftError

__all__ = [
    "DEBIAN_GUEST_FILES",
    "HTTP_PORT",
    "READY_LINE",
    "REDIS_PORT",
    "REDIS_SECRET_KEY",
    "SECRET_PATH",
    "DebianGuestError",
    "DebianImage",
    "build_debian_image",
    "debian_cache_dir",
]

log = logging.getLogger(__name__)

DEBIAN_GUEST_FILES = GUEST_DIR / "debian"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
# What debootstrap adds to minbase. iproute2 sets the static address; no DHCP client is needed.
PACKAGES = ("systemd-sysv", "udev", KERNEL_METAPACKAGE, "nginx-light", "redis-server", "iproute2")
# An operator's disk size (the benchmark: 4 GiB virtual, ~1 GiB used). Virtual size costs
# nothing: the image stores what is used, and a mirror with sync=top copies what the guest wrote.
DISK_SIZE = "4G"
# mke2fs writes the inode tables and the journal now: left lazy, the guest's kernel would zero them in
# the background after every fresh boot, and those writes would land in each guest's overlay.
MKFS_EXTENDED = "lazy_itable_init=0,lazy_journal_init=0"
FORMAT_VERSION = 6  # bump when the builder changes what it puts into an image for the same inputs

HTTP_PORT = 80
REDIS_PORT = 6379
REDIS_SECRET_KEY = "sealift:secret"
SECRET_PATH = "/var/lib/sealift/secret.txt"
READY_LINE = b"sealift-guest-ready"
NOT_READY_LINE = b"sealift-guest-not-ready"

# Our units, enabled; units that only cost TCG boot time (or write to the disk on a timer), masked.
_OUR_UNITS = ("sealift-net.service", "sealift-secret.service", "sealift-ready.service")
_MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
    "getty@tty1.service",  # no screen
    # No login prompt on the serial console (root has no password anyway): the console keeps the kernel's
    # messages and sealift's lines, and agetty's vhangup() no longer cuts off a unit writing to it.
    "serial-getty@ttyS0.service",
    "systemd-pstore.service",
    "systemd-networkd-wait-online.service",
    "systemd-logind.service",  # no D-Bus in the image: it would only fail and restart; a serial login needs none
)
_STRIPPED = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/cache/apt",
    "var/lib/apt/lists",
)
# What the initramfs loads: the root disk's drivers (ext4 is built in), and the NIC's, so eth0 is there
# when systemd starts instead of when udev gets to it (~7 s later under TCG).
_INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "virtio_net")
_DEBOOTSTRAP_TIMEOUT_S = 900.0
_TOOL_TIMEOUT_S = 300.0
_KERNEL_FILE = "kernel"  # an ELF vmlinux (PVH) or a bzImage: QEMU's -kernel takes either


class DebianGuestError(SealiftError):
    """The Debian guest's image or saved state could not be built, found or started."""

    code = "debian_guest_error"


@dataclass(frozen=True)
class DebianImage:
    """A built Debian guest image: the disk and the kernel files QEMU boots directly."""

    dir: Path
    disk: Path  # qcow2, read-only: every guest runs on an overlay of it
    kernel: Path
    initrd: Path
    key: str
    kernel_release: str  # e.g. "6.1.0-50-cloud-amd64"
    packages: dict[str, str]  # the included packages' versions as installed

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def debian_cache_dir(cache_dir: Path | None = None) -> Path:
    """Where Debian images live: ``debian/`` under the guest image cache (default_cache_dir())."""
    return (cache_dir if cache_dir is not None else default_cache_dir()) / "debian"


def _mirror() -> str:
    return os.environ.get("SEALIFT_DEBIAN_MIRROR", DEFAULT_MIRROR)


def _run(argv: list[str], what: str, timeout: float = _TOOL_TIMEOUT_S, log_path: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise DebianGuestError(f"{what}: {argv[0]} is not installed (scripts/run.sh setup installs it)") from exc
    except subprocess.TimeoutExpired as exc:
        raise DebianGuestError(f"{what}: `{argv[0]}` did not finish in {timeout:.0f} s") from exc
    if log_path is not None:
        log_path.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        tail = " / ".join((done.stderr or done.stdout).strip().splitlines()[-4:])
        raise DebianGuestError(f"{what} failed (exit {done.returncode}): {tail}")
    return done.stdout


def _tool_version(argv: list[str]) -> str:
    return _run(argv, f"`{' '.join(argv)}`", timeout=30).strip().splitlines()[0]


def _files_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(DEBIAN_GUEST_FILES.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(DEFAULT_SECRET.encode())
    return digest.hexdigest()


def _key() -> str:
    """The image's key, from every input; raises debian.DebianError if apt cannot resolve the packages."""
    fields = debian.show(list(PACKAGES))
    material = {
        "format": FORMAT_VERSION,
        "suite": SUITE,
        "mirror": _mirror(),
        "packages": {name: fields[name]["Version"] for name in PACKAGES},
        "debootstrap": _tool_version(["debootstrap", "--version"]),
        "files": _files_digest(),
        "disk_size": DISK_SIZE,
        # The builder's own settings, so changing one rebuilds without a FORMAT_VERSION bump.
        "units": [_OUR_UNITS, _MASKED_UNITS],
        "initramfs_modules": _INITRAMFS_MODULES,
        "stripped": _STRIPPED,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def _load(image_dir: Path) -> DebianImage | None:
    try:
        info = json.loads((image_dir / MANIFEST).read_text())
        image = DebianImage(
            dir=image_dir,
            disk=image_dir / "disk.qcow2",
            kernel=image_dir / _KERNEL_FILE,
            initrd=image_dir / "initrd.img",
            key=str(info["key"]),
            kernel_release=str(info["kernel_release"]),
            packages={str(k): str(v) for k, v in info["packages"].items()},
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return image if all(p.is_file() for p in (image.disk, image.kernel, image.initrd)) else None


def _install(src_name: str, root: Path, dest: str, mode: int) -> None:
    target = root / dest.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DEBIAN_GUEST_FILES / src_name, target)
    os.chmod(target, mode)


def _symlink(root: Path, link: str, target: str) -> None:
    path = root / link.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    path.symlink_to(target)


def _configure(root: Path) -> None:
    """Turn debootstrap's tree into the guest: our files and units, redis and nginx settings, the secret."""
    (root / "etc/hostname").write_text("sealift-guest\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 sealift-guest\n")
    # The kernel mounts / read-write (root=/dev/vda rw); no fsck pass: the disk is always a fresh overlay.
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw,noatime 0 0\n")
    for script in ("sealift-net", "sealift-secret", "sealift-ready"):
        _install(script, root, f"/usr/local/sbin/{script}", 0o755)
    for unit in _OUR_UNITS:
        _install(unit, root, f"/etc/systemd/system/{unit}", 0o644)
        _symlink(root, f"/etc/systemd/system/multi-user.target.wants/{unit}", f"/etc/systemd/system/{unit}")
    for unit in _MASKED_UNITS:
        _symlink(root, f"/etc/systemd/system/{unit}", "/dev/null")
    _install("journald-sealift.conf", root, "/etc/systemd/journald.conf.d/sealift.conf", 0o644)
    _install("redis-sealift.conf", root, "/etc/redis/sealift.conf", 0o640)
    shutil.copystat(root / "etc/redis/redis.conf", root / "etc/redis/sealift.conf")
    os.chown(root / "etc/redis/sealift.conf", *_owner(root / "etc/redis/redis.conf"))
    with open(root / "etc/redis/redis.conf", "a") as conf:
        conf.write("\n# sealift (last, so its settings win)\ninclude /etc/redis/sealift.conf\n")
    _install("index.html", root, "/var/www/html/index.html", 0o644)
    secret = root / SECRET_PATH.lstrip("/")
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text(DEFAULT_SECRET + "\n")


def _owner(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid


def _strip(root: Path) -> None:
    """Remove what a server never reads (documentation, translations, apt's caches): a smaller disk."""
    for rel in _STRIPPED:
        folder = root / rel
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()


def _take_boot_files(root: Path, out: Path) -> str:
    """Move the kernel and initramfs out of the tree (QEMU boots them directly); returns the release.

    The kernel is unpacked into an ELF for PVH boot when it allows (as the
    busybox guest's: image.py pvh_vmlinux), which spares the kernel's own
    decompressor, about 5 s of a TCG boot; else the bzImage is used as is.
    """
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise DebianGuestError(f"expected one kernel in the guest's /boot, found {[k.name for k in kernels]}")
    release = kernels[0].name.removeprefix("vmlinuz-")
    initrd = root / "boot" / f"initrd.img-{release}"
    if not initrd.is_file():
        raise DebianGuestError(f"the guest has no initramfs for {release} (initramfs-tools did not run?)")
    vmlinux = pvh_vmlinux(kernels[0], root / "boot" / f"config-{release}")
    if vmlinux is not None:
        (out / _KERNEL_FILE).write_bytes(vmlinux)
    else:
        log.warning("the guest kernel cannot be unpacked for PVH boot: using the bzImage (a slower first boot)")
        shutil.copyfile(kernels[0], out / _KERNEL_FILE)
    shutil.move(initrd, out / "initrd.img")
    for leftover in (root / "boot").iterdir():
        leftover.unlink()
    for link in ("vmlinuz", "vmlinuz.old", "initrd.img", "initrd.img.old"):
        (root / link).unlink(missing_ok=True)
    return release


def _installed_versions(root: Path) -> dict[str, str]:
    text = _run(
        ["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Package} ${Version}\\n", *PACKAGES],
        "reading the guest's package versions",
    )
    return dict(line.split(" ", 1) for line in text.splitlines() if " " in line)


def _unmount_under(root: Path) -> None:
    """Detach every mount below ``root`` (deepest first), so removing the scratch never reaches the host's."""
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30, check=False)


def _debootstrap(root: Path, scratch: Path) -> tuple[float, float]:
    """Both stages of debootstrap, with the guest's dpkg and initramfs settings in between.

    Between the stages (download and unpack of the base; then dpkg in a
    chroot) go: dpkg's ``force-unsafe-io`` (no fsync per unpacked file: the
    tree becomes a disk image anyway, and on a busy host the fsyncs doubled
    the build time; removed afterwards) and ``MODULES=list`` with just the
    virtio drivers the root disk needs, so the initramfs is ~6 MB instead of
    ~15 MB (quicker to make, and to unpack in every TCG boot). Returns the
    seconds of each stage (the first is mostly downloading).
    """
    started = time.monotonic()
    mirror = _mirror()
    first = ["debootstrap", "--foreign", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root)]
    _run(
        [*first, mirror],
        f"debootstrap {SUITE} from {mirror} (it needs the Debian mirror; set SEALIFT_DEBIAN_MIRROR for another)",
        timeout=_DEBOOTSTRAP_TIMEOUT_S,
        log_path=scratch / "debootstrap-1.log",
    )
    first_done = time.monotonic()
    unsafe_io = root / "etc/dpkg/dpkg.cfg.d/sealift-build-unsafe-io"
    _write(unsafe_io, "force-unsafe-io\n")
    _write(root / "etc/initramfs-tools/conf.d/sealift", "MODULES=list\n")
    _write(root / "usr/share/initramfs-tools/modules.d/sealift", "".join(f"{m}\n" for m in _INITRAMFS_MODULES))
    try:
        _run(
            ["chroot", str(root), "/debootstrap/debootstrap", "--second-stage"],
            "debootstrap --second-stage (dpkg in the guest's tree)",
            timeout=_DEBOOTSTRAP_TIMEOUT_S,
            log_path=scratch / "debootstrap-2.log",
        )
    except DebianGuestError:
        _unmount_under(root)  # a second stage that died in its chroot may leave /proc or /sys mounted there
        raise
    unsafe_io.unlink()
    return first_done - started, time.monotonic() - first_done


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _build(key: str, scratch: Path) -> Path:
    started = time.monotonic()
    root, out = scratch / "root", scratch / "out"
    out.mkdir()
    log.info("debootstrap %s from %s (a minute or two)", SUITE, _mirror())
    first_stage_s, second_stage_s = _debootstrap(root, scratch)
    bootstrapped = time.monotonic()
    _configure(root)
    release = _take_boot_files(root, out)
    versions = _installed_versions(root)
    _strip(root)
    raw = scratch / "disk.raw"
    mkfs = ["mkfs.ext4", "-q", "-F", "-L", "sealift-root", "-E", MKFS_EXTENDED, "-d", str(root), str(raw), DISK_SIZE]
    _run(mkfs, "mkfs.ext4 -d")
    _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out / "disk.qcow2")], "qemu-img convert")
    raw.unlink()
    manifest = {
        "format": FORMAT_VERSION,
        "key": key,
        "suite": SUITE,
        "mirror": _mirror(),
        "kernel_release": release,
        "packages": versions,
        "disk_size": DISK_SIZE,
        "disk_bytes": (out / "disk.qcow2").stat().st_size,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "debootstrap_seconds": round(bootstrapped - started, 1),
        "debootstrap_first_stage_seconds": round(first_stage_s, 1),
        "debootstrap_second_stage_seconds": round(second_stage_s, 1),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    for name in ("disk.qcow2", _KERNEL_FILE, "initrd.img"):
        os.chmod(out / name, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)  # read-only: guests use overlays
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def build_debian_image(cache_dir: Path | None = None, force: bool = False) -> DebianImage:
    """The Debian guest image for the current inputs: from the cache, or built now (root; a minute or two).

    ``cache_dir`` is the guest image cache (default: default_cache_dir());
    the image goes into its ``debian/`` subdirectory. If apt cannot resolve
    the packages (offline, no lists) the last image built is used, with a
    warning; with none, the error says what failed.
    """
    where = debian_cache_dir(cache_dir)
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DebianGuestError(f"cannot create the image cache {where}: {exc}") from exc
    try:
        key = _key()
    except debian.DebianError as exc:
        previous = None if force else last_built(where, _load)
        if previous is None:
            raise DebianGuestError(f"cannot resolve the Debian guest's packages: {exc}") from exc
        log.warning("using the last built Debian guest image %s: %s", previous.key, exc)
        return previous
    if os.geteuid() != 0 and _load(where / key) is None:
        raise DebianGuestError("building the Debian guest image needs root (debootstrap, device files)")
    try:
        image, built = cached_build(where, key, _load, lambda scratch: _build(key, scratch), force=force)
    except OSError as exc:
        raise DebianGuestError(f"building Debian guest image {key} failed: {exc}") from exc
    if built:
        log.info("built Debian guest image %s in %s", key, image.dir)
    return image
