"""Helpers shared by the QEMU backend tests (a plain module: conftest fixtures cannot be imported)."""

from __future__ import annotations

import select
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sealift.backends.qemu.image import GuestImagePaths
from sealift.backends.qemu.vm import QemuVM

# The tests promise TCG (no KVM on CI machines); the backend itself would probe for KVM.
ACCEL = "tcg"


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that is free now (for a user-network port forward)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def short_tmpdir(prefix: str) -> Path:
    """A scratch directory with a short path (unix socket paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class VmPool:
    """Starts VMs and stops every one of them at the end, whatever the test did."""

    def __init__(self, image: GuestImagePaths) -> None:
        self.image = image
        self._vms: list[QemuVM] = []
        self._dirs: list[Path] = []

    def new_dir(self, prefix: str = "sl-qemu-") -> Path:
        path = short_tmpdir(prefix)
        self._dirs.append(path)
        return path

    def start(self, vm_dir: Path, name: str = "vm", memory_mib: int = 160, **kwargs: Any) -> QemuVM:
        kwargs.setdefault("accel", ACCEL)
        vm = QemuVM.start(vm_dir, name, memory_mib, self.image, **kwargs)
        self._vms.append(vm)
        return vm

    def cleanup(self) -> None:
        for vm in self._vms:
            vm.stop_vm(timeout=5.0)
        for path in self._dirs:
            shutil.rmtree(path, ignore_errors=True)


class GapProber:
    """Pings one guest address every few ms, like ping, and measures the longest silence.

    Pings go out without waiting for answers; the gap is the longest time
    between two consecutive answers (the downtime seen from outside, when the
    guest keeps its address across a migration, as on the lab's bridge).
    """

    INTERVAL_S = 0.005

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.answers = 0
        self.longest_gap_s = 0.0
        self._last: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gap-prober", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            while not self._stop.is_set():
                try:
                    sock.sendto(b"ping", self.address)
                except OSError:
                    pass  # unreachable for now: that is the gap being measured
                readable, _, _ = select.select([sock], [], [], self.INTERVAL_S)
                if readable:
                    self._drain(sock)

    def _drain(self, sock: socket.socket) -> None:
        now = time.monotonic()
        while True:
            try:
                sock.recv(256)
            except OSError:
                return  # EAGAIN: drained
            if self._last is not None:
                self.longest_gap_s = max(self.longest_gap_s, now - self._last)
            self._last = now
            self.answers += 1

    def stop(self) -> float:
        """Stop pinging; the longest gap between answers, in ms."""
        self._stop.set()
        self._thread.join(timeout=5)
        return self.longest_gap_s * 1000
