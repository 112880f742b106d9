"""Opening the files the built-in guest maps: its image and its dirty log.

Both are opened (or created) by file descriptor, checked, then handed to the
object that maps and owns them; until then a failure must not leak the
descriptor or leave a half-made file behind.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self


def open_fd(path: Path, flags: int, error: type[Exception], what: str) -> int:
    """``os.open(path, flags, 0o600)``; an OSError becomes ``error("cannot {what}: {reason}")``."""
    try:
        return os.open(path, flags, 0o600)
    except OSError as exc:
        raise error(f"cannot {what}: {exc.strerror}") from None


@contextmanager
def closed_on_failure(fd: int, remove: Path | None = None) -> Iterator[None]:
    """Around the set-up of the object that will own ``fd``: if it fails, close ``fd``
    and remove ``remove`` (a file the set-up created), then let the error through."""
    try:
        yield
    except BaseException:
        os.close(fd)
        if remove is not None:
            remove.unlink(missing_ok=True)
        raise


def unmap_and_close(mm: mmap.mmap | None, fd: int) -> None:
    """Unmap ``mm`` and close ``fd``: what closing an image or a dirty log ends with."""
    if mm is not None:
        try:
            mm.close()
        except BufferError:
            pass  # caller-held numpy views: unmapped when the last one is dropped
    os.close(fd)


class MappedFile:
    """What owns a mapped file (the image, the dirty log): ``with`` closes it."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
