"""A QEMU test guest's memory and processes, read from the host: did the guest come through a migration whole?

The test guest's workload (backends/qemu/guest/workload.c) keeps rewriting
its working set; each page it writes holds a 64-byte stamp, eight 64-bit
words `(index << 32) ^ (counter * GOLDEN) ^ i`, followed by zeros (its pages
are anonymous memory, zeroed when first touched). A page moved by a
migration with one bit changed, anywhere in it, no longer reads as a whole
stamp: its words disagree, its index or counter does not decode, or its
tail is not zero. `check_memory` reads the guest's RAM straight from the
QEMU process (`/proc/PID/mem`, root), finds every stamped page, and
reports the whole ones (by their workload index) and the damaged ones.
A guest whose every working-set page is found whole, once each at least,
came through with that memory intact. (Other guest memory, the kernel's,
is not checked: its content is not known from outside.)

`qemu_processes` counts QEMU processes from /proc, not from what an agent
says: "exactly one QEMU runs" is checked against the machine itself.
"""

from __future__ import annotations

import os
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

__all__ = ["MemoryCheck", "check_memory", "qemu_processes", "workload_pages"]

PAGE = 4096
STAMP_WORDS = 8
STAMP_BYTES = 8 * STAMP_WORDS
GOLDEN = 0x9E3779B97F4A7C15  # workload.c's multiplier for the counter
_GOLDEN_INV_32 = pow(GOLDEN & 0xFFFFFFFF, -1, 1 << 32)  # odd, so invertible modulo 2^32
_MASK64 = (1 << 64) - 1
_ZERO_TAIL = bytes(PAGE - STAMP_BYTES)
_STAMP = struct.Struct("<8Q")
CHUNK = 8 << 20  # read the guest's RAM this much at a time
RECHECK_S = 0.2  # a page that looks damaged is read again after this: the guest may have been writing it
_MEM_MIB = re.compile(r"sealift\.mem_mib=(\d+)")


@dataclass
class MemoryCheck:
    """What the guest's RAM held: its workload pages, whole and damaged."""

    expected: int  # pages in the workload's working set
    whole: int = 0  # stamped pages whose every byte checks
    indices: set[int] = field(default_factory=set)  # the workload indices of the whole ones
    damaged: list[int] = field(default_factory=list)  # offsets in guest RAM of stamped pages that do not check
    scanned_bytes: int = 0

    @property
    def intact(self) -> bool:
        """Every page of the working set found whole, and no stamped page damaged."""
        return not self.damaged and len(self.indices) >= self.expected

    def describe(self) -> str:
        found = f"{len(self.indices)} of {self.expected} working-set pages whole"
        if self.damaged:
            where = ", ".join(f"{offset:#x}" for offset in self.damaged[:4])
            return f"{found}; {len(self.damaged)} stamped pages DAMAGED (at guest RAM offsets {where})"
        return f"{found}, none damaged ({self.scanned_bytes >> 20} MiB of guest RAM read)"


def workload_pages(cmdline: str) -> int:
    """The working set's pages for a guest started with these workload arguments (`sealift.mem_mib=N`)."""
    match = _MEM_MIB.search(cmdline)
    if match is None:
        raise ValueError(f"no sealift.mem_mib= in {cmdline!r}")
    return int(match.group(1)) * (1 << 20) // PAGE


def check_memory(pid: int, memory_bytes: int, expected_pages: int) -> MemoryCheck:
    """Scan the RAM of the QEMU process `pid` (a guest of `memory_bytes`) for the workload's stamped pages."""
    check = MemoryCheck(expected_pages)
    suspects: list[tuple[int, int]] = []  # (address in QEMU, offset in the scan) of pages to read again
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, data in _ram_chunks(pid, mem, memory_bytes):
            check.scanned_bytes += len(data)
            for offset in range(0, len(data) - PAGE + 1, PAGE):
                verdict = _page(data, offset, expected_pages)
                if verdict is None:
                    continue
                if verdict < 0:
                    suspects.append((start + offset, check.scanned_bytes - len(data) + offset))
                    continue
                check.whole += 1
                check.indices.add(verdict)
        if suspects:
            time.sleep(RECHECK_S)
        for address, offset in suspects:
            mem.seek(address)
            page = mem.read(PAGE)
            verdict = _page(page, 0, expected_pages)
            if verdict is not None and verdict < 0:
                check.damaged.append(offset)
            elif verdict is not None:
                check.whole += 1
                check.indices.add(verdict)
    return check


def _page(data: bytes, offset: int, expected_pages: int) -> int | None:
    """A page's verdict: None (not a stamped page), its workload index (whole), or -1 (a damaged stamp).

    A stamp's words agree (`word[i] ^ i` the same for all eight); one changed
    bit in a word leaves the other seven agreeing, so a page where at least
    six agree is a stamp, whole only if all eight do, its value decodes to a
    workload index and a counter (below 2^32: ticks of 10 ms), and the rest
    of the page is zero.
    """
    words = _STAMP.unpack_from(data, offset)
    bases = [word ^ i for i, word in enumerate(words)]
    value = max(set(bases), key=bases.count)
    agreeing = bases.count(value)
    if agreeing < STAMP_WORDS - 2:
        return None
    if agreeing < STAMP_WORDS or data[offset + STAMP_BYTES : offset + PAGE] != _ZERO_TAIL:
        return -1
    counter = ((value & 0xFFFFFFFF) * _GOLDEN_INV_32) & 0xFFFFFFFF
    index_bits = value ^ ((counter * GOLDEN) & _MASK64)
    index = index_bits >> 32
    if index_bits & 0xFFFFFFFF or index >= expected_pages:
        return -1
    return index


def _ram_chunks(pid: int, mem: BinaryIO, memory_bytes: int) -> Iterator[tuple[int, bytes]]:
    """The guest's RAM in QEMU's address space: its writable, non-executable mappings at least as large as the
    guest (TCG's code buffer is executable), read in chunks; (address, bytes)."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        span, perms = line.split()[:2]
        low, high = (int(part, 16) for part in span.split("-"))
        if high - low < memory_bytes or not perms.startswith("rw") or "x" in perms:
            continue
        for start in range(low, high, CHUNK):
            try:
                mem.seek(start)
                data = mem.read(min(CHUNK, high - start))
            except OSError:
                continue  # a guard page or a hole: no guest RAM there
            if data:
                yield start, data


def qemu_processes(root: Path) -> list[int]:
    """The live QEMU processes whose command line names a path under `root` (a cluster's VM folder)."""
    needle = str(root).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = (Path("/proc") / entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and any(needle in arg for arg in argv):
            found.append(int(entry))
    return found
