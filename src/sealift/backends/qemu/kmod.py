"""Kernel modules for the guest's initramfs: which to take, and in which order to load them.

A Debian kernel package ships its modules without ``modules.dep`` (depmod
runs at install time, which we skip), so dependencies are read from each
module's own ``.modinfo`` ELF section (``depends=a,b``), the same data
depmod uses. Loading then follows a dependency-first order, because
busybox ``insmod`` loads exactly one file and resolves nothing.
"""

from __future__ import annotations

import lzma
import re
import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KernelModule", "ModuleError", "config_value", "module_bytes", "module_index", "modules_to_load"]


class ModuleError(Exception):
    """A kernel module or the kernel configuration is missing or unreadable."""


@dataclass(frozen=True)
class KernelModule:
    name: str  # the module's name, with underscores (as the kernel and depends= spell it)
    path: Path
    depends: tuple[str, ...]


def config_value(config: Path, symbol: str) -> str | None:
    """``y``, ``m``, another value, or None when ``symbol`` (e.g. CONFIG_VIRTIO_NET) is unset."""
    prefix = symbol + "="
    for line in config.read_text().splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].strip('"')
    return None


def module_bytes(path: Path) -> bytes:
    """The module's ELF image (xz-compressed modules, as newer Debian kernels ship, are unpacked)."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko"):
        return data
    raise ModuleError(f"{path.name}: unsupported module compression (only .ko and .ko.xz are handled)")


def _modinfo(elf: bytes, what: str) -> dict[str, str]:
    """Key/value strings of the ELF64 little-endian ``.modinfo`` section."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ModuleError(f"{what}: not a 64-bit little-endian ELF module")
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", elf, shoff + index * shentsize)
        return name, offset, size

    _, names_offset, _ = section(shstrndx)
    for index in range(shnum):
        name_at, offset, size = section(index)
        name_end = elf.index(b"\0", names_offset + name_at)
        if elf[names_offset + name_at : name_end] == b".modinfo":
            info: dict[str, str] = {}
            for entry in elf[offset : offset + size].split(b"\0"):
                key, sep, value = entry.partition(b"=")
                if sep:
                    info.setdefault(key.decode("ascii", "replace"), value.decode("utf-8", "replace"))
            return info
    raise ModuleError(f"{what}: no .modinfo section")


def _module_name(path: Path) -> str:
    stem = re.sub(r"\.ko(\.xz)?$", "", path.name)
    return stem.replace("-", "_")


def module_index(modules_root: Path) -> dict[str, Path]:
    """Every module under ``lib/modules/<version>/kernel``, by module name."""
    index: dict[str, Path] = {}
    for path in modules_root.rglob("*.ko*"):
        if path.is_file() and re.search(r"\.ko(\.xz|\.zst|\.gz)?$", path.name):
            index[_module_name(path)] = path
    if not index:
        raise ModuleError(f"no kernel modules under {modules_root}")
    return index


def modules_to_load(wanted: list[str], index: dict[str, Path]) -> list[KernelModule]:
    """``wanted`` and everything they depend on, each after its dependencies."""
    ordered: list[KernelModule] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str, needed_by: str) -> None:
        if name in done:
            return
        if name in visiting:
            raise ModuleError(f"module dependency cycle through {name}")
        path = index.get(name)
        if path is None:
            raise ModuleError(f"module {name} (needed by {needed_by}) is not in the kernel package")
        visiting.add(name)
        info = _modinfo(module_bytes(path), path.name)
        depends = tuple(dep for dep in info.get("depends", "").split(",") if dep)
        for dep in depends:
            visit(dep, name)
        visiting.discard(name)
        done.add(name)
        ordered.append(KernelModule(name, path, depends))

    for name in wanted:
        visit(name, "the guest")
    return ordered
