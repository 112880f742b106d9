"""The operator's VM definition as it travels with a QEMU migration: vCPUs, disks and boot.

It rides inside the guest description (wire/qemu_stream.py GuestSpec,
key ``definition``), sealed and covered by the stream digest like the rest;
the destination recreates the same machine from it. Checked strictly on
arrival, as GuestSpec is: exact keys, exact types, bounded sizes, so a bug or
a hostile peer gets a ProtocolError naming the field, never a path QEMU or
qemu-img would misread (no commas, no control characters, absolute paths).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NoReturn

from .errors import ProtocolError

MAX_DISKS = 8
MAX_CPUS = 64
MAX_DISK_BYTES = 1 << 50  # 1 PiB virtual: qemu-img's own limits are far above what anyone migrates
MAX_PATH = 1024
DISK_FORMATS = ("qcow2", "raw")
_PATH = re.compile(r"/[^\x00-\x1f,]*")  # absolute; no commas (QEMU's option syntax), no control characters
_TOKEN = re.compile(r"[0-9a-f]{32}")
_DOC = "VM definition in the guest description"


def _fail(problem: str) -> NoReturn:
    raise ProtocolError(f"the {_DOC} is malformed: {problem}")


def _exact_keys(raw: object, what: str, required: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        _fail(f"{what} must be an object")
    missing, unknown = required - raw.keys(), raw.keys() - required
    if missing or unknown:
        _fail(f"{what}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
    return raw


def _path(what: str, value: object) -> str:
    if type(value) is not str or len(value) > MAX_PATH or not _PATH.fullmatch(value) or "/../" in value + "/":
        _fail(
            f"{what} must be an absolute path of at most {MAX_PATH} characters without commas, control "
            f"characters or '..', not {value!r}"
        )
    return value


@dataclass(frozen=True)
class DiskSpec:
    """One virtio-blk disk: its image on the source, and how the destination gets its own.

    A shared disk is not copied: both hosts open `path`, and `token` is the
    content of the check file the source wrote beside it for this migration
    (the destination must read the same). A copied disk is mirrored into a
    target the destination creates with the same format and virtual size,
    over the same `backing` file when there is one (then only the top layer
    travels).
    """

    path: str
    format: str
    virtual_size: int
    shared: bool
    backing: str | None = None
    token: str | None = None  # shared disks during a migration only

    def to_json(self) -> dict[str, object]:
        return {
            "path": self.path,
            "format": self.format,
            "virtual_size": self.virtual_size,
            "shared": self.shared,
            "backing": self.backing,
            "token": self.token,
        }

    def without_token(self) -> DiskSpec:
        return DiskSpec(self.path, self.format, self.virtual_size, self.shared, self.backing)

    @classmethod
    def from_json(cls, raw: object, index: int) -> DiskSpec:
        what = f"disk {index}"
        raw = _exact_keys(raw, what, {"path", "format", "virtual_size", "shared", "backing", "token"})
        fmt = raw["format"]
        if fmt not in DISK_FORMATS:
            _fail(f"{what}: format must be one of {DISK_FORMATS}, not {fmt!r}")
        size = raw["virtual_size"]
        if type(size) is not int or not 512 <= size <= MAX_DISK_BYTES or size % 512:
            _fail(f"{what}: virtual_size must be a multiple of 512 from 512 to {MAX_DISK_BYTES}, not {size!r}")
        shared = raw["shared"]
        if type(shared) is not bool:
            _fail(f"{what}: shared must be true or false")
        backing = raw["backing"]
        if backing is not None:
            backing = _path(f"{what}: backing", backing)
            if fmt != "qcow2":
                _fail(f"{what}: only a qcow2 disk has a backing file")
        token = raw["token"]
        if token is not None and (type(token) is not str or not _TOKEN.fullmatch(token)):
            _fail(f"{what}: token must be 32 lowercase hex digits")
        if token is not None and not shared:
            _fail(f"{what}: only a shared disk carries a token")
        return cls(_path(f"{what}: path", raw["path"]), fmt, size, shared, backing, token)


@dataclass(frozen=True)
class BootSpec:
    """The operator's own kernel and initramfs (instead of sealift's test image).

    Both hosts must hold the very same files at the same paths: the guest
    description's image key is then their digest (definition.boot_image).
    """

    kernel: str
    initrd: str

    def to_json(self) -> dict[str, object]:
        return {"kernel": self.kernel, "initrd": self.initrd}

    @classmethod
    def from_json(cls, raw: object) -> BootSpec:
        raw = _exact_keys(raw, "boot", {"kernel", "initrd"})
        return cls(_path("boot: kernel", raw["kernel"]), _path("boot: initrd", raw["initrd"]))


@dataclass(frozen=True)
class FirmwareBoot:
    """Firmware boot from the first disk (QEMU's ``-bios``; libvirt's ``<boot dev='hd'/>``): no -kernel.

    `firmware` is the BIOS image QEMU runs (SeaBIOS by default). Both hosts
    must hold the very same file at that path: the guest description's image
    key is then its digest (definition.boot_image), since the firmware's code
    is part of the guest memory that migrates. The kernel the guest runs lives
    on its first disk, which travels (copied) or is shared like any disk.
    """

    firmware: str

    def to_json(self) -> dict[str, object]:
        return {"firmware": self.firmware}

    @classmethod
    def from_json(cls, raw: object) -> FirmwareBoot:
        raw = _exact_keys(raw, "boot", {"firmware"})
        return cls(_path("boot: firmware", raw["firmware"]))


def _boot_from_json(raw: object) -> BootSpec | FirmwareBoot:
    """A kernel boot ({kernel, initrd}) or a firmware boot ({firmware}), told apart by their keys."""
    if isinstance(raw, dict) and "firmware" in raw:
        return FirmwareBoot.from_json(raw)
    return BootSpec.from_json(raw)


@dataclass(frozen=True)
class VmDefinition:
    """What the operator defined beyond memory and network: vCPUs, disks (in guest order), how it boots."""

    cpus: int = 1
    disks: tuple[DiskSpec, ...] = ()
    boot: BootSpec | FirmwareBoot | None = None  # None: sealift's guest image

    def to_json(self) -> dict[str, object]:
        return {
            "cpus": self.cpus,
            "disks": [disk.to_json() for disk in self.disks],
            "boot": None if self.boot is None else self.boot.to_json(),
        }

    @classmethod
    def from_json(cls, raw: object) -> VmDefinition:
        raw = _exact_keys(raw, "definition", {"cpus", "disks", "boot"})
        cpus = raw["cpus"]
        if type(cpus) is not int or not 1 <= cpus <= MAX_CPUS:
            _fail(f"cpus must be an integer from 1 to {MAX_CPUS}, not {cpus!r}")
        disks = raw["disks"]
        if not isinstance(disks, list) or len(disks) > MAX_DISKS:
            _fail(f"disks must be a list of at most {MAX_DISKS}")
        parsed = tuple(DiskSpec.from_json(disk, index) for index, disk in enumerate(disks))
        paths = [disk.path for disk in parsed]
        if len(set(paths)) != len(paths):
            _fail("two disks have the same path")
        boot = None if raw["boot"] is None else _boot_from_json(raw["boot"])
        if isinstance(boot, FirmwareBoot) and not parsed:
            _fail("a firmware boot needs a disk to boot from (disk 0)")
        return cls(cpus, parsed, boot)

    @property
    def copied(self) -> tuple[int, ...]:
        """The indexes of the disks the migration copies (not shared), in order: one disk stream each."""
        return tuple(index for index, disk in enumerate(self.disks) if not disk.shared)
