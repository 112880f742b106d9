"""A minimal writer for the kernel's initramfs format (cpio "newc", uncompressed).

Written here rather than with the ``cpio`` tool so the image needs no extra
package and is reproducible: every entry has mtime 0, uid/gid 0 and a
fixed inode sequence, so the same inputs give the same bytes. Uncompressed,
because under TCG the kernel would spend longer inflating the archive than
the extra megabytes cost in RAM.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["CpioEntry", "write_cpio"]

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    path: str  # relative, no leading slash: "bin/busybox"
    mode: int  # full st_mode: type bits | permissions
    data: bytes = b""  # file content, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)  # (major, minor) for device nodes

    @classmethod
    def directory(cls, path: str) -> CpioEntry:
        return cls(path, stat.S_IFDIR | 0o755)

    @classmethod
    def file(cls, path: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        return cls(path, stat.S_IFREG | perm, data)

    @classmethod
    def char_device(cls, path: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return cls(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad(out: BinaryIO, length: int) -> None:
    out.write(b"\0" * (-length % 4))


def _write_entry(out: BinaryIO, inode: int, entry: CpioEntry) -> None:
    name = entry.path.encode() + b"\0"
    fields = [
        inode,
        entry.mode,
        0,  # uid
        0,  # gid
        2 if stat.S_ISDIR(entry.mode) else 1,  # nlink
        0,  # mtime: fixed, for reproducible images
        len(entry.data),
        0,  # dev major
        0,  # dev minor
        entry.rdev[0],
        entry.rdev[1],
        len(name),
        0,  # check (unused by newc)
    ]
    header = _MAGIC + b"".join(b"%08X" % value for value in fields)
    out.write(header + name)
    _pad(out, len(header) + len(name))
    out.write(entry.data)
    _pad(out, len(entry.data))


def write_cpio(out: BinaryIO, entries: list[CpioEntry]) -> None:
    """Write ``entries`` (parents before children) and the trailer."""
    for inode, entry in enumerate(entries, start=1):
        _write_entry(out, inode, entry)
    _write_entry(out, 0, CpioEntry(_TRAILER, 0))
