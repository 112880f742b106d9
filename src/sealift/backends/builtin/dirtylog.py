"""The built-in guest's dirty log: one write generation per RAM page.

File layout: ``npages`` little-endian uint32, nothing else. It lives next to
the image (``NAME.dirty``) and is created fresh for every guest process.

Protocol, the same idea as a hypervisor's dirty bitmap but without a
clear-and-fetch step:

* Only the guest writes ``gens``. It increments a page's generation before
  it writes the page's data and again after (the boot fill and every tick
  do this for the pages they write). The increment before is what a
  hardware dirty log does on the write fault: a pause that lands between the
  data write and the second increment still finds the page dirty (without
  it, a migration once lost such a page and the end-to-end image check
  caught it). The increment after covers a page the engine read while it was
  being written. Generations wrap around at 2**32; only equality matters.
* The engine never writes ``gens``. Each pre-copy round it takes
  ``snapshot()``, compares it with the generations of the copies it last
  sent, and (re)sends the pages that differ, recording the snapshot values
  as sent. A page written while the engine reads it gets a newer generation
  after the write, so it differs next round and is sent again.
* Because there is a single writer, there is no read-modify-write race
  between guest and engine. x86 keeps stores in order, and the final
  stop-and-copy round runs with the guest stopped (SIGSTOP), so that round
  sees every increment made before the stop.
* Generation 0 means "not written since this log was created", which is
  why the engine's first round sends every non-zero page, not only the ones
  with a non-zero generation.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from sealift.backends.builtin.files import MappedFile, closed_on_failure, open_fd, unmap_and_close

__all__ = ["DirtyLog", "DirtyLogError", "GEN_DTYPE"]

GEN_DTYPE = np.dtype("<u4")


class DirtyLogError(Exception):
    """A dirty log is missing or does not match its image."""


class DirtyLog(MappedFile):
    """A mapped dirty log. Build with :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, fd: int, npages: int) -> None:
        self.path = path
        self._fd = fd
        self.npages = npages
        self._mm: mmap.mmap | None = mmap.mmap(
            fd, npages * GEN_DTYPE.itemsize, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        self._gens: np.ndarray | None = np.frombuffer(self._mm, dtype=GEN_DTYPE, count=npages)

    @classmethod
    def create(cls, path: Path | str, npages: int) -> DirtyLog:
        """Create a zeroed log, replacing any old one atomically.

        The new file is renamed over the old path rather than truncated in
        place, so a process still mapping the old log never faults (SIGBUS).
        """
        path = Path(path)
        if npages < 1:
            raise DirtyLogError(f"a dirty log needs at least one page, got {npages}")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = open_fd(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, DirtyLogError, f"create dirty log {path}")
        with closed_on_failure(fd, remove=tmp):
            os.ftruncate(fd, npages * GEN_DTYPE.itemsize)
            os.replace(tmp, path)
            return cls(path, fd, npages)

    @classmethod
    def open(cls, path: Path | str, npages: int) -> DirtyLog:
        path = Path(path)
        fd = open_fd(path, os.O_RDWR | os.O_CLOEXEC, DirtyLogError, f"open dirty log {path}")
        with closed_on_failure(fd):
            size = os.fstat(fd).st_size
            if npages < 1 or size != npages * GEN_DTYPE.itemsize:
                raise DirtyLogError(
                    f"dirty log {path} is {size} bytes but the image has {npages} pages "
                    f"({npages * GEN_DTYPE.itemsize} bytes expected); it belongs to another image"
                )
            return cls(path, fd, npages)

    @property
    def gens(self) -> np.ndarray:
        """The live generations (uint32, one per page). Only the guest writes them."""
        if self._gens is None:
            raise DirtyLogError(f"dirty log {self.path} is closed")
        return self._gens

    def snapshot(self) -> np.ndarray:
        """A private copy of the generations, as of now."""
        return self.gens.copy()

    def close(self) -> None:
        """Unmap and close. Idempotent. Arrays a caller still holds keep the mapping alive."""
        if self._gens is None:
            return
        self._gens = None
        mm, self._mm = self._mm, None
        unmap_and_close(mm, self._fd)
