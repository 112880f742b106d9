"""Helpers for the processes the backends run their guests in (the built-in guest, QEMU).

Both backends find their guest process again by its command line, read the
end of its log and console files, and poll until it has reached some state.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


def proc_cmdline(pid: int) -> list[str]:
    """The arguments of process ``pid`` (from /proc/PID/cmdline); empty if it is gone or not ours to read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [arg.decode("utf-8", "surrogateescape") for arg in raw.split(b"\0") if arg]


def file_tail(path: Path, limit: int, unreadable: bytes = b"") -> bytes:
    """The last ``limit`` bytes of ``path``; ``unreadable`` if the file cannot be read (e.g. not written yet)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read()
    except OSError:
        return unreadable


def wait_until(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.05, max_interval: float | None = None
) -> bool:
    """Poll ``predicate`` until true (True) or ``timeout`` passes (False).

    It sleeps ``interval`` between polls; with ``max_interval``, each pause doubles
    up to that, so a state reached at once is seen at once without a busy loop.
    """
    deadline = time.monotonic() + timeout
    longest = interval if max_interval is None else max_interval
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
        interval = min(interval * 2, longest)
