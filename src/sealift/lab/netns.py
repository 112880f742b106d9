"""Network namespaces from Python: run a command in one, or make sockets in one.

A network namespace is a property of a thread, and a socket belongs to the
namespace it was created in for its whole life. So a thread can step into a
namespace, create a socket there, step back, and keep using the socket: the
lab's attacker relay listens and connects inside the attacker's namespace
while it runs in the lab's own process.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sealift.errors import SealiftError

__all__ = ["NetnsError", "enter_netns", "netns_argv", "netns_exists", "run_in"]

NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


class NetnsError(SealiftError):
    """A namespace is missing, or a command inside one failed."""

    code = "netns_error"


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_argv(name: str | None, argv: Sequence[str]) -> list[str]:
    """`argv` run inside namespace `name` (unchanged when `name` is None)."""
    return ["ip", "netns", "exec", name, *argv] if name else list(argv)


def run_in(
    name: str | None, argv: Sequence[str], timeout: float = 20.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(netns_argv(name, argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        where = f" in {name}" if name else ""
        raise NetnsError(f"`{' '.join(argv)}`{where} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise NetnsError(f"setns failed: {os.strerror(errno)}")


@contextmanager
def enter_netns(name: str | None) -> Iterator[None]:
    """Run the body with the calling thread inside namespace `name` (no-op for None)."""
    if name is None:
        yield
        return
    try:
        target = os.open(NETNS_DIR / name, os.O_RDONLY)
    except FileNotFoundError:
        raise NetnsError(f"network namespace {name!r} does not exist") from None
    home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)
